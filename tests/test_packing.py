"""Packed-layout helpers."""

import pytest
import torch

from vhack.packing import offsets_from_sizes, pack_blocks, pack_vectors


def test_offsets_and_pack_vectors():
    assert offsets_from_sizes([3, 0, 2]).tolist() == [0, 3, 3, 5]
    assert offsets_from_sizes([]).tolist() == [0]
    flat, offsets = pack_vectors([torch.ones(2), torch.zeros(3, dtype=torch.float64)])
    assert flat.tolist() == [1, 1, 0, 0, 0] and flat.dtype == torch.float32
    assert offsets.dtype == torch.int64 and offsets.tolist() == [0, 2, 5]
    with pytest.raises(ValueError, match="1-D"):
        pack_vectors([torch.ones(2, 2)])
    with pytest.raises(ValueError, match="at least one"):
        pack_vectors([])


def test_pack_blocks_row_major_with_absent_modules():
    a = torch.arange(6.0).reshape(2, 3)
    b = torch.arange(4.0).reshape(1, 4)
    basis, offs, ks = pack_blocks([a, None, b], [3, 5, 4])
    assert basis.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert offs.tolist() == [0, 6, 6, 10] and ks.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"block 0 must be \[k, 4\]"):
        pack_blocks([a], [4])
    empty, offs, ks = pack_blocks([None], [3])
    assert empty.numel() == 0 and ks.tolist() == [0]
