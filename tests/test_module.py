"""EnhancedSparseAttention: data flow, paths, positions, stats, heads, errors."""

import io
import math

import numpy as np
import pytest
import torch

from reference import reference_attention, step_matches_eager
from sparse_attention import EnhancedSparseAttention, SparsityPattern, build_layout

PATTERNS = [SparsityPattern.RANDOM, SparsityPattern.STRIDED, SparsityPattern.BLOCK,
            SparsityPattern.AXIAL, SparsityPattern.LONGFORMER]


def make(pattern=SparsityPattern.AXIAL, **kw):
    args = dict(in_channels=16, out_channels=16, num_heads=4, sparsity_pattern=pattern,
                max_relative_positions=4, kernel_size=3, block_size=4)
    args.update(kw)
    torch.manual_seed(0)
    return EnhancedSparseAttention(**args)


def hand_written_attention(module, x, layout):
    """DESIGN.md's data flow from the fused projection to the output
    projection, with the dense reference for the attention: tokens [B, N, C]
    -> [B, N, out_channels]."""
    batch, n, _ = x.shape
    heads, dim = module.num_heads, module.head_dim
    qkv = x @ module.qkv.weight.T + module.qkv.bias
    q, k, v = qkv.view(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4)
    attended = reference_attention(q, k, v, layout, bias=module.rel_pos_bias)[0]
    merged = (attended * module.head_importance.view(1, heads, 1, 1)).transpose(1, 2).reshape(batch, n, -1)
    return merged @ module.proj.weight.T + module.proj.bias


def test_module_matches_a_hand_written_forward():
    """The data flow of DESIGN.md, recomputed from the parameters with the dense reference."""
    module = make(SparsityPattern.LONGFORMER, in_channels=12, out_channels=16).double().eval()
    with torch.no_grad():
        module.rel_pos_bias.normal_()
        module.head_importance.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5]))
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    layout = build_layout("longformer", 5, 7, kernel_size=3)
    pos = torch.nn.functional.interpolate(module.pos_embedding, size=(5, 7), mode="bilinear",
                                          align_corners=False)
    tokens = (x + pos).flatten(2).transpose(1, 2)
    out = hand_written_attention(module, tokens, layout)
    out = out + x.flatten(2).transpose(1, 2) @ module.residual.weight.T + module.residual.bias
    out = torch.nn.functional.layer_norm(out, (16,), module.norm.weight, module.norm.bias)
    expected = out.transpose(1, 2).reshape(2, 16, 5, 7)
    torch.testing.assert_close(module(x), expected)


def test_module_gradients_match_the_hand_written_forward():
    """The backward through the data flow (the fused projection split into q, k
    and v, the gate, the merge) against autograd on the hand-written float64
    forward: gradients of the input and of every parameter the kernel feeds."""
    module = make(SparsityPattern.LONGFORMER, in_channels=12, out_channels=16).double().eval()
    with torch.no_grad():
        module.rel_pos_bias.normal_()
        module.head_importance.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5]))
    layout = build_layout("longformer", 5, 7, kernel_size=3)
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    weight = torch.randn(2, 16, 5, 7, dtype=torch.float64)

    def hand_written(x):
        out = hand_written_attention(module, x.flatten(2).transpose(1, 2), layout)
        return out.transpose(1, 2).reshape(2, 16, 5, 7)

    module.pos_embedding = None  # the hand-written flow leaves out the position embedding
    module.skip_connection = False
    module.norm = torch.nn.Identity()
    grads = []
    for run in (module, hand_written):
        xi = x.clone().requires_grad_(True)
        (run(xi) * weight).sum().backward()
        params = (module.qkv.weight, module.proj.weight, module.rel_pos_bias, module.head_importance)
        grads.append([xi.grad] + [p.grad.clone() for p in params])
        module.zero_grad()
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_native_and_torch_paths_agree_with_one_state_dict(pattern):
    native = make(pattern, dropout=0.3)
    torch_path = make(pattern, dropout=0.3, use_cuda_kernel=False)
    torch_path.load_state_dict(native.state_dict())
    x = torch.randn(2, 16, 6, 9)
    outs = []
    for module in (native, torch_path):
        torch.manual_seed(3)  # the same dropout seed is drawn on both paths
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, module.rel_pos_bias.grad, module.qkv.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("shape", [(0, 16, 4, 4), (1, 16, 1, 1), (1, 16, 1, 13), (3, 16, 7, 1),
                                   (2, 16, 7, 13), (1, 16, 40, 40)])
