"""3-D neighbourhoods (video, volumes): neighborhood_layout_3d and
NeighborhoodAttention3D, against a per-axis definition, the float64
reference and NATTEN's na3d where it is installed."""

import copy
import pickle
import warnings

import pytest
import torch

from reference import (assert_bias_gradients_match_reference, assert_forward_matches_reference,
                       assert_learns_the_teacher, bias_gradients, bias_training_inputs, reference_attention)
from sparse_attention import NeighborhoodAttention3D, neighborhood_layout, neighborhood_layout_3d
from sparse_attention import sparse_scaled_dot_product_attention as attention
from test_clamped_window import natten_axis

SETTINGS = [((3, 3, 3), 1, 1, False), ((2, 5, 3), (2, 1, 2), (1, 3, 1), (True, False, False)),
            ((3, 3, 5), (1, 2, 1), (3, 1, 2), (False, True, True)), (4, 1, (4, 2, 1), False),
            ((1, 7, 7), 1, 1, (True, False, False))]


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 5, 6), (7, 3, 9), (2, 9, 1), (5, 1, 8), (1, 7, 13)])
@pytest.mark.parametrize("kernel, dilation, stride, causal", SETTINGS)
def test_layout_matches_its_definition(shape, kernel, dilation, stride, causal):
    """Every query's keys are the product of its keys on each axis, each axis
    by the 1-D rule written out in test_clamped_window.natten_axis."""
    layout = neighborhood_layout_3d(*shape, kernel, dilation=dilation, stride=stride, is_causal=causal)
    depth, height, width = shape
    assert (layout.height, layout.width) == (depth * height, width)
    per_axis = [natten_axis(size, *setting) for size, *setting in
                zip(shape, *(v if isinstance(v, tuple) else (v,) * 3 for v in (kernel, dilation, stride, causal)))]
    for token in range(layout.num_tokens):
        z, rest = divmod(token, height * width)
        y, x = divmod(rest, width)
        expected = [(a * height + b) * width + c for a in per_axis[0][z] for b in per_axis[1][y]
                    for c in per_axis[2][x]]
        assert layout.neighbors(token).tolist() == expected, token


def test_one_frame_is_the_2d_neighbourhood():
    flat = neighborhood_layout_3d(1, 9, 11, (3, 5, 3), dilation=(1, 2, 1), stride=(1, 1, 3), is_causal=(True, True,
                                                                                                      False))
    plane = neighborhood_layout(9, 11, (5, 3), dilation=(2, 1), stride=(1, 3), is_causal=(True, False))
    assert (flat.indptr == plane.indptr).all() and (flat.indices == plane.indices).all()
    assert flat.name == "neighborhood 3x5x3 dilated 1x2x1 stride 1x1x3 causal yesxyesxno"


@pytest.mark.parametrize("shape, kernel, stride, causal", [((3, 5, 4), 3, 1, False), ((4, 3, 5), (2, 3, 3), 2, True),
                                                           ((5, 1, 6), (3, 1, 5), (3, 1, 1), (True, False, False))])
def test_op_matches_the_reference(shape, kernel, stride, causal):
    """Forward and backward with a bias table (indexed on the flat grid),
    a key mask, a pruned head and dropout; the tiles or the rows run it."""
    layout = neighborhood_layout_3d(*shape, kernel, stride=stride, is_causal=causal)
    q, k, v, bias, grad_out, args = bias_training_inputs(layout, bias_side=9, dim=12)
    out, lse = attention(q.float(), k.float(), v.float(), layout, rel_pos_bias=bias.float(), return_lse=True,
                         **args)
    ref_out, ref_lse, _ = reference_attention(q.float(), k.float(), v.float(), layout, bias=bias.float(), **args)
    assert_forward_matches_reference(out, lse, ref_out, ref_lse, 2e-5)
    got = bias_gradients(attention, layout, q, k, v, bias, grad_out, **args)
    assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args)


def test_gradcheck_in_float64():
    layout = neighborhood_layout_3d(3, 3, 4, (2, 3, 3), is_causal=(True, False, False))
    gen = torch.Generator().manual_seed(11)
    inputs = [torch.randn(1, 2, layout.num_tokens, 5, dtype=torch.float64, generator=gen).requires_grad_()
              for _ in range(3)]
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, layout), inputs)


@pytest.mark.parametrize("shape, kernel, dilation, stride, causal", [
    ((6, 7, 8), 3, 1, 1, False), ((5, 11, 7), (3, 5, 3), (1, 2, 2), (1, 1, 2), (True, False, False)),
    ((8, 6, 6), (4, 3, 3), (2, 1, 1), (2, 3, 1), (False, False, True)), ((4, 8, 8), (2, 4, 4), 1, (2, 4, 4), False)])
