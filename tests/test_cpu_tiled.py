"""The CPU forward over tile plans (csrc/attention_cpu_tiled.c, float32)
against the float64 reference and the row-by-row kernel."""

import numpy as np
import pytest
import torch

from reference import random_inputs as make
from reference import (assert_backward_matches_reference, assert_bias_gradients_match_reference,
                       assert_forward_matches_reference, bias_gradients, bias_training_inputs, call_with,
                       reference_attention, reference_statistics)
from sparse_attention import _stencil, _tiles, _torch_ops, build_layout, get_num_threads, set_num_threads
from sparse_attention import sparse_scaled_dot_product_attention as attention
from sparse_attention._native import C

PATTERNS = ["dense", "axial", "block", "longformer", "strided", "random"]


@pytest.fixture(autouse=True)
def every_plan_takes_the_tiled_path(monkeypatch):
    """The kernel itself is under test here, also for sparse chunks that the
    fill threshold would otherwise send to the row kernel, and for the layouts
    that the stencil kernels would otherwise take."""
    monkeypatch.setattr(_tiles, "CPU_MIN_FILL", 0.0)
    monkeypatch.setattr(_stencil, "use_stencil_cpu_kernel", False)
SIZES = [(1, 1), (1, 17), (9, 1), (7, 13), (33, 35), (20, 70)]


def rows_kernel(*args, **kwargs):
    return call_with(_tiles, "use_tiled_cpu_kernel", False, attention, *args, **kwargs)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_against_reference_and_row_kernel(pattern, size):
    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, num_global_tokens=2,
                          attention_ratio=0.3)
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, 20)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(2)) > 0.25
    active = torch.tensor([True, False, True])
    args = dict(key_mask=key_mask, head_active=active, dropout_p=0.2, dropout_seed=7)
    out, lse = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), **args,
                         return_lse=True)
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout,
                                              bias=bias.float(), **args)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    rows = rows_kernel(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), **args)
    torch.testing.assert_close(out, rows, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dim", [16, 40, 256])
@pytest.mark.parametrize("pattern", ["random", "dense"])
def test_key_panels_kept_across_tiles(pattern, dim):
    """Plans whose tiles read many chunks keep each (batch, head)'s packed key
    panels across tiles (the cache holds 64 panels at D = 16, 16 at D = 256):
    rows read where they lie (D a multiple of 8) and rows copied, several
    (batch, head) whose chunks share key ids, a key mask, any thread count."""
    layout = build_layout(pattern, 33, 35, attention_ratio=0.4)
    n = layout.num_tokens
    (q, k, v), _ = make(2, 3, n, dim)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(5)) > 0.2
    # no bias and no statistics: these plans also take the shift from the raw scores
    args = dict(key_mask=key_mask, dropout_p=0.2, dropout_seed=7, head_active=torch.tensor([True, False, True]))
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout, **args)
    before = get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            set_num_threads(threads)
            out, lse = attention(q.float(), k.float(), v.float(), layout, **args, return_lse=True)
            assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
            outs.append(out)
    finally:
        set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("pattern", ["block", "longformer"])
def test_statistics_match_the_row_kernel(pattern):
    layout = build_layout(pattern, 16, 24, block_size=8, kernel_size=5)
    assert len(layout.cpu_tile_plan()) == 1
    (q, k, v), bias = make(2, 4, 384, 32, bias_side=5)
    args = dict(rel_pos_bias=bias.float(), return_lse=True, return_stats=True)
    got = attention(q.float(), k.float(), v.float(), layout, **args)
    expected = rows_kernel(q.float(), k.float(), v.float(), layout, **args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(7, 13), (33, 35), (20, 70)])
