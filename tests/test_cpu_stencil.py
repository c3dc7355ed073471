"""The CPU stencil kernels (csrc/attention_cpu_stencil.c, float32) against the
float64 reference and the row-by-row kernels, and the stencil description
(sparse_attention/_stencil.py) against the layouts it stands for."""

import numpy as np
import pytest
import torch

from reference import random_inputs as make
from reference import (assert_backward_matches_reference, assert_bias_gradients_match_reference,
                       assert_forward_matches_reference, bias_gradients, bias_training_inputs, call_with,
                       reference_attention, reference_statistics)
from sparse_attention import _stencil, _tiles, _torch_ops, build_layout, get_num_threads
from sparse_attention import set_num_threads
from sparse_attention import sparse_scaled_dot_product_attention as attention
from sparse_attention._native import C
from sparse_attention.patterns import Layout

STENCIL_PATTERNS = ["longformer", "strided"]
SIZES = [(1, 1), (1, 17), (9, 1), (7, 13), (33, 35), (20, 70)]
KNOBS = dict(kernel_size=5, stride=3, num_global_tokens=2)


def other_kernels(*args, **kwargs):
    """The same call with the stencil kernels off (tile or row kernels)."""
    return call_with(_stencil, "use_stencil_cpu_kernel", False, attention, *args, **kwargs)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", STENCIL_PATTERNS)
def test_stencil_layouts_are_recognised(pattern, size):
    layout = build_layout(pattern, *size, **KNOBS)
    packed = layout.stencil()
    assert packed is not None and packed.dtype == np.int32
    num_offsets, num_keys, num_rows = packed[:3]
    assert packed.size == 3 + 2 * num_offsets + num_keys + num_rows
    if pattern == "longformer":
        assert num_keys == num_rows == min(2, layout.num_tokens)


@pytest.mark.parametrize("pattern", ["dense", "block", "random", "axial"])
def test_other_layouts_have_no_stencil(pattern):
    assert build_layout(pattern, 12, 12).stencil() is None


def test_a_layout_that_is_not_what_its_pattern_says_gets_no_stencil():
    axial = build_layout("axial", 10, 10)
    # AXIAL's pairs labelled LONGFORMER: the check against the CSR rows must refuse them
    fake = Layout("longformer", 10, 10, axial.indptr, axial.indices, axial.col_ptr,
                  axial.row_indices, params=dict(kernel_size=5, num_global_tokens=1))
    assert fake.stencil() is None
    # one pair dropped from a window row
    window = build_layout("longformer", 10, 10, kernel_size=3)
    rows = window.row_ids()
    keep = np.ones(window.nnz, dtype=bool)
    keep[window.indptr[44]] = False
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=100))])
    dense = np.zeros((100, 100), dtype=bool)
    dense[rows[keep], window.indices[keep]] = True
    cols, col_rows = np.nonzero(dense.T)
    col_ptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=100))])
    broken = Layout("longformer", 10, 10, indptr, window.indices[keep], col_ptr, col_rows,
                    params=window.params)
    assert broken.stencil() is None


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", STENCIL_PATTERNS)
def test_forward_against_reference_and_other_kernels(pattern, size):
    layout = build_layout(pattern, *size, **KNOBS)
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, 20)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(2)) > 0.25
    active = torch.tensor([True, False, True])
    args = dict(key_mask=key_mask, head_active=active, dropout_p=0.2, dropout_seed=7)
    before = _torch_ops.stencil_forwards_run
    out, lse = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), **args,
                         return_lse=True)
    assert _torch_ops.stencil_forwards_run == before + 1
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout,
                                              bias=bias.float(), **args)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    others = other_kernels(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), **args)
    torch.testing.assert_close(out, others, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("pattern", STENCIL_PATTERNS)
def test_statistics_match_the_row_kernel(pattern):
    layout = build_layout(pattern, 14, 19, **KNOBS)
    (q, k, v), bias = make(2, 4, layout.num_tokens, 32, bias_side=5)
    key_mask = torch.rand(2, layout.num_tokens, generator=torch.Generator().manual_seed(4)) > 0.1
    args = dict(rel_pos_bias=bias.float(), key_mask=key_mask, return_lse=True, return_stats=True)
    got = attention(q.float(), k.float(), v.float(), layout, **args)
    _tiles.use_tiled_cpu_kernel = False
    try:
        expected = other_kernels(q.float(), k.float(), v.float(), layout, **args)
    finally:
        _tiles.use_tiled_cpu_kernel = True
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", STENCIL_PATTERNS)
def test_backward_against_reference(pattern, size):
    layout = build_layout(pattern, *size, **KNOBS)
    n = layout.num_tokens
    (q, k, v), _ = make(2, 3, n, 20)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(2)) > 0.25
    active = torch.tensor([True, False, True])
    args = dict(key_mask=key_mask, head_active=active, dropout_p=0.2, dropout_seed=7)
    grad_out = torch.randn(2, 3, n, 20, generator=torch.Generator().manual_seed(3))
    before = _torch_ops.stencil_backwards_run
    assert_backward_matches_reference(attention, layout, (q, k, v), grad_out, **args)
    assert _torch_ops.stencil_backwards_run == before + 1


@pytest.mark.parametrize("bias_side", [5, 9])  # 5: M = 2, so a 7 x 7 window's offsets are clipped
@pytest.mark.parametrize("size", [(1, 1), (1, 17), (9, 1), (7, 13), (33, 35)])
@pytest.mark.parametrize("knobs", [dict(kernel_size=7, num_global_tokens=1),
                                   dict(kernel_size=5, num_global_tokens=2),
                                   dict(kernel_size=3, num_global_tokens=0)])
