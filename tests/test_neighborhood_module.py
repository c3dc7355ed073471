"""NeighborhoodAttention1D / 2D: NATTEN's interface on our kernels."""

import copy
import pickle
import warnings

import pytest
import torch

from reference import assert_learns_the_teacher, reference_attention
from sparse_attention import NeighborhoodAttention1D, NeighborhoodAttention2D, neighborhood_layout

CONFIGS = [dict(kernel_size=7), dict(kernel_size=5, dilation=2), dict(kernel_size=(3, 5), stride=(2, 1)),
           dict(kernel_size=4, is_causal=(True, False)), dict(kernel_size=5, stride=5)]


def attention_with_nat_bias(q, k, v, layout, module):
    """Dense masked attention in float64 with NAT's rpb as its checkpoints
    define it: the bias of key j for query i is rpb[h, (yj - yi) / dy + ky - 1,
    (xj - xi) / dx + kx - 1] (offsets in steps of the dilation)."""
    n = layout.num_tokens
    (ky, kx), (dy, dx) = module.kernel_size, module.dilation
    rpb = module.rpb.double().view(module.num_heads, 2 * ky - 1, 2 * kx - 1)
    bias = torch.zeros(module.num_heads, n, n, dtype=torch.float64)
    for i in range(n):
        for j in layout.neighbors(i).tolist():
            (yi, xi), (yj, xj) = divmod(i, layout.width), divmod(j, layout.width)
            bias[:, i, j] = rpb[:, (yj - yi) // dy + ky - 1, (xj - xi) // dx + kx - 1]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * module.scale + bias
    allowed = torch.from_numpy(layout.to_dense())
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return probs @ v


def module_reference(module, x):
    """The module's forward in float64 with the dense masked reference for
    the attention: projections by hand from its parameters, no dropout."""
    x = x.double()
    batch, *token_shape, channels = x.shape
    height, width = token_shape if len(token_shape) == 2 else (1, token_shape[0])
    heads, dim = module.num_heads, module.head_dim
    bias = None if module.qkv.bias is None else module.qkv.bias.double()
    qkv = torch.nn.functional.linear(x, module.qkv.weight.double(), bias)
    qkv = qkv.reshape(batch, height * width, 3, heads, dim).permute(2, 0, 3, 1, 4)
    layout = neighborhood_layout(height, width, module.kernel_size, stride=module.stride,
                                 dilation=module.dilation, is_causal=module.is_causal)
    table = None if module.rel_pos_bias is None else module.rel_pos_bias.double()
    if module.rpb is None:
        out, _, _ = reference_attention(*qkv, layout, scale=module.scale, bias=table)
    else:
        out = attention_with_nat_bias(*qkv, layout, module)
    out = out.transpose(1, 2).reshape(batch, *token_shape, channels)
    return torch.nn.functional.linear(out, module.proj.weight.double(), module.proj.bias.double())


@pytest.mark.parametrize("rel_pos_bias", [False, True])
@pytest.mark.parametrize("config", CONFIGS)
def test_2d_module_matches_the_reference(config, rel_pos_bias):
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(24, 3, rel_pos_bias=rel_pos_bias, **config).eval()
    x = torch.randn(2, 9, 13, 24)
    with torch.no_grad():
        torch.testing.assert_close(module(x).double(), module_reference(module, x), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("config", [dict(kernel_size=5), dict(kernel_size=3, dilation=3, stride=2),
                                    dict(kernel_size=6, is_causal=True)])
def test_1d_module_matches_the_reference(config):
    torch.manual_seed(1)
    module = NeighborhoodAttention1D(16, 2, rel_pos_bias=True, **config).eval()
    x = torch.randn(3, 21, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(x).double(), module_reference(module, x), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("config", CONFIGS[:3])
def test_natten_modules_state_dicts_load_and_give_the_same_outputs(config):
    natten = pytest.importorskip("natten")
    torch.manual_seed(2)
    theirs = natten.NeighborhoodAttention2D(32, 4, **config).eval()
    ours = NeighborhoodAttention2D(32, 4, **config).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    x = torch.randn(2, 14, 15, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NATTEN's CPU path warns that Flex Attention runs uncompiled
        expected = theirs(x)
        theirs_1d = natten.NeighborhoodAttention1D(16, 2, kernel_size=5, dilation=2).eval()
        sequence = torch.randn(3, 20, 16)
        expected_1d = theirs_1d(sequence)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    ours_1d = NeighborhoodAttention1D(16, 2, kernel_size=5, dilation=2).eval()
    ours_1d.load_state_dict(theirs_1d.state_dict())
    torch.testing.assert_close(ours_1d(sequence), expected_1d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [dict(kernel_size=7), dict(kernel_size=5, dilation=2), dict(kernel_size=(3, 5)),
                                    dict(kernel_size=3, dilation=(2, 3))])
def test_nat_checkpoint_bias_matches_its_definition(config):
    torch.manual_seed(7)
    module = NeighborhoodAttention2D(12, 3, rpb=True, **config).eval()
    with torch.no_grad():
        module.rpb.normal_()  # large enough to matter
    x = torch.randn(2, 11, 13, 12)
    with torch.no_grad():
        torch.testing.assert_close(module(x).double(), module_reference(module, x), rtol=1e-5, atol=2e-6)


def test_nat_checkpoint_bias_in_1d_and_its_gradient():
    torch.manual_seed(8)
    module = NeighborhoodAttention1D(8, 2, 5, dilation=2, rpb=True).double().eval()
    assert module.rpb.shape == (2, 9)
    x = torch.randn(2, 17, 8, dtype=torch.float64)
    torch.testing.assert_close(module(x), module_reference(module, x), rtol=1e-9, atol=1e-9)
    assert torch.autograd.gradcheck(lambda rpb: torch.func.functional_call(module, {"rpb": rpb}, x[:1, :9]),
                                    (module.rpb.detach().clone().requires_grad_(),))


def test_a_nat_state_dict_loads():
    """The keys and shapes a NAT / DiNAT checkpoint's attention holds
    (NATTEN before 0.20): qkv, rpb, proj."""
    heads, kernel, dim = 4, 7, 64
    state = {"qkv.weight": torch.randn(3 * dim, dim), "qkv.bias": torch.randn(3 * dim),
             "rpb": torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1), "proj.weight": torch.randn(dim, dim),
             "proj.bias": torch.randn(dim)}
    module = NeighborhoodAttention2D(dim, heads, kernel, dilation=2, rpb=True)
    module.load_state_dict(state)  # strict
    assert torch.isfinite(module(torch.randn(1, 14, 14, dim))).all()


def test_parameter_names_are_natten_s():
    names = {name for name, _ in NeighborhoodAttention2D(8, 2, 3).named_parameters()}
    assert names == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    names = {name for name, _ in NeighborhoodAttention2D(8, 2, 3, qkv_bias=False, rel_pos_bias=True)
             .named_parameters()}
    assert names == {"qkv.weight", "proj.weight", "proj.bias", "rel_pos_bias"}
    # offsets reach (kernel - 1) x dilation where the window is moved inward at the edges
    assert NeighborhoodAttention2D(8, 2, (3, 5), dilation=2, rel_pos_bias=True).rel_pos_bias.shape == (2, 17, 17)


def test_the_bias_table_reaches_every_offset_of_a_strided_window():
    """The table holds every offset the layout has, none clamped to its
    edge, and no more: (kernel - 1) x dilation is reached at the grid's
    edges, and a stride (at most the kernel) moves no query's keys further,
    since its group's shared window stays within kernel - 1 of each member."""
    for kernel, stride, dilation in ((5, 4, 1), ((3, 7), (2, 5), (2, 1)), (4, 3, 3), (5, 1, 2), (7, 7, 1)):
        module = NeighborhoodAttention2D(8, 2, kernel, stride=stride, dilation=dilation, rel_pos_bias=True)
        reach = (module.rel_pos_bias.shape[-1] - 1) // 2
        layout = neighborhood_layout(23, 19, kernel, stride=stride, dilation=dilation)
        queries = torch.repeat_interleave(torch.arange(layout.num_tokens), torch.from_numpy(layout.degrees()))
        keys = torch.from_numpy(layout.indices).long()
        far = max((queries // 19 - keys // 19).abs().max().item(), (queries % 19 - keys % 19).abs().max().item())
        assert far == reach


def test_gradients_through_the_module_pass_gradcheck():
    torch.manual_seed(3)
    module = NeighborhoodAttention2D(4, 2, 3, stride=(1, 2), rel_pos_bias=True).double()
    x = torch.randn(1, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, table: torch.func.functional_call(module, {"rel_pos_bias": table}, x),
                                    (x, module.rel_pos_bias.detach().clone().requires_grad_()))


def test_the_module_trains_on_the_cpu():
    """What NATTEN's CPU path cannot: a backward. Steps of Adam towards a
    teacher of the same shape lower the loss, and every parameter gets a
    gradient."""
    torch.manual_seed(4)
    module = NeighborhoodAttention2D(16, 2, 5, dilation=2, attn_drop=0.1, proj_drop=0.1, rel_pos_bias=True)
    teacher = NeighborhoodAttention2D(16, 2, 5, dilation=2, rel_pos_bias=True).eval()
    assert_learns_the_teacher(module, teacher, torch.randn(2, 12, 12, 16), steps=30)


def test_dropout_only_in_training():
    torch.manual_seed(5)
    module = NeighborhoodAttention2D(8, 2, 3, attn_drop=0.5)
    x = torch.randn(1, 6, 6, 8)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    assert not torch.equal(module(x), module(x))


def test_any_grid_even_smaller_than_the_window():
    """NATTEN wants kernel_size x dilation <= the grid; here a smaller grid
    attends all of it (each class of tokens takes as many as the smallest holds)."""
    module = NeighborhoodAttention2D(8, 2, 7, dilation=2).eval()
    x = torch.randn(1, 5, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(module(x).double(), module_reference(module, x), rtol=1e-5, atol=2e-6)


def test_pickles_copies_and_keeps_one_layout_per_grid():
    module = NeighborhoodAttention2D(8, 2, 3, stride=2).eval()
    x = torch.randn(1, 6, 7, 8)
    expected = module(x)
    assert len(module._layouts) == 1
    module(torch.randn(2, 6, 7, 8))
    assert len(module._layouts) == 1
    for twin in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        torch.testing.assert_close(twin(x), expected)


def test_compiles_into_one_graph():
    torch.manual_seed(6)
    module = NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True).eval()
    x = torch.randn(2, 5, 6, 8)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x))


def test_bad_arguments_and_inputs_are_refused():
    with pytest.raises(ValueError, match="embed_dim a multiple of num_heads, got embed_dim=10, num_heads=4"):
        NeighborhoodAttention2D(10, 4, 3)
    with pytest.raises(TypeError, match="num_heads: expected an int"):
        NeighborhoodAttention2D(8, 2.0, 3)
    with pytest.raises(ValueError, match="stride: expected <= kernel_size"):
        NeighborhoodAttention2D(8, 2, 3, stride=4)
    with pytest.raises(ValueError, match="attn_drop: expected a probability in"):
        NeighborhoodAttention2D(8, 2, 3, attn_drop=1.0)
    with pytest.raises(ValueError, match=r"kernel_size: expected an int or a 1-tuple, got \(3, 3\)"):
        NeighborhoodAttention1D(8, 2, (3, 3))
    with pytest.raises(ValueError, match="rel_pos_bias, rpb: expected at most one"):
        NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True, rpb=True)
    with pytest.raises(ValueError, match=r"rpb: NAT's bias is defined for stride 1 .* got stride \(2, 2\)"):
        NeighborhoodAttention2D(8, 2, 3, stride=2, rpb=True)
    module = NeighborhoodAttention2D(8, 2, 3)
    with pytest.raises(ValueError, match=r"x: expected \[B, H, W, C\] with C = embed_dim = 8, got shape \(1, 8, 5, 5\)"):
        module(torch.randn(1, 8, 5, 5))  # channels first, as EnhancedSparseAttention takes it
    with pytest.raises(ValueError, match=r"x: expected \[B, H, W, C\] .* got shape \(5, 5, 8\)"):
        module(torch.randn(5, 5, 8))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        module([[1.0]])
    with pytest.raises(ValueError, match=r"x: expected \[B, L, C\]"):
        NeighborhoodAttention1D(8, 2, 3)(torch.randn(1, 4, 4, 8))


def test_compiled_modules_of_other_sizes_and_scales_stay_one_graph():
    """torch.compile recompiles the shared forward for a second module and
    then makes the sizes and float attributes that changed symbolic: layouts
    are still built for concrete sizes, the scale still checked, and the
    outputs are the eager ones."""
    torch._dynamo.reset()
    torch.manual_seed(9)
    cases = [(NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True), torch.randn(2, 5, 6, 8)),
             (NeighborhoodAttention2D(12, 2, 5, qk_scale=0.3), torch.randn(1, 7, 9, 12)),
             (NeighborhoodAttention2D(12, 4, 3, dilation=2), torch.randn(1, 8, 6, 12)),
             (NeighborhoodAttention1D(8, 2, 5), torch.randn(2, 11, 8))]
    for module, x in cases:
        module.eval()
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), module(x))