def test_statistics_merge_across_axial_passes(size):
    """AXIAL's two passes (row segments, then column segments): the second
    merges its statistics into the first's through the shares of the merged
    softmax, with a bias, a key mask and a pruned head."""
    layout = build_layout("axial", *size)
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, 16, bias_side=5)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(8)) > 0.3
    args = dict(key_mask=key_mask, head_active=torch.tensor([True, False, True]))
    passes = len(layout.cpu_tile_plan())
    before = _torch_ops.tiled_passes_run
    out, stats = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(),
                           return_stats=True, **args)
    assert _torch_ops.tiled_passes_run == before + passes
    ref_out, _, probs = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(), **args)
    expected = reference_statistics(probs)
    assert (stats.double() - expected).abs().max() < 2e-5 * max(1.0, expected.abs().max().item())
    assert (out.double() - ref_out).abs().max() < 2e-5


def test_results_do_not_depend_on_the_thread_count():
    layout = build_layout("axial", 30, 40)
    (q, k, v), bias = make(2, 4, 1200, 24, bias_side=9)
    before = get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            set_num_threads(threads)
            results.append(attention(q.float(), k.float(), v.float(), layout,
                                     rel_pos_bias=bias.float(), dropout_p=0.1, dropout_seed=3))
    finally:
        set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_nan_query_row_stays_in_its_row():
    layout = build_layout("block", 16, 16, block_size=8)
    (q, k, v), _ = make(1, 2, 256, 16)
    q = q.float()
    q[0, 1, 37, 2] = float("nan")
    out, lse = attention(q, k.float(), v.float(), layout, return_lse=True)
    nan_rows = torch.isnan(out).any(-1)
    assert nan_rows[0, 1, 37] and torch.isnan(lse[0, 1, 37])
    nan_rows[0, 1, 37] = False
    assert not nan_rows.any()


@pytest.mark.parametrize("token", [0, 47, 239])
def test_nan_key_poisons_exactly_its_rows_across_merged_passes(token):
    """AXIAL runs its image rows, then its columns, merging the second pass's
    log-sum-exp into the first's eight rows at a time: a NaN key seen by only
    one of the passes must still make exactly the rows that attend it NaN."""
    layout = build_layout("axial", 12, 20)
    assert len(layout.cpu_tile_plan()) == 2
    (q, k, v), _ = make(1, 2, 240, 16)
    q, k, v = q.float(), k.float(), v.float()
    k[0, 1, token, 3] = float("nan")
    out, lse = attention(q, k, v, layout, return_lse=True)
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout)
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(ref_out).any(-1))
    assert torch.isnan(lse).sum() == 12 + 20 - 1  # the key's image row and column
    finite = ~torch.isnan(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("masked_by", ["layout", "key_mask"])
def test_shift_from_raw_scores_falls_back_when_a_masked_score_dominates(masked_by):
    """RANDOM-like plans take each row's softmax shift from all of its raw
    scores, kept or not. A key outside a row's pairs (or masked) whose scores
    are thousands above the kept ones would push every kept exp below float's
    range: the tile must then run again with the shift from the kept scores."""
    layout = build_layout("random", 33, 35, attention_ratio=0.4)
    n = layout.num_tokens
    (q, k, v), _ = make(1, 2, n, 16)
    q, k, v = q.float(), k.float(), v.float()
    big = 700
    # scores of 125 to 375 against key 700 (one product each, so float32 rounds
    # them no worse than the rest), the other scores near 0
    q[..., 0] = 1 + q[..., 0].abs().clamp_max(2)
    k[:, :, big] = 0
    k[:, :, big, 0] = 500
    key_mask = None
    if masked_by == "key_mask":
        key_mask = torch.ones(1, n, dtype=torch.bool)
        key_mask[0, big] = False
    out, lse = attention(q, k, v, layout, key_mask=key_mask, return_lse=True)
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout, key_mask=key_mask)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # rows that keep key 700 have a log-sum-exp of 125 to 375: float32 carries it to 1e-7 relative
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("size", [(33, 35), (23, 23), (19, 29)])
def test_raw_shift_covers_every_column_of_a_chunk(size):
    """The raw shift is each row's largest score over the whole chunk, taken
    from the scores kernel's accumulators. Here every query's own key scores
    about 3000 and every other key at least 300 less, so a shift that missed
    the column holding a row's own key would overflow the exp. 529 and 551
    tokens leave a last chunk of 24 and 40 columns, whose last 8 the kernel
    takes in a step of their own (plans with 8 chunks a tile or more take the
    raw shift)."""
    layout = build_layout("random", *size, attention_ratio=0.4)
    n = layout.num_tokens
    (q, _, v), _ = make(1, 2, n, 16)
    q = q.float()
    q = q / q.norm(dim=-1, keepdim=True) * 3000 ** 0.5
    k = q.clone()
    v = v.float()
    cosines = (q[0, 0] @ q[0, 0].T) / 3000
    cosines.fill_diagonal_(0)
    assert cosines.max() < 0.9  # the inputs keep their gap
    out, lse = attention(q, k, v, layout, return_lse=True, scale=1.0)
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout, scale=1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=0, rtol=1e-6)


