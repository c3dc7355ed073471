"""EnhancedSparseAttention: sparse self-attention over a CNN feature map.

Data flow (DESIGN.md):

    x [B, Cin, H, W] -> + learnable absolute position (resized to H x W)
      -> 1x1 projections to q, k, v [B, heads, N, Cout/heads]
      -> sparse attention on the layout of (H, W), relative position bias inside the kernel
      -> per-head gate head_importance -> 1x1 output projection
      -> + residual (identity, or a 1x1 projection when Cin != Cout)
      -> LayerNorm over channels -> [B, Cout, H, W]
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _torch_ops
from .custom_layouts import name_of
from .patterns import (Layout, SparsityPattern, build_layout, building_cached_tensors, layout_by_serial,
                       may_cache_tensors, static_int)


@dataclasses.dataclass
class AttentionStats:
    """Running attention statistics of an :class:`EnhancedSparseAttention`.

    mean, std: of the attention weights p_ij over the pairs the layout (and key
    mask) allows. sparsity: fraction of the N x N pairs left out (1 - density).
    entropy: mean over rows of -sum_j p_ij log p_ij, in nats. ``*_per_head``
    give the same per head. head_importance: the per-head gates (the
    gradient-based scores come from ``analyze_head_importance()``).
    """

    mean: float
    std: float
    sparsity: float
    entropy: float
    pattern_type: str
    head_importance: List[float]
    mean_per_head: List[float]
    std_per_head: List[float]
    entropy_per_head: List[float]
    num_forward_passes: int
    density: float


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _in_degree(layout, device):
    """Each token's in-degree in the layout as float64 on ``device`` (cached)."""
    return layout._built_once(
        ("in_degree", str(device)),
        lambda layout: torch.from_numpy(np.diff(layout.col_ptr)).to(device, torch.float64),
        layout._device_cache)


# Host work under torch.compile: these run while it traces and their results
# are constants of the graph (tensors among them stay inputs, read live). As
# compiler.disable'd functions they were a graph break each, and
# fullgraph=True failed.
@torch.compiler.assume_constant_result
def _in_degree_while_tracing(layout_serial, device):
    return _in_degree(layout_by_serial(layout_serial), device)


@torch.compiler.assume_constant_result
def _layout_while_tracing(pattern, height, width, knobs):
    return build_layout(pattern, height, width, **dict(knobs))


def _custom_layout(builder, height, width):
    """The layout a custom pattern (a callable (height, width) -> Layout) gives, checked."""
    layout = builder(height, width)
    if not isinstance(layout, Layout):
        raise TypeError(f"sparsity_pattern: the custom pattern returned {type(layout).__name__} for a "
                        f"{height} x {width} map, expected a sparse_attention.Layout")
    if (layout.height, layout.width) != (height, width):
        raise ValueError(f"sparsity_pattern: the custom pattern returned a {layout.height} x {layout.width} "
                         f"layout for a {height} x {width} map")
    return layout


@torch.compiler.assume_constant_result
def _custom_layout_while_tracing(builder, height, width):
    return _custom_layout(builder, height, width)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for the device type (its linear layers then
    take inputs of another dtype than their weights)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has one flag per device type
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()


