"""NATTEN's neighbourhood attention: a whole box of keys clamped to the grid,
built by neighborhood_layout (or found in any custom layout) and run on the
CPU window kernel as a clamped stencil. Everything against the float64
reference."""

import functools
import pickle
import warnings

import numpy as np
import pytest
import torch

from reference import (assert_backward_matches_reference, assert_bias_gradients_match_reference,
                       assert_forward_matches_reference, bias_gradients, bias_training_inputs, random_inputs,
                       reference_attention, reference_statistics)
from sparse_attention import (EnhancedSparseAttention, _stencil, build_layout, layout_from_rule,
                              neighborhood_layout, set_num_threads, get_num_threads)
from sparse_attention import sparse_scaled_dot_product_attention as attention
from sparse_attention._native import C


def natten_axis(size, kernel, dilation, stride=1, causal=False):
    """Per coordinate, its keys on one axis, straight from the definition: in
    its residue class, the ``kernel`` tokens nearest to its stride group's
    middle member, the window slid inward at the ends (every class takes as
    many as the smallest holds); causal: the tokens at or before it, back to
    ``kernel`` - 1 before its group's last member."""
    classes = [list(range(r, size, dilation)) for r in range(min(dilation, size))]
    count = min(kernel, min(len(c) for c in classes))
    keys = []
    for i in range(size):
        members = classes[i % dilation]
        index = i // dilation
        group = list(range(index - index % stride, min(index - index % stride + stride, len(members))))
        if causal:
            keys.append(members[max(0, group[-1] - kernel + 1):index + 1])
            continue
        leader = group[min(stride // 2, len(group) - 1)]
        start = max(0, min(leader - kernel // 2, len(members) - count))
        keys.append(members[start:start + count])
    return keys


def clamped_rule(height, width, box, corner):
    """A box of box[0] x box[1] keys whose top-left is corner = (dy, dx) from the
    query, slid back onto the grid: the same layout as neighborhood_layout for
    a centred box, and off-centre ones too."""
    def rule(yi, xi, yj, xj):
        y0 = np.clip(yi + corner[0], 0, height - box[0])
        x0 = np.clip(xi + corner[1], 0, width - box[1])
        return (yj >= y0) & (yj < y0 + box[0]) & (xj >= x0) & (xj < x0 + box[1])
    return layout_from_rule(rule, height, width, name="clamped box")


@pytest.mark.parametrize("height, width", [(1, 1), (1, 9), (9, 1), (7, 13), (10, 10), (16, 5)])
@pytest.mark.parametrize("kernel, dilation, stride, causal", [
    (1, 1, 1, False), (3, 1, 1, False), (4, 1, 1, False), (7, 1, 1, False), ((3, 5), 1, 1, False), (3, 2, 1, False),
    (3, (1, 3), 1, False), (3, 1, 2, False), (5, 2, 3, False), (4, 1, 4, False), ((3, 5), 1, (1, 2), False),
    (3, 1, 1, True), (5, 2, 2, True), (4, 1, 3, (True, False)), ((3, 5), (2, 1), (1, 5), (False, True))])
def test_neighborhood_layout_matches_its_definition(height, width, kernel, dilation, stride, causal):
    layout = neighborhood_layout(height, width, kernel, dilation=dilation, stride=stride, is_causal=causal)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ch, cw = (causal, causal) if isinstance(causal, bool) else causal
    rows, cols = natten_axis(height, kh, dh, sh, ch), natten_axis(width, kw, dw, sw, cw)
    for token in range(height * width):
        y, x = divmod(token, width)
        expected = [a * width + b for a in rows[y] for b in cols[x]]
        assert layout.neighbors(token).tolist() == expected
    assert layout.pattern is None and layout.name.startswith("neighborhood")


@pytest.mark.parametrize("stride, causal", [(2, False), (3, True), ((1, 7), (False, True))])
def test_strided_and_causal_neighbourhoods_match_the_reference(stride, causal):
    """Generalised (strided) and causal neighbourhoods go wherever their
    plans send them; forward and backward with a bias, key mask, pruned head
    and dropout against the reference."""
    layout = neighborhood_layout(13, 11, 7, stride=stride, is_causal=causal)
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, bias_side=13, dim=20)
    out, lse = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), return_lse=True,
                         **args)
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(), **args)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)