@pytest.mark.parametrize("dominant_masked_key", [False, True])
@pytest.mark.parametrize("size", [(33, 35), (23, 23)])
def test_raw_shift_statistics_match_the_reference(size, dominant_masked_key):
    """RANDOM-like plans take the raw shift with statistics too: sum p^2 and
    the entropy do not depend on the shift. Against the float64 reference,
    with a key mask, and with a masked key whose scores are far above the
    kept ones (the tiles then run again, exactly)."""
    layout = build_layout("random", *size, attention_ratio=0.4)
    n = layout.num_tokens
    (q, k, v), _ = make(2, 2, n, 16)
    q, k, v = q.float(), k.float(), v.float()
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(3)) > 0.2
    if dominant_masked_key:
        big = n // 2
        key_mask[:, big] = False
        q[..., 0] = 1 + q[..., 0].abs().clamp_max(2)
        k[:, :, big] = 0
        k[:, :, big, 0] = 500
    out, lse, stats = attention(q, k, v, layout, key_mask=key_mask, return_lse=True, return_stats=True)
    ref_out, ref_lse, probs = reference_attention(q, k, v, layout, key_mask=key_mask)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    torch.testing.assert_close(stats.double(), reference_statistics(probs), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("table", ["plain", "wide", "dominant_cell", "infinite_cell"])
def test_raw_shift_with_a_bias_matches_the_reference(table):
    """With a bias the raw shift adds the head's largest table cell to the
    largest raw score. A table spread over about +-60 puts that shift far
    above many rows' kept scores, which must then run again exactly; a cell
    of 200 on the query's own offset would overflow the exp of a shift that
    left the bias out; a table with a -inf cell (a pair ruled out) sends its
    head to the exact path. Outputs, log-sum-exps and statistics against the float64
    reference, with a key mask."""
    layout = build_layout("random", 33, 35, attention_ratio=0.4)
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, 16, bias_side=9)
    if table == "wide":
        bias = bias * 20
    if table == "dominant_cell":
        bias[:, 4, 4] = 200.0
    if table == "infinite_cell":
        bias[1, 4, 5] = -float("inf")
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(4)) > 0.2
    out, lse, stats = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(),
                                key_mask=key_mask, return_lse=True, return_stats=True)
    ref_out, ref_lse, probs = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(),
                                                  key_mask=key_mask)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 1e-4)
    torch.testing.assert_close(stats.double(), reference_statistics(probs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale", [-0.7, 0.0, 0.3])
def test_raw_shift_plans_with_any_scale(scale):
    """A negative scale turns the largest raw score into the smallest scaled
    one: RANDOM-like plans must still give the reference's softmax."""
    layout = build_layout("random", 33, 35, attention_ratio=0.4)
    n = layout.num_tokens
    (q, k, v), _ = make(1, 2, n, 16)
    q, k, v = (t.float() * 3 for t in (q, k, v))  # scores spread over about 300
    out, lse = attention(q, k, v, layout, scale=scale, return_lse=True)
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout, scale=scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # scores up to about 150 in float32: their rounding, not the kernel, sets this tolerance
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-4)


def test_nan_key_poisons_exactly_its_rows_with_the_raw_shift():
    """The raw shift skips the mask pass's NaN check: a NaN score of a kept
    pair must still make its row NaN through the sum, and one outside the
    layout must not."""
    layout = build_layout("random", 33, 35, attention_ratio=0.4)
    n = layout.num_tokens
    (q, k, v), _ = make(1, 2, n, 16)
    q, k, v = q.float(), k.float(), v.float()
    k[0, 1, 500, 3] = float("nan")
    out, lse = attention(q, k, v, layout, return_lse=True)
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout)
    expected_nan = torch.isnan(ref_lse)
    assert 0 < int(expected_nan.sum()) < n  # some rows attend the key, some do not
    assert torch.equal(torch.isnan(lse), expected_nan)
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(ref_out).any(-1))
    finite = ~expected_nan
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), atol=2e-5, rtol=2e-5)


