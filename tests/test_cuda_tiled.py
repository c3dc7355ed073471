"""The tensor-core forward (tile plans, cuda/attention_tiled.cu) against the
float64 reference and against the other CUDA kernels. Skipped without a GPU."""

import pytest
import torch

from reference import assert_forward_matches_reference, reference_attention, reference_statistics
from sparse_attention import build_layout
from sparse_attention import sparse_scaled_dot_product_attention as attention
from sparse_attention import _torch_ops
from sparse_attention._native import C

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not C.WITH_CUDA, reason="sparse_attention was built without CUDA kernels"),
]

TOL = {torch.float16: 1.5e-2, torch.bfloat16: 6e-2}
PATTERNS = ["dense", "axial", "block", "longformer", "strided", "random"]
# 1 x W, H x 1, odd sizes, partial tiles, and sizes whose AXIAL plan has two passes
SIZES = [(1, 1), (1, 17), (9, 1), (7, 13), (33, 35), (20, 70)]


def make(batch, heads, n, dim, dtype, seed=0, bias_side=7):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64) for _ in range(3)]
    bias = torch.randn(heads, bias_side, bias_side, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in tensors], bias.to(dtype)


def run_tiled(*args, expect_tiled=True, **kwargs):
    before = _torch_ops.tiled_passes_run
    result = attention(*args, **kwargs)
    ran = _torch_ops.tiled_passes_run - before
    assert (ran > 0) == expect_tiled, f"tensor-core passes run: {ran}"
    return result


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("extras", ["plain", "bias+mask"])
def test_forward_against_reference(pattern, size, dtype, extras):
    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, num_global_tokens=2,
                          attention_ratio=0.3)
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, 40, dtype)
    key_mask = None
    if extras == "bias+mask":
        key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(2)) > 0.25
    else:
        bias = None
    dev = lambda t: None if t is None else t.cuda()
    out, lse = run_tiled(dev(q), dev(k), dev(v), layout, rel_pos_bias=dev(bias),
                         key_mask=dev(key_mask), return_lse=True)
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout, bias=bias, key_mask=key_mask)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, TOL[dtype])


