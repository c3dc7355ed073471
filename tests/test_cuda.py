"""CUDA kernels against the float64 reference and the CPU kernels. Skipped
without a GPU (see conftest.py) or without a CUDA build."""

import pytest
import torch

from reference import reference_attention, step_matches_eager
from sparse_attention import build_layout
from sparse_attention import sparse_scaled_dot_product_attention as attention
from sparse_attention._native import C

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not C.WITH_CUDA, reason="sparse_attention was built without CUDA kernels"),
]

# max abs error allowed against the float64 reference, inputs of unit scale
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 1.5e-2, torch.bfloat16: 6e-2}
PATTERNS = ["dense", "axial", "block", "longformer", "strided", "random"]
SIZES = [(1, 1), (1, 17), (9, 1), (7, 13), (33, 35)]


def inputs(batch, heads, n, dim, dtype, bias_side=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(heads, bias_side, bias_side, generator=gen, dtype=torch.float64) if bias_side else None
    return q, k, v, bias


def grads_of(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_forward_backward_against_reference(pattern, size, dtype):
    layout = build_layout(pattern, *size, kernel_size=5, block_size=4, num_global_tokens=2,
                          attention_ratio=0.3)
    n = layout.num_tokens
    q, k, v, bias = inputs(2, 3, n, 40, dtype, bias_side=7)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(2)) > 0.25
    grad_out = torch.randn(2, 3, n, 40, dtype=torch.float64)
    dev = [t.to("cuda", dtype) for t in (q, k, v, bias)]

    def ours(q, k, v, b):
        return attention(q, k, v, layout, rel_pos_bias=b, key_mask=key_mask.cuda(), backend="native")

    out, grads = grads_of(ours, dev, grad_out.to("cuda", dtype))
    rounded = [t.to(dtype).double() for t in (q, k, v, bias)]

    def ref(q, k, v, b):
        return reference_attention(q, k, v, layout, bias=b, key_mask=key_mask)[0]

    ref_out, ref_grads = grads_of(ref, rounded, grad_out.to(dtype).double())
    tol = TOL[dtype]
    assert (out.double().cpu() - ref_out).abs().max() < tol
    scale = max(1.0, max(g.abs().max().item() for g in ref_grads))
    for g, rg in zip(grads, ref_grads):
        g = g.double().cpu()
        assert torch.isfinite(g).all(), "NaN or Inf in a gradient"
        assert (g - rg).abs().max() < 4 * tol * scale


@pytest.mark.parametrize("dim", [1, 31, 64, 100, 128, 256])
def test_head_dims_and_cpu_agreement(dim):
    layout = build_layout("longformer", 11, 9, kernel_size=3)
    q, k, v, bias = inputs(1, 2, 99, dim, torch.float32, bias_side=5)
    args = dict(rel_pos_bias=None, dropout_p=0.3, dropout_seed=17)
    cpu = [t.float() for t in (q, k, v)]
    expected = attention(*cpu, layout, **args)
    got = attention(*(t.cuda() for t in cpu), layout, **args)
    torch.testing.assert_close(got.cpu(), expected, atol=2e-5, rtol=2e-4)


def test_dropout_mask_is_the_cpu_mask_in_backward_too():
    layout = build_layout("random", 8, 8, attention_ratio=0.5, seed=3)
    q, k, v, bias = inputs(2, 2, 64, 16, torch.float64, bias_side=5)
    grad_out = torch.randn(2, 2, 64, 16, dtype=torch.float64)

    def fn(q, k, v, b):
        return attention(q, k, v, layout, rel_pos_bias=b, dropout_p=0.4, dropout_seed=123)

    cpu_out, cpu_grads = grads_of(fn, (q, k, v, bias), grad_out)
    gpu_out, gpu_grads = grads_of(fn, [t.cuda() for t in (q, k, v, bias)], grad_out.cuda())
    torch.testing.assert_close(gpu_out.cpu(), cpu_out)
    for a, b in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(a.cpu(), b)


def test_gradcheck_float64_on_gpu():
    layout = build_layout("strided", 3, 5, kernel_size=3, stride=2)
    q, k, v, bias = inputs(1, 2, 15, 8, torch.float64, bias_side=3)
    leaves = tuple(t.cuda().requires_grad_(True) for t in (q, k, v, bias))
    key_mask = torch.ones(1, 15, dtype=torch.bool, device="cuda")
    key_mask[0, 3] = False
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: attention(q, k, v, layout, rel_pos_bias=b, key_mask=key_mask,
                                     dropout_p=0.2, dropout_seed=1), leaves, eps=1e-6, atol=1e-6)