def test_window_backward_gives_the_bias_gradient(knobs, size, bias_side):
    """With a relative position bias the window backward sums the bias
    gradient per (batch, head) itself, window slots, global keys and global
    rows alike; key mask, a pruned head and dropout as in training."""
    layout = build_layout("longformer", *size, **knobs)
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, bias_side)
    before = _torch_ops.stencil_backwards_run, C.cpu_window_backwards()
    got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    assert (_torch_ops.stencil_backwards_run, C.cpu_window_backwards()) == (before[0] + 1, before[1] + 1)
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)
    rows = bias_gradients(other_kernels, layout, q, k, v, bias, grad_out, **args)
    for mine, theirs in zip(got, rows):  # bias cells sum many pairs: a tolerance to their size
        assert (mine - theirs).abs().max() < 5e-5 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("pattern, size, knobs, planned", [
    ("longformer", (20, 21), dict(kernel_size=15, num_global_tokens=1), True),  # a 15 x 15 window
    ("strided", (14, 14), dict(kernel_size=7), True),  # lattice offsets of +-7 leave the window's box
    ("strided", (8, 19), dict(kernel_size=7), True),
    ("strided", (23, 23), dict(kernel_size=3, stride=11), False),  # a plan too sparse for the tiles
])
@pytest.mark.parametrize("tiles", [True, False])
@pytest.mark.parametrize("strips", [True, False])
def test_a_bias_gradient_the_window_cannot_give_comes_from_the_strips_tiles_or_rows(pattern, size, knobs, planned,
                                                                                   tiles, strips, monkeypatch):
    """A stencil past the window kernel's box runs its backward with a bias on
    the strips where the stencil is offsets alone (they sum the gradient per
    offset), else on the layout's tile plan where the tiles would take the
    layout, else on the row kernels; a training call's key mask, pruned head
    and dropout included."""
    monkeypatch.setattr(_stencil, "use_strip_bias_backward", strips)
    layout = build_layout(pattern, *size, **knobs)
    assert layout.stencil() is not None and layout.stencil_split() is None
    assert (layout.cpu_tile_plan().cpu_fill >= _tiles.CPU_MIN_FILL) == planned
    on_strips = strips and _stencil.sums_bias_grad(layout.stencil())
    assert on_strips == (strips and pattern == "strided")  # LONGFORMER's global token is a listed row
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, 5)
    before = _torch_ops.stencil_backwards_run, _torch_ops.tiled_backwards_run
    got = call_with(_tiles, "use_tiled_cpu_kernel", tiles, bias_gradients, attention, layout, q, k, v, bias,
                    grad_out, **args)
    assert _torch_ops.stencil_backwards_run == before[0] + on_strips
    assert _torch_ops.tiled_backwards_run == before[1] + (tiles and planned and not on_strips)
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)
    # without a bias the stencil backward runs as before
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    attention(*leaves, layout, **args).backward(grad_out.float())
    assert _torch_ops.stencil_backwards_run == before[0] + on_strips + 1


def test_the_strips_refuse_a_bias_gradient_they_cannot_sum():
    """grad_bias_rows on the strips: only stencils of offsets alone (a listed
    row's pairs are not one offset each)."""
    layout = build_layout("longformer", 12, 12, kernel_size=15, num_global_tokens=1)
    stencil = torch.from_numpy(layout.stencil().copy())
    assert not _stencil.sums_bias_grad(stencil)
    (q, k, v), bias = make(1, 2, layout.num_tokens, 8, bias_side=5)
    q, k, v, bias = (t.float() for t in (q, k, v, bias))
    tensors = layout.torch_tensors("cpu")
    out, lse = torch.empty_like(q), torch.empty(1, 2, layout.num_tokens)
    C.attention_forward(q, k, v, out, lse, tensors["row_ptr"], tensors["col_idx"], height=12, width=12,
                        scale=0.25, rel_pos_bias=bias, stencil=stencil)
    grads = [torch.empty_like(q) for _ in range(3)]
    with pytest.raises(ValueError, match="grad_bias_rows: takes"):
        C.attention_backward(q, k, v, out, torch.randn_like(q), lse, torch.empty(1, 2, layout.num_tokens), *grads,
                             tensors["row_ptr"], tensors["col_idx"], tensors["col_ptr"], tensors["row_idx"],
                             height=12, width=12, scale=0.25, rel_pos_bias=bias, stencil=stencil,
                             grad_bias_rows=torch.empty(1, 2, 25))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("pattern, size, knobs", [
    ("longformer", (29, 23), dict(kernel_size=7, num_global_tokens=2)),  # the window kernel
    ("strided", (17, 13), dict(kernel_size=5)),  # lattice offsets past the window's box: the strips
])
def test_the_bias_gradient_is_the_same_for_any_thread_count(pattern, size, knobs, threads):
    layout = build_layout(pattern, *size, **knobs)
    assert _stencil.window_takes(layout.stencil(), 16) == (pattern == "longformer")
    assert _stencil.sums_bias_grad(layout.stencil()) == (pattern == "strided")
    (q, k, v), bias = make(3, 2, layout.num_tokens, 16, bias_side=9)
    grad_out = torch.randn(3, 2, layout.num_tokens, 16, generator=torch.Generator().manual_seed(5))
    before = get_num_threads()
    try:
        set_num_threads(1)
        expected = bias_gradients(attention, layout, q, k, v, bias, grad_out)
        set_num_threads(threads)
        stencil_runs = _torch_ops.stencil_backwards_run
        got = bias_gradients(attention, layout, q, k, v, bias, grad_out)
        assert _torch_ops.stencil_backwards_run == stencil_runs + 1
    finally:
        set_num_threads(before)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_window_takes_follows_the_kernels_rule():
    window = build_layout("longformer", 20, 21, kernel_size=7, num_global_tokens=1).stencil()
    assert _stencil.window_takes(window, 32) and _stencil.window_takes(torch.from_numpy(window.copy()), 256)
    assert not _stencil.window_takes(window, 257) and not _stencil.window_takes(window, 0)
    wide = build_layout("longformer", 20, 21, kernel_size=15, num_global_tokens=1).stencil()
    assert not _stencil.window_takes(wide, 32)  # a 15 x 15 box
    # two offsets at the corners of a 13 x 13 box fill too little of it
    assert not _stencil.window_takes(np.array([2, 0, 0, -6, -6, 6, 6], dtype=np.int32), 32)
    assert _stencil.window_takes(np.array([2, 0, 0, 0, 0, 0, 1], dtype=np.int32), 32)
    with pytest.raises(ValueError, match="stencil: expected E, G, L"):
        _stencil.window_takes(np.array([3, 0, 0, 1, 1], dtype=np.int32), 32)
    with pytest.raises(TypeError, match="stencil"):
        _stencil.window_takes(window.astype(np.int64), 32)


