"""Gradients of gradients (create_graph=True): gradient penalties and other
higher derivatives through the native op, against the float64 reference."""

import copy

import pytest
import torch

from conftest import PATTERNS
from reference import random_inputs, reference_attention
from sparse_attention import EnhancedSparseAttention, build_layout
from sparse_attention import sparse_scaled_dot_product_attention as attention


def make_layout(pattern, height, width):
    return build_layout(pattern, height, width, kernel_size=3, block_size=4, num_global_tokens=2,
                        attention_ratio=0.4, seed=5)


def penalty_gradients(fn, leaves):
    """First gradients (with a graph) of sum(out^2), then the gradient of the
    sum of their squares: what a gradient penalty differentiates."""
    out = fn(*leaves)
    first = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in first), leaves)
    return first, second


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("size", [(1, 9), (8, 1), (7, 13)])
@pytest.mark.parametrize("extras", [False, True])
def test_second_derivatives_match_reference(pattern, size, extras):
    layout = make_layout(pattern, *size)
    n = layout.num_tokens
    (q, k, v), bias = random_inputs(2, 3, n, 5, seed=n, bias_side=5)
    args = {}
    if extras:
        key_mask = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) > 0.3
        args = dict(key_mask=key_mask, dropout_p=0.25, dropout_seed=11)
    tensors = [q, k, v] + ([bias] if extras else [])

    def ours(q, k, v, b=None):
        return attention(q, k, v, layout, rel_pos_bias=b, backend="native", **args)

    def oracle(q, k, v, b=None):
        return reference_attention(q, k, v, layout, bias=b, **args)[0]

    leaves = [t.clone().requires_grad_(True) for t in tensors]
    first, second = penalty_gradients(ours, leaves)
    ref_leaves = [t.clone().requires_grad_(True) for t in tensors]
    ref_first, ref_second = penalty_gradients(oracle, ref_leaves)
    plain = torch.autograd.grad(ours(*leaves).square().sum(), leaves)
    for got, ref, kernel in zip(first, ref_first, plain):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9)
        # with a graph or without, the same gradient
        torch.testing.assert_close(got, kernel, atol=1e-10, rtol=1e-9)
    for got, ref in zip(second, ref_second):
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("pattern", ["axial", "longformer", "random"])
def test_gradgradcheck(pattern):
    layout = make_layout(pattern, 3, 4)
    (q, k, v), bias = random_inputs(1, 2, layout.num_tokens, 3, seed=2, bias_side=3)
    key_mask = torch.ones(1, layout.num_tokens, dtype=torch.bool)
    key_mask[0, 5] = False
    leaves = [t.requires_grad_(True) for t in (q, k, v, bias)]

    def ours(q, k, v, b):
        return attention(q, k, v, layout, rel_pos_bias=b, key_mask=key_mask, dropout_p=0.2,
                         dropout_seed=4, backend="native")

    assert torch.autograd.gradgradcheck(ours, leaves)


def test_pruned_heads_get_zero_second_derivatives():
    layout = make_layout("axial", 4, 5)
    (q, k, v), _ = random_inputs(1, 3, layout.num_tokens, 4, seed=3)
    head_active = torch.tensor([True, False, True])
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    first, second = penalty_gradients(
        lambda q, k, v: attention(q, k, v, layout, head_active=head_active, backend="native"), leaves)
    for grad in first + second:
        assert torch.all(grad[:, 1] == 0)
        assert torch.any(grad[:, 0] != 0)