@pytest.mark.parametrize("height, width, kernel, dilation, stride, causal", [
    (7, 13, 7, 1, 1, False), (14, 14, 7, 1, 1, False), (16, 16, 7, 2, 1, False), (9, 20, 3, 3, 1, False),
    (12, 12, 5, (1, 2), 1, False), (7, 13, (3, 5), 1, 1, False), (10, 10, 4, 1, 1, False),
    (16, 11, 5, 1, 2, False), (14, 14, 7, 2, (3, 7), False), (13, 9, 4, 1, 1, True), (16, 16, 5, 2, 2, True),
    (11, 14, (3, 7), 1, (2, 3), (True, False))])
def test_natten_gives_what_our_neighbourhood_gives(height, width, kernel, dilation, stride, causal):
    """NATTEN itself (when installed) as a second definition: its na2d on the CPU against the op."""
    natten = pytest.importorskip("natten")
    gen = torch.Generator().manual_seed(height * width)
    batch, heads, dim = 2, 3, 16
    q, k, v = (torch.randn(batch, height, width, heads, dim, generator=gen) for _ in range(3))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its CPU path warns that Flex Attention runs uncompiled
        theirs = natten.na2d(q, k, v, kernel_size=kernel, dilation=dilation, stride=stride, is_causal=causal)

    def heads_first(t):
        return t.reshape(batch, height * width, heads, dim).transpose(1, 2)
    layout = neighborhood_layout(height, width, kernel, dilation=dilation, stride=stride, is_causal=causal)
    ours = attention(*(heads_first(t) for t in (q, k, v)), layout)
    torch.testing.assert_close(ours, heads_first(theirs), rtol=1e-5, atol=1e-5)


def test_neighborhood_layout_refuses_bad_arguments():
    with pytest.raises(ValueError, match="kernel_size: expected >= 1"):
        neighborhood_layout(8, 8, 0)
    with pytest.raises(ValueError, match=r"dilation: expected an int or \(rows, cols\)"):
        neighborhood_layout(8, 8, 3, dilation=(1, 2, 3))
    with pytest.raises(TypeError, match="kernel_size"):
        neighborhood_layout(8, 8, 2.5)
    with pytest.raises(ValueError, match="height: expected >= 1"):
        neighborhood_layout(0, 8, 3)
    with pytest.raises(ValueError, match=r"stride: expected <= kernel_size on each axis .* \(3, 4\) for kernel_size "
                                         r"\(3, 3\)"):
        neighborhood_layout(8, 8, 3, stride=(3, 4))
    with pytest.raises(ValueError, match="stride: expected >= 1"):
        neighborhood_layout(8, 8, 3, stride=0)
    with pytest.raises(ValueError, match=r"is_causal: expected a bool or \(rows, cols\) of bools, got 1"):
        neighborhood_layout(8, 8, 3, is_causal=1)


@pytest.mark.parametrize("layout_args, clamped, choice", [
    ((16, 16, 7), True, "stencil"), ((12, 12, 7), True, "stencil"), ((7, 13, 5), True, "stencil"),
    ((1, 9, 3), True, "stencil"), ((10, 10, 4), True, "stencil"), ((20, 20, 13), True, "stencil"),
    ((16, 16, 15), True, "tiles"),  # past the window kernel's 13 x 13 box, which alone runs it
    ((14, 14, 13), True, "tiles"),  # its tiles fill 0.81 of their slots: faster there (CUSTOM_WINDOW_MAX_FILL)
    ((7, 7, 7), False, "tiles"),  # the whole grid: a plain stencil, but the tiles fill well
])
def test_a_neighbourhood_is_found_as_a_clamped_window(layout_args, clamped, choice):
    layout = neighborhood_layout(*layout_args)
    stencil = layout.stencil()
    assert (stencil is not None and _stencil.is_clamped(stencil)) == clamped
    assert _stencil.cpu_kernel_choice(layout) == choice
    if clamped:
        assert not _stencil.sums_bias_grad(stencil)  # the strips never run it
        box = stencil[3:3 + 2 * int(stencil[0])].reshape(-1, 2)
        assert box[:, 0].max() - box[:, 0].min() + 1 == min(layout_args[2], layout_args[0])