def test_grad_bias_rows_is_refused_where_the_window_backward_would_not_fill_it():
    layout = build_layout("longformer", 8, 9, kernel_size=5, num_global_tokens=1)
    n = layout.num_tokens
    (q, k, v), bias = make(1, 2, n, 8, bias_side=5)
    q, k, v, bias = (t.float().contiguous() for t in (q, k, v, bias))
    out, lse = attention(q, k, v, layout, rel_pos_bias=bias, return_lse=True)
    stencil = torch.from_numpy(layout.stencil().copy())
    csr = [torch.from_numpy(a.copy()) for a in (layout.indptr, layout.indices, layout.col_ptr,
                                                 layout.row_indices)]

    def call(**extra):
        grads = [torch.empty_like(q) for _ in range(3)]
        C.attention_backward(q, k, v, out, torch.ones_like(out), lse, torch.empty(1, 2, n), *grads, *csr,
                             height=8, width=9, scale=0.35, **extra)

    good = dict(rel_pos_bias=bias, stencil=stencil, grad_bias_rows=torch.empty(1, 2, 25))
    call(**good)
    with pytest.raises(ValueError, match="grad_bias_rows: takes"):
        call(**{**good, "stencil_strips": True})
    with pytest.raises(ValueError, match="grad_bias_rows: takes"):
        call(**{**good, "rel_pos_bias": None})
    with pytest.raises(ValueError, match="grad_bias_rows"):
        call(**{**good, "grad_bias_rows": torch.empty(1, 2, 24)})
    with pytest.raises(TypeError, match="grad_bias_rows: expected dtype float32"):
        call(**{**good, "grad_bias_rows": torch.empty(1, 2, 25, dtype=torch.float64)})


@pytest.mark.parametrize("pattern", STENCIL_PATTERNS)
def test_results_are_bitwise_the_same_for_any_thread_count(pattern):
    layout = build_layout(pattern, 21, 26, **KNOBS)
    (q, k, v), bias = make(2, 3, layout.num_tokens, 24, bias_side=9)
    before = get_num_threads()
    outs, grads = [], []
    try:
        for threads in (1, 2, 3):
            set_num_threads(threads)
            leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
            out = attention(*leaves, layout, dropout_p=0.1, dropout_seed=3)
            out.backward(torch.cos(out.detach()))
            outs.append(out.detach())
            grads.append([leaf.grad for leaf in leaves])
    finally:
        set_num_threads(before)
    for other_out, other_grads in zip(outs[1:], grads[1:]):
        assert torch.equal(outs[0], other_out)
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other_grads))


def test_a_nan_key_reaches_exactly_the_rows_that_attend_it():
    """A NaN in a key row: every row whose keys include it (its window's
    queries and the global query, whose scores take the eight-at-a-time path
    without bias or mask) turns NaN, as in the float64 reference; the rest
    match the reference."""
    poison = float("nan")
    layout = build_layout("longformer", 16, 16, kernel_size=5)
    (q, k, v), _ = make(1, 2, 256, 16)
    k = k.clone()
    k[0, 1, 37, 3] = poison
    out = attention(q.float(), k.float(), v.float(), layout)
    expected = reference_attention(q.double(), k.double(), v.double(), layout)[0]
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    attends = torch.from_numpy(layout.to_dense())[:, 37]
    assert torch.isnan(out[0, 1]).any(-1).equal(attends)
    finite = ~torch.isnan(expected)
    torch.testing.assert_close(out[finite].double(), expected[finite], rtol=1e-4, atol=1e-5)


def test_nan_query_row_stays_in_its_row():
    layout = build_layout("longformer", 16, 16, kernel_size=5)
    (q, k, v), _ = make(1, 2, 256, 16)
    q = q.float().requires_grad_(True)
    with torch.no_grad():
        q[0, 1, 37, 2] = float("nan")
    out, lse = attention(q, k.float(), v.float(), layout, return_lse=True)
    nan_rows = torch.isnan(out).any(-1)
    assert nan_rows[0, 1, 37] and torch.isnan(lse[0, 1, 37])
    nan_rows[0, 1, 37] = False
    assert not nan_rows.any()
    # the backward keeps the NaN to the query's row of dQ (and its keys' dK, dV)
    grad_out = torch.zeros_like(out)
    grad_out[0, 1, 100] = 1.0
    out.backward(grad_out)
    assert torch.isfinite(q.grad[0, 1, 100]).all()


def test_head_dims_past_the_vector_width():
    layout = build_layout("strided", 12, 12, kernel_size=3, stride=4)
    for dim in (1, 7, 8, 9, 33, 130):
        (q, k, v), _ = make(1, 2, 144, dim)
        leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
        got = attention(*leaves, layout)
        got.backward(torch.sin(got.detach()))
        ref = [t.float().double().requires_grad_(True) for t in (q, k, v)]
        expected = reference_attention(*ref, layout)[0]
        expected.backward(torch.sin(got.detach()).double())
        assert (got.double() - expected).abs().max() < 2e-5
        for leaf, r in zip(leaves, ref):
            assert (leaf.grad.double() - r.grad).abs().max() < 5e-5


