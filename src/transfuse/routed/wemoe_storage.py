"""What a WEMoE model costs to store, in closed form (``routed_storage(model)`` counts a built model's bytes).

With N parameters stored in b bytes each, R of them routed (the blocks' parameters), B blocks whose routers read
H-wide inputs through L layers, and K tasks (task vectors and routers in float32):

- shared = ``N*b`` (the merged module, holding the blocks' base weights) + ``4*B*(L-1)*(H*H + H)`` (the routers'
  hidden layers, shared by every task);
- per task = ``4*R`` (its task vectors of the routed tensors) + ``4*B*(H + 1)`` (its row of each router's output
  layer and its bias; ``4*B`` when L = 0);
- K full experts = ``K*N*b``.

Adding a task costs ``4*R + 4*B*(H + 1)`` bytes instead of ``N*b``.
"""

from __future__ import annotations

from transfuse.errors import ParameterError
from transfuse.routed.storage import RoutedStorage


def wemoe_storage_estimate(
    num_params: int,
    routed_params: int,
    num_blocks: int,
    router_in_features: int,
    num_tasks: int,
    *,
    router_layers: int = 2,
    bytes_per_param: int = 4,
) -> RoutedStorage:
    """WEMoE's storage for `num_tasks` experts of a model of `num_params` parameters, `routed_params` of them in
    `num_blocks` routed blocks whose routers read `router_in_features`-wide inputs (formulas: module docstring)."""
    counts = (num_params, num_blocks, router_in_features, num_tasks, bytes_per_param)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise ParameterError(
            "num_params, num_blocks, router_in_features, num_tasks and bytes_per_param must be integers >= 1"
        )
    if (
        isinstance(routed_params, bool)
        or not isinstance(routed_params, int)
        or not 1 <= routed_params <= num_params
    ):
        raise ParameterError(f"routed_params must be an integer in [1, num_params], got {routed_params!r}")
    if isinstance(router_layers, bool) or not isinstance(router_layers, int) or router_layers < 0:
        raise ParameterError(f"router_layers must be an integer >= 0, got {router_layers!r}")
    h = router_in_features
    hidden = num_blocks * max(router_layers - 1, 0) * (h * h + h) * 4
    row = num_blocks * ((h if router_layers > 0 else 0) + 1) * 4
    per_task = 4 * routed_params + row
    return RoutedStorage(
        method="wemoe",
        shared_bytes=num_params * bytes_per_param + hidden,
        task_bytes={f"task{i}": per_task for i in range(num_tasks)},
        full_experts_bytes=num_tasks * num_params * bytes_per_param,
    )