def test_what_is_not_a_whole_clamped_box_is_not_taken_for_one():
    full = neighborhood_layout(12, 12, 5)
    mask = full.to_dense()
    mask[0, 0] = False  # one row a key short
    from sparse_attention import layout_from_mask
    assert layout_from_mask(mask, 12, 12).stencil() is None or \
        not _stencil.is_clamped(layout_from_mask(mask, 12, 12).stencil())
    _stencil.use_clamped_window = False
    try:
        assert neighborhood_layout(12, 12, 5).stencil() is None
    finally:
        _stencil.use_clamped_window = True


def assert_window_kernel_matches_reference(layout, bias_side):
    """A training call (bias, key mask, pruned head, dropout) on the window
    kernel, forward and backward (counted), against the reference."""
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, bias_side=bias_side, dim=20)
    forwards, backwards = C.cpu_window_forwards(), C.cpu_window_backwards()
    out, lse = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), return_lse=True,
                         **args)
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(), **args)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)
    assert (C.cpu_window_forwards(), C.cpu_window_backwards()) == (forwards + 2, backwards + 1)
    return q, k, v, grad_out


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("grid, kernel, dilation", [((12, 12), 3, 2), ((13, 17), 5, 3), ((17, 9), (3, 5), (2, 1)),
                                                    ((16, 16), 7, 2), ((7, 20), (1, 3), (1, 4)), ((11, 11), 3, 3)])
def test_dilated_neighbourhoods_run_on_the_window_kernel(grid, kernel, dilation, narrow, monkeypatch):
    """DiNAT's dilated neighbourhood: every class of tokens modulo the
    dilation is a clamped window of its own, which the window kernel runs as
    a grid of its own (its rows and columns `dilation` tokens apart)."""
    if narrow:
        monkeypatch.setenv("SPARSE_ATTENTION_NARROW_KERNELS", "1")
    monkeypatch.setattr(_stencil, "CUSTOM_WINDOW_MAX_FILL", float("inf"))
    layout = neighborhood_layout(*grid, kernel, dilation=dilation)
    assert _stencil.is_clamped(layout.stencil()) and _stencil.cpu_kernel_choice(layout) == "stencil"
    assert_window_kernel_matches_reference(layout, bias_side=11)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("grid, kernel, dilation, stride", [
    ((13, 17), 7, 1, 2), ((16, 16), 5, 1, 4), ((23, 14), (7, 5), 1, (2, 4)), ((20, 21), 3, 2, 2),
    ((9, 30), (3, 7), (1, 2), (1, 2)), ((12, 12), 7, 1, (4, 1)), ((24, 26), 9, 1, 8), ((11, 10), 5, 1, (1, 4))])
def test_strided_neighbourhoods_run_on_the_window_kernel(grid, kernel, dilation, stride, narrow, monkeypatch):
    """NATTEN's generalised neighbourhood (runs of queries share their middle
    member's window) with strides that divide the kernel's 4 x 2 blocks or
    are multiples of them: the blocks' lanes take their leaders' windows."""
    if narrow:
        monkeypatch.setenv("SPARSE_ATTENTION_NARROW_KERNELS", "1")
    monkeypatch.setattr(_stencil, "CUSTOM_WINDOW_MAX_FILL", float("inf"))
    layout = neighborhood_layout(*grid, kernel, dilation=dilation, stride=stride)
    stencil = layout.stencil()
    assert _stencil.is_clamped(stencil) and _stencil.cpu_kernel_choice(layout) == "stencil"
    assert _stencil.query_strides(stencil) == ((stride, stride) if isinstance(stride, int) else stride)
    assert_window_kernel_matches_reference(layout, bias_side=13)