def test_statistics_and_pruned_heads_match_cpu():
    layout = build_layout("axial", 10, 12)
    q, k, v, bias = inputs(2, 4, 120, 32, torch.float32, bias_side=9)
    active = torch.tensor([True, False, True, True])
    cpu = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(),
                    head_active=active, return_lse=True, return_stats=True)
    gpu = attention(q.float().cuda(), k.float().cuda(), v.float().cuda(), layout,
                    rel_pos_bias=bias.float().cuda(), head_active=active.cuda(), return_lse=True,
                    return_stats=True)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)
    assert (gpu[0][:, 1] == 0).all()


def test_bias_gradient_is_deterministic():
    layout = build_layout("dense", 16, 16)
    q, k, v, bias = inputs(2, 4, 256, 32, torch.float32, bias_side=15)
    grads = []
    for _ in range(3):
        b = bias.float().cuda().requires_grad_(True)
        out = attention(q.float().cuda(), k.float().cuda(), v.float().cuda(), layout, rel_pos_bias=b)
        out.sum().backward()
        grads.append(b.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_runs_on_a_side_stream_and_strided_views():
    layout = build_layout("block", 16, 16, block_size=8)
    fused = torch.randn(2, 256, 3, 4, 32, device="cuda")
    q, k, v = (fused[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    expected = attention(q.contiguous(), k.contiguous(), v.contiguous(), layout)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = attention(q, k, v, layout)
    stream.synchronize()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_kernels_are_given_torchs_current_stream():
    """The handle the entry points get is torch's current stream, on the
    default stream and inside a side stream's context."""
    from sparse_attention import _torch_ops

    device = torch.device("cuda", torch.cuda.current_device())
    assert _torch_ops._stream_of(device) == torch.cuda.current_stream(device).cuda_stream
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        assert _torch_ops._stream_of(device) == stream.cuda_stream != 0


def test_fully_masked_rows_give_zero_and_finite_grads():
    layout = build_layout("block", 4, 4, block_size=2)
    q, k, v, bias = inputs(1, 2, 16, 8, torch.float32, bias_side=3)
    key_mask = torch.ones(1, 16, dtype=torch.bool)
    key_mask[0, [0, 1, 4, 5]] = False
    leaves = [t.float().cuda().requires_grad_(True) for t in (q, k, v, bias)]
    out = attention(*leaves[:3], layout, rel_pos_bias=leaves[3], key_mask=key_mask.cuda())
    out.sum().backward()
    assert (out[0, :, [0, 1, 4, 5]] == 0).all()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()


def test_cuda_errors_are_exceptions():
    layout = build_layout("axial", 4, 4)
    q = torch.randn(1, 1, 16, 300, device="cuda")
    with pytest.raises(TypeError, match="256"):
        attention(q, q, q, layout, backend="native")
    with pytest.raises(ValueError, match="device"):
        attention(q, q.cpu(), q, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern,size", [("longformer", (40, 44)), ("dense", (36, 36)),
                                          ("axial", (48, 30)), ("random", (20, 20))])
def test_fast_kernels_match_reference_kernels(pattern, size, dtype):
    """The tiled-over-lanes kernels (and the block-per-long-row launches) against the
    simple warp-per-row kernels kept as the reference."""
    from sparse_attention import _torch_ops

    layout = build_layout(pattern, *size, kernel_size=5, num_global_tokens=3, attention_ratio=0.2)
    n = layout.num_tokens
    q, k, v, bias = (t.to("cuda", dtype) for t in inputs(2, 2, n, 64, dtype, bias_side=9))
    key_mask = (torch.rand(2, n, generator=torch.Generator().manual_seed(5)) > 0.1).cuda()
    grad_out = torch.randn(2, 2, n, 64, device="cuda", dtype=dtype)
    results = []
    for reference in (True, False):
        _torch_ops.use_reference_cuda_kernels = reference
        try:
            def fn(q, k, v, b):
                out, stats = attention(q, k, v, layout, rel_pos_bias=b, key_mask=key_mask,
                                       dropout_p=0.1, dropout_seed=9, return_stats=True)
                results.append(stats)
                return out
            results.append(grads_of(fn, (q, k, v, bias), grad_out))
        finally:
            _torch_ops.use_reference_cuda_kernels = False
    ref_stats, (ref_out, ref_grads), stats, (out, grads) = results
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(stats, ref_stats, atol=tol, rtol=tol)
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    for g, rg in zip(grads, ref_grads):
        scale = max(1.0, rg.abs().max().item())
        assert (g.float() - rg.float()).abs().max() < 2 * tol * scale


@pytest.mark.parametrize("pattern", ["longformer", "dense"])
def test_nan_query_in_a_row_with_a_partial_chunk(pattern):
    """A NaN query whose row ends in a partial chunk of 32 keys: the lanes past
    the row hold -inf, the others NaN, and the warp must still agree on the
    chunk's maximum (the row kernel and the long-row kernel both)."""
    layout = build_layout(pattern, 20, 20, kernel_size=7, num_global_tokens=1)
    q, k, v, _ = inputs(1, 2, 400, 32, torch.float64)
    q[0, 1, 150, 3] = float("nan")
    out, lse = attention(q.float().cuda(), k.float().cuda(), v.float().cuda(), layout, return_lse=True)
    torch.cuda.synchronize()
    nan_rows = torch.isnan(out).any(-1).cpu()
    assert nan_rows[0, 1, 150] and torch.isnan(lse[0, 1, 150])
    nan_rows[0, 1, 150] = False
    assert not nan_rows.any()


@pytest.mark.parametrize("reference_kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_plus_inf_score_makes_its_row_nan(pattern, dtype, reference_kernels):
    """As tests/test_nonfinite.py on the CPU: a key with an infinite element
    makes the rows that score it +inf NaN (output and lse), never the zeros
    and -inf lse of a row without keys; the other rows match the reference."""
    from sparse_attention import _torch_ops

    layout = build_layout(pattern, 24, 20, kernel_size=5, num_global_tokens=1, attention_ratio=0.3)
    n = layout.num_tokens
    q, k, v, _ = inputs(1, 2, n, 64, torch.float64, seed=4)
    k[0, 1, 5, 3] = float("inf")
    k[0, 0, n // 2, 1] = float("-inf")
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    expected = reference_attention(q, k, v, layout)[0]
    nan_rows = torch.isnan(expected).any(-1)
    _torch_ops.use_reference_cuda_kernels = reference_kernels
    try:
        out, lse = attention(*(t.to("cuda", dtype) for t in (q, k, v)), layout, return_lse=True)
        torch.cuda.synchronize()
    finally:
        _torch_ops.use_reference_cuda_kernels = False
    out, lse = out.double().cpu(), lse.double().cpu()
    assert torch.equal(torch.isnan(out).all(-1), nan_rows)
    assert torch.equal(torch.isnan(lse), nan_rows)
    assert (out[~nan_rows] - expected[~nan_rows]).abs().max() < TOL[dtype]


@pytest.mark.parametrize("pattern", ["axial", "longformer", "random"])
def test_second_derivatives_against_reference(pattern):
    """create_graph=True on the GPU: the backward runs the differentiable
    PyTorch path there too, with the kernels' dropout draw."""
    layout = build_layout(pattern, 5, 7, kernel_size=3, num_global_tokens=1, attention_ratio=0.3)
    n = layout.num_tokens
    q, k, v, bias = inputs(2, 3, n, 8, torch.float64, bias_side=5, seed=4)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(3)) > 0.25
    args = dict(key_mask=key_mask, dropout_p=0.2, dropout_seed=9)
    found = []
    for device, fn in (("cuda", lambda *t: attention(*t[:3], layout, rel_pos_bias=t[3], backend="native",
                                                     **{**args, "key_mask": key_mask.cuda()})),
                       ("cpu", lambda *t: reference_attention(*t[:3], layout, bias=t[3], **args)[0])):
        leaves = [t.to(device).requires_grad_(True) for t in (q, k, v, bias)]
        first = torch.autograd.grad(fn(*leaves).square().sum(), leaves, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), leaves)
        found.append([g.cpu() for g in first + second])
    for got, ref in zip(*found):
        torch.testing.assert_close(got, ref, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("pattern", ["axial", "longformer"])
def test_module_training_step_does_not_synchronize(pattern):
    """A training step of the module with its defaults (bias, dropout,
    statistics) and a key mask queues its work without waiting for the GPU:
    the statistics' totals stay on the device until get_attention_stats."""
    from sparse_attention import EnhancedSparseAttention

    torch.manual_seed(0)
    module = EnhancedSparseAttention(64, 64, num_heads=4, sparsity_pattern=pattern).cuda().train()
    x = torch.randn(2, 64, 12, 12, device="cuda")
    key_mask = torch.rand(2, 144, device="cuda") > 0.1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        module(x, key_mask=key_mask).float().square().mean().backward()  # builds and copies the layout
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            module(x, key_mask=key_mask).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = module.get_attention_stats()
    assert stats.num_forward_passes == 2 and 0 < stats.density < 1


@pytest.mark.parametrize("native", [True, False])
def test_module_compiles_to_one_graph_on_cuda(native):
    """torch.compile(fullgraph=True) from a cold start on CUDA tensors: the
    host work (layout, plan, the PyTorch path's form) runs while torch
    traces and builds device tensors; outputs and gradients equal eager's."""
    from sparse_attention import EnhancedSparseAttention

    torch._dynamo.reset()
    torch.manual_seed(0)
    module = EnhancedSparseAttention(32, 32, num_heads=4, sparsity_pattern="longformer",
                                     use_cuda_kernel=native).cuda().eval()
    twin = EnhancedSparseAttention(32, 32, num_heads=4, sparsity_pattern="longformer",
                                   use_cuda_kernel=native).cuda().eval()
    twin.load_state_dict(module.state_dict())
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 32, 10, 11, device="cuda")
    key_mask = torch.rand(2, 110, device="cuda") > 0.2
    step_matches_eager(compiled, twin, x, key_mask, 1e-4)
    for a, b in zip(module.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-3, rtol=1e-3)


def test_torch_path_dropout_mask_on_cuda_equals_the_cpu_loop():
    """The PyTorch path draws its mask in tensor arithmetic on CUDA and in
    the C loop on the CPU: the same mask."""
    from sparse_attention._torch_impl import dropout_keep_mask

    rows, cols = torch.arange(300)[:, None], torch.arange(500)[None]
    for seed in (0, 12345, 2**63 - 1):
        cpu = dropout_keep_mask(seed, 2, 3, rows, cols, 0.3)
        gpu = dropout_keep_mask(seed, 2, 3, rows.cuda(), cols.cuda(), 0.3)
        assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(1, 17), (9, 1), (7, 13), (33, 35)])