def test_head_dims_past_the_vector_width():
    layout = build_layout("longformer", 12, 12, kernel_size=3)
    for dim in (1, 7, 8, 9, 33, 130):
        (q, k, v), _ = make(1, 2, 144, dim)
        got = attention(q.float(), k.float(), v.float(), layout)
        torch.testing.assert_close(got, rows_kernel(q.float(), k.float(), v.float(), layout),
                                   atol=1e-5, rtol=1e-5)


def _call(layout, q, **kwargs):
    C.attention_forward(q, q, q, torch.zeros_like(q), torch.empty(q.shape[:3]),
                        torch.from_numpy(layout.indptr.copy()), torch.from_numpy(layout.indices.copy()),
                        height=layout.height, width=layout.width, scale=0.3, **kwargs)


def test_bad_plans_are_refused_or_contained():
    layout = build_layout("block", 8, 8)
    q = torch.randn(1, 1, 64, 16)
    buffer, fields, _ = layout.packed_tile_plan()
    buffer = torch.from_numpy(buffer.copy())
    with pytest.raises(ValueError, match="6 integers per pass"):
        _call(layout, q, tile_plan=buffer, tile_passes=fields[:5])
    with pytest.raises(ValueError, match="outside"):
        _call(layout, q, tile_plan=buffer, tile_passes=fields[:5] + [buffer.numel() + 1])
    with pytest.raises(ValueError, match="past the"):
        _call(layout, q, tile_plan=buffer[:100], tile_passes=[min(x, 100) for x in fields])
    with pytest.raises(ValueError, match="must be even"):
        _call(layout, q, tile_plan=buffer, tile_passes=fields[:5] + [fields[5] - 1])
    with pytest.raises(TypeError, match="tile_plan"):
        _call(layout, q, tile_plan=buffer.long(), tile_passes=fields)
    with pytest.raises(ValueError, match="long_rows"):
        _call(layout, q, tile_plan=buffer, tile_passes=fields,
              long_rows=torch.tensor([64], dtype=torch.int32))
    # corrupted contents: offsets are clamped and ids outside [0, N) skipped
    tiles, chunks, _, ptr_at, keys_at, _ = fields
    bad = buffer.clone()
    bad[ptr_at + 1:ptr_at + tiles + 1] = 1 << 30
    bad[keys_at:keys_at + chunks * 64] = -5
    out, lse = torch.empty_like(q), torch.empty(1, 1, 64)
    C.attention_forward(q, q, q, out, lse, torch.from_numpy(layout.indptr.copy()),
                        torch.from_numpy(layout.indices.copy()), height=8, width=8, scale=0.3,
                        tile_plan=bad, tile_passes=fields)
    assert (out == 0).all() and torch.isinf(lse).all()


