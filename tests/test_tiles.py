"""Tile plans of the tensor-core CUDA forward, checked on the host: every pair
of the layout is in exactly one chunk of one pass, and nothing else is."""

import numpy as np
import pytest
import torch

from sparse_attention import build_layout
from sparse_attention._native import C
from sparse_attention._tiles import TILE, build_tile_plan

PATTERNS = ["dense", "axial", "block", "longformer", "strided", "random"]
SIZES = [(1, 1), (1, 17), (9, 1), (7, 13), (33, 35), (20, 70), (64, 64)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_plan_covers_every_pair_once(pattern, size):
    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, num_global_tokens=2,
                          attention_ratio=0.3)
    plan = build_tile_plan(layout)
    n = layout.num_tokens
    queries, keys = zip(*(one.pairs() for one in plan))
    got = np.sort(np.concatenate(queries).astype(np.int64) * n + np.concatenate(keys))
    expected = np.sort(layout.row_ids() * n + layout.indices)
    np.testing.assert_array_equal(got, expected)  # no pair missing, none twice, none extra
    for one in plan:
        assert one.queries.shape[1] == TILE and one.keys.shape[1] == TILE
        assert one.chunk_ptr[0] == 0 and one.chunk_ptr[-1] == one.num_chunks
        assert np.all(np.diff(one.chunk_ptr) >= 0)
        # every token is in exactly one tile of every pass (the first pass writes all rows)
        tokens = np.sort(one.queries[one.queries >= 0])
        np.testing.assert_array_equal(tokens, np.arange(n))
        # a chunk's keys ascend, padding (-1) only at its end, no bits on padding
        for chunk_keys, words in zip(one.keys, one.masks.view(np.uint64)):
            real = chunk_keys[chunk_keys >= 0]
            assert np.all(np.diff(real) > 0) and np.all(chunk_keys[real.size:] == -1)
            if real.size < TILE:
                assert not np.any(words >> np.uint64(real.size))


def test_axial_splits_into_row_and_column_passes_without_waste():
    layout = build_layout("axial", 64, 64)
    plan = build_tile_plan(layout)
    assert [one.shape for one in plan] == [(1, 64), (64, 1)]
    used = sum(one.num_chunks for one in plan) * TILE * TILE
    assert layout.nnz / used > 0.99


def test_block_tiles_are_the_blocks():
    layout = build_layout("block", 32, 32, block_size=8)
    plan = build_tile_plan(layout)
    assert len(plan) == 1 and plan[0].shape == (8, 8) and plan[0].num_chunks == 16
    assert np.all(plan[0].masks == -1)  # all 64 x 64 bits set


def test_no_plan_for_layouts_past_the_limits():
    assert build_tile_plan(build_layout("dense", 128, 128)) is None


def test_tile_plan_arguments_are_refused_on_the_cpu():
    layout = build_layout("block", 4, 4, block_size=2)
    plan = build_tile_plan(layout)[0]
    q = torch.randn(1, 1, 16, 8)
    arrays = [torch.from_numpy(a.copy()) for a in (plan.queries, plan.chunk_ptr, plan.keys, plan.masks)]
    with pytest.raises(ValueError, match="CUDA"):
        C.attention_forward(q, q, q, torch.empty_like(q), torch.empty(1, 1, 16),
                            torch.from_numpy(layout.indptr.copy()), torch.from_numpy(layout.indices.copy()),
                            height=4, width=4, scale=0.3, tile_queries=arrays[0],
                            tile_chunk_ptr=arrays[1], chunk_keys=arrays[2], chunk_masks=arrays[3])
    with pytest.raises(ValueError, match="all four"):
        C.attention_forward(q, q, q, torch.empty_like(q), torch.empty(1, 1, 16),
                            torch.from_numpy(layout.indptr.copy()), torch.from_numpy(layout.indices.copy()),
                            height=4, width=4, scale=0.3, chunk_keys=arrays[2])
    with pytest.raises(ValueError, match="merge_previous"):
        C.attention_forward(q, q, q, torch.empty_like(q), torch.empty(1, 1, 16),
                            torch.from_numpy(layout.indptr.copy()), torch.from_numpy(layout.indices.copy()),
                            height=4, width=4, scale=0.3, merge_previous=True)