@pytest.mark.parametrize("rule", ["dilated", "earlier_neighbours", "top_rows_only", "checkerboard", "neighborhood"])
def test_custom_layouts_against_reference(rule, size, dtype):
    """Layouts of one's own, empty rows and empty columns among them, and
    DiNAT's dilated neighbourhood, on every CUDA kernel the dtype reaches
    (bfloat16: the tensor-core tiles)."""
    import test_custom_layouts
    from sparse_attention import layout_from_rule, neighborhood_layout

    if rule == "neighborhood":
        layout = neighborhood_layout(*size, 5, dilation=2)
    else:
        layout = layout_from_rule(getattr(test_custom_layouts, rule), *size)
    n = layout.num_tokens
    q, k, v, bias = inputs(2, 3, n, 32, dtype, bias_side=9, seed=4)
    key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(5)) > 0.25
    grad_out = torch.randn(2, 3, n, 32, dtype=torch.float64)

    def ours(q, k, v, b):
        return attention(q, k, v, layout, rel_pos_bias=b, key_mask=key_mask.cuda(), backend="native")

    out, grads = grads_of(ours, [t.to("cuda", dtype) for t in (q, k, v, bias)], grad_out.to("cuda", dtype))

    def ref(q, k, v, b):
        return reference_attention(q, k, v, layout, bias=b, key_mask=key_mask)[0]

    ref_out, ref_grads = grads_of(ref, [t.to(dtype).double() for t in (q, k, v, bias)],
                                  grad_out.to(dtype).double())
    assert (out.double().cpu() - ref_out).abs().max() < TOL[dtype]
    scale = max(1.0, max(g.abs().max().item() for g in ref_grads))
    for g, rg in zip(grads, ref_grads):
        g = g.double().cpu()
        assert torch.isfinite(g).all(), "NaN or Inf in a gradient"
        assert (g - rg).abs().max() < 4 * TOL[dtype] * scale
