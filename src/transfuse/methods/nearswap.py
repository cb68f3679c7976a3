"""NearSwap: take the other model's value only where it is already close to the base."""

from __future__ import annotations

from torch import Tensor

from transfuse.methods.registry import ParamSpec, register

T = ParamSpec(
    "t",
    float,
    None,
    "similarity threshold: entries that differ by at most t take the model's value, farther ones move t/|diff| "
    "of the way (0 = the base)",
    low=0.0,
)


@register(
    "nearswap",
    params=(T,),
    paper="alchemonaut, NearSwap (QuartetAnemoi-70B-t0.0001 model card, "
    "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001), as implemented by MergeKit",
    min_models=1,
    max_models=1,
    mergekit_name="nearswap",
)
def nearswap(base: Tensor, deltas: Tensor, weights: Tensor, *, t: float) -> Tensor:
    """NearSwap: interpolate each entry toward the model by ``t`` over their distance.

    a = base, b = base + delta; s = clip(t / max(|a - b|, 1e-6), 0, 1) per entry; merged = s b + (1 - s) a.
    Entries within ``t`` of each other take the model's value; farther ones move only ``t`` toward it, so
    ``t -> 0`` gives the base and large ``t`` the model.  ``weights`` are ignored, as in MergeKit.
    Overwrites ``deltas``.

    alchemonaut, NearSwap (QuartetAnemoi-70B-t0.0001).  MergeKit: ``nearswap``.
    """
    delta = deltas[0]
    share = delta.abs().clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(0, 1)
    other = base + delta
    return share * other + (1 - share) * base