def test_strides_the_blocks_do_not_take_go_to_the_tiles():
    layout = neighborhood_layout(20, 20, 7, stride=3)
    assert layout.stencil() is None and _stencil.cpu_kernel_choice(layout) == "tiles"
    assert _stencil.query_strides(neighborhood_layout(20, 20, 7).stencil()) == (1, 1)


CASES = [((16, 16), (7, 7), (-3, -3)), ((12, 12), (7, 7), (-3, -3)), ((7, 13), (5, 5), (-2, -2)),
         ((1, 9), (1, 3), (0, -1)), ((9, 1), (3, 1), (-1, 0)), ((10, 10), (4, 4), (-2, -2)),
         ((20, 11), (5, 5), (-4, -4)), ((10, 12), (3, 3), (0, 0)), ((14, 14), (13, 13), (-6, -6)),
         ((30, 17), (9, 3), (-4, -1)), ((6, 18), (2, 13), (-1, -6))]


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("grid, box, corner", CASES)
def test_clamped_window_matches_the_reference(grid, box, corner, narrow, monkeypatch):
    """Forward and backward on the window kernel (counted), centred and
    off-centre boxes, against the reference with a bias, a key mask, a pruned
    head and dropout; on the 32- and 16-register paths."""
    if narrow:
        monkeypatch.setenv("SPARSE_ATTENTION_NARROW_KERNELS", "1")
    monkeypatch.setattr(_stencil, "CUSTOM_WINDOW_MAX_FILL", float("inf"))  # the window kernel, however full
    layout = clamped_rule(*grid, box, corner)
    assert _stencil.is_clamped(layout.stencil())
    q, k, v, grad_out = assert_window_kernel_matches_reference(layout, bias_side=9)
    backwards = C.cpu_window_backwards()
    assert_backward_matches_reference(attention, layout, (q, k, v), grad_out)  # no bias, no mask
    assert C.cpu_window_backwards() == backwards + 1


@pytest.mark.parametrize("dim", [8, 33, 64])
def test_clamped_window_statistics_match_the_reference(dim):
    layout = neighborhood_layout(11, 14, 5)
    (q, k, v), bias = random_inputs(2, 3, layout.num_tokens, dim, seed=dim, bias_side=9)
    key_mask = torch.rand(2, layout.num_tokens, generator=torch.Generator().manual_seed(1)) > 0.3
    out, stats = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), key_mask=key_mask,
                           return_stats=True)
    _, _, probs = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(), key_mask=key_mask)
    expected = reference_statistics(probs)
    assert (stats.double() - expected).abs().max() < 2e-5 * max(1.0, expected.abs().max().item())


def test_a_row_whose_keys_are_all_masked_gives_zero_and_minus_infinity():
    layout = neighborhood_layout(9, 9, 3)
    (q, k, v), _ = random_inputs(1, 2, 81, 16)
    key_mask = torch.ones(1, 81, dtype=torch.bool)
    key_mask[0, [0, 1, 2, 9, 10, 11, 18, 19, 20]] = False  # the corner's box, which four queries share
    out, lse = attention(q.float(), k.float(), v.float(), layout, key_mask=key_mask, return_lse=True)
    empty = torch.zeros(81, dtype=torch.bool)
    empty[[0, 1, 9, 10]] = True
    assert torch.equal(out[0][:, empty], torch.zeros_like(out[0][:, empty]))
    assert torch.isinf(lse[0][:, empty]).all() and torch.isfinite(lse[0][:, ~empty]).all()
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout, key_mask=key_mask)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)


def test_clamped_window_bits_do_not_depend_on_threads():
    layout = neighborhood_layout(20, 20, 7)
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, bias_side=11, batch=2, heads=4, dim=24)
    threads = get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            set_num_threads(count)
            results.append(bias_gradients(attention, layout, q, k, v, bias, grad_out, **args))
    finally:
        set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_past_the_window_kernel_the_rows_run_it():
    """Head dims over 256 and float64 are not the window kernel's: the row
    kernels run the same CSR (the C side steps aside for a clamped stencil)."""
    layout = neighborhood_layout(6, 7, 3)
    (q, k, v), _ = random_inputs(1, 2, 42, 300)
    before = C.cpu_window_forwards()
    out = attention(q.float(), k.float(), v.float(), layout)
    assert C.cpu_window_forwards() == before
    ref_out, _, _ = reference_attention(q.float(), k.float(), v.float(), layout)
    assert (out.double() - ref_out).abs().max() < 2e-5
    assert_backward_matches_reference(attention, layout, (q, k, v), torch.randn(1, 2, 42, 300))
    torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, neighborhood_layout(4, 5, 3)),
                             [t[..., :20, :6].clone().requires_grad_() for t in random_inputs(1, 2, 20, 6)[0]])