def test_passes_head_by_head_match_passes_over_all_heads():
    # with enough (batch, head) pairs per thread the CPU runs every pass of one
    # pair after another; otherwise each pass over all pairs: the same sums
    layout = build_layout("axial", 18, 22)
    assert len(layout.cpu_tile_plan()) == 2
    (q, k, v), bias = make(2, 2, 18 * 22, 16, bias_side=7)
    args = dict(rel_pos_bias=bias.float(), dropout_p=0.1, dropout_seed=5, return_lse=True)
    before = get_num_threads()
    try:
        set_num_threads(1)  # 4 pairs for 1 thread: head by head
        by_head = attention(q.float(), k.float(), v.float(), layout, **args)
        set_num_threads(3)  # 4 pairs for 3 threads: pass by pass
        by_pass = attention(q.float(), k.float(), v.float(), layout, **args)
    finally:
        set_num_threads(before)
    for a, b in zip(by_head, by_pass):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = reference_attention(q, k, v, layout, bias=bias, dropout_p=0.1, dropout_seed=5)
    torch.testing.assert_close(by_head[0].double(), expected[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("size", [(20, 30), (14, 14)])
def test_numpy_arrays_take_the_tiled_path_too(size):
    layout = build_layout("axial", *size)
    assert layout.cpu_tile_plan() is not layout.tile_plan()  # both take the CPU's own plan
    (q, k, v), _ = make(1, 2, layout.num_tokens, 16)
    arrays = [t.float().numpy() for t in (q, k, v)]
    got = attention(*arrays, layout)
    expected = attention(q.float(), k.float(), v.float(), layout)
    np.testing.assert_array_equal(got, expected.numpy())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", ["dense", "axial", "block", "strided", "random"])
def test_backward_against_reference(pattern, size):
    from sparse_attention import _torch_ops

    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, attention_ratio=0.3)
    n = layout.num_tokens
    (q, k, v), _ = make(2, 3, n, 20)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(2)) > 0.25
    active = torch.tensor([True, False, True])
    args = dict(key_mask=key_mask, head_active=active, dropout_p=0.2, dropout_seed=7)
    grad_out = torch.randn(2, 3, n, 20, generator=torch.Generator().manual_seed(3))
    before = _torch_ops.tiled_backwards_run
    assert_backward_matches_reference(attention, layout, (q, k, v), grad_out, **args)
    assert _torch_ops.tiled_backwards_run == before + 1


@pytest.mark.parametrize("bias_side", [5, 9])  # M = 2 clips most of these layouts' offsets
@pytest.mark.parametrize("size", [(1, 17), (9, 1), (7, 13), (33, 35)])
@pytest.mark.parametrize("pattern", ["dense", "axial", "block", "strided", "random"])
def test_tiled_backward_gives_the_bias_gradient(pattern, size, bias_side):
    """With a relative position bias the tiled backward adds the bias to the
    scores it recomputes and each pair's dS to its bias cell, per (batch,
    head); key mask, a pruned head and dropout as in training."""
    from sparse_attention import _torch_ops

    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, attention_ratio=0.3)
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, bias_side)
    before = _torch_ops.tiled_backwards_run
    got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    assert _torch_ops.tiled_backwards_run == before + 1
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)
    rows = bias_gradients(rows_kernel, layout, q, k, v, bias, grad_out, **args)
    for mine, theirs in zip(got, rows):  # bias cells sum many pairs: a tolerance to their size
        assert (mine - theirs).abs().max() < 5e-5 * max(1.0, theirs.abs().max().item())


