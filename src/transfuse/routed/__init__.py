"""Routed (task-conditioned) models: a shared module plus small per-task parts, run with a task per example.

- :mod:`transfuse.routed.model`: ``RoutedModel`` (grouping a mixed-task batch, materialising one task's
  parameters at a time) and the ``TaskParts`` protocol a method implements;
- :mod:`transfuse.routed.emr`: EMR-Merging's math and its builder ``emr_merge``;
- :mod:`transfuse.routed.wemoe`: WEMoE's weight ensembling, routed blocks and builder ``wemoe_merge``;
  :mod:`transfuse.routed.wemoe_train` its router training, :mod:`transfuse.routed.wemoe_storage` its bytes;
- :mod:`transfuse.routed.twin`: Twin-Merging's shared expert, compressed exclusive knowledge and builder
  ``twin_merge``; :mod:`transfuse.routed.twin_train` its router training;
- :mod:`transfuse.routed.store`: the on-disk format, ``save_routed`` and ``load``;
- :mod:`transfuse.routed.storage`: bytes of the shared and per-task parts against K full experts;
- :mod:`transfuse.routed.bitpack`: masks at 1 bit per entry.
"""

from __future__ import annotations

from transfuse._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "RoutedModel": "model",
        "TaskParts": "model",
        "EMRParts": "emr",
        "emr_merge": "emr",
        "save_routed": "store",
        "load": "store",
        "RoutedStorage": "storage",
        "routed_storage": "storage",
        "emr_storage_estimate": "storage",
        "WEMoEParts": "wemoe",
        "feed_forward_blocks": "wemoe",
        "wemoe_merge": "wemoe",
        "WEMoETraining": "wemoe_train",
        "train_wemoe_router": "wemoe_train",
        "wemoe_storage_estimate": "wemoe_storage",
        "TwinParts": "twin",
        "twin_merge": "twin",
        "TwinRouterTraining": "twin_train",
        "train_twin_router": "twin_train",
        "router_accuracy": "twin_train",
    },
)

__all__ = [
    "EMRParts",
    "RoutedModel",
    "RoutedStorage",
    "TaskParts",
    "TwinParts",
    "TwinRouterTraining",
    "WEMoEParts",
    "WEMoETraining",
    "emr_merge",
    "emr_storage_estimate",
    "feed_forward_blocks",
    "load",
    "routed_storage",
    "router_accuracy",
    "save_routed",
    "train_twin_router",
    "train_wemoe_router",
    "twin_merge",
    "wemoe_merge",
    "wemoe_storage_estimate",
]