@pytest.mark.parametrize("dim", [1, 8, 31, 64, 100, 128])
@pytest.mark.parametrize("pattern", ["axial", "longformer"])
def test_head_dims_match_the_other_kernels(pattern, dim):
    layout = build_layout(pattern, 24, 40, kernel_size=7)
    (q, k, v), bias = make(2, 2, layout.num_tokens, dim, torch.bfloat16, bias_side=9)
    q, k, v, bias = (t.cuda() for t in (q, k, v, bias))
    got = run_tiled(q, k, v, layout, rel_pos_bias=bias, return_lse=True)
    _torch_ops.use_tiled_cuda_kernel = False
    try:
        expected = run_tiled(q, k, v, layout, rel_pos_bias=bias, return_lse=True, expect_tiled=False)
    finally:
        _torch_ops.use_tiled_cuda_kernel = True
    torch.testing.assert_close(got[0], expected[0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got[1], expected[1], atol=1e-3, rtol=1e-3)


def test_dropout_uses_the_same_mask_as_the_other_kernels():
    layout = build_layout("longformer", 30, 30, kernel_size=7)
    (q, k, v), _ = make(2, 4, 900, 64, torch.float16)
    q, k, v = (t.cuda() for t in (q, k, v))
    got = run_tiled(q, k, v, layout, dropout_p=0.25, dropout_seed=123)
    ref_out, _, _ = reference_attention(q.cpu(), k.cpu(), v.cpu(), layout, dropout_p=0.25,
                                        dropout_seed=123)
    assert (got.double().cpu() - ref_out).abs().max() < 2 * TOL[torch.float16]


def test_statistics_and_pruned_heads():
    layout = build_layout("block", 16, 24, block_size=8)  # a one-pass plan
    (q, k, v), bias = make(2, 4, 384, 32, torch.float16, bias_side=5)
    active = torch.tensor([True, False, True, True])
    dev = [t.cuda() for t in (q, k, v, bias)]
    out, lse, stats = run_tiled(*dev[:3], layout, rel_pos_bias=dev[3], head_active=active.cuda(),
                                return_lse=True, return_stats=True)
    cpu = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(),
                    head_active=active, return_lse=True, return_stats=True)
    torch.testing.assert_close(out.float().cpu(), cpu[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.cpu(), cpu[1], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(stats.cpu(), cpu[2], atol=2e-3, rtol=2e-3)
    assert (out[:, 1] == 0).all() and torch.isinf(lse[:, 1]).all()


def test_statistics_with_a_two_pass_plan_use_the_other_kernels(monkeypatch):
    monkeypatch.setattr(_torch_ops, "merge_stats_cuda_passes", False)
    layout = build_layout("axial", 64, 64)
    assert len(layout.tile_plan()) == 2
    (q, k, v), _ = make(1, 2, 4096, 32, torch.bfloat16)
    q, k, v = (t.cuda() for t in (q, k, v))
    out, stats = run_tiled(q, k, v, layout, return_stats=True, expect_tiled=False)
    plain = run_tiled(q, k, v, layout)
    torch.testing.assert_close(out, plain, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("size", [(7, 13), (33, 35), (24, 40)])
@pytest.mark.parametrize("extras", ["plain", "bias+mask+pruned"])
def test_statistics_merged_across_passes(size, extras, monkeypatch):
    """merge_stats_cuda_passes: AXIAL's two passes on the general kernel with
    statistics, the column pass folding its rows' sum p^2 and entropy into the
    row pass's; against the CPU kernels (which merge the same way) and the
    float64 reference's probabilities."""
    monkeypatch.setattr(_torch_ops, "merge_stats_cuda_passes", True)
    layout = build_layout("axial", *size)
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, 32, torch.bfloat16, seed=15, bias_side=9)
    kwargs, ref_kwargs = {}, {}
    if extras != "plain":
        key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(16)) > 0.2
        active = torch.tensor([True, False, True])
        kwargs = dict(rel_pos_bias=bias.cuda(), key_mask=key_mask.cuda(), head_active=active.cuda())
        ref_kwargs = dict(bias=bias, key_mask=key_mask, head_active=active)
    passes = len(layout.tile_plan())
    before = _torch_ops.tiled_passes_run
    out, lse, stats = run_tiled(q.cuda(), k.cuda(), v.cuda(), layout, return_lse=True, return_stats=True,
                                **kwargs)
    assert _torch_ops.tiled_passes_run - before == passes
    ref_out, ref_lse, probs = reference_attention(q, k, v, layout, **ref_kwargs)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, TOL[torch.bfloat16])
    expected = reference_statistics(probs)
    torch.testing.assert_close(stats[..., 0].double().cpu(), expected[..., 0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(stats[..., 1].double().cpu(), expected[..., 1], atol=5e-2, rtol=2e-2)


def test_nan_query_row_is_nan_and_others_are_not():
    for pattern in ("block", "axial"):
        layout = build_layout(pattern, 64, 64, block_size=8)
        (q, k, v), _ = make(1, 2, 4096, 64, torch.bfloat16)
        q[0, 1, 100, 3] = float("nan")
        out, lse = run_tiled(q.cuda(), k.cuda(), v.cuda(), layout, return_lse=True)
        nan_rows = torch.isnan(out).any(-1).cpu()
        assert nan_rows[0, 1, 100] and torch.isnan(lse[0, 1, 100])
        nan_rows[0, 1, 100] = False
        assert not nan_rows.any(), f"{pattern}: NaN leaked into other rows"


def test_fully_masked_rows_and_backward_after_the_tiled_forward():
    layout = build_layout("axial", 20, 70)
    assert len(layout.tile_plan()) == 2
    (q, k, v), _ = make(2, 2, 1400, 48, torch.bfloat16)
    key_mask = torch.ones(2, 1400, dtype=torch.bool)
    key_mask[1] = False  # batch 1 attends nothing
    key_mask[0, :70] = False  # the first grid row is masked for batch 0
    leaves = [t.cuda().requires_grad_(True) for t in (q, k, v)]
    out = run_tiled(*leaves, layout, key_mask=key_mask.cuda())
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert (out[1] == 0).all()
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref_out = reference_attention(*ref, layout, key_mask=key_mask)[0]
    ref_out.backward(grad_out.double().cpu())
    assert (out.double().cpu() - ref_out).abs().max() < TOL[torch.bfloat16]
    for leaf, r in zip(leaves, ref):
        assert torch.isfinite(leaf.grad).all()
        assert (leaf.grad.double().cpu() - r.grad).abs().max() < 4 * TOL[torch.bfloat16] * max(
            1.0, r.grad.abs().max().item())


def test_side_stream_and_strided_views():
    layout = build_layout("longformer", 16, 16)
    fused = torch.randn(2, 256, 3, 4, 64, device="cuda", dtype=torch.float16)
    q, k, v = (fused[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    expected = run_tiled(q.contiguous(), k.contiguous(), v.contiguous(), layout)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = run_tiled(q, k, v, layout)
    stream.synchronize()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_bad_plans_are_refused():
    layout = build_layout("block", 8, 8)
    q = torch.randn(1, 1, 64, 32, device="cuda", dtype=torch.float16)
    out = torch.empty_like(q)
    lse = torch.empty(1, 1, 64, device="cuda")
    t = layout.torch_tensors("cuda")
    plan = layout.tile_plan_tensors("cuda")
    buffer, fields = plan["buffer"], plan["passes"]

    def call(query=q, output=out, **kwargs):
        C.attention_forward(query, query, query, output, lse, t["row_ptr"], t["col_idx"], height=8,
                            width=8, scale=0.2, **kwargs)

    with pytest.raises(ValueError, match="both or neither"):
        call(tile_plan=buffer)
    with pytest.raises(ValueError, match="6 integers per pass"):
        call(tile_plan=buffer, tile_passes=fields[:5])
    with pytest.raises(ValueError, match="outside"):
        call(tile_plan=buffer, tile_passes=fields[:5] + [buffer.numel() + 1])
    with pytest.raises(ValueError, match="past the"):
        call(tile_plan=buffer[:100], tile_passes=[min(x, 100) for x in fields])
    with pytest.raises(TypeError, match="tile_plan"):
        call(tile_plan=buffer.long(), tile_passes=fields)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        call(query=q.float(), output=out.float(), tile_plan=buffer, tile_passes=fields)
    # corrupted contents: out-of-range offsets and ids are clamped or skipped, never read
    tiles, chunks, q_at, ptr_at, keys_at, masks_at = fields
    bad = buffer.clone()
    bad[ptr_at + 1:ptr_at + tiles + 1] = 1 << 30
    bad[keys_at:keys_at + chunks * 64] = 1 << 30
    call(tile_plan=bad, tile_passes=fields)
    torch.cuda.synchronize()
    assert (out == 0).all() and torch.isinf(lse).all()


@pytest.mark.parametrize("pattern", ["axial", "longformer", "block"])
def test_simple_variant_matches_the_pipelined_one(pattern, monkeypatch):
    """SPARSE_ATTENTION_TILED_SIMPLE=1 runs the one-stage kernel; both must agree."""
    layout = build_layout(pattern, 40, 40, kernel_size=7)
    (q, k, v), bias = make(2, 4, 1600, 64, torch.bfloat16, bias_side=9)
    q, k, v, bias = (t.cuda() for t in (q, k, v, bias))
    pipelined = run_tiled(q, k, v, layout, rel_pos_bias=bias, return_lse=True)
    monkeypatch.setenv("SPARSE_ATTENTION_TILED_SIMPLE", "1")
    simple = run_tiled(q, k, v, layout, rel_pos_bias=bias, return_lse=True)
    torch.testing.assert_close(pipelined[0], simple[0], atol=0, rtol=0)
    torch.testing.assert_close(pipelined[1], simple[1], atol=0, rtol=0)


@pytest.mark.parametrize("segment_keys", [0, 7, 100, 512])
def test_long_rows_split_across_blocks(segment_keys, monkeypatch):
    """The global rows of LONGFORMER leave the plan; their keys are cut into
    segments of segment_keys (0: one block per row) and merged afterwards."""
    monkeypatch.setattr(_torch_ops, "split_segment_keys", segment_keys)
    layout = build_layout("longformer", 40, 40, kernel_size=5, num_global_tokens=2)
    assert layout.tile_plan().long_rows.size == 2
    (q, k, v), bias = make(2, 3, 1600, 64, torch.float16, bias_side=9)
    key_mask = torch.rand(2, 1600, generator=torch.Generator().manual_seed(4)) > 0.2
    active = torch.tensor([True, False, True])
    args = dict(key_mask=key_mask, head_active=active, dropout_p=0.2, dropout_seed=5)
    out, lse, stats = run_tiled(q.cuda(), k.cuda(), v.cuda(), layout, rel_pos_bias=bias.cuda(),
                                **{n: (t.cuda() if torch.is_tensor(t) else t) for n, t in args.items()},
                                return_lse=True, return_stats=True)
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout, bias=bias, **args)
    assert (out.double().cpu() - ref_out).abs().max() < 2 * TOL[torch.float16]
    lse = lse.double().cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() < TOL[torch.float16]
    cpu = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), **args,
                    return_stats=True)
    torch.testing.assert_close(stats.cpu(), cpu[1], atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("segment_keys", [0, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_rows_beside_the_passes_give_the_same_bits(segment_keys, dtype, monkeypatch):
    """Long rows on a second stream write the rows the passes leave out, so the
    results are the same bits as with the long rows after the passes; also on a
    side stream of the caller's and under CUDA graph capture."""
    monkeypatch.setattr(_torch_ops, "split_segment_keys", segment_keys)
    layout = build_layout("longformer", 40, 40, kernel_size=5, num_global_tokens=2)
    (q, k, v), _ = make(2, 3, 1600, 64, dtype)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    key_mask = (torch.rand(2, 1600, generator=torch.Generator().manual_seed(4)) > 0.2).cuda()
    monkeypatch.setattr(_torch_ops, "long_rows_beside", False)
    after = run_tiled(q, k, v, layout, key_mask=key_mask, return_lse=True)
    monkeypatch.setattr(_torch_ops, "long_rows_beside", True)
    before = C.cuda_beside_forwards()
    beside = run_tiled(q, k, v, layout, key_mask=key_mask, return_lse=True)
    assert C.cuda_beside_forwards() == before + 1
    for a, b in zip(after, beside):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_stream = run_tiled(q, k, v, layout, key_mask=key_mask, return_lse=True)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(after, on_stream):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attention(q, k, v, layout, key_mask=key_mask, return_lse=True)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(after, captured):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_overlapped_passes_give_the_same_bits(dtype, monkeypatch):
    """AXIAL's column pass, launched to start while the row pass drains, waits
    for that pass before merging into its rows: the same bits as one pass after
    the other, eager, with a pruned head and NaN rows, and under graph capture.
    The grid is several waves of blocks deep, so the two passes do overlap.
    (With the switch on by default, the reference tests above cover it too.)"""
    layout = build_layout("axial", 96, 100)
    assert len(layout.tile_plan()) == 2
    n = layout.num_tokens
    (q, k, v), _ = make(2, 4, n, 64, dtype, seed=11)
    q[1, 1, 5 * 100 + 7, 3] = float("nan")
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    key_mask = (torch.rand(2, n, generator=torch.Generator().manual_seed(6)) > 0.1).cuda()
    active = torch.tensor([True, True, False, True]).cuda()
    args = dict(key_mask=key_mask, head_active=active, return_lse=True)
    monkeypatch.setattr(_torch_ops, "overlap_passes", False)
    before = C.cuda_overlapped_passes()
    ordered = run_tiled(q, k, v, layout, **args)
    assert C.cuda_overlapped_passes() == before
    monkeypatch.setattr(_torch_ops, "overlap_passes", True)
    overlapped = run_tiled(q, k, v, layout, **args)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert C.cuda_overlapped_passes() == before + (1 if hopper else 0)
    assert torch.isnan(ordered[0][1, 1, 5 * 100 + 7]).all()
    for a, b in zip(ordered, overlapped):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attention(q, k, v, layout, **args)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(ordered, captured):
            torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


def test_nan_in_a_split_long_row(monkeypatch):
    monkeypatch.setattr(_torch_ops, "split_segment_keys", 128)
    layout = build_layout("longformer", 40, 40, kernel_size=5, num_global_tokens=1)
    (long_row,) = layout.tile_plan().long_rows
    (q, k, v), _ = make(1, 2, 1600, 32, torch.bfloat16)
    q[0, 0, long_row, 0] = float("nan")
    out, lse = run_tiled(q.cuda(), k.cuda(), v.cuda(), layout, return_lse=True)
    assert torch.isnan(out[0, 0, long_row]).all() and torch.isnan(lse[0, 0, long_row])
    nan_rows = torch.isnan(out).any(-1).cpu()
    nan_rows[0, 0, long_row] = False
    assert not nan_rows.any()


def lean_passes():
    return C.cuda_lean_passes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [8, 32, 40, 64])
@pytest.mark.parametrize("size", [(1, 17), (9, 1), (7, 13), (33, 35), (20, 70)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_lean_kernel_against_reference(pattern, size, dim, dtype):
    """Calls without bias, dropout or statistics, head dims that are multiples
    of 8 up to 64: the lean kernel, with a key mask and a pruned head."""
    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, num_global_tokens=2,
                          attention_ratio=0.3)
    n = layout.num_tokens
    (q, k, v), _ = make(2, 3, n, dim, dtype, seed=dim)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(3)) > 0.25
    active = torch.tensor([True, False, True])
    before = lean_passes()
    out, lse = run_tiled(q.cuda(), k.cuda(), v.cuda(), layout, key_mask=key_mask.cuda(),
                         head_active=active.cuda(), return_lse=True)
    assert lean_passes() > before, "the lean kernel did not run"
    ref_out, ref_lse, _ = reference_attention(q, k, v, layout, key_mask=key_mask, head_active=active)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, TOL[dtype])
    assert (out[:, 1] == 0).all()


@pytest.mark.parametrize("pattern", ["axial", "longformer", "block", "strided", "random"])
@pytest.mark.parametrize("dim", [32, 64])
def test_lean_and_general_kernels_agree(pattern, dim, monkeypatch):
    """SPARSE_ATTENTION_TILED_KERNEL=general runs the same call on the general
    kernel; the two differ only in how exp is formed and rounded."""
    layout = build_layout(pattern, 40, 40, kernel_size=7)
    (q, k, v), _ = make(2, 4, 1600, dim, torch.bfloat16, seed=1)
    q, k, v = (t.cuda() for t in (q, k, v))
    before = lean_passes()
    lean = run_tiled(q, k, v, layout, return_lse=True)
    assert lean_passes() > before
    monkeypatch.setenv("SPARSE_ATTENTION_TILED_KERNEL", "general")
    before = lean_passes()
    general = run_tiled(q, k, v, layout, return_lse=True)
    assert lean_passes() == before, "the general kernel was asked for"
    torch.testing.assert_close(lean[0], general[0], atol=1.5e-2, rtol=1.5e-2)
    torch.testing.assert_close(lean[1], general[1], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("extras", ["bias", "dropout", "stats", "dim 72", "dim 20"])
def test_calls_outside_the_lean_kernel_take_the_general_one(extras):
    layout = build_layout("block", 16, 24, block_size=8)
    dim = int(extras.split()[1]) if extras.startswith("dim") else 32
    (q, k, v), bias = make(1, 2, 384, dim, torch.float16, bias_side=5)
    kwargs = {"bias": dict(rel_pos_bias=bias.cuda()), "dropout": dict(dropout_p=0.1, dropout_seed=1),
              "stats": dict(return_stats=True)}.get(extras, {})
    before = lean_passes()
    run_tiled(q.cuda(), k.cuda(), v.cuda(), layout, **kwargs)
    assert lean_passes() == before


def test_lean_kernel_nan_rows_and_merged_passes():
    """A NaN query row stays NaN through AXIAL's second (merging) pass, on the
    lean kernel, and other rows stay finite; a fully masked batch gives zeros."""
    layout = build_layout("axial", 48, 40)
    assert len(layout.tile_plan()) == 2
    (q, k, v), _ = make(2, 2, 1920, 64, torch.bfloat16)
    q[1, 0, 77, 5] = float("nan")
    key_mask = torch.ones(2, 1920, dtype=torch.bool)
    key_mask[0] = False
    before = lean_passes()
    out, lse = run_tiled(q.cuda(), k.cuda(), v.cuda(), layout, key_mask=key_mask.cuda(),
                         return_lse=True)
    assert lean_passes() >= before + 2
    nan_rows = torch.isnan(out).any(-1).cpu()
    assert nan_rows[1, 0, 77] and torch.isnan(lse[1, 0, 77])
    nan_rows[1, 0, 77] = False
    assert not nan_rows.any()
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()


def tiled_backward_passes():
    return C.cuda_tiled_grad_query_passes(), C.cuda_tiled_grad_key_value_passes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [8, 32, 40, 64])
@pytest.mark.parametrize("size", [(1, 17), (9, 1), (7, 13), (33, 35), (20, 70)])
@pytest.mark.parametrize("pattern", ["dense", "axial", "block", "strided", "longformer", "random"])
def test_tiled_backward_against_reference(pattern, size, dim, dtype, monkeypatch):
    """SPARSE_ATTENTION_TILED_BACKWARD: dQ on tensor cores over the plan's
    passes (AXIAL's two add up), and dK / dV too where the layout is symmetric
    (RANDOM is not: the column kernel does them); with a key mask and a pruned
    head. All three gradients against the float64 reference."""
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward", True)
    monkeypatch.setattr(_torch_ops, "tiled_backward_long_rows", True)
    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, attention_ratio=0.3)
    n = layout.num_tokens
    (q, k, v), _ = make(2, 3, n, dim, dtype, seed=dim + 2)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(7)) > 0.25
    active = torch.tensor([True, False, True])
    grad_out = torch.randn(2, 3, n, dim, generator=torch.Generator().manual_seed(8)).to(dtype)
    leaves = [t.cuda().requires_grad_(True) for t in (q, k, v)]
    before = tiled_backward_passes()
    out = run_tiled(*leaves, layout, key_mask=key_mask.cuda(), head_active=active.cuda())
    out.backward(grad_out.cuda())
    # LONGFORMER's global row, left out of the forward's plan from 33 x 35 on,
    # is kept in the backward's (full_tile_plan)
    passes = len(layout.full_tile_plan())
    expected = (passes, passes if layout.is_symmetric() else 0)
    assert tuple(a - b for a, b in zip(tiled_backward_passes(), before)) == expected
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref_out = reference_attention(*ref, layout, key_mask=key_mask, head_active=active)[0]
    ref_out.backward(grad_out.double())
    for name, leaf, r in zip("qkv", leaves, ref):
        assert torch.isfinite(leaf.grad).all(), f"grad {name}: NaN or Inf"
        error = (leaf.grad.double().cpu() - r.grad).abs().max().item()
        assert error < 4 * TOL[dtype] * max(1.0, r.grad.abs().max().item()), f"grad {name}: {error}"
    for leaf in leaves:
        assert (leaf.grad[:, 1] == 0).all()
    assert (leaves[1].grad.transpose(1, 2)[~key_mask.cuda()] == 0).all()  # masked keys get no gradient