def test_strided_views_of_a_fused_projection():
    layout = build_layout("longformer", 9, 11, kernel_size=5)
    qkv = torch.randn(2, 99, 3, 4, 16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    got = attention(q, k, v, layout)
    expected = other_kernels(q.contiguous(), k.contiguous(), v.contiguous(), layout)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_numpy_arrays_take_the_stencil_path_too():
    layout = build_layout("longformer", 20, 30)
    (q, k, v), _ = make(1, 2, 600, 16)
    arrays = [t.float().numpy() for t in (q, k, v)]
    got = attention(*arrays, layout)
    expected = attention(q.float(), k.float(), v.float(), layout)
    np.testing.assert_array_equal(got, expected.numpy())


def _call(layout, q, stencil, backward=False):
    indptr, indices = torch.from_numpy(layout.indptr.copy()), torch.from_numpy(layout.indices.copy())
    common = dict(height=layout.height, width=layout.width, scale=0.3, stencil=stencil)
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:3], dtype=q.dtype)
    if not backward:
        C.attention_forward(q, q, q, out, lse, indptr, indices, **common)
        return
    grads = [torch.empty_like(q) for _ in range(3)]
    C.attention_backward(q, q, q, out, out, lse, torch.empty(q.shape[:3], dtype=q.dtype), *grads,
                         indptr, indices,
                         torch.from_numpy(layout.col_ptr.copy()),
                         torch.from_numpy(layout.row_indices.copy()), **common)


@pytest.mark.parametrize("backward", [False, True])
def test_bad_stencils_are_refused(backward):
    layout = build_layout("longformer", 8, 8, kernel_size=3)
    q = torch.randn(1, 1, 64, 16)
    good = torch.from_numpy(layout.stencil().copy())
    _call(layout, q, good, backward)

    def refused(stencil, match, error=ValueError, tensor=q):
        with pytest.raises(error, match=match):
            _call(layout, tensor, stencil, backward)

    refused(good[:-1], "2E \\+ G \\+ L numbers")
    refused(torch.tensor([-1, 0, 0], dtype=torch.int32), "2E \\+ G \\+ L numbers")
    refused(torch.tensor([1, 0, 0, 8, 0], dtype=torch.int32), "outside the 8 x 8 grid")
    refused(torch.tensor([1, 0, 0, 0, -8], dtype=torch.int32), "outside the 8 x 8 grid")
    refused(torch.tensor([1, 1, 0, 0, 0, 64], dtype=torch.int32), "key 0 is token 64")
    refused(torch.tensor([1, 0, 1, 0, 0, -1], dtype=torch.int32), "row 0 is token -1")
    refused(good.long(), "stencil", TypeError)
    refused(good, "float32", tensor=q.double())


@pytest.mark.parametrize("size", [(1, 17), (9, 1), (7, 13), (20, 30)])
def test_a_stencil_that_reaches_across_the_grid(size):
    """AXIAL as offsets (dx up to +-(W - 1), all the padding a key panel can
    have), called directly: the kernel against the row kernel."""
    layout = build_layout("axial", *size)
    offsets = np.array(_stencil.axial_offsets(*size), dtype=np.int32).reshape(-1)
    packed = np.concatenate([[offsets.size // 2, 0, 0], offsets]).astype(np.int32)
    (q, k, v), bias = make(2, 2, layout.num_tokens, 12, bias_side=5)
    arrays = [t.float().numpy() for t in (q, k, v)]
    results = []
    for stencil in (packed, None):
        out = np.empty_like(arrays[0])
        lse = np.empty(arrays[0].shape[:3], dtype=np.float32)
        C.attention_forward(*arrays, out, lse, layout.indptr, layout.indices, height=size[0],
                            width=size[1], scale=0.25, rel_pos_bias=bias.float().numpy(),
                            dropout_p=0.3, dropout_seed=11, stencil=stencil)
        results.append((out, lse))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], atol=2e-5, rtol=2e-5)


def test_listed_rows_that_do_not_attend_everything_take_the_row_kernel():
    """A listed row whose CSR row is not every token (not made by any pattern
    today) is done by the row kernels, forward and backward: listing an
    ordinary window row must not change any result."""
    layout = build_layout("longformer", 9, 12, kernel_size=5, num_global_tokens=1)
    packed = layout.stencil()
    num_offsets, num_keys, num_rows = (int(x) for x in packed[:3])
    extra_row = 40  # a window row, not a global token
    assert extra_row not in packed[3 + 2 * num_offsets + num_keys:]
    listed_more = np.concatenate([[num_offsets, num_keys, num_rows + 1], packed[3:], [extra_row]])
    listed_more = torch.from_numpy(listed_more.astype(np.int32))
    (q, k, v), bias = make(2, 2, layout.num_tokens, 16, bias_side=5)
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    grad_out = torch.randn_like(q)
    tensors = {name: torch.from_numpy(getattr(layout, name).copy())
               for name in ("indptr", "indices", "col_ptr", "row_indices")}
    common = dict(height=layout.height, width=layout.width, scale=0.3, dropout_p=0.2, dropout_seed=5,
                  key_mask=torch.rand(2, layout.num_tokens, generator=torch.Generator().manual_seed(1)) > 0.2)
    results = []
    for stencil in (torch.from_numpy(packed.copy()), listed_more):
        out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
        C.attention_forward(q, k, v, out, lse, tensors["indptr"], tensors["indices"], stencil=stencil,
                            **common)
        grads = [torch.empty_like(q) for _ in range(3)]
        C.attention_backward(q, k, v, out, grad_out, lse, torch.empty(q.shape[:3]), *grads,
                             tensors["indptr"], tensors["indices"], tensors["col_ptr"],
                             tensors["row_indices"], stencil=stencil, **common)
        results.append([out, lse] + grads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


# STRIDED's lattice on the tile kernels, its window on the stencil kernel
SPLIT_CASES = [((7, 13), dict(kernel_size=5, stride=3)),    # partial tiles, classes of 6 to 10
               ((20, 30), dict(kernel_size=5, stride=2)),   # lattice offsets inside the window
               ((33, 35), dict(kernel_size=7, stride=4)),
               ((17, 90), dict(kernel_size=3, stride=3))]   # classes past 64 tokens: several tiles
# the benchmark's layout (stride 7), checked for coverage only (its dense reference is slow)
BENCH_CASE = ((64, 64), dict(kernel_size=7))


def whole_stencil(*args, **kwargs):
    """The same call with STRIDED on the stencil kernel alone."""
    return call_with(_stencil, "use_lattice_split", False, attention, *args, **kwargs)


@pytest.mark.parametrize("size, knobs", SPLIT_CASES + [BENCH_CASE])
def test_lattice_split_covers_the_layout_exactly_once(size, knobs):
    layout = build_layout("strided", *size, **knobs)
    window, buffer, fields = layout.stencil_split()
    num_offsets = int(window[0])
    offsets = window[3:3 + 2 * num_offsets].reshape(-1, 2)
    stride = knobs.get("stride", knobs["kernel_size"])
    assert not np.any((offsets[:, 0] % stride == 0) & (offsets[:, 1] % stride == 0))
    (plan_pass,) = _tiles.build_lattice_plan(layout.height, layout.width, stride).passes
    queries, keys = plan_pass.pairs()
    w = layout.width
    pairs = set(zip(queries.tolist(), keys.tolist()))
    assert len(pairs) == queries.size  # no pair twice
    for q, k in pairs:
        assert (q // w - k // w) % stride == 0 and (q % w - k % w) % stride == 0
    ys, xs = np.divmod(np.arange(layout.num_tokens), w)
    window_pairs = set()
    for dy, dx in offsets:
        inside = (ys + dy >= 0) & (ys + dy < layout.height) & (xs + dx >= 0) & (xs + dx < w)
        window_pairs.update(zip(np.flatnonzero(inside).tolist(),
                                ((ys + dy) * w + xs + dx)[inside].tolist()))
    assert not window_pairs & pairs
    rows = layout.row_ids()
    assert window_pairs | pairs == set(zip(rows.tolist(), layout.indices.tolist()))
    assert len(fields) == 6


@pytest.mark.parametrize("size, knobs", SPLIT_CASES)
def test_lattice_split_against_reference(size, knobs):
    layout = build_layout("strided", *size, **knobs)
    assert layout.stencil_split() is not None
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, 20)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(5)) > 0.3
    active = torch.tensor([True, False, True])
    args = dict(key_mask=key_mask, head_active=active, dropout_p=0.2, dropout_seed=11)
    # forward with a bias
    out, lse = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(),
                         return_lse=True, **args)
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout,
                                              bias=bias.float(), **args)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    torch.testing.assert_close(out, whole_stencil(q.float(), k.float(), v.float(), layout,
                                                  rel_pos_bias=bias.float(), **args),
                               atol=2e-5, rtol=2e-5)
    # backward (a bias gradient would take the row kernels)
    grad_out = torch.randn(2, 3, n, 20, generator=torch.Generator().manual_seed(6))
    before = _torch_ops.stencil_backwards_run
    assert_backward_matches_reference(attention, layout, (q, k, v), grad_out, **args)
    assert _torch_ops.stencil_backwards_run == before + 1


