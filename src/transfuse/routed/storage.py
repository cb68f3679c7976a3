"""What a routed model costs to store: the shared part, each task's part, and K full experts for comparison.

For EMR-Merging with N routed parameters stored in b bytes each and K tasks:
shared = N*b (the base) + 4N (``tau_uni`` in float32); per task = ceil(N/8) (the mask, 1 bit per entry) + 4 (the
float32 rescaler); K full experts = K*N*b.  Adding a task costs ceil(N/8) + 4 bytes instead of N*b.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from transfuse.routed.bitpack import packed_size
from transfuse.routed.model import RoutedModel


@dataclass(frozen=True)
class RoutedStorage:
    """Bytes of a routed model's shared part and of each task's part, against keeping K full experts."""

    method: str
    shared_bytes: int
    task_bytes: dict[str, int]
    full_experts_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.shared_bytes + sum(self.task_bytes.values())

    @property
    def ratio_to_full_experts(self) -> float:
        """Total bytes / the bytes of K full experts."""
        return self.total_bytes / self.full_experts_bytes


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def routed_storage(model: RoutedModel) -> RoutedStorage:
    """The bytes `model`'s tensors take (as ``save_routed`` writes them, headers aside)."""
    base = model.module.state_dict()
    unique = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t for t in base.values()}
    base_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    return RoutedStorage(
        method=model.method,
        shared_bytes=base_bytes + _nbytes(model.parts.shared_tensors()),
        task_bytes={task: _nbytes(model.parts.task_tensors(task)) for task in model.tasks},
        full_experts_bytes=len(model.tasks) * base_bytes,
    )


def emr_storage_estimate(num_params: int, num_tasks: int, *, bytes_per_param: int = 4) -> RoutedStorage:
    """EMR's storage for `num_tasks` experts of a model of `num_params` parameters (all routed), weights stored
    in `bytes_per_param` bytes (4: float32, 2: bf16)."""
    if num_params < 1 or num_tasks < 1 or bytes_per_param < 1:
        raise ValueError("num_params, num_tasks and bytes_per_param must be >= 1")
    per_task = packed_size(num_params) + 4
    return RoutedStorage(
        method="emr",
        shared_bytes=num_params * bytes_per_param + 4 * num_params,
        task_bytes={f"task{i}": per_task for i in range(num_tasks)},
        full_experts_bytes=num_tasks * num_params * bytes_per_param,
    )