def test_any_input_size_and_batch(shape):
    module = make(SparsityPattern.LONGFORMER)
    y = module(torch.randn(*shape))
    assert y.shape == shape and torch.isfinite(y).all()


def test_in_out_channels_differ_and_without_skip():
    module = make(in_channels=8, out_channels=24, num_heads=3)
    assert module(torch.randn(2, 8, 5, 5)).shape == (2, 24, 5, 5)
    plain = make(in_channels=8, out_channels=24, num_heads=3, skip_connection=False)
    assert plain.residual is None
    assert plain(torch.randn(2, 8, 5, 5)).shape == (2, 24, 5, 5)


def test_dropout_only_in_training():
    module = make(dropout=0.5)
    x = torch.randn(2, 16, 6, 6)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    assert not torch.equal(module(x), module(x))


def test_state_dict_round_trip_and_dtype_move(tmp_path):
    module = make(SparsityPattern.STRIDED).eval()
    with torch.no_grad():
        module.rel_pos_bias.normal_()
    x = torch.randn(1, 16, 9, 9)
    path = tmp_path / "m.pt"
    torch.save(module.state_dict(), path)
    other = make(SparsityPattern.STRIDED).eval()
    other.load_state_dict(torch.load(path))
    torch.testing.assert_close(other(x), module(x))
    as_double = other.to(torch.float64)
    y = as_double(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.float(), module(x), atol=1e-5, rtol=1e-4)


def test_relative_bias_and_positions_learn_through_the_kernel():
    module = make(SparsityPattern.BLOCK)
    module(torch.randn(2, 16, 8, 8)).sum().backward()
    assert module.rel_pos_bias.grad.abs().sum() > 0
    assert module.pos_embedding.grad.abs().sum() > 0
    plain = make(use_relative_pos=False, use_learnable_pos=False)
    assert plain.rel_pos_bias is None and plain.pos_embedding is None
    plain(torch.randn(1, 16, 4, 4))


def test_key_mask_argument():
    module = make(SparsityPattern.AXIAL).eval()
    x = torch.randn(2, 16, 4, 4)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[:, 5] = False
    assert not torch.allclose(module(x, key_mask=mask), module(x))


def test_statistics_follow_their_definitions():
    module = make(SparsityPattern.LONGFORMER, num_heads=2, out_channels=8, in_channels=8).double()
    module.eval()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    module.reset_stats()
    module(x)
    stats = module.get_attention_stats()
    layout = module.layout_for(5, 6)
    _, q, k, v = module._project(x)
    _, _, probs = reference_attention(q, k, v, layout, bias=module.rel_pos_bias)
    allowed = torch.from_numpy(layout.to_dense()).expand_as(probs)
    values = probs[allowed]
    assert stats.mean == pytest.approx(values.mean().item(), rel=1e-9)
    assert stats.std == pytest.approx(values.std(unbiased=False).item(), rel=1e-6)
    assert stats.sparsity == pytest.approx(1 - layout.density)
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-300).log(), torch.zeros_like(probs))
    row_entropy = -plogp.sum(-1)
    assert stats.entropy == pytest.approx(row_entropy.mean().item(), rel=1e-9)
    np.testing.assert_allclose(stats.entropy_per_head, row_entropy.mean((0, 2)).detach().numpy(), rtol=1e-9)
    assert stats.pattern_type == "LONGFORMER" and stats.num_forward_passes == 1
    module(x)
    assert module.get_attention_stats().num_forward_passes == 2
    assert module.get_attention_stats().entropy == pytest.approx(stats.entropy)
    module.reset_stats()
    assert module.get_attention_stats().num_forward_passes == 0


def test_head_importance_is_gradient_based():
    module = make(SparsityPattern.AXIAL)
    with pytest.raises(RuntimeError, match="no gradient"):
        module.analyze_head_importance()
    x = torch.randn(4, 16, 6, 6)
    target = torch.randn(4, 16, 6, 6)
    for _ in range(3):
        module.zero_grad()
        loss = (module(x) - target).square().mean()
        loss.backward()
    scores = module.analyze_head_importance(normalize=False)
    assert set(scores) == {0, 1, 2, 3}
    assert all(s > 0 for s in scores.values())
    assert len(set(round(s, 12) for s in scores.values())) == 4, "scores differ per head"
    normalized = module.analyze_head_importance()
    assert math.isclose(sum(v * v for v in normalized.values()), 1.0, rel_tol=1e-9)