def test_lattice_split_is_bitwise_the_same_for_any_thread_count():
    layout = build_layout("strided", 30, 41, kernel_size=5, stride=3)
    (q, k, v), _ = make(2, 3, layout.num_tokens, 24)
    before = get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            set_num_threads(threads)
            leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
            out = attention(*leaves, layout, dropout_p=0.1, dropout_seed=3)
            out.backward(torch.cos(out.detach()))
            results.append([out.detach()] + [leaf.grad for leaf in leaves])
    finally:
        set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_statistics_and_numpy_with_the_lattice_split():
    layout = build_layout("strided", 24, 24, kernel_size=5, stride=3)
    (q, k, v), _ = make(1, 2, layout.num_tokens, 16)
    # the lattice's tiles merge their statistics into the window's
    before = _torch_ops.stencil_forwards_run, C.cpu_window_forwards()
    out, stats = attention(q.float(), k.float(), v.float(), layout, return_stats=True)
    assert (_torch_ops.stencil_forwards_run, C.cpu_window_forwards()) == (before[0] + 1, before[1] + 1)
    ref = whole_stencil(q.float(), k.float(), v.float(), layout, return_stats=True)
    torch.testing.assert_close(out, ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(stats, ref[1], atol=2e-5, rtol=2e-5)
    expected = reference_statistics(reference_attention(q.float(), k.float(), v.float(), layout)[2])
    assert (stats.double() - expected).abs().max() < 2e-5 * expected.abs().max()
    # NumPy arrays take the same kernels as torch tensors, so the same bits
    arrays = [t.float().numpy() for t in (q, k, v)]
    np.testing.assert_array_equal(attention(*arrays, layout),
                                  attention(q.float(), k.float(), v.float(), layout).numpy())


def test_small_lattices_stay_on_the_stencil():
    # classes of fewer than MIN_CLASS_TOKENS tokens on average: no split
    assert build_layout("strided", 12, 12, kernel_size=7).stencil_split() is None
    assert build_layout("strided", 30, 30, kernel_size=3, stride=1).stencil_split() is None
    assert build_layout("longformer", 40, 40).stencil_split() is None


def test_a_stencil_with_a_lattice_plan_merges_statistics():
    layout = build_layout("strided", 24, 24, kernel_size=5, stride=3)
    window, buffer, fields = layout.stencil_split()
    q = torch.randn(1, 1, layout.num_tokens, 16)
    indptr, indices = torch.from_numpy(layout.indptr.copy()), torch.from_numpy(layout.indices.copy())
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:3])
    common = dict(height=24, width=24, scale=0.25, stencil=torch.from_numpy(window.copy()),
                  tile_plan=torch.from_numpy(buffer.copy()), tile_passes=fields)
    C.attention_forward(q, q, q, out, lse, indptr, indices, **common)
    ref_out, ref_lse, _ = reference_attention(q, q, q, layout, scale=0.25)
    assert (out.double() - ref_out).abs().max() < 2e-5
    stats = torch.full((1, 1, layout.num_tokens, 2), float("nan"))
    C.attention_forward(q, q, q, out, lse, indptr, indices, row_stats=stats, **common)
    expected = reference_statistics(reference_attention(q, q, q, layout, scale=0.25)[2])
    assert (stats.double() - expected).abs().max() < 2e-5 * expected.abs().max()
    with pytest.raises(ValueError, match="scale: expected a finite number, got nan"):
        C.attention_forward(q, q, q, out, lse, indptr, indices, **dict(common, scale=float("nan")))
    with pytest.raises(ValueError, match=r"dropout_p: expected a value in \[0, 1\), got 1.5"):
        C.attention_forward(q, q, q, out, lse, indptr, indices, dropout_p=1.5, **common)