def test_strided_lattice_adds_its_bias_gradient_to_the_windows():
    """STRIDED on the stencil split: the window backward writes the bias
    gradient's rows, the lattice's tiles add to them."""
    from sparse_attention import _torch_ops

    layout = build_layout("strided", 33, 35, kernel_size=5, stride=3)
    n = layout.num_tokens
    (q, k, v), bias = make(2, 2, n, 16, bias_side=9)
    grad_out = torch.randn(2, 2, n, 16, generator=torch.Generator().manual_seed(4))
    before = _torch_ops.stencil_backwards_run, C.cpu_window_backwards()
    got = call_with(_stencil, "use_stencil_cpu_kernel", True, bias_gradients, attention, layout, q, k, v, bias,
                    grad_out)
    assert (_torch_ops.stencil_backwards_run, C.cpu_window_backwards()) == (before[0] + 1, before[1] + 1)
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out)


def test_tiled_backward_is_bitwise_the_same_for_any_thread_count():
    layout = build_layout("block", 24, 24, block_size=8)
    (q, k, v), bias = make(2, 3, 576, 16, bias_side=9)
    before = get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            set_num_threads(threads)
            leaves = [t.float().requires_grad_(True) for t in (q, k, v, bias)]
            attention(*leaves[:3], layout, rel_pos_bias=leaves[3], dropout_p=0.1, dropout_seed=1).sum().backward()
            grads.append([leaf.grad for leaf in leaves])
    finally:
        set_num_threads(before)
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("dim", [40, 72])
@pytest.mark.parametrize("pattern", ["axial", "random"])
def test_tiles_on_their_16_and_32_register_paths(monkeypatch, pattern, dim, narrow):
    """P x V takes 32 columns of d a step where the CPU has 32 vector
    registers, and the bias row comes by AVX2 gathers where the CPU has AVX2;
    SPARSE_ATTENTION_NARROW_KERNELS sends them to the 16 and 8 column steps
    and the scalar loads, so that both run on such a machine (elsewhere both
    runs are narrow). Head dims 40 and 72 end in a part that is not a whole 32."""
    if narrow:
        monkeypatch.setenv("SPARSE_ATTENTION_NARROW_KERNELS", "1")
        assert C.cpu_wide_kernels() == 0
    # RANDOM dense enough for the tiles where the rows would run on the gather kernels
    layout = build_layout(pattern, 19, 23, attention_ratio=0.55)
    assert _stencil.cpu_kernel_choice(layout, dim) == "tiles"
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, dim, seed=dim)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(4)) > 0.25
    args = dict(key_mask=key_mask, head_active=torch.tensor([True, False, True]), dropout_p=0.2, dropout_seed=5)
    out, lse = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), return_lse=True,
                         **args)
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(), **args)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    grad_out = torch.randn(2, 3, n, dim, generator=torch.Generator().manual_seed(dim + 1))
    assert_backward_matches_reference(attention, layout, (q, k, v), grad_out, **args)


def chunks_in_halves(plan):
    """How many chunks of a plan hold their pairs in two diagonal 32 x 32 blocks."""
    halved = 0
    for one_pass in plan:
        words = one_pass.masks.view(np.uint64).reshape(-1, 64)
        low, high = words & np.uint64(0xFFFFFFFF), words >> np.uint64(32)
        halved += int(((high[:, :32] == 0).all(1) & (low[:, 32:] == 0).all(1)).sum())
    return halved


@pytest.mark.parametrize("size", [(32, 32), (33, 32), (20, 32), (16, 32)])
def test_chunks_in_halves_skip_the_empty_blocks(size):
    """On a grid 32 wide (or high) AXIAL's 64-query tiles span two image rows
    (columns), each attending its own 32 keys: the kernel computes only the
    two diagonal 32 x 32 blocks of such a chunk. Its outputs, lse and
    statistics must match the reference with bias, key mask, dropout and
    pruned heads, forward and backward."""
    layout = build_layout("axial", *size)
    assert chunks_in_halves(_tiles.build_tile_plan(layout)) > 0
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, 24, bias_side=9)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(4)) > 0.2
    args = dict(key_mask=key_mask, head_active=torch.tensor([True, False, True]), dropout_p=0.15, dropout_seed=3)
    out, lse, stats = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), **args,
                                return_lse=True, return_stats=True)
    ref_out, ref_lse, probs = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(),
                                                  **args)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    torch.testing.assert_close(stats.double(), reference_statistics(probs), atol=2e-5, rtol=2e-5)
    grad_out = torch.randn(2, 3, n, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)