def test_tiled_backward_agrees_with_the_row_kernels_and_falls_back(monkeypatch):
    """The tiled gradients against the row and column kernels' on the same call
    (bf16 rounding apart), AXIAL's and LONGFORMER's with its global row
    planned again for the backward; calls they do not take (dropout, that row
    with tiled_backward_long_rows off, head dim 72) run the row and column
    kernels."""
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward_extras", False)  # dropout falls back
    layout = build_layout("axial", 24, 40)
    (q, k, v), _ = make(2, 4, 960, 64, torch.bfloat16, seed=3)
    grad_out = torch.randn(2, 4, 960, 64).to(torch.bfloat16).cuda()

    def grads(inputs=(q, k, v), on=layout, **args):
        leaves = [t.cuda().requires_grad_(True) for t in inputs]
        out = attention(*leaves, on, **args)
        out.backward(grad_out if out.shape == grad_out.shape else torch.randn_like(out))
        return [leaf.grad for leaf in leaves]

    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward", False)
    rows = grads()
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward", True)
    before = tiled_backward_passes()
    tiled = grads()
    assert tuple(a - b for a, b in zip(tiled_backward_passes(), before)) == (2, 2)
    for a, b in zip(tiled, rows):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
    before = tiled_backward_passes()
    grads(dropout_p=0.1, dropout_seed=3)
    # at 48 x 48 the global row is left out of the forward's plan; with
    # tiled_backward_long_rows off the backward does not plan it again
    long_row_layout = build_layout("longformer", 48, 48, num_global_tokens=1)
    assert len(long_row_layout.tile_plan().long_rows)
    (q48, k48, v48), _ = make(1, 2, 48 * 48, 64, torch.bfloat16, seed=4)
    monkeypatch.setattr(_torch_ops, "tiled_backward_long_rows", False)
    torch.manual_seed(0)  # the same random output gradient for both calls
    rows48 = grads(inputs=(q48, k48, v48), on=long_row_layout)
    assert tiled_backward_passes() == before
    monkeypatch.setattr(_torch_ops, "tiled_backward_long_rows", True)
    torch.manual_seed(0)
    tiled48 = grads(inputs=(q48, k48, v48), on=long_row_layout)
    assert tiled_backward_passes()[0] == before[0] + len(long_row_layout.full_tile_plan())
    for a, b in zip(tiled48, rows48):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
    before = tiled_backward_passes()
    (q72, k72, v72), _ = make(2, 4, 960, 72, torch.bfloat16)
    grads(inputs=(q72, k72, v72))
    assert tiled_backward_passes() == before


