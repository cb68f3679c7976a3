"""linear accepts MergeKit's int8_mask (written by its evolutionary merge) as an inert parameter."""

from __future__ import annotations

import pytest
import torch

from transfuse import merge_state_dicts
from transfuse.errors import ParameterError
from transfuse.methods import get_method


def test_int8_mask_is_inert_for_linear():
    spec = get_method("linear")
    assert spec.param("int8_mask").inert and spec.defaults()["int8_mask"] is False
    g = torch.Generator().manual_seed(0)
    models = [{"w": torch.randn(3, 4, generator=g)} for _ in range(2)]
    plain = merge_state_dicts(None, models, "linear", weight=[0.3, 0.7])
    masked = merge_state_dicts(None, models, "linear", weight=[0.3, 0.7], int8_mask=True)
    assert torch.equal(plain["w"], masked["w"])
    with pytest.raises(ParameterError, match="int8_mask"):
        merge_state_dicts(None, models, "linear", int8_mask="yes please")