@pytest.mark.parametrize("threads", [1, 2])
def test_reused_workspaces_leave_no_trace(threads):
    """Workspaces are reused across calls: after a call that fills them with
    NaN (a wider grid, so its rows land where the next call keeps padding), a
    call on a narrow odd grid must still match the reference. (Clearing only
    the padding instead of the whole block fails this unless every padding
    region is covered.)"""
    before = get_num_threads()
    set_num_threads(threads)
    try:
        wide = build_layout("longformer", 16, 40, kernel_size=7)
        poison = torch.full((2, 4, wide.num_tokens, 32), float("nan"))
        before_runs = _torch_ops.stencil_forwards_run
        attention(poison, poison, poison, wide)
        narrow = build_layout("longformer", 13, 21, kernel_size=5)
        (q, k, v), _ = make(1, 2, narrow.num_tokens, 24, seed=3)
        q, k, v = (t.float() for t in (q, k, v))
        out = attention(q, k, v, narrow)
        assert _torch_ops.stencil_forwards_run == before_runs + 2
        ref_out, _, _ = reference_attention(q, k, v, narrow)
        assert torch.isfinite(out).all()
        assert (out.double() - ref_out).abs().max() < 2e-5
    finally:
        set_num_threads(before)


# ---- the window kernel (csrc/attention_cpu_window.c) -------------------------

def strip_kernel(*args, **kwargs):
    """The same call with every stencil on the strip kernel."""
    return call_with(_stencil, "use_window_kernel", False, attention, *args, **kwargs)


WINDOW_CASES = [("longformer", dict(kernel_size=7, num_global_tokens=1)),
                ("longformer", dict(kernel_size=3, num_global_tokens=0)),
                ("longformer", dict(kernel_size=13, num_global_tokens=3)),  # the widest box it takes
                ("strided", dict(kernel_size=5, stride=3))]                 # a window with a hole (0, 0)
WINDOW_SIZES = [(1, 1), (1, 17), (9, 1), (7, 13), (33, 35), (20, 70)]


@pytest.mark.parametrize("dim", [8, 20, 32])
@pytest.mark.parametrize("size", WINDOW_SIZES)
@pytest.mark.parametrize("pattern, knobs", WINDOW_CASES)
def test_window_kernel_against_reference_and_the_strip_kernel(pattern, knobs, size, dim):
    layout = build_layout(pattern, *size, **knobs)
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, dim, seed=dim)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(5)) > 0.2
    args = dict(rel_pos_bias=bias.float(), key_mask=key_mask, head_active=torch.tensor([True, False, True]),
                dropout_p=0.15, dropout_seed=9, return_lse=True)
    args["return_stats"] = True  # STRIDED's lattice merges its statistics into the window's
    before = C.cpu_window_forwards()
    got = attention(q.float(), k.float(), v.float(), layout, **args)
    if pattern == "longformer":
        assert C.cpu_window_forwards() == before + 1
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(),
                                              key_mask=key_mask, head_active=args["head_active"],
                                              dropout_p=0.15, dropout_seed=9)
    assert_forward_matches_reference(got[0], got[1], ref_out, ref_lse, 2e-5)
    strips = strip_kernel(q.float(), k.float(), v.float(), layout, **args)
    for a, b in zip(got, strips):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_window_kernel_with_no_bias_mask_or_dropout():
    # head dim 64: two passes of four vectors over d
    layout = build_layout("longformer", 23, 29, kernel_size=7, num_global_tokens=2)
    (q, k, v), _ = make(1, 2, layout.num_tokens, 64)
    before = C.cpu_window_forwards()
    out, lse = attention(q.float(), k.float(), v.float(), layout, return_lse=True)
    assert C.cpu_window_forwards() == before + 1
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)


def test_window_kernel_leaves_wide_windows_to_the_strip_kernel():
    # a 15 x 15 window is past the 13 x 13 box the window kernel keeps in registers
    layout = build_layout("longformer", 20, 21, kernel_size=15, num_global_tokens=1)
    (q, k, v), _ = make(1, 2, layout.num_tokens, 16)
    before = C.cpu_window_forwards()
    out, lse = attention(q.float(), k.float(), v.float(), layout, return_lse=True)
    assert C.cpu_window_forwards() == before
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)