def backward_with_extras(layout, inputs, bias, grad_out, **args):
    """q, k, v (and bias) gradients of one CUDA call, and the tiled passes it ran."""
    leaves = [t.cuda().requires_grad_(True) for t in inputs]
    table = bias.cuda().requires_grad_(True) if bias is not None else None
    before = tiled_backward_passes()
    out = run_tiled(*leaves, layout, rel_pos_bias=table, **args)
    out.backward(grad_out.cuda())
    ran = tuple(a - b for a, b in zip(tiled_backward_passes(), before))
    grads = [leaf.grad for leaf in leaves] + ([table.grad] if table is not None else [])
    return grads, ran


@pytest.mark.parametrize("dtype, dim", [(torch.float16, 32), (torch.bfloat16, 64)])
@pytest.mark.parametrize("size", [(1, 17), (9, 1), (7, 13), (33, 35)])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("extras", ["bias", "dropout", "bias+dropout"])
def test_tiled_backward_with_bias_and_dropout_against_reference(pattern, size, dim, dtype, extras,
                                                                monkeypatch):
    """use_tiled_cuda_backward_extras: the tensor-core backward with a relative
    position bias (its gradient from the plan-order score gradients) and
    dropout, with a key mask and a pruned head; every gradient, the bias's
    included, against the float64 reference."""
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward", True)
    monkeypatch.setattr(_torch_ops, "tiled_backward_long_rows", True)
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward_extras", True)
    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, attention_ratio=0.3)
    n = layout.num_tokens
    (q, k, v), bias = make(2, 3, n, dim, dtype, seed=dim + 5, bias_side=7)
    bias = bias if "bias" in extras else None
    dropout_p = 0.2 if "dropout" in extras else 0.0
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(9)) > 0.25
    active = torch.tensor([True, False, True])
    grad_out = torch.randn(2, 3, n, dim, generator=torch.Generator().manual_seed(10)).to(dtype)
    args = dict(key_mask=key_mask.cuda(), head_active=active.cuda(), dropout_p=dropout_p, dropout_seed=11)
    grads, ran = backward_with_extras(layout, (q, k, v), bias, grad_out, **args)
    passes = len(layout.full_tile_plan())
    assert ran == (passes, passes if layout.is_symmetric() else 0)
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref_bias = bias.double().requires_grad_(True) if bias is not None else None
    ref_out = reference_attention(*ref, layout, bias=ref_bias, key_mask=key_mask, head_active=active,
                                  dropout_p=dropout_p, dropout_seed=11)[0]
    ref_out.backward(grad_out.double())
    expected = [t.grad for t in ref] + ([ref_bias.grad] if bias is not None else [])
    for name, got, r in zip(["q", "k", "v", "bias"], grads, expected):
        assert torch.isfinite(got).all(), f"grad {name}: NaN or Inf"
        error = (got.double().cpu() - r).abs().max().item()
        assert error < 4 * TOL[dtype] * max(1.0, r.abs().max().item()), f"grad {name}: {error}"
    for got in grads[:3]:
        assert (got[:, 1] == 0).all()


