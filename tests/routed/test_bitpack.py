"""Masks at 1 bit per entry: sizes, bit order (against a loop) and round trips."""

from __future__ import annotations

import pytest
import torch

from transfuse.routed.bitpack import _pack_torch, _unpack_torch, pack_bits, packed_size, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (2, 3, 4), (0,), (17, 1)])
def test_round_trip_and_size(shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    mask = torch.rand(shape, generator=g) > 0.5
    packed = pack_bits(mask)
    n = mask.numel()
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,) == (packed_size(n),)
    assert torch.equal(unpack_bits(packed, shape), mask)
    # the torch version (used off the CPU) writes and reads the same bytes
    assert torch.equal(_pack_torch(mask.reshape(-1)), packed)
    assert torch.equal(_unpack_torch(packed, n).view(shape), mask)


def test_bit_order_and_zero_padding_match_a_loop():
    mask = torch.tensor([True, False, True, True, False, False, False, True, True, False, True])
    want = []
    for start in range(0, 11, 8):
        byte = 0
        for j, bit in enumerate(mask[start : start + 8].tolist()):
            byte |= int(bit) << j  # entry 8b + j is bit j of byte b
        want.append(byte)
    assert pack_bits(mask).tolist() == _pack_torch(mask).tolist() == want == [0b10001101, 0b101]


def test_wrong_inputs_are_refused():
    with pytest.raises(TypeError, match="bool"):
        pack_bits(torch.ones(3))
    with pytest.raises(ValueError, match="packs into 2"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), (3, 3))
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int32), (3, 3))
