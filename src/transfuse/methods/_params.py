"""Parameter specs shared by the task-arithmetic family (task arithmetic, TIES, DARE, Breadcrumbs, DELLA, MagMax).

One definition per parameter, so that every method that accepts ``density`` or ``lambda`` validates and documents
it the same way (MergeKit's names and defaults), and ``per_model_values``, which reads a per-model parameter back
as the decimals the recipe wrote.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from transfuse.methods.registry import ParamSpec

DENSITY = ParamSpec(
    "density", float, 1.0, "fraction of each task vector's entries kept", per_model=True, low=0.0, high=1.0
)
NORMALIZE_FALSE = ParamSpec("normalize", bool, False, "divide the summed task vectors by the sum of weights")
NORMALIZE_TRUE = ParamSpec("normalize", bool, True, "divide the summed task vectors by the sum of weights")
LAMBDA = ParamSpec("lambda", float, 1.0, "global scale of the merged task vector")
INT8_MASK = ParamSpec(
    "int8_mask",
    bool,
    False,
    "accepted for MergeKit recipes, no effect: MergeKit stores its sign-agreement mask as int8 instead of the "
    "compute dtype (memory only, same result); transfuse never materializes that mask (the sign election is "
    "applied per chunk as clamp bounds)",
    inert=True,
)
RESCALE_FALSE = ParamSpec(
    "rescale", bool, False, "rescale each sparsified task vector to its original L1 norm"
)
RESCALE_TRUE = ParamSpec("rescale", bool, True, "rescale each sparsified task vector (see rescale_mode)")
RESCALE_MODE = ParamSpec(
    "rescale_mode",
    str,
    "l1",
    "l1: match the task vector's L1 norm (MergeKit); inverse_density: divide kept entries by their keep "
    "probability (the paper)",
    choices=("l1", "inverse_density"),
)
SIGN_ELECTION = ParamSpec(
    "sign_election",
    str,
    "weighted",
    "weighted: elect the sign of sum(w_i*tau_i) (MergeKit); unweighted: elect the sign of sum(tau_i), "
    "weights applied after (original TIES code)",
    choices=("weighted", "unweighted"),
)
GAMMA = ParamSpec(
    "gamma",
    float,
    0.01,
    "fraction of largest-magnitude entries removed as outliers",
    per_model=True,
    low=0.0,
    high=1.0,
)
EPSILON = ParamSpec(
    "epsilon",
    float,
    0.15,
    "half-width of the keep-probability range density +/- epsilon (must stay inside (0, 1))",
    per_model=True,
    low=0.0,
    high=1.0,
)


def per_model_values(values: Tensor) -> list[float]:
    """Python floats of a ``[K]`` per-model parameter, as the decimals the recipe wrote.

    MergeKit computes ``int(density * n)`` with the recipe's Python float; the float32 copy of 0.7 is
    0.69999999 and would keep one entry fewer.  The shortest decimal that round-trips the float32 value
    recovers what the user wrote (up to ~7 significant digits).
    """
    if values.dtype == torch.float32:
        return [float(str(np.float32(v))) for v in values.tolist()]
    return [float(v) for v in values.tolist()]