@pytest.mark.parametrize("pattern, size", [("axial", (24, 40)), ("longformer", (48, 48)), ("random", (20, 20)),
                                           ("strided", (30, 30))])
def test_tiled_backward_extras_agree_with_the_row_kernels_and_repeat_exactly(pattern, size, monkeypatch):
    """With a bias and dropout, the tensor-core backward against the row and
    column kernels on the same call (bf16 rounding apart); its bias gradient
    is the same bits run after run (fixed summation order, no atomics). Off
    (the default until measured), the call runs the row and column kernels."""
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward", True)
    monkeypatch.setattr(_torch_ops, "tiled_backward_long_rows", True)
    layout = build_layout(pattern, *size, num_global_tokens=1, attention_ratio=0.2)
    n = layout.num_tokens
    (q, k, v), bias = make(2, 4, n, 64, torch.bfloat16, seed=6, bias_side=9)
    grad_out = torch.randn(2, 4, n, 64, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    args = dict(dropout_p=0.1, dropout_seed=5)
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward_extras", False)
    rows, ran = backward_with_extras(layout, (q, k, v), bias, grad_out, **args)
    assert ran == (0, 0)
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward_extras", True)
    tiled, ran = backward_with_extras(layout, (q, k, v), bias, grad_out, **args)
    assert ran[0] == len(layout.full_tile_plan())
    again, _ = backward_with_extras(layout, (q, k, v), bias, grad_out, **args)
    assert torch.equal(tiled[3], again[3]), "the bias gradient changed between two identical calls"
    for name, a, b in zip("qkvb", tiled, rows):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.float() / scale, b.float() / scale, atol=3e-2, rtol=3e-2,
                                   msg=lambda m: f"grad {name}: {m}")