def test_pruned_heads_are_skipped():
    module = make(SparsityPattern.AXIAL).eval()
    x = torch.randn(2, 16, 5, 5)
    before = module(x)
    module.prune_heads([1, 3])
    assert module.active_heads == [0, 2]
    after = module(x)
    with torch.no_grad():
        module.head_mask.fill_(True)
        module.head_importance[[1, 3]] = 0.0  # the seed README's way: zero gates
    torch.testing.assert_close(module(x), after)
    assert module.active_heads == [0, 2]
    assert not torch.allclose(before, after)
    with pytest.raises(ValueError, match="heads"):
        module.prune_heads([4])


@pytest.mark.parametrize("kwargs,match", [
    (dict(out_channels=10, num_heads=4), "divisible"),
    (dict(in_channels=0), "in_channels"),
    (dict(sparsity_pattern="zigzag"), "sparsity_pattern"),
    (dict(dropout=1.0), "dropout"),
    (dict(kernel_size=0, sparsity_pattern="longformer"), "kernel_size"),
    (dict(attention_ratio=0.0), "attention_ratio"),
    (dict(max_relative_positions=-1), "max_relative_positions"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_bad_inputs_name_the_argument():
    module = make()
    with pytest.raises(ValueError, match="x: expected 4 dimensions"):
        module(torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match="x: expected 16 channels"):
        module(torch.randn(1, 8, 4, 4))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        module(torch.ones(1, 16, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        module(np.zeros((1, 16, 4, 4)))
    with pytest.raises(ValueError, match="key_mask"):
        module(torch.randn(1, 16, 4, 4), key_mask=torch.ones(1, 15, dtype=torch.bool))


@pytest.mark.parametrize("native", [True, False])
def test_torch_compile_runs_and_matches(native):
    module = make(SparsityPattern.LONGFORMER, use_cuda_kernel=native).eval()
    compiled = torch.compile(module)
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(compiled(x), module(x), atol=1e-5, rtol=1e-5)
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("pattern", ["axial", "random", "longformer"])
def test_torch_compile_fullgraph_from_a_cold_start(pattern, native):
    """fullgraph=True compiles the module whose first call is compiled (no
    layout, plan or statistics cached yet): the host work runs while torch
    traces. Outputs, gradients and statistics equal eager calls', over new
    batch sizes and a new map size, with a key mask; training steps do not
    recompile (the statistics' counters are tensors, not Python numbers that
    the graph would guard on). aot_eager: dynamo and autograd's tracing as
    inductor gets them, without its C++ builds (minutes on a cold cache)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module = make(pattern, use_cuda_kernel=native, attention_ratio=0.5).eval()
    twin = make(pattern, use_cuda_kernel=native, attention_ratio=0.5).eval()
    twin.load_state_dict(module.state_dict())
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for batch, height, width, masked in ((2, 6, 6, False), (3, 6, 6, False), (2, 5, 7, True)):
        x = torch.randn(batch, 16, height, width)
        key_mask = torch.rand(batch, height * width) > 0.3 if masked else None
        step_matches_eager(compiled, twin, x, key_mask, 1e-5)
    for a, b in zip(module.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
    ours, theirs = module.get_attention_stats(), twin.get_attention_stats()
    assert ours.num_forward_passes == theirs.num_forward_passes == 3
    for name in ("mean", "std", "entropy", "density"):
        assert getattr(ours, name) == pytest.approx(getattr(theirs, name), rel=1e-6), name

    graphs = counters["stats"]["unique_graphs"]
    module.train()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 6, 6)
    compiled(x).sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(3):  # dropout, statistics and importance hooks: no recompile per step
        compiled(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs
    assert module.get_attention_stats().num_forward_passes == 7


def test_visualization_renders_a_png():
    import matplotlib
    matplotlib.use("Agg")
    from sparse_attention.utils import draw_patterns, visualize_attention_patterns

    module = make(SparsityPattern.LONGFORMER)
    x = torch.randn(2, 16, 9, 11)
    module(x)
    fig = visualize_attention_patterns(module, x, heads=[0, 2])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert len(fig.axes) >= 9  # 3 query points x (layout + 2 heads), plus colour bars
    assert "LONGFORMER" in fig._suptitle.get_text() and "over 1 forward passes" in fig._suptitle.get_text()
    fresh = make(SparsityPattern.LONGFORMER)
    assert "no statistics recorded yet" in visualize_attention_patterns(fresh, x)._suptitle.get_text()
    fig = draw_patterns(10, 10)
    assert len(fig.axes) == 5
    from functools import partial

    from sparse_attention import neighborhood_layout
    fig = draw_patterns(10, 10, patterns=["axial", partial(neighborhood_layout, kernel_size=5)])
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["AXIAL", "neighborhood 5x5"]
    with pytest.raises(ValueError, match="query_points"):
        visualize_attention_patterns(module, x, query_points=[(20, 0)])


def test_attention_weights_are_the_softmax_rows():
    module = make(SparsityPattern.STRIDED).double().eval()
    x = torch.randn(1, 16, 7, 8, dtype=torch.float64)
    rows = module.attention_weights(x, [0, 27])
    layout = module.layout_for(7, 8)
    _, q, k, v = module._project(x)
    _, _, probs = reference_attention(q, k, v, layout, bias=module.rel_pos_bias)
    for token, (keys, weights) in zip([0, 27], rows):
        torch.testing.assert_close(weights, probs[:, :, token, keys])
        torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, dtype=torch.float64))


@pytest.mark.parametrize("size", [(5, 7), (1, 9), (40, 3), (16, 16), (64, 64), (1, 1)])
def test_position_embedding_resize_matches_bilinear_interpolate(size):
    """The resize as two matrix products (module._position_tokens) against
    F.interpolate(bilinear, align_corners=False): values and the embedding's gradient."""
    module = EnhancedSparseAttention(6, 6, num_heads=2, pos_embedding_size=16).double()
    height, width = size
    weight = torch.randn(height * width, 6, dtype=torch.float64)
    got = module._position_tokens(height, width, torch.float64)
    (got * weight).sum().backward()
    got_grad = module.pos_embedding.grad.clone()
    module.pos_embedding.grad = None
    expected = torch.nn.functional.interpolate(module.pos_embedding, size=size, mode="bilinear",
                                               align_corners=False).flatten(2).transpose(1, 2)[0]
    (expected * weight).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, module.pos_embedding.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_trains_under_cpu_autocast_on_the_native_kernels(pattern):
    """Under torch.autocast("cpu", bfloat16) the projections hand the op
    bfloat16 q, k, v: it runs the float32 kernels on widened copies. The
    training step's output and gradients stay close to the float32 module's,
    and the native and PyTorch paths agree under autocast too."""
    x = torch.randn(2, 16, 6, 7, generator=torch.Generator().manual_seed(3))
    results = {}
    for name, autocast, native in (("fp32", False, True), ("bf16 native", True, True),
                                   ("bf16 torch", True, False)):
        module = make(pattern, use_cuda_kernel=native, dropout=0.0).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(x)
        out.float().square().mean().backward()
        results[name] = (out.float().detach(), module.rel_pos_bias.grad.clone(), module.qkv.weight.grad.clone())
    for name in ("bf16 native", "bf16 torch"):
        for got, expected in zip(results[name], results["fp32"]):
            assert torch.isfinite(got).all()
            scale = expected.abs().max().clamp_min(1e-3)
            assert ((got - expected).abs().max() / scale) < 0.1, name
    for got, expected in zip(results["bf16 native"], results["bf16 torch"]):
        scale = expected.abs().max().clamp_min(1e-3)
        assert ((got - expected).abs().max() / scale) < 0.05


@pytest.mark.parametrize("pattern", PATTERNS)
def test_whole_module_copies_and_saves_after_use(pattern):
    """copy.deepcopy (EMA weights, checkpoints) and torch.save of the whole
    module work after forwards have filled its layout caches."""
    import copy

    module = make(pattern).eval()
    x = torch.randn(2, 16, 7, 9)
    expected = module(x)
    module.train()
    module(x).sum().backward()
    module.eval()
    twin = copy.deepcopy(module)
    assert twin.layout_for(7, 9) is module.layout_for(7, 9)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        torch.testing.assert_close(other(x), expected, atol=0, rtol=0)
    with torch.no_grad():
        twin.qkv.weight.mul_(2)  # the copy's parameters are its own
    torch.testing.assert_close(module(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_training_after_a_first_forward_under_inference_mode(pattern, native):
    """Caches filled under torch.inference_mode (a validation pass, a model
    summary) must not hand inference tensors to later training steps."""
    import copy

    module = make(pattern, use_cuda_kernel=native)
    fresh = copy.deepcopy(module)
    x = torch.randn(2, 16, 6, 10)
    with torch.inference_mode():
        module(x)
    grads = []
    for m in (module, fresh):
        torch.manual_seed(1)  # the same dropout seed for both
        m(x).square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_input_of_another_dtype_than_the_parameters_is_refused_outside_autocast():
    module = make(SparsityPattern.AXIAL).eval()
    x = torch.randn(2, 16, 7, 9)
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32 \(the module's parameters\), "
                                        r"got torch.float64"):
        module(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert module.double()(x.double()).dtype == torch.float64


def test_meta_device_module_runs_for_shapes():
    with torch.device("meta"):
        module = make(SparsityPattern.LONGFORMER)
        y = module(torch.randn(2, 16, 7, 9))
    assert y.device.type == "meta" and y.shape == (2, 16, 7, 9)
    y.sum().backward()
    assert module.qkv.weight.grad.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta device"):
        module.get_attention_stats()
    with pytest.raises(ValueError, match="x: expected a tensor on meta"):
        module(torch.randn(2, 16, 7, 9))
    module.to_empty(device="cpu")
    module.load_state_dict(make(SparsityPattern.LONGFORMER).state_dict())
    assert torch.isfinite(module(torch.randn(2, 16, 7, 9))).all()
    assert module.get_attention_stats().num_forward_passes == 1


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("pattern", [SparsityPattern.AXIAL, SparsityPattern.RANDOM, SparsityPattern.LONGFORMER,
                                     SparsityPattern.STRIDED])
def test_torch_export_then_eager_calls(pattern, native):
    """torch.export traces with fake tensors: none of them may stay in the
    caches that later eager calls read, and the exported program computes
    what the module does."""
    module = make(pattern, use_cuda_kernel=native).eval()
    x = torch.randn(1, 16, 6, 7)
    exported = torch.export.export(module, (x,))
    expected = module(x)  # the first eager call comes after the export
    torch.testing.assert_close(exported.module()(x), expected, atol=1e-6, rtol=1e-5)
    module.train()
    module(x).sum().backward()
    assert module.qkv.weight.grad is not None


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_forward_once(reentrant):
    """torch.utils.checkpoint reruns the forward inside backward: the same
    dropout draw (the seed comes from torch's generator, whose state the
    checkpoint restores), the same gradients, and statistics counted once."""
    import copy

    from torch.utils.checkpoint import checkpoint

    plain = make(SparsityPattern.AXIAL).train()
    checkpointed = copy.deepcopy(plain)
    x = torch.randn(2, 16, 6, 7)
    for _ in range(2):
        torch.manual_seed(5)
        plain(x).square().sum().backward()
        torch.manual_seed(5)
        checkpoint(checkpointed, x.clone().requires_grad_(reentrant),
                   use_reentrant=reentrant).square().sum().backward()
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=0, rtol=0)
    ours, theirs = checkpointed.get_attention_stats(), plain.get_attention_stats()
    assert ours.num_forward_passes == theirs.num_forward_passes == 2
    assert ours.entropy == theirs.entropy and ours.mean_per_head == theirs.mean_per_head


@pytest.mark.parametrize("native", [True, False])
def test_torch_jit_trace_of_the_module(native):
    """torch.jit.trace records the custom op (native) or the PyTorch path's
    operators, with the dropout seed drawn per call inside the graph."""
    import warnings

    module = make(SparsityPattern.LONGFORMER, use_cuda_kernel=native, dropout=0.5)
    x = torch.randn(2, 16, 6, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the traced graph is specialised to 6 x 7
        traced = torch.jit.trace(module.eval(), x, check_trace=False)
        trained = torch.jit.trace(module.train(), x, check_trace=False)
    other_batch = torch.randn(3, 16, 6, 7)
    torch.testing.assert_close(traced(other_batch), module.eval()(other_batch), atol=1e-6, rtol=1e-5)
    module.train()
    assert not torch.equal(trained(x), trained(x))  # a new dropout mask per call
    torch.manual_seed(3)
    first = trained(x)
    torch.manual_seed(3)
    torch.testing.assert_close(first, module(x), atol=1e-6, rtol=1e-5)
    leaf = x.clone().requires_grad_(True)
    trained(leaf).sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