@pytest.mark.parametrize("pattern", ["axial", "block", "longformer", "strided", "random"])
def test_module_gradient_penalty_matches_pytorch_path(pattern):
    torch.manual_seed(0)
    native = EnhancedSparseAttention(8, 8, num_heads=2, sparsity_pattern=pattern, kernel_size=3,
                                     block_size=2).double().eval()
    python = copy.deepcopy(native)
    python.use_cuda_kernel = False
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    grads = []
    for module in (native, python):
        leaf = x.clone().requires_grad_(True)
        grad_x, = torch.autograd.grad(module(leaf).square().sum(), leaf, create_graph=True)
        params = [leaf] + list(module.parameters())
        found = torch.autograd.grad(grad_x.square().sum(), params, allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, found)])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_torch_func_transforms(pattern):
    """vmap, grad and jacrev (which wrap tensors the kernels cannot read) run
    the PyTorch path and agree with the kernels' plain calls."""
    from torch.func import grad, jacrev, vmap

    layout = make_layout(pattern, 3, 5)
    (q, k, v), bias = random_inputs(4, 2, layout.num_tokens, 3, seed=7, bias_side=3)
    key_mask = torch.rand(4, layout.num_tokens, generator=torch.Generator().manual_seed(8)) > 0.2

    def one(q, k, v, mask):  # one sample: [heads, N, D]
        return attention(q[None], k[None], v[None], layout, rel_pos_bias=bias, key_mask=mask[None])[0]

    mapped = vmap(one)(q, k, v, key_mask)
    torch.testing.assert_close(mapped, attention(q, k, v, layout, rel_pos_bias=bias, key_mask=key_mask),
                               atol=1e-12, rtol=1e-10)
    per_sample = vmap(grad(lambda q, k, v, m: one(q, k, v, m).square().sum()))(q, k, v, key_mask)
    for i in range(4):
        leaf = q[i:i + 1].clone().requires_grad_(True)
        out = attention(leaf, k[i:i + 1], v[i:i + 1], layout, rel_pos_bias=bias, key_mask=key_mask[i:i + 1])
        expected, = torch.autograd.grad(out.square().sum(), leaf)
        torch.testing.assert_close(per_sample[i], expected[0], atol=1e-12, rtol=1e-10)
    jacobian = jacrev(one)(q[0], k[0], v[0], key_mask[0])
    leaf = q[:1].clone().requires_grad_(True)
    out = attention(leaf, k[:1], v[:1], layout, rel_pos_bias=bias, key_mask=key_mask[:1])
    row, = torch.autograd.grad(out[0, 1, 2, 0], leaf)
    torch.testing.assert_close(jacobian[1, 2, 0], row[0], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("form", ["gather", "strips", "plan"])
def test_a_layouts_first_call_inside_a_transform_leaves_plain_caches(form, monkeypatch):
    """The layout's device tensors and the module's resize maps, first built
    inside torch.func.grad, are cached for later calls: they must be plain
    tensors, not the transform's wrappers (which die with it: the native
    call after failed with 'Cannot access data pointer')."""
    import pickle

    from torch.func import grad

    from sparse_attention import _torch_impl

    monkeypatch.setattr(_torch_impl, "use_tile_plan", form != "gather")
    monkeypatch.setattr(_torch_impl, "strip_min_plan_fill", 0.0 if form == "strips" else float("inf"))
    layout = pickle.loads(pickle.dumps(make_layout("longformer", 5, 6)))  # empty caches
    (q, k, v), bias = random_inputs(2, 2, layout.num_tokens, 3, seed=3, bias_side=3)

    def loss(q):
        return attention(q, k, v, layout, rel_pos_bias=bias).square().sum()

    inside = grad(loss)(q)
    cached = layout.torch_tensors(q.device, 1)
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in cached.values())
    leaf = q.clone().requires_grad_(True)
    out = attention(leaf, k, v, layout, rel_pos_bias=bias, backend="native")
    expected, = torch.autograd.grad(out.square().sum(), leaf)
    torch.testing.assert_close(inside, expected, atol=1e-12, rtol=1e-10)

    module = EnhancedSparseAttention(4, 4, num_heads=2, sparsity_pattern="axial", kernel_size=3,
                                     use_learnable_pos=True).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    params = {name: p.detach() for name, p in module.named_parameters()}
    grad(lambda p: torch.func.functional_call(module, p, (x,)).sum())(params)
    for found in module._resize_maps.values():
        assert not torch._C._functorch.is_functorch_wrapped_tensor(found)
    module(x).sum().backward()  # reads the maps cached inside the transform


def test_native_backend_under_vmap_says_why():
    from torch.func import vmap

    layout = make_layout("axial", 3, 4)
    (q, k, v), _ = random_inputs(2, 2, layout.num_tokens, 3)
    with pytest.raises(RuntimeError, match="backend=.native.: torch.func transforms"):
        vmap(lambda q: attention(q[None], k[:1], v[:1], layout, backend="native"))(q)


def test_module_per_sample_gradients():
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    module = EnhancedSparseAttention(8, 8, num_heads=2, sparsity_pattern="longformer",
                                     kernel_size=3).double().eval()
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64)
    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss(params, sample):
        return functional_call(module, params, (sample[None],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    passes = module.get_attention_stats().num_forward_passes
    for i in range(3):
        expected = torch.autograd.grad(module(x[i:i + 1]).square().sum(), list(module.parameters()))
        for name, ref in zip(params, expected):
            torch.testing.assert_close(per_sample[name][i], ref, atol=1e-11, rtol=1e-9)
    # the transformed calls counted no statistics; the plain ones did
    assert passes == 0 and module.get_attention_stats().num_forward_passes == 3


def test_forward_mode_ad_gets_tangents():
    import torch.autograd.forward_ad as fwAD

    layout = make_layout("strided", 4, 5)
    (q, k, v), bias = random_inputs(2, 2, layout.num_tokens, 3, seed=9, bias_side=3)
    tangents = [torch.randn_like(t) for t in (q, k, v)]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, d) for t, d in zip((q, k, v), tangents)]
        tangent = fwAD.unpack_dual(attention(*duals, layout, rel_pos_bias=bias)).tangent
    _, expected = torch.func.jvp(lambda q, k, v: reference_attention(q, k, v, layout, bias=bias)[0],
                                 (q, k, v), tuple(tangents))
    torch.testing.assert_close(tangent, expected, atol=1e-10, rtol=1e-9)
