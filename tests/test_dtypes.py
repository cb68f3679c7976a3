"""The one table of output dtype names."""

from __future__ import annotations

import pytest
import torch

from transfuse.dtypes import DTYPE_NAMES, torch_dtype


def test_every_name_is_a_floating_torch_dtype_of_that_name():
    for name in DTYPE_NAMES:
        dtype = torch_dtype(name)
        assert isinstance(dtype, torch.dtype) and dtype.is_floating_point
        assert str(dtype) == f"torch.{name}"
    assert len(set(map(torch_dtype, DTYPE_NAMES))) == len(DTYPE_NAMES)


@pytest.mark.parametrize("name", ["bf16", "float", "int8", "Float32", ""])
def test_other_names_are_refused_with_the_list(name):
    with pytest.raises(ValueError, match="float32, float16, bfloat16, float64"):
        torch_dtype(name)