def test_statistics_leave_axial_forward_to_the_row_kernels_but_not_its_backward(monkeypatch):
    """AXIAL's two passes do not merge statistics on CUDA, so a call with
    them (as the module makes by default) runs the row kernels forward; with
    the extras on its backward still takes the plan, and matches the row and
    column kernels' gradients."""
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward", True)
    layout = build_layout("axial", 24, 40)
    assert len(layout.tile_plan()) == 2
    (q, k, v), bias = make(2, 4, 960, 32, torch.bfloat16, seed=13, bias_side=9)
    grad_out = torch.randn(2, 4, 960, 32, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)

    def grads():
        leaves = [t.cuda().requires_grad_(True) for t in (q, k, v)]
        table = bias.cuda().requires_grad_(True)
        before_forward, before = _torch_ops.tiled_passes_run, tiled_backward_passes()
        out, stats = attention(*leaves, layout, rel_pos_bias=table, dropout_p=0.1, dropout_seed=2,
                               return_stats=True)
        assert _torch_ops.tiled_passes_run == before_forward
        out.backward(grad_out.cuda())
        ran = tuple(a - b for a, b in zip(tiled_backward_passes(), before))
        return [leaf.grad for leaf in leaves] + [table.grad], ran

    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward_extras", False)
    rows, ran = grads()
    assert ran == (0, 0)
    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward_extras", True)
    tiled, ran = grads()
    assert ran == (2, 2)
    for name, a, b in zip("qkvb", tiled, rows):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.float() / scale, b.float() / scale, atol=3e-2, rtol=3e-2,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("unrun_switches", [False, True])