def test_window_kernel_leaves_sparse_offsets_to_the_strip_kernel():
    """Offsets that fill under half of their box (here 3 of 2 x 12: rows in
    steps of 6, which they share) would waste most of a block's union: the
    strip kernel takes them."""
    layout = build_layout("longformer", 16, 16, kernel_size=13, num_global_tokens=0)
    packed = np.array([3, 0, 0, 0, -6, 0, 0, 6, 5], dtype=np.int32)
    (q, k, v), _ = make(1, 2, layout.num_tokens, 16)
    arrays = [t.float().numpy() for t in (q, k, v)]
    results = []
    for window_kernel in (True, False):
        out = np.empty_like(arrays[0])
        lse = np.empty(arrays[0].shape[:3], dtype=np.float32)
        before = C.cpu_window_forwards()
        C.attention_forward(*arrays, out, lse, layout.indptr, layout.indices, height=16, width=16, scale=0.25,
                            stencil=packed, stencil_strips=not window_kernel)
        assert C.cpu_window_forwards() == before
        results.append((out, lse))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    # row (8, 8) attends (8, 2), (8, 8) and (14, 13): check it by hand
    i, keys = 8 * 16 + 8, [8 * 16 + 2, 8 * 16 + 8, 14 * 16 + 13]
    scores = torch.stack([(q[0, :, i] * k[0, :, j]).sum(-1) * 0.25 for j in keys], -1).float()
    expected = torch.einsum("hk,hkd->hd", torch.softmax(scores.double(), -1), v[0, :, keys].double())
    np.testing.assert_allclose(results[0][0][0, :, i], expected.numpy(), atol=2e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_window_kernel_gives_the_same_bits_for_any_thread_count(threads):
    layout = build_layout("longformer", 37, 19, kernel_size=7, num_global_tokens=2)
    (q, k, v), bias = make(2, 3, layout.num_tokens, 24, bias_side=9)
    args = dict(rel_pos_bias=bias.float(), dropout_p=0.1, dropout_seed=3, return_lse=True, return_stats=True)
    before = get_num_threads()
    try:
        set_num_threads(1)
        expected = attention(q.float(), k.float(), v.float(), layout, **args)
        set_num_threads(threads)
        got = attention(q.float(), k.float(), v.float(), layout, **args)
    finally:
        set_num_threads(before)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dim", [8, 20, 32])
@pytest.mark.parametrize("size", WINDOW_SIZES[:5])  # 20 x 70 adds time, not paths (33 x 35 has them all)
@pytest.mark.parametrize("pattern, knobs", WINDOW_CASES)
def test_window_backward_against_reference_and_the_strip_kernel(pattern, knobs, size, dim):
    layout = build_layout(pattern, *size, **knobs)
    n = layout.num_tokens
    (q, k, v), _ = make(2, 3, n, dim, seed=dim + 1)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(6)) > 0.2
    args = dict(key_mask=key_mask, head_active=torch.tensor([True, False, True]), dropout_p=0.15, dropout_seed=9)
    grad_out = torch.randn(2, 3, n, dim, generator=torch.Generator().manual_seed(7))
    before = C.cpu_window_backwards()
    assert_backward_matches_reference(attention, layout, (q, k, v), grad_out, **args)
    if pattern == "longformer":
        assert C.cpu_window_backwards() == before + 1

    def gradients(run):
        leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
        run(*leaves, layout, **args).backward(grad_out.float())
        return [leaf.grad for leaf in leaves]

    window = gradients(attention)
    strips = gradients(strip_kernel)
    before = C.cpu_window_backwards()
    call_with(_stencil, "use_window_kernel", False, gradients, attention)
    assert C.cpu_window_backwards() == before  # the switch reaches the backward too
    for a, b in zip(window, strips):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("dim", [20, 72])
@pytest.mark.parametrize("pattern, knobs", WINDOW_CASES)
def test_window_kernel_on_its_16_and_32_register_paths(monkeypatch, pattern, knobs, dim, narrow):
    """Where the CPU has 32 vector registers (x86-64-v4) the window kernel
    takes two union rows a pass and P x V (dQ in the backward) four lanes at a
    time; SPARSE_ATTENTION_NARROW_KERNELS turns that off, so that both paths
    run here on such a machine (elsewhere both runs take the narrow one)."""
    if narrow:
        monkeypatch.setenv("SPARSE_ATTENTION_NARROW_KERNELS", "1")
        assert C.cpu_wide_kernels() == 0
    layout = build_layout(pattern, 33, 35, **knobs)
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, dim, seed=dim + 2)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(3)) > 0.2
    args = dict(key_mask=key_mask, head_active=torch.tensor([True, False, True]), dropout_p=0.15, dropout_seed=4)
    before = C.cpu_window_forwards()
    out, lse = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), return_lse=True, **args)
    assert C.cpu_window_forwards() == before + 1
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(), **args)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    grad_out = torch.randn(2, 3, n, dim, generator=torch.Generator().manual_seed(dim))
    before = C.cpu_window_backwards()
    assert_backward_matches_reference(attention, layout, (q, k, v), grad_out, **args)
    assert C.cpu_window_backwards() == before + 1


def test_window_backward_leaves_partial_listed_rows_to_the_strip_kernel():
    """A listed row that attends only some tokens needs the row kernel's
    backward, which only the strip kernel's backward runs: with one, the
    window backward steps aside, and the gradients match the reference."""
    layout = build_layout("longformer", 9, 12, kernel_size=5, num_global_tokens=1)
    packed = layout.stencil()
    num_offsets, num_keys, num_rows = (int(x) for x in packed[:3])
    listed_more = torch.from_numpy(np.concatenate([[num_offsets, num_keys, num_rows + 1], packed[3:], [40]])
                                   .astype(np.int32))
    (q, k, v), _ = make(1, 2, layout.num_tokens, 16)
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    tensors = {name: torch.from_numpy(getattr(layout, name).copy())
               for name in ("indptr", "indices", "col_ptr", "row_indices")}
    common = dict(height=layout.height, width=layout.width, scale=0.3)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
    C.attention_forward(q, k, v, out, lse, tensors["indptr"], tensors["indices"], stencil=listed_more, **common)
    grads = [torch.empty_like(q) for _ in range(3)]
    before = C.cpu_window_backwards()
    grad_out = torch.randn_like(q)
    C.attention_backward(q, k, v, out, grad_out, lse, torch.empty(q.shape[:3]), *grads, tensors["indptr"],
                         tensors["indices"], tensors["col_ptr"], tensors["row_indices"], stencil=listed_more,
                         **common)
    assert C.cpu_window_backwards() == before
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    reference_attention(*ref, layout, scale=0.3)[0].backward(grad_out.double())
    for got, r in zip(grads, ref):
        assert (got.double() - r.grad).abs().max() < 5e-5


def test_window_backward_with_a_wide_head_dim():
    # head dim 72: two passes of four vectors over d, then one of one
    layout = build_layout("longformer", 23, 29, kernel_size=7, num_global_tokens=2)
    (q, k, v), _ = make(1, 2, layout.num_tokens, 72)
    grad_out = torch.randn(1, 2, layout.num_tokens, 72, generator=torch.Generator().manual_seed(8))
    before = C.cpu_window_backwards()
    assert_backward_matches_reference(attention, layout, (q, k, v), grad_out)
    assert C.cpu_window_backwards() == before + 1