def test_the_binding_checks_a_clamped_stencil():
    layout = neighborhood_layout(8, 8, 3)
    tensors = {name: torch.from_numpy(getattr(layout, name).copy()) for name in ("indptr", "indices")}
    q = torch.randn(1, 1, 64, 8)
    out, lse = torch.empty_like(q), torch.empty(1, 1, 64)

    def refused(stencil, message, **extra):
        with pytest.raises(ValueError, match=message):
            C.attention_forward(q, q, q, out, lse, tensors["indptr"], tensors["indices"], height=8, width=8,
                                scale=0.3, stencil=torch.tensor(stencil, dtype=torch.int32), **extra)

    box = [a for dy in (-1, 0, 1) for dx in (-1, 0, 1) for a in (dy, dx)]
    refused([9, 0, 0] + box + [2], "unknown flags 2")
    refused([9, 1, 0] + box + [5, 1], "offsets alone")
    refused([8, 0, 0] + box[:16] + [1], "whole box")
    refused([9, 0, 0] + box[:16] + [0, 0, 1], "given twice|whole box")
    wide = [a for dx in range(-4, 5) for a in (0, dx)]
    refused([9, 0, 0] + wide + [1], "within the 8 x 8 grid")
    refused([9, 0, 0] + box + [0, 0], "optionally a flags word")
    refused([9, 0, 0] + box + [1 << 8], r"query strides are for a window clamped to the grid")
    refused([9, 0, 0] + box + [1 | (2 << 8)], r"query strides 3 x 1 do not suit a 3 x 3 clamped window")
    refused([9, 0, 0] + box + [1 | (3 << 16)], r"query strides 1 x 4 do not suit a 3 x 3 clamped window")
    refused([9, 0, 0] + box + [1 | (1 << 24)], "unknown flags")
    C.attention_forward(q, q, q, out, lse, tensors["indptr"], tensors["indices"], height=8, width=8, scale=0.3,
                        stencil=torch.tensor([9, 0, 0] + box + [1], dtype=torch.int32))
    ref_out, _, _ = reference_attention(q, q, q, layout, scale=0.3)
    assert (out.double() - ref_out).abs().max() < 2e-5


def test_module_trains_on_a_neighbourhood_and_pickles():
    torch.manual_seed(0)
    pattern = functools.partial(neighborhood_layout, kernel_size=5)
    module = EnhancedSparseAttention(16, 16, num_heads=2, sparsity_pattern=pattern)
    x = torch.randn(2, 16, 9, 11, requires_grad=True)
    before = C.cpu_window_backwards()
    module(x).sum().backward()
    assert C.cpu_window_backwards() == before + 1
    assert module.get_attention_stats().pattern_type == "neighborhood_layout"  # the partial's function
    assert x.grad is not None and torch.isfinite(x.grad).all()
    copy = pickle.loads(pickle.dumps(module))
    module.eval(), copy.eval()
    x = torch.randn(1, 16, 9, 11)
    torch.testing.assert_close(copy(x), module(x))
    module.use_cuda_kernel = False  # the PyTorch path over the same pairs
    torch.testing.assert_close(module(x), copy(x), atol=2e-5, rtol=1e-4)


def test_numpy_inputs_take_the_clamped_window():
    layout = neighborhood_layout(10, 9, 5)
    (q, k, v), _ = random_inputs(1, 2, 90, 16)
    arrays = [t.float().numpy() for t in (q, k, v)]
    before = C.cpu_window_forwards()
    out = attention(*arrays, layout)
    assert C.cpu_window_forwards() == before + 1
    assert np.array_equal(out, attention(q.float(), k.float(), v.float(), layout).numpy())