@pytest.mark.parametrize("pattern", ["axial", "longformer", "block", "strided"])
def test_module_trains_under_cuda_autocast(pattern, unrun_switches, monkeypatch):
    """EnhancedSparseAttention with its defaults (bias, dropout, statistics)
    under bfloat16 autocast: the op gets bfloat16 q, k, v and runs the
    tensor-core forward (AXIAL's two passes with statistics only with
    merge_stats_cuda_passes); output, statistics and gradients agree with the
    PyTorch path under the same autocast and dropout seed. Run with the
    switches not yet measured on a device (tiled backward extras, merged
    statistics) off and on."""
    from sparse_attention import EnhancedSparseAttention

    monkeypatch.setattr(_torch_ops, "use_tiled_cuda_backward_extras", unrun_switches)
    monkeypatch.setattr(_torch_ops, "merge_stats_cuda_passes", unrun_switches)
    x = torch.randn(2, 64, 24, 20, generator=torch.Generator().manual_seed(17)).cuda()
    results = []
    for native in (True, False):
        torch.manual_seed(0)
        module = EnhancedSparseAttention(64, 64, num_heads=4, sparsity_pattern=pattern,
                                         use_cuda_kernel=native).cuda().train()
        torch.manual_seed(1)  # the same dropout seed on both paths
        before = _torch_ops.tiled_passes_run
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(x)
        out.float().square().mean().backward()
        if native:
            planned_forward = pattern != "axial" or unrun_switches
            assert (_torch_ops.tiled_passes_run > before) == planned_forward
        stats = module.get_attention_stats()
        results.append([out.float().detach(), module.rel_pos_bias.grad, module.qkv.weight.grad,
                         module.pos_embedding.grad, torch.tensor([stats.entropy, stats.mean, stats.std])])
    for name, got, expected in zip(["out", "bias grad", "qkv grad", "pos grad", "stats"], *results):
        scale = expected.abs().max().clamp_min(1e-3)
        error = ((got.float() - expected.float()).abs().max() / scale).item()
        assert error < 5e-2, f"{name}: {error}"