class EnhancedSparseAttention(nn.Module):
    """Sparse multi-head self-attention for ``[B, C, H, W]`` feature maps.

    Args:
        in_channels: channels of the input map.
        out_channels: channels of the output map (divisible by ``num_heads``).
        num_heads: attention heads (8).
        attention_ratio: share of keys each query keeps, RANDOM pattern only (0.5).
        dropout: attention-weight dropout in training (0.1); none in eval.
        use_bias: biases in the projections (True).
        skip_connection: add the input (projected when Cin != Cout) (True).
        sparsity_pattern: a :class:`SparsityPattern` or its name (RANDOM), or
            a pattern of your own: a callable ``(height, width) -> Layout``
            such as ``CustomPattern(rule)`` (see custom_layouts.py), called
            once per map size.
        use_relative_pos: learnable relative position bias table
            ``[heads, 2M+1, 2M+1]`` applied inside the kernels (True).
        max_relative_positions: M, offsets are clamped to [-M, M] (32).
        use_learnable_pos: learnable absolute position embedding added to the
            input; stored at ``pos_embedding_size`` squared and resized
            bilinearly to each input's H x W (True).
        kernel_size: window side of LONGFORMER and STRIDED (7).
        use_cuda_kernel: True runs our native kernels where the tensor lives (C
            on the CPU, CUDA on GPUs when built); False the pure-PyTorch path.
            Both give the same result from the same state_dict.
        block_size: BLOCK tile side (8). stride: STRIDED stride (kernel_size).
        num_global_tokens: LONGFORMER global tokens (1). seed: RANDOM seed (0).
        pos_embedding_size: side of the stored absolute embedding (16).
        track_stats: accumulate attention statistics while True (True).
    """

    def __init__(self, in_channels, out_channels, num_heads=8, attention_ratio=0.5, dropout=0.1,
                 use_bias=True, skip_connection=True, sparsity_pattern=SparsityPattern.RANDOM,
                 use_relative_pos=True, max_relative_positions=32, use_learnable_pos=True,
                 kernel_size=7, use_cuda_kernel=True, *, block_size=8, stride=None,
                 num_global_tokens=1, seed=0, pos_embedding_size=16, track_stats=True):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.num_heads = _positive_int(num_heads, "num_heads")
        if self.out_channels % self.num_heads:
            raise ValueError(f"out_channels: {out_channels} is not divisible by num_heads={num_heads}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        if isinstance(max_relative_positions, bool) or not isinstance(max_relative_positions, numbers.Integral) \
                or max_relative_positions < 0:
            raise ValueError(f"max_relative_positions: expected an int >= 0, got {max_relative_positions!r}")
        if callable(sparsity_pattern) and not isinstance(sparsity_pattern, (str, SparsityPattern)):
            self.sparsity_pattern = sparsity_pattern  # the user's own: (height, width) -> Layout
        else:
            self.sparsity_pattern = SparsityPattern.parse(sparsity_pattern)
        self.layout_knobs = dict(kernel_size=kernel_size, block_size=block_size, stride=stride,
                                 num_global_tokens=num_global_tokens,
                                 attention_ratio=attention_ratio, seed=seed)
        # checks every knob now (a custom pattern ignores them, but a bad one is still a mistake)
        build_layout(self._built_in_pattern or SparsityPattern.DENSE, 1, 1, **self.layout_knobs)
        self.attention_ratio = float(attention_ratio)
        self.kernel_size = kernel_size
        self.dropout = float(dropout)
        self.skip_connection = bool(skip_connection)
        self.use_relative_pos = bool(use_relative_pos)
        self.max_relative_positions = int(max_relative_positions)
        self.use_learnable_pos = bool(use_learnable_pos)
        self.use_cuda_kernel = bool(use_cuda_kernel)
        self.track_stats = bool(track_stats)
        self.head_dim = self.out_channels // self.num_heads

        self.qkv = nn.Linear(self.in_channels, 3 * self.out_channels, bias=use_bias)
        self.proj = nn.Linear(self.out_channels, self.out_channels, bias=use_bias)
        self.norm = nn.LayerNorm(self.out_channels)
        self.residual = (nn.Linear(self.in_channels, self.out_channels, bias=use_bias)
                         if self.skip_connection and self.in_channels != self.out_channels else None)
        side = 2 * self.max_relative_positions + 1
        self.rel_pos_bias = (nn.Parameter(torch.zeros(self.num_heads, side, side))
                             if self.use_relative_pos else None)
        size = _positive_int(pos_embedding_size, "pos_embedding_size")
        self.pos_embedding = (nn.Parameter(torch.randn(1, self.in_channels, size, size) * 0.02)
                              if self.use_learnable_pos else None)
        self.head_importance = nn.Parameter(torch.ones(self.num_heads))
        self._resize_maps: Dict[tuple, torch.Tensor] = {}  # (size in, size out, dtype, device) -> map
        self.register_buffer("head_mask", torch.ones(self.num_heads, dtype=torch.bool))
        # Michel et al. (2019): importance of head h = E |dL / d gate_h|, summed
        # over the backward passes seen; see analyze_head_importance().
        self.register_buffer("importance_grad_sum", torch.zeros(self.num_heads, dtype=torch.float64))
        self.register_buffer("importance_steps", torch.zeros((), dtype=torch.int64))
        self.head_importance.register_hook(self._accumulate_importance)
        self._layouts = {}
        self._reset_running_stats()

    # -- statistics ----------------------------------------------------------

    def _reset_running_stats(self):
        # per head: rows that attended, allowed pairs, sum of p^2, sum of row entropies
        # on the CPU always (not torch.device("meta") or any default device)
        self._stats_totals = torch.zeros(4, self.num_heads, dtype=torch.float64, device="cpu")
        # forward passes, allowed pairs, grid pairs (B * N^2): a tensor, not
        # Python numbers, which torch.compile would guard on (a recompile per step)
        self._stats_counts = torch.zeros(3, dtype=torch.float64, device="cpu")

    def reset_stats(self):
        """Forget the running attention statistics."""
        self._reset_running_stats()

    def _accumulate_importance(self, grad):
        with torch.no_grad():
            self.importance_grad_sum += grad.detach().abs().to(self.importance_grad_sum)
            self.importance_steps += 1
        return grad

    def _record_stats(self, row_stats, layout: Layout, key_mask, head_active):
        # row_stats: [B, heads, N, 2] = (sum_j p_ij^2, entropy of row i), from the
        # kernel's own pass; only these O(B * heads * N) numbers are reduced here.
        # torch.compile traces it (a graph break here kept fullgraph=True from
        # compiling the module); the checks it cannot trace are eager-only.
        if row_stats.device.type == "meta":
            return  # a pass that computes shapes only has no statistics to count
        if not torch.compiler.is_compiling():
            if torch._C._are_functorch_transforms_active():
                return  # torch.func transforms refuse side effects on captured tensors
            if torch._C._current_graph_task_id() != -1:
                return  # a forward rerun inside backward (activation checkpointing) counted when it ran first
        # The totals stay on the device of the statistics: reading them back
        # here would make every training step wait for the GPU.
        device = row_stats.device
        with torch.no_grad():
            batch = row_stats.shape[0]
            if key_mask is None:
                pairs = float(layout.nnz) * batch
            else:
                if torch.compiler.is_compiling():
                    in_degree = _in_degree_while_tracing(layout._serial, device)
                else:
                    in_degree = _in_degree(layout, device)
                pairs = (key_mask.to(device, torch.float64) * in_degree).sum()
            per_row = row_stats.double().sum(0)  # [heads, N, 2]
            rows = (row_stats[..., 0] > 0).double().sum((0, 2))  # rows that attended
            heads_on = torch.ones(self.num_heads, dtype=torch.float64, device=device) if head_active is None \
                else head_active.to(device, torch.float64)
            totals = torch.stack([rows, heads_on * pairs, per_row[..., 0].sum(-1), per_row[..., 1].sum(-1)])
            one = torch.ones((), dtype=torch.float64, device=device)
            counts = torch.stack([one, one * pairs, one * (batch * float(layout.num_tokens) ** 2)])
            if self._stats_totals.device != device:
                self._stats_totals = self._stats_totals.to(device)
                self._stats_counts = self._stats_counts.to(device)
            self._stats_totals += totals
            self._stats_counts += counts

    def get_attention_stats(self) -> AttentionStats:
        """Statistics over the forward passes since construction or reset_stats()."""
        if self.head_importance.device.type == "meta":
            raise RuntimeError("get_attention_stats: the module's parameters are on the meta device "
                               "and hold no values; move it with to_empty() and load weights first")
        rows, pairs, sum_p2, entropy = self._stats_totals.cpu()
        passes, layout_pairs, grid_pairs = self._stats_counts.cpu().tolist()
        sum_p = rows  # a row's weights sum to 1
        safe_pairs = pairs.clamp_min(1)
        mean = sum_p / safe_pairs
        var = (sum_p2 / safe_pairs - mean ** 2).clamp_min(0)
        ent = entropy / rows.clamp_min(1)
        total_pairs = pairs.sum().clamp_min(1)
        overall_mean = (sum_p.sum() / total_pairs).item()
        overall_var = max((sum_p2.sum() / total_pairs).item() - overall_mean ** 2, 0.0)
        density = layout_pairs / grid_pairs if grid_pairs else 0.0
        return AttentionStats(
            mean=overall_mean, std=math.sqrt(overall_var),
            sparsity=1.0 - density if passes else 0.0,
            entropy=(entropy.sum() / rows.sum().clamp_min(1)).item(),
            pattern_type=self.pattern_name,
            head_importance=self.head_importance.detach().cpu().tolist(),
            mean_per_head=mean.tolist(), std_per_head=var.sqrt().tolist(),
            entropy_per_head=ent.tolist(), num_forward_passes=int(passes), density=density)

    # -- heads ---------------------------------------------------------------

    def analyze_head_importance(self, normalize: bool = True) -> Dict[int, float]:
        """Gradient-based importance of each head (Michel et al., 2019).

        The score of head h is the mean over the backward passes seen so far of
        |dL / d g_h|, g_h being the head's gate (``head_importance``): how much
        the loss would move if the head were scaled down. With ``normalize``
        the scores are divided by their L2 norm, as in the paper. Pruned heads
        score 0. Raises RuntimeError before any backward pass.
        """
        steps = int(self.importance_steps.item())
        if steps == 0:
            raise RuntimeError("analyze_head_importance: no gradient has reached head_importance yet; "
                               "run some training steps (forward and backward) first")
        scores = self.importance_grad_sum / steps
        scores = torch.where(self.head_mask.to(scores.device), scores, torch.zeros_like(scores))
        if normalize:
            scores = scores / scores.norm().clamp_min(1e-12)
        return {h: float(s) for h, s in enumerate(scores.tolist())}

    def prune_heads(self, heads: Iterable[int]):
        """Skip ``heads`` from now on: the kernels never visit their rows."""
        heads = list(heads)
        for h in heads:
            if isinstance(h, bool) or not isinstance(h, numbers.Integral) or not 0 <= h < self.num_heads:
                raise ValueError(f"heads: expected head indices in [0, {self.num_heads}), got {h!r}")
        with torch.no_grad():
            for h in heads:
                self.head_mask[h] = False

    @property
    def active_heads(self) -> List[int]:
        """Heads that run: not pruned, and with a gate that is not exactly zero."""
        active = self.head_mask & (self.head_importance.detach() != 0)
        return [h for h, a in enumerate(active.tolist()) if a]

    # -- forward -------------------------------------------------------------

    @property
    def pattern_name(self) -> str:
        """The pattern's name: a SparsityPattern's, or a custom pattern's ``name``
        (``__name__`` for a plain function, its function's for a
        functools.partial)."""
        pattern = self.sparsity_pattern
        return str(getattr(pattern, "name", None) or name_of(pattern))

    @property
    def _built_in_pattern(self):
        """The SparsityPattern, or None for a custom pattern."""
        return self.sparsity_pattern if isinstance(self.sparsity_pattern, SparsityPattern) else None

    def layout_for(self, height: int, width: int) -> Layout:
        """The (cached) layout of this module's pattern for an H x W map."""
        built_in = self._built_in_pattern
        if torch.compiler.is_compiling():
            # worked out while torch.compile traces (a constant of the graph,
            # guarded by the map's size): no graph break
            if built_in is None:
                return _custom_layout_while_tracing(self.sparsity_pattern, static_int(height), static_int(width))
            return _layout_while_tracing(built_in, static_int(height), static_int(width),
                                         tuple(self.layout_knobs.items()))
        layout = self._layouts.get((height, width))
        if layout is None:  # build_layout validates every knob; do that once per size
            if built_in is None:
                layout = _custom_layout(self.sparsity_pattern, height, width)
            else:
                layout = build_layout(built_in, height, width, **self.layout_knobs)
            self._layouts[(height, width)] = layout
        return layout

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor [B, C, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected 4 dimensions [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels (in_channels), got shape "
                             f"{tuple(x.shape)}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"x: height and width must be >= 1, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        weights = self.qkv.weight
        if x.device != weights.device:
            raise ValueError(f"x: expected a tensor on {weights.device} (where the module's parameters "
                             f"are), got one on {x.device}; move one of them with .to()")
        if x.dtype != weights.dtype and not _autocast_enabled(x.device.type):
            raise TypeError(f"x: expected dtype {weights.dtype} (the module's parameters), got {x.dtype}; "
                            f"convert one of them with .to(), or run under torch.autocast")

    def _project(self, x):
        """x [B, Cin, H, W] -> tokens [B, N, Cin] (compact), q, k, v [B, heads, N, D]
        (views of the fused projection, no copy)."""
        batch, _, height, width = x.shape
        # one compact copy in token order serves the projection and the skip:
        # both read it with unit stride (adding the strided view took 3-5 ms at
        # 2 x 256 x 64 x 64, and the projection copied it again)
        tokens = x.flatten(2).transpose(1, 2).contiguous()
        projected = tokens
        if self.pos_embedding is not None:
            projected = tokens + self._position_tokens(height, width, x.dtype)
        qkv = self.qkv(projected).view(batch, height * width, 3, self.num_heads, self.head_dim)
        # unbind, not three selects: its backward stacks the three gradients once,
        # where each select's backward fills a zero tensor of all of qkv
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return tokens, q, k, v

    def _position_tokens(self, height, width, dtype):
        """The learnable position embedding resized to height x width (bilinear,
        align_corners=False), as [N, Cin] in token order.

        Bilinear resizing is one linear map per axis, so it runs as two small
        matrix products with the maps F.interpolate would apply; its own CPU
        kernel took 9 ms for 256 channels from 16 x 16 to 64 x 64, these take
        a fraction of one."""
        pos = self.pos_embedding[0].to(dtype)  # [Cin, h, w]
        rows = self._resize_map(pos.shape[1], height, dtype, pos.device)  # [H, h]
        cols = self._resize_map(pos.shape[2], width, dtype, pos.device)  # [W, w]
        return torch.einsum("Yy,cyx,Xx->YXc", rows, pos, cols).reshape(height * width, -1)

    def _resize_map(self, size_in, size_out, dtype, device):
        """[size_out, size_in]: F.interpolate's linear weights along one axis."""
        key = (size_in, size_out, dtype, device)
        found = self._resize_maps.get(key)
        if found is None and torch.compiler.is_compiling():
            return self._build_resize_map(size_in, size_out, dtype, device)  # ops of the graph
        if found is None:
            with building_cached_tensors():  # cached: a later training step saves it
                found = self._build_resize_map(size_in, size_out, dtype, device)
            if may_cache_tensors():
                self._resize_maps[key] = found
        return found

    @staticmethod
    def _build_resize_map(size_in, size_out, dtype, device):
        if size_in == size_out:
            return torch.eye(size_in, dtype=dtype, device=device)
        basis = torch.eye(size_in, dtype=torch.float64, device=device).unsqueeze(0)
        resized = F.interpolate(basis, size=size_out, mode="linear", align_corners=False)[0].t()
        return resized.to(dtype).contiguous()

    def _head_active(self, device):
        # always a tensor: deciding "all active" would need a host sync (and a
        # graph break under torch.compile); the kernels read it once per row
        return (self.head_mask & (self.head_importance.detach() != 0)).to(device)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> [B, out_channels, H, W].

        key_mask: optional [B, H*W] bool, True where a token may be attended.
        """
        self._check_input(x)
        batch, _, height, width = x.shape
        height, width = int(height), int(width)  # torch.jit.trace hands shapes over as tensors
        layout = self.layout_for(height, width)
        tokens, q, k, v = self._project(x)
        bias = self.rel_pos_bias.to(q.dtype) if self.rel_pos_bias is not None else None
        want_stats = self.track_stats
        head_active = self._head_active(x.device)
        result = _torch_ops.attention(
            q, k, v, layout, None, bias, key_mask, self.dropout if self.training else 0.0, None,
            head_active, want_stats, "auto" if self.use_cuda_kernel else "torch")
        attended, _lse, row_stats = result
        if want_stats and row_stats is not None:
            self._record_stats(row_stats, layout, key_mask, head_active)
        merged = attended.transpose(1, 2).reshape(batch, height * width, self.out_channels)
        # the per-head gate scales the projection's input channels of its head:
        # folded into the Cout x Cout weight, it costs a small product instead of
        # a pass over [B, heads, N, D] forward and two more backward
        gate = self.head_importance.to(merged.dtype).repeat_interleave(self.head_dim)
        out = F.linear(merged, self.proj.weight * gate, self.proj.bias)
        if self.skip_connection:
            out = out + (self.residual(tokens) if self.residual is not None else tokens)
        out = self.norm(out)
        return out.transpose(1, 2).reshape(batch, self.out_channels, height, width)

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, query_tokens: Iterable[int]):
        """Exact attention weights of a few query tokens, without an N x N matrix.

        Runs the kernel for the log-sum-exp of every row, then evaluates
        p_ij = exp(score_ij - lse_i) for the chosen rows only. Returns a list
        (one per query token) of (keys [K], weights [B, heads, K]). Dropout is
        not applied (the weights are the softmax, as in eval mode).
        """
        self._check_input(x)
        batch, _, height, width = x.shape
        layout = self.layout_for(height, width)
        _, q, k, v = self._project(x)
        bias = self.rel_pos_bias.to(q.dtype) if self.rel_pos_bias is not None else None
        _, lse, _ = _torch_ops.attention(q, k, v, layout, None, bias, None, 0.0, None,
                                         self._head_active(x.device), False,
                                         "auto" if self.use_cuda_kernel else "torch")
        scale = 1.0 / math.sqrt(self.head_dim)
        results = []
        for token in query_tokens:
            keys = torch.from_numpy(layout.neighbors(int(token)).astype("int64")).to(x.device)
            scores = torch.einsum("bhd,bhkd->bhk", q[:, :, token].double(), k[:, :, keys].double()) * scale
            if bias is not None:
                m = self.max_relative_positions
                dy = (token // width - keys // width).clamp(-m, m) + m
                dx = (token % width - keys % width).clamp(-m, m) + m
                scores = scores + bias.double()[:, dy, dx].unsqueeze(0)
            weights = torch.exp(scores - lse[:, :, token].double().unsqueeze(-1))
            weights = torch.nan_to_num(weights, nan=0.0)
            results.append((keys.cpu(), weights.cpu()))
        return results

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, num_heads={self.num_heads}, "
                f"pattern={self.pattern_name}, dropout={self.dropout}, "
                f"relative_pos={self.use_relative_pos}, learnable_pos={self.use_learnable_pos}, "
                f"native={self.use_cuda_kernel}")