def test_the_layout_builders_agree():
    assert np.array_equal(neighborhood_layout(13, 17, 7).indices, clamped_rule(13, 17, (7, 7), (-3, -3)).indices)
    assert np.array_equal(neighborhood_layout(13, 17, (3, 5)).indices,
                          clamped_rule(13, 17, (3, 5), (-1, -2)).indices)
    assert build_layout("longformer", 13, 17, kernel_size=7, num_global_tokens=0).nnz < \
        neighborhood_layout(13, 17, 7).nnz == 13 * 17 * 49


def test_many_heads_share_one_bias_table_per_thread():
    """A thread keeps every head's bias tables while they take at most 64 MiB
    (a 13 x 13 clamped box: 169 anchors of 224 union slots, 1.2 MB a head);
    past that, one head's at a time. Both against the reference."""
    layout = neighborhood_layout(20, 20, 13)
    for heads in (2, 60):
        q, k, v, bias, grad_out, args = bias_training_inputs(layout, bias_side=15, batch=1, heads=heads, dim=8)
        before = C.cpu_window_backwards()
        got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
        assert C.cpu_window_backwards() == before + 1
        assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)


def test_command_lines_name_the_neighbourhood():
    from sparse_attention.custom_layouts import layout_of, pattern_from_spec

    pattern = pattern_from_spec("sparse_attention:neighborhood_layout")
    assert pattern.name == "neighborhood_layout"
    assert np.array_equal(layout_of(pattern, 9, 10).indices, neighborhood_layout(9, 10, 7).indices)


@pytest.mark.parametrize("pattern, knobs", [("strided", dict(kernel_size=1, stride=9)),
                                            ("strided", dict(kernel_size=1, stride=4))])
def test_offsets_that_share_a_divisor_run_on_the_window_kernel(pattern, knobs):
    """A stencil whose offsets are all multiples of (s_y, s_x) links only tokens
    of the same class modulo the steps (STRIDED without its window: the lattice
    alone): the window kernel runs each class as a grid of its own."""
    layout = build_layout(pattern, 19, 21, **knobs)
    assert layout.stencil() is not None and _stencil.window_takes(layout.stencil(), 16)
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, bias_side=41, dim=16)
    forwards, backwards = C.cpu_window_forwards(), C.cpu_window_backwards()
    got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    assert (C.cpu_window_forwards(), C.cpu_window_backwards()) == (forwards + 1, backwards + 1)
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)


