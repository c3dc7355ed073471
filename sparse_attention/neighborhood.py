"""Neighbourhood attention modules with NATTEN's interface, on our kernels.

``NeighborhoodAttention1D``, ``2D`` and ``3D`` take NATTEN's constructor
arguments and its channels-last inputs (``[B, L, C]``, ``[B, H, W, C]``,
``[B, D, H, W, C]``), and hold the same parameters under the same names
(``qkv``, ``proj``), so a NAT or DiNAT model built on NATTEN's modules takes
these in their place and loads its state dict unchanged. What differs: they
train on the CPU too (NATTEN's CPU path has no backward), take any grid
(NATTEN asks for kernel_size x dilation <= the grid), and offer attention
dropout and (1-D and 2-D) a relative position bias: our own table, or
``rpb``, the bias of NAT's and DiNAT's published checkpoints (NATTEN before
0.20; later versions dropped it), so those load and run too.
"""

import functools
import math

import torch
from torch import nn

from .custom_layouts import (_axis_flags, _axis_values, _neighborhood_settings, neighborhood_layout,
                             neighborhood_layout_3d)
from .functional import sparse_scaled_dot_product_attention
from .module import _custom_layout, _custom_layout_while_tracing
from .patterns import _as_int, static_int


def _probability(value, label):
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{label}: expected a probability in [0, 1), got {value}")
    return value


