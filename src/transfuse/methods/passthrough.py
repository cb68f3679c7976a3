"""Passthrough: copy one model's tensors unchanged (optionally scaled): the building block of frankenmerges."""

from __future__ import annotations

from torch import Tensor

from transfuse.methods.registry import ParamSpec, register

SCALE = ParamSpec(
    "scale", float, 1.0, "multiply the tensor by this (e.g. per-filter damping of o_proj)", per_model=True
)


@register(
    "passthrough",
    params=(SCALE,),
    paper="Goddard et al., Arcee's MergeKit: A Toolkit for Merging Large Language Models, EMNLP 2024 Industry "
    "(arXiv:2403.13257); used for layer-stacking 'frankenmerges' such as SOLAR's depth up-scaling (Kim et al., "
    "arXiv:2312.15166)",
    min_models=1,
    max_models=1,
    needs_base=False,
    mergekit_name="passthrough",
    identity_param="scale",
)
def passthrough(base: Tensor, deltas: Tensor, weights: Tensor, *, scale: Tensor) -> Tensor:
    """Passthrough: the single input tensor, times its ``scale``.

    merged = scale * (base + tau_1)   (without a base the one model is its own reference, so tau_1 = 0)

    With ``slices:`` each output layer range is copied from one model's layer range, so stacking slices builds
    a deeper model.  ``weight`` is accepted and ignored, as in MergeKit.  A tensor with ``scale`` 1 kept in
    its own dtype never reaches this function: the plan copies its bytes (``identity_param``).  MergeKit:
    ``passthrough``.
    """
    out = deltas[0].add_(base)  # the work buffer is ours (see the method contract)
    return out.mul_(scale[0]) if float(scale[0]) != 1.0 else out