def random_stencil_case(rng):
    """A random grid and a stencil of offsets alone on it (a plain one, or a
    clamped box, with or without query strides), dilated by random steps,
    with the CSR it stands for."""
    from sparse_attention._stencil import _pack, clamped_axis_keys

    height, width = (int(x) for x in rng.integers(1, 21, size=2))
    step_y = int(rng.integers(1, 4)) if height > 3 else 1
    step_x = int(rng.integers(1, 4)) if width > 3 else 1
    n = height * width
    if rng.random() < 0.5:  # clamped: a whole box, clamped within each class
        box_h = int(rng.integers(1, min(13, height // step_y) + 1))
        box_w = int(rng.integers(1, min(13, width // step_x) + 1))
        lo_y, lo_x = int(rng.integers(-box_h + 1, 1)), int(rng.integers(-box_w + 1, 1))
        offsets = [((lo_y + a) * step_y, (lo_x + b) * step_x) for a in range(box_h) for b in range(box_w)]
        # query strides the window kernel's 4 x 2 blocks take, up to the box
        stride_y = int(rng.choice([s for s in (1, 1, 2, 4, 8) if s <= box_h]))
        stride_x = int(rng.choice([s for s in (1, 1, 2, 4, 6) if s <= box_w]))
        rows = clamped_axis_keys(height, lo_y, box_h, step_y, stride_y)
        cols = clamped_axis_keys(width, lo_x, box_w, step_x, stride_x)
        indices = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(-1)
        indptr = np.arange(n + 1, dtype=np.int64) * (box_h * box_w)
        clamped = True
    else:  # plain: some offsets of a box, clipped at the grid
        reach_y, reach_x = min(6, (height - 1) // step_y), min(6, (width - 1) // step_x)
        cells = [(a * step_y, b * step_x) for a in range(-reach_y, reach_y + 1) for b in range(-reach_x, reach_x + 1)]
        keep = rng.random(len(cells)) < rng.uniform(0.3, 1.0)
        offsets = [cell for cell, kept in zip(cells, keep) if kept] or [(0, 0)]
        ys, xs = np.divmod(np.arange(n), width)
        pairs = []
        for dy, dx in offsets:
            ok = (ys + dy >= 0) & (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width)
            pairs.append(np.stack([np.arange(n)[ok], ((ys + dy) * width + xs + dx)[ok]], 1))
        pairs = np.concatenate(pairs)
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(pairs[:, 0], minlength=n), out=indptr[1:])
        indices = pairs[:, 1]
        clamped, stride_y, stride_x = False, 1, 1
    empty = np.zeros(0, dtype=np.int64)
    from sparse_attention import layout_from_csr
    return layout_from_csr(height, width, indptr, indices), _pack(offsets, empty, empty, clamped=clamped,
                                                                  strides=(stride_y, stride_x))


def test_random_stencils_give_what_their_csr_gives():
    """Random grids, steps, plain and clamped stencils straight into C: the
    window (or strip) kernels with the stencil against the row kernels on
    the CSR it stands for, forward and backward with a bias, a key mask and
    dropout. Run under the sanitizers too (test_sanitizers.py)."""
    rng = np.random.default_rng(7)
    window_runs = 0
    for case in range(40):
        layout, packed = random_stencil_case(rng)
        n = layout.num_tokens
        (q, k, v), bias = random_inputs(2, 2, n, 12, seed=case, bias_side=9)
        q, k, v, bias = (t.float().contiguous() for t in (q, k, v, bias))
        grad_out = torch.randn_like(q)
        tensors = {name: torch.from_numpy(getattr(layout, name).copy())
                   for name in ("indptr", "indices", "col_ptr", "row_indices")}
        common = dict(height=layout.height, width=layout.width, scale=0.3, dropout_p=0.2, dropout_seed=case,
                      key_mask=torch.rand(2, n, generator=torch.Generator().manual_seed(case)) > 0.2,
                      rel_pos_bias=bias)
        results = []
        before = C.cpu_window_forwards()
        for stencil in (torch.from_numpy(packed.copy()), None):
            out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
            C.attention_forward(q, k, v, out, lse, tensors["indptr"], tensors["indices"], stencil=stencil,
                                **common)
            grads = [torch.empty_like(q) for _ in range(3)]
            scores = torch.empty(2, 2, layout.nnz) if stencil is None else None
            C.attention_backward(q, k, v, out, grad_out, lse, torch.empty(q.shape[:3]), *grads,
                                 tensors["indptr"], tensors["indices"], tensors["col_ptr"], tensors["row_indices"],
                                 stencil=stencil, grad_scores=scores, **common)
            results.append([out, lse] + grads)
        window_runs += C.cpu_window_forwards() - before
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5, msg=lambda m: f"case {case}: {m}")
    assert window_runs >= 20  # most of them fit the window kernel


def test_demo_trains_and_draws_a_neighbourhood(tmp_path, capsys):
    """The demo with a pattern of one's own: trained, tabled, and drawn in
    layouts.png beside the built-in ones asked for (needs the demo's
    scikit-learn and scikit-image)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    import matplotlib

    matplotlib.use("Agg")
    from sparse_attention import demo

    records = demo.main(["--quick", "--patterns", "axial,sparse_attention:neighborhood_layout",
                         "--out", str(tmp_path)])
    assert [r["pattern"].name for r in records] == ["AXIAL", "neighborhood_layout"]
    assert "| neighborhood_layout | 0.191 |" in capsys.readouterr().out
    assert (tmp_path / "layouts.png").stat().st_size > 5000
    assert (tmp_path / "attention_neighborhood_layout.png").stat().st_size > 5000