def _flat_3d_layout(depth, builder, flat_height, width):
    """builder's layout of a depth x (flat_height / depth) x width map, on its flat grid."""
    return builder(depth, flat_height // depth, width)


class _NeighborhoodAttention(nn.Module):
    """What the modules share; ``rank`` is the number of token axes of the
    input (1-D runs on a 1 x L grid, 3-D on a (D x H) x W one)."""

    def __init__(self, rank, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale,
                 proj_drop, attn_drop, rel_pos_bias, rpb):
        super().__init__()
        embed_dim, num_heads = _as_int(embed_dim, "embed_dim"), _as_int(num_heads, "num_heads")
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim, num_heads: expected positive, embed_dim a multiple of num_heads, "
                             f"got embed_dim={embed_dim}, num_heads={num_heads}")
        self.rank = rank
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = float(qk_scale) if qk_scale is not None else self.head_dim ** -0.5
        self.kernel_size = self._per_axis(kernel_size, "kernel_size", _axis_values, 1)
        self.stride = self._per_axis(stride, "stride", _axis_values, 1)
        self.dilation = self._per_axis(dilation, "dilation", _axis_values, 1)
        self.is_causal = self._per_axis(is_causal, "is_causal", _axis_flags, False)
        # the builder's own checks, now rather than at forward
        _neighborhood_settings(len(self.kernel_size), self.kernel_size, self.dilation, self.stride, self.is_causal)
        self.attn_drop = _probability(attn_drop, "attn_drop")
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bool(qkv_bias))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(_probability(proj_drop, "proj_drop"))
        if rel_pos_bias and rpb:
            raise ValueError("rel_pos_bias, rpb: expected at most one of the two biases")
        if rpb and self.stride != (1, 1):
            raise ValueError(f"rpb: NAT's bias is defined for stride 1 (offsets within the kernel), got stride "
                             f"{self.stride}")
        # offsets reach (kernel - 1) x dilation at the grid's edges, where the window is moved inward
        self._reach = max((k - 1) * d for k, d in zip(self.kernel_size, self.dilation))
        if rel_pos_bias:
            self.rel_pos_bias = nn.Parameter(torch.randn(num_heads, 2 * self._reach + 1, 2 * self._reach + 1) * 0.02)
        else:
            self.register_parameter("rel_pos_bias", None)
        if rpb:
            # as NATTEN's 1-D and 2-D modules held it: one axis of cells per axis of tokens
            shape = [2 * k - 1 for k in self.kernel_size[2 - rank:]]
            self.rpb = nn.Parameter(torch.randn(num_heads, *shape) * 0.02)
            # where each of rpb's rows and columns lands in the op's table (see _bias_table); not
            # in the state dict, which keeps a checkpoint's keys
            rows, cols = (self._reach - d * (torch.arange(2 * k - 1) - (k - 1))
                          for k, d in zip(self.kernel_size, self.dilation))
            self.register_buffer("_rpb_rows", rows[:, None], persistent=False)
            self.register_buffer("_rpb_cols", cols[None, :], persistent=False)
        else:
            self.register_parameter("rpb", None)
        self._builder = functools.partial(neighborhood_layout_3d if rank == 3 else neighborhood_layout,
                                          kernel_size=self.kernel_size, stride=self.stride,
                                          dilation=self.dilation, is_causal=self.is_causal)
        self._layouts = {}

    def _per_axis(self, value, label, check, filler):
        """A value per axis of the grid the op runs on: a 1-D module's value
        for its one axis becomes (filler, value), as the grid is 1 x L."""
        if self.rank > 1:
            return check(value, label, self.rank)
        return (filler,) + check(value, label, 1)

    def _bias_table(self):
        """The op's bias table: rel_pos_bias, or NAT's rpb spread into one.
        rpb[h, u + k - 1, v + k - 1] is the bias of a key u rows and v
        columns (in steps of the dilation) after the query; the op's table
        is indexed by query minus key, clamped to M, so rpb's cell (u, v)
        goes to (M - u x dilation, M - v x dilation) and the cells between
        the dilation's steps, which no pair reaches, stay 0."""
        if self.rpb is None:
            return self.rel_pos_bias
        side = 2 * self._reach + 1
        table = self.rpb.new_zeros(self.num_heads, side, side)
        table[:, self._rpb_rows, self._rpb_cols] = self.rpb.view(self.num_heads, self._rpb_rows.numel(),
                                                                 self._rpb_cols.numel())
        return table

    def _builder_and_grid(self, token_shape):
        """(builder of (height, width) -> Layout, height, width) for the grid
        the op runs on: 1 x L, H x W, or (D x H) x W."""
        if self.rank == 3:
            depth, height, width = token_shape
            return functools.partial(_flat_3d_layout, depth, self._builder), depth * height, width
        return (self._builder, *token_shape) if self.rank == 2 else (self._builder, 1, token_shape[0])

    def _layout(self, token_shape):
        if torch.compiler.is_compiling():
            # a size torch.compile made symbolic after a recompile: the graph specialises on it
            token_shape = tuple(static_int(size) for size in token_shape)
            return _custom_layout_while_tracing(*self._builder_and_grid(token_shape))
        layout = self._layouts.get(token_shape)
        if layout is None:
            layout = self._layouts[token_shape] = _custom_layout(*self._builder_and_grid(token_shape))
        return layout

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != self.rank + 2 or x.shape[-1] != self.embed_dim:
            expected = {1: "[B, L, C]", 2: "[B, H, W, C]", 3: "[B, D, H, W, C]"}[self.rank]
            raise ValueError(f"x: expected {expected} with C = embed_dim = {self.embed_dim}, got shape "
                             f"{tuple(x.shape)}")
        batch, *token_shape, channels = x.shape
        token_shape = tuple(token_shape)
        num_tokens = math.prod(token_shape)
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim)
        # [B, heads, N, head_dim] views: the op takes any strides but the last
        query, key, value = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        out = sparse_scaled_dot_product_attention(query, key, value, self._layout(token_shape), scale=self.scale,
                                                  rel_pos_bias=self._bias_table(),
                                                  dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, *token_shape, channels)
        return self.proj_drop(self.proj(out))

    def extra_repr(self):
        pick = (lambda values: values) if self.rank > 1 else (lambda values: values[1:])
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kernel_size={pick(self.kernel_size)}, "
                f"stride={pick(self.stride)}, dilation={pick(self.dilation)}, is_causal={pick(self.is_causal)}, "
                f"attn_drop={self.attn_drop}, rel_pos_bias={self.rel_pos_bias is not None}, "
                f"rpb={self.rpb is not None}")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_layouts"] = {}  # rebuilt on first use; layouts hold native buffers
        return state


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """Neighbourhood attention over a 2-D feature map ``[B, H, W, C]``:
    the ``qkv`` projection, :func:`neighborhood_layout` attention on our
    kernels, the ``proj`` projection and its dropout, as NATTEN's module of
    the same name (same arguments, parameters and parameter names).

    ``kernel_size``, ``stride``, ``dilation`` and ``is_causal`` take a value
    or (rows, cols), as in :func:`neighborhood_layout`. Beyond NATTEN's:
    ``attn_drop`` (dropout on the attention weights, in training) and
    ``rel_pos_bias=True`` (a learnable table ``[heads, 2M+1, 2M+1]`` indexed
    by the offset (dy, dx), M = (kernel_size - 1) x dilation, the farthest
    offset a window moved inward at the edges reaches), or ``rpb=True``: the
    parameter ``rpb`` ``[heads, 2 kernel_size - 1, 2 kernel_size - 1]`` of NAT's
    and DiNAT's checkpoints (NATTEN before 0.20), indexed by key minus query
    in steps of the dilation plus kernel_size - 1 (NATTEN's get_pb_start rule
    for its odd kernels), so their state dicts load (stride 1 only; those
    versions padded maps smaller than kernel_size x dilation with zero
    tokens, where this attends the whole smaller map)."""

    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0, *, attn_drop=0.0, rel_pos_bias=False, rpb=False):
        super().__init__(2, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias,
                         qk_scale, proj_drop, attn_drop, rel_pos_bias, rpb)


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """Neighbourhood attention over a sequence ``[B, L, C]`` (a 1 x L grid),
    as NATTEN's module of the same name; the arguments as
    :class:`NeighborhoodAttention2D`'s, each a single value (``rpb``:
    ``[heads, 2 kernel_size - 1]``)."""

    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0, *, attn_drop=0.0, rel_pos_bias=False, rpb=False):
        super().__init__(1, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias,
                         qk_scale, proj_drop, attn_drop, rel_pos_bias, rpb)


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """Neighbourhood attention over a video or volume ``[B, D, H, W, C]``, as
    NATTEN's module of the same name (arguments, parameters and their
    names): the ``qkv`` projection, :func:`neighborhood_layout_3d` attention
    on our kernels, ``proj`` and its dropout. ``kernel_size``, ``stride``,
    ``dilation`` and ``is_causal`` take a value or (depth, rows, cols)
    (``is_causal=(True, False, False)``: causal in time, as video models
    ask). ``attn_drop`` as the 2-D module's. No relative position bias: the
    op's table is indexed by 2-D offsets (NATTEN's has had none since 0.20)."""

    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0, *, attn_drop=0.0):
        super().__init__(3, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias,
                         qk_scale, proj_drop, attn_drop, False, False)