def test_natten_gives_what_our_neighbourhood_gives(shape, kernel, dilation, stride, causal):
    natten = pytest.importorskip("natten")
    gen = torch.Generator().manual_seed(sum(shape))
    batch, heads, dim = 2, 3, 16
    q, k, v = (torch.randn(batch, *shape, heads, dim, generator=gen) for _ in range(3))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its CPU path warns that Flex Attention runs uncompiled
        theirs = natten.na3d(q, k, v, kernel_size=kernel, dilation=dilation, stride=stride, is_causal=causal)

    def heads_first(t):
        return t.reshape(batch, -1, heads, dim).transpose(1, 2)
    layout = neighborhood_layout_3d(*shape, kernel, dilation=dilation, stride=stride, is_causal=causal)
    ours = attention(*(heads_first(t) for t in (q, k, v)), layout)
    torch.testing.assert_close(ours, heads_first(theirs), rtol=1e-5, atol=1e-5)


def test_layout_refuses_bad_arguments():
    with pytest.raises(ValueError, match="depth: expected >= 1, got 0"):
        neighborhood_layout_3d(0, 4, 4, 3)
    with pytest.raises(TypeError, match="depth: expected an int"):
        neighborhood_layout_3d(2.5, 4, 4, 3)
    with pytest.raises(ValueError, match=r"kernel_size: expected an int or \(depth, rows, cols\), got \(3, 3\)"):
        neighborhood_layout_3d(4, 4, 4, (3, 3))
    with pytest.raises(ValueError, match=r"stride: expected <= kernel_size on each axis .* \(1, 1, 4\) for "
                                         r"kernel_size \(3, 3, 3\)"):
        neighborhood_layout_3d(4, 4, 4, 3, stride=(1, 1, 4))
    with pytest.raises(ValueError, match=r"is_causal: expected a bool or \(depth, rows, cols\) of bools"):
        neighborhood_layout_3d(4, 4, 4, 3, is_causal=(True, False))
    with pytest.raises(ValueError, match="height, width: expected fewer than 2\\*\\*31 - 1 tokens"):
        neighborhood_layout_3d(1 << 12, 1 << 10, 1 << 10, 1)


def module_reference(module, x):
    """The module's forward in float64: projections by hand, the dense masked reference."""
    x = x.double()
    batch, depth, height, width, channels = x.shape
    bias = None if module.qkv.bias is None else module.qkv.bias.double()
    qkv = torch.nn.functional.linear(x, module.qkv.weight.double(), bias)
    qkv = qkv.reshape(batch, -1, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    layout = neighborhood_layout_3d(depth, height, width, module.kernel_size, stride=module.stride,
                                    dilation=module.dilation, is_causal=module.is_causal)
    out, _, _ = reference_attention(*qkv, layout, scale=module.scale)
    out = out.transpose(1, 2).reshape(x.shape)
    return torch.nn.functional.linear(out, module.proj.weight.double(), module.proj.bias.double())


@pytest.mark.parametrize("config", [dict(kernel_size=3), dict(kernel_size=(3, 5, 5), dilation=(1, 2, 1),
                                                              is_causal=(True, False, False)),
                                    dict(kernel_size=(2, 3, 3), stride=(2, 1, 3))])
def test_module_matches_the_reference(config):
    torch.manual_seed(0)
    module = NeighborhoodAttention3D(24, 3, **config).eval()
    x = torch.randn(2, 4, 7, 9, 24)
    with torch.no_grad():
        torch.testing.assert_close(module(x).double(), module_reference(module, x), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("config", [dict(kernel_size=3), dict(kernel_size=(3, 5, 5), dilation=(1, 2, 1),
                                                              is_causal=(True, False, False))])
def test_natten_module_state_dict_loads_and_gives_the_same_outputs(config):
    natten = pytest.importorskip("natten")
    torch.manual_seed(2)
    theirs = natten.NeighborhoodAttention3D(32, 4, **config).eval()
    ours = NeighborhoodAttention3D(32, 4, **config).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    x = torch.randn(2, 5, 11, 9, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(x)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_module_trains_pickles_and_compiles():
    """A backward on the CPU (NATTEN's CPU path has none): Adam steps lower
    the loss towards a teacher; copies give the same outputs; one graph."""
    torch.manual_seed(4)
    module = NeighborhoodAttention3D(16, 2, (3, 5, 5), is_causal=(True, False, False), attn_drop=0.1)
    teacher = NeighborhoodAttention3D(16, 2, (3, 5, 5), is_causal=(True, False, False)).eval()
    x = torch.randn(2, 4, 8, 8, 16)
    assert_learns_the_teacher(module, teacher, x, steps=25)
    module.eval()
    expected = module(x)
    assert list(module._layouts) == [(4, 8, 8)]
    for twin in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        torch.testing.assert_close(twin(x), expected)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)


def test_module_refuses_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match=r"kernel_size: expected an int or \(depth, rows, cols\)"):
        NeighborhoodAttention3D(8, 2, (3, 3))
    with pytest.raises(TypeError, match="rel_pos_bias"):
        NeighborhoodAttention3D(8, 2, 3, rel_pos_bias=True)
    module = NeighborhoodAttention3D(8, 2, 3)
    with pytest.raises(ValueError, match=r"x: expected \[B, D, H, W, C\] with C = embed_dim = 8, got shape "
                                         r"\(1, 6, 6, 8\)"):
        module(torch.randn(1, 6, 6, 8))
    with pytest.raises(ValueError, match=r"x: expected \[B, D, H, W, C\] .* got shape \(1, 2, 6, 6, 4\)"):
        module(torch.randn(1, 2, 6, 6, 4))