def test_the_split_needs_no_whole_stencil(monkeypatch):
    """Past MAX_OFFSETS lattice offsets (sides over 225 at stride 7) STRIDED
    is no stencil, but the split still runs, its rows checked in C against
    the window and the lattice: here with the limit lowered to 40."""
    monkeypatch.setattr(_stencil, "MAX_OFFSETS", 40)
    layout = build_layout("strided", 41, 37, kernel_size=5, stride=3)
    assert layout.stencil() is None and layout.stencil_split() is not None
    assert _stencil.cpu_route_name(layout) == "window + tiles"
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, 20)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(5)) > 0.3
    args = dict(key_mask=key_mask, head_active=torch.tensor([True, False, True]), dropout_p=0.2, dropout_seed=11)
    before = C.cpu_window_forwards()
    out, lse = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), return_lse=True,
                         **args)
    assert C.cpu_window_forwards() == before + 1
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(), **args)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    grad_out = torch.randn(2, 3, n, 20, generator=torch.Generator().manual_seed(6))
    assert_backward_matches_reference(attention, layout, (q, k, v), grad_out, **args)


def test_the_window_and_lattice_check_finds_any_pair_amiss():
    layout = build_layout("strided", 23, 19, kernel_size=5, stride=4)
    window = np.array([(a, b) for a in range(-2, 3) for b in range(-2, 3) if a % 4 or b % 4], dtype=np.int32)
    indptr, indices = layout.indptr, layout.indices

    def matches(indptr, indices, offsets=window, stride=4):
        return C.stencil_matches(indptr, indices, 23, 19, offsets.reshape(-1), lattice_stride=stride)
    assert matches(indptr, indices)
    assert not matches(indptr, indices, window[1:])  # a window offset the rows hold
    assert not matches(indptr, indices, stride=3)
    row = 200
    dropped = np.delete(indices, indptr[row] + 3)
    fewer = indptr.copy()
    fewer[row + 1:] -= 1
    assert not matches(fewer, dropped)
    swapped = indices.copy()
    swapped[indptr[row]], swapped[indptr[row] + 1] = swapped[indptr[row] + 1], swapped[indptr[row]]
    assert not matches(indptr, swapped)  # keys must ascend
    # a rule naming a pair twice matches no layout: its kernels would count the pair twice
    assert not matches(indptr, indices, np.concatenate([window, [(4, 0)]]).astype(np.int32))
    assert matches(indptr, indices, np.concatenate([window, window[:1]])) is False
    with pytest.raises(ValueError, match=r"offsets: \(0, 19\) is off the 23 x 19 grid's span"):
        matches(indptr, indices, np.array([(0, 19)], dtype=np.int32))
    with pytest.raises(ValueError, match="offsets: expected \\(dy, dx\\) pairs, got 3 numbers"):
        C.stencil_matches(indptr, indices, 23, 19, np.array([1, 2, 3], dtype=np.int32))
    with pytest.raises(ValueError, match="indptr"):
        C.stencil_matches(indptr[:-1], indices, 23, 19, window.reshape(-1))
    with pytest.raises(ValueError, match="lattice_stride: expected >= 1, or 0 for no lattice, got -1"):
        matches(indptr, indices, stride=-1)
    with pytest.raises(ValueError, match=r"keys: entry 1 is 437, outside \[0, 437\)"):
        C.stencil_matches(indptr, indices, 23, 19, window.reshape(-1), np.array([0, 437], dtype=np.int32))
    assert C.stencil_matches(indptr, indices, 23, 19, window.reshape(-1), np.array([5, 5], dtype=np.int32)) is False
    with pytest.raises(ValueError, match=r"rows: entry 0 is -1"):
        C.stencil_matches(indptr, indices, 23, 19, window.reshape(-1), None, np.array([-1], dtype=np.int32))
    with pytest.raises(TypeError, match="offsets: expected an array, got None"):
        C.stencil_matches(indptr, indices, 23, 19, None)
    with pytest.raises(TypeError, match="offsets: expected dtype int32, got int64"):
        C.stencil_matches(indptr, indices, 23, 19, window.reshape(-1).astype(np.int64))


def rule_mask(height, width, offsets, keys, lattice_stride):
    """[N, N] bool: the pairs a stencil rule gives every row, straight from its definition."""
    ys, xs = np.divmod(np.arange(height * width), width)
    mask = np.zeros((height * width,) * 2, dtype=bool)
    for dy, dx in offsets:
        mask |= (ys[None, :] == ys[:, None] + dy) & (xs[None, :] == xs[:, None] + dx)
    if lattice_stride:
        mask |= ((ys[None, :] - ys[:, None]) % lattice_stride == 0) & \
                ((xs[None, :] - xs[:, None]) % lattice_stride == 0)
    mask[:, keys] = True
    return mask


def csr_of(mask):
    rows, cols = np.nonzero(mask)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=mask.shape[0]))]).astype(np.int64)
    return indptr, cols.astype(np.int32)


@pytest.mark.parametrize("seed", range(40))
def test_the_stencil_check_agrees_with_its_definition(seed):
    """C.stencil_matches on random rules and on CSRs that are the rule, the rule
    with one pair added or taken away, or anything in the listed rows."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(1, 9, size=2))
    n = height * width
    stride = int(rng.choice([0, 0, 2, 3]))
    span = [(a, b) for a in range(1 - height, height) for b in range(1 - width, width)
            if not (stride and a % stride == 0 and b % stride == 0)]
    offsets = [span[i] for i in rng.permutation(len(span))[:int(rng.integers(0, len(span) + 1))]]
    keys = rng.permutation(n)[:int(rng.integers(0, 3))].astype(np.int32)
    rows = rng.permutation(n)[:int(rng.integers(0, 3))].astype(np.int32)
    mask = rule_mask(height, width, offsets, keys, stride)
    packed = np.array(offsets, dtype=np.int32).reshape(-1)

    def check(candidate):
        return C.stencil_matches(*csr_of(candidate), height, width, packed, keys, rows, lattice_stride=stride)
    assert check(mask)
    listed = np.zeros(n, dtype=bool)
    listed[rows] = True
    for _ in range(4):
        query, key = (int(v) for v in rng.integers(0, n, size=2))
        changed = mask.copy()
        changed[query, key] = not changed[query, key]
        assert check(changed) == bool(listed[query])
    anything = mask.copy()
    anything[rows] = rng.random((rows.size, n)) < 0.5
    assert check(anything)