def assert_output_and_statistics_match_reference(layout, q, k, v, bias, args):
    """The forward with statistics (no dropout) against the float64 reference."""
    out, stats = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), return_stats=True,
                           key_mask=args["key_mask"], head_active=args["head_active"])
    ref_out, _, probs = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(),
                                            key_mask=args["key_mask"], head_active=args["head_active"])
    assert (out.double() - ref_out).abs().max() < 2e-5
    expected = reference_statistics(probs)
    assert (stats.double() - expected).abs().max() < 2e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("size", [(14, 14), (12, 23), (24, 5)])
def test_axial_on_the_cpu_plan_against_the_reference(size):
    """AXIAL on a small grid runs on its CPU plan (one image row or column a
    tile): forward with statistics and backward with a bias, key mask, pruned
    head and dropout against the float64 reference."""
    layout = build_layout("axial", *size)
    assert layout.cpu_tile_plan() is not layout.tile_plan()
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, 5)
    before = _torch_ops.tiled_passes_run, _torch_ops.tiled_backwards_run
    got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    assert _torch_ops.tiled_passes_run == before[0] + len(layout.cpu_tile_plan())
    assert _torch_ops.tiled_backwards_run == before[1] + 1
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)
    assert_output_and_statistics_match_reference(layout, q, k, v, bias, args)


@pytest.mark.parametrize("grid, block_size, shape", [((21, 14), 7, (7, 7)), ((24, 36), 12, (4, 12)),
                                                     ((14, 23), 7, (7, 7))])
def test_blocks_that_straddle_eight_by_eight_tiles_get_tiles_of_their_own(grid, block_size, shape):
    """Swin-sized windows (7 x 7, 12 x 12) straddle every 8 x 8 tile; the CPU
    plan takes a tile shape aligned with them (two to four times fewer slots),
    and forward with statistics and backward with a bias, key mask, pruned
    head and dropout still match the float64 reference."""
    layout = build_layout("block", *grid, block_size=block_size)
    plan = layout.cpu_tile_plan()
    assert [tile_pass.shape for tile_pass in plan] == [shape]
    aligned = plan.cpu_fill
    standard = _tiles.TilePlan([_tiles._build_pass(layout, (8, 8), _tiles.PAIRS_ALL, None)], plan.long_rows,
                               layout.nnz).cpu_fill
    assert aligned > 1.5 * standard
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, 9)
    before = _torch_ops.tiled_passes_run, _torch_ops.tiled_backwards_run
    got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    assert (_torch_ops.tiled_passes_run, _torch_ops.tiled_backwards_run) == (before[0] + 1, before[1] + 1)
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)
    assert_output_and_statistics_match_reference(layout, q, k, v, bias, args)


def test_non_local_layouts_keep_the_standard_tile_shapes():
    """Where every standard shape costs alike (RANDOM's far keys), the extra
    shapes are not even estimated: they could not win, and would slow planning."""
    layout = build_layout("random", 24, 24, attention_ratio=0.3)
    tried = []
    original = _tiles._estimate_cost

    def counting(layout, shape, *args, **kwargs):
        tried.append(shape)
        return original(layout, shape, *args, **kwargs)
    try:
        _tiles._estimate_cost = counting
        _tiles.choose_passes(layout, for_cpu=True)
    finally:
        _tiles._estimate_cost = original
    assert not set(tried) & set(_tiles._CPU_EXTRA_SHAPES)
