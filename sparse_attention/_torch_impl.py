"""Sparse attention in plain PyTorch: the path of ``use_cuda_kernel=False``
and of devices our kernels do not cover.

Same semantics as the kernels (csrc/attention_cpu_body.h), same dropout mask.
Where the layout has a tile plan (sparse_attention/_tiles.py) it computes
over the plan's 64 x 64 blocks with matrix products, the scores taking a float
per plan slot (about one a pair for AXIAL and BLOCK, up to 10 for sparse
RANDOM layouts); otherwise one gathered key row per pair, O(B * heads * nnz *
D). Never an N x N matrix. Autograd differentiates it.
"""

from __future__ import annotations

import torch

from .patterns import layout_by_serial, static_int

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32), exact in int64 arithmetic."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser of csrc/dropout_hash.h, on int64 tensors holding uint32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _row_keys(seed, batch: int, heads: int, device) -> torch.Tensor:
    """int64 [batch, heads]: sa_dropout_row_key of csrc/dropout_hash.h."""
    if isinstance(seed, torch.Tensor):
        # the same keys from a seed tensor: traced and compiled graphs then
        # draw a new mask per call instead of keeping the traced seed's
        seed = seed.to(device=device, dtype=torch.int64).reshape(1, 1)
        x = mix32((seed & _MASK32) ^ 0x9E3779B9)
        x = mix32(x ^ ((seed >> 32) & _MASK32))
        x = mix32(x ^ torch.arange(batch, dtype=torch.int64, device=device).view(batch, 1))
        return mix32(x ^ torch.arange(heads, dtype=torch.int64, device=device).view(1, heads))
    row_keys = []
    for b in range(batch):
        for h in range(heads):
            x = _mix32_int((seed & _MASK32) ^ 0x9E3779B9)
            x = _mix32_int(x ^ ((seed >> 32) & _MASK32))
            x = _mix32_int(x ^ (b & _MASK32))
            row_keys.append(_mix32_int(x ^ (h & _MASK32)))
    return torch.tensor(row_keys, dtype=torch.int64, device=device).view(batch, heads)


def dropout_keep_mask_torch(seed, batch: int, heads: int, rows: torch.Tensor, cols: torch.Tensor,
                            dropout_p: float) -> torch.Tensor:
    """Boolean [batch, heads, *shape]: True where pair (rows, cols) survives
    dropout, for ``rows`` and ``cols`` broadcast to ``shape``; ``seed`` an int
    or a one-element int64 tensor. Plain tensor arithmetic (any device, any
    tracer), about 65 ns a pair on two CPU cores where rows and cols are
    outer (the query keys hashed once per row)."""
    threshold = min(int(dropout_p * 4294967296.0), 4294967295)
    ndim = max(rows.dim(), cols.dim())
    keys = _row_keys(seed, batch, heads, rows.device).view(batch, heads, *([1] * ndim))
    query_keys = mix32(keys ^ (rows.to(torch.int64) & _MASK32))
    return mix32(query_keys ^ (cols.to(torch.int64) & _MASK32)) >= threshold


def dropout_keep_mask(seed, batch: int, heads: int, rows: torch.Tensor, cols: torch.Tensor,
                      dropout_p: float) -> torch.Tensor:
    """dropout_keep_mask_torch's mask; on the CPU with an integer seed (eager
    calls) drawn by the extension's C loop, about 100 times faster."""
    if (not isinstance(seed, int) or rows.device.type != "cpu" or cols.device.type != "cpu"
            or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()):
        return dropout_keep_mask_torch(seed, batch, heads, rows, cols, dropout_p)
    from ._native import C

    shape = torch.broadcast_shapes(rows.shape, cols.shape)
    if rows.dim() == 2 and cols.dim() == 2 and rows.shape[1] == 1 and cols.shape[0] == 1:
        # every (row, col): the C loop hashes a row's key once
        keep = torch.empty(batch, heads, *shape, dtype=torch.bool)
        C.dropout_mask(seed, dropout_p, rows.reshape(-1).to(torch.int64).contiguous(),
                       cols.reshape(-1).to(torch.int64).contiguous(), keep)
        return keep
    keep = torch.empty(batch, heads, shape.numel(), dtype=torch.bool)
    C.dropout_mask(seed, dropout_p, rows.expand(shape).reshape(-1).to(torch.int64).contiguous(),
                   cols.expand(shape).reshape(-1).to(torch.int64).contiguous(), keep)
    return keep.view(batch, heads, *shape)


def _layout_tensors(layout, device, max_relative):
    """The layout's device tensors and each pair's row (cached on the layout)."""
    return layout.torch_tensors(device, max_relative), layout.row_ids_tensor(device)


# Whether the PyTorch path computes over the layout's tile plan (batched 64 x 64
# score blocks, matrix products) where the layout has one, instead of one
# gathered key row per pair: at 64x64 (B=2, 8 heads, D=32, float32, 2 threads)
# the forward took 98 instead of 2133 ms for AXIAL, 41 / 966 BLOCK, 265 / 748
# LONGFORMER, 1006 / 2383 STRIDED, and its largest buffers went from a
# [B, heads, nnz, D] gather per operand to a float per plan slot. Tests flip it.
use_tile_plan = True


def _plan_tensors(layout, device):
    """The full tile plan's passes as torch tensors on ``device`` (cached on the
    layout): per pass the tiles' tokens [T, 64], each chunk's tile [C], the
    chunks' tokens [C, 64] (-1 pads), the pairs as a bool [C, 64, 64] (query
    row, key column), and the tile slots that hold a token with those tokens
    (worked out here: a data-dependent shape would break torch.compile's
    graph); None without a plan."""
    import numpy as np

    def build(layout):
        plan = layout.full_tile_plan()
        if plan is None:
            return None
        passes = []
        for one in plan:
            chunk_tile = np.repeat(np.arange(one.queries.shape[0]), np.diff(one.chunk_ptr))
            _, keys, bits = one.chunk_pairs()
            queries = one.queries.astype(np.int64)
            real = np.flatnonzero(queries.reshape(-1) >= 0)
            tokens = queries.reshape(-1)[real]
            passes.append(tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device)
                                for a in (queries, chunk_tile, keys, bits, real, tokens)))
        return passes

    return layout._built_once(("torch_plan", str(torch.device(device))), build, layout._device_cache)


def _plan_buckets(layout, device, max_relative):
    """Per pass of the full tile plan, every slot's relative position bucket
    (_tiles.slot_buckets) as an int64 tensor [C, 64, 64] on ``device``, cached
    on the layout per clamp."""
    import numpy as np

    from ._tiles import slot_buckets

    def build(layout):
        out = []
        for one in layout.full_tile_plan():
            chunk_tile = np.repeat(np.arange(one.queries.shape[0]), np.diff(one.chunk_ptr))
            out.append(torch.from_numpy(slot_buckets(one.queries[chunk_tile].astype(np.int64),
                                                     one.keys.astype(np.int64), layout.width,
                                                     max_relative)).to(device))
        return out

    key = ("torch_plan_buckets", int(max_relative), str(torch.device(device)))
    return layout._built_once(key, build, layout._device_cache)


def _strip_bounds(layout, rows_per_strip):
    """Per strip of query rows: (start, stop, begin, end), its rows and the
    span of its pairs in the CSR (cached per strip height)."""
    def build(layout):
        n = layout.num_tokens
        return [(start, min(n, start + rows_per_strip), int(layout.indptr[start]),
                 int(layout.indptr[min(n, start + rows_per_strip)]))
                for start in range(0, n, rows_per_strip)]

    return layout._built_once(("strip_bounds", int(rows_per_strip)), build)


def _strip_pair_slots(bound, rows, cols, num_tokens):
    """Each pair of the strip as a flat index into its [stop - start, N] scores."""
    start, _stop, begin, end = bound
    return (rows[begin:end] - start) * num_tokens + cols[begin:end].long()


def _strip_mask(bound, rows, cols, num_tokens, slots=None):
    """The strip's pairs as a bool [stop - start, N], built on the device
    (``slots``: _strip_pair_slots, where the caller has them)."""
    start, stop, _begin, _end = bound
    if slots is None:
        slots = _strip_pair_slots(bound, rows, cols, num_tokens)
    mask = torch.zeros((stop - start) * num_tokens, dtype=torch.bool, device=rows.device)
    return mask.index_fill(0, slots, 1).view(stop - start, num_tokens)  # 1, not True: jit.trace


# Whether training calls recompute the scores of each strip (or plan pass) in
# backward (torch.utils.checkpoint) instead of keeping them: the strips' saved
# probabilities are B x heads x N^2 floats, an N x N matrix per head, and a
# pass keeps its scores and gathered rows. Tests flip it; torch.func
# transforms, tracers and torch.compile keep the scores.
recompute_in_backward = True


def _attention_in_strips(q, k, v, strips, scale, table, key_mask, head_active, dropout_p,
                         dropout_seed, want_stats):
    """The op as strips of query rows against all keys, masked to the layout:
    each strip's scores [B, heads, rows, N] are one matrix product, its mask
    and bias map built on the device from the layout's cached CSR tensors,
    one strip at a time. Same results as the other forms; returns (out, lse,
    stats)."""
    batch, heads, num_tokens, dim = q.shape
    usable = None
    if key_mask is not None:
        usable = key_mask.to(torch.bool).view(batch, 1, 1, num_tokens)
    heads_on = None
    if head_active is not None:
        heads_on = head_active.to(device=q.device, dtype=torch.bool).view(1, heads, 1, 1)
    bounds, tensors, pair_rows = strips
    context = dict(tensors=tensors, pair_rows=pair_rows, scale=scale, usable=usable, heads_on=heads_on,
                   dropout_p=dropout_p, dropout_seed=dropout_seed, want_stats=want_stats)
    recompute = _recompute_in_backward(q, k, v, table)
    outs, lses, stats = [], [], []
    for bound in bounds:
        args = (q[:, :, bound[0]:bound[1]], k, v, table, bound)
        if recompute:
            from torch.utils.checkpoint import checkpoint

            out, lse, row_stats = checkpoint(_one_strip, *args, use_reentrant=False, **context)
        else:
            out, lse, row_stats = _one_strip(*args, **context)
        outs.append(out)
        lses.append(lse)
        stats.append(row_stats)
    return (torch.cat(outs, dim=2), torch.cat(lses, dim=2),
            torch.cat(stats, dim=2) if want_stats else None)


def _one_strip(q_rows, k, v, table, bound, *, tensors, pair_rows, scale, usable, heads_on, dropout_p,
               dropout_seed, want_stats):
    """One strip of _attention_in_strips: rows [bound[0], bound[1]) of the
    output, log-sum-exp and statistics (None without)."""
    batch, heads, rows, _ = q_rows.shape
    num_tokens = k.shape[2]
    device, dtype = q_rows.device, q_rows.dtype
    start, stop = bound[0], bound[1]
    zero = torch.zeros((), dtype=dtype, device=device)
    lowest = torch.finfo(dtype).min
    scores = torch.matmul(q_rows, k.transpose(-1, -2)) * scale  # [B, H, R, N]
    slots = _strip_pair_slots(bound, pair_rows, tensors["col_idx"], num_tokens)
    if table is not None:
        # each pair's bucket (Layout.bias_buckets) at its slot; the slots
        # outside the layout read bucket 0 and are masked below
        bucket_map = torch.zeros(rows * num_tokens, dtype=torch.int64, device=device)
        bucket_map = bucket_map.index_copy(0, slots, tensors["bucket"][bound[2]:bound[3]].long())
        bias = table.reshape(heads, -1)[:, bucket_map].view(heads, rows, num_tokens)
        scores = scores + bias.unsqueeze(0)
    allowed = _strip_mask(bound, pair_rows, tensors["col_idx"], num_tokens, slots).view(1, 1, rows, num_tokens)
    if usable is not None:
        allowed = allowed & usable
    if heads_on is not None:
        allowed = allowed & heads_on
    # Pairs outside the layout take the lowest finite score, not -inf: a row
    # without pairs then gets a finite (uniform) softmax, zeroed below,
    # instead of NaNs that its backward would spread through torch.softmax,
    # whose fused kernel is several times faster than an exp pass here. The
    # where also keeps a NaN key from rows that do not attend it, as the
    # kernels do.
    scores = torch.where(allowed, scores, lowest)
    row_max = scores.detach().amax(-1)  # NaN and +inf pass on
    empty = row_max <= lowest  # no pair, or only pairs scoring -inf
    probs = torch.softmax(scores, -1)
    # lse = max - log(the max's probability): no second pass of exp
    lse = row_max - torch.log(probs.detach().amax(-1))
    lse = torch.where(empty, float("-inf"), lse)
    mixed = probs
    if dropout_p > 0:
        tokens = torch.arange(num_tokens, device=device)
        keep = dropout_keep_mask(dropout_seed, batch, heads, tokens[start:stop, None], tokens[None],
                                 dropout_p)  # [B, H, R, N]
        mixed = torch.where(keep, probs, zero)
    out = torch.matmul(mixed, v)
    if dropout_p > 0:
        out = out / (1.0 - dropout_p)
    out = torch.where(empty.unsqueeze(-1), zero, out)
    row_stats = None
    if want_stats:
        with torch.no_grad():
            p = probs.detach()
            log_p = scores.detach() - torch.where(empty, zero, lse.detach()).unsqueeze(-1)
            plogp = torch.where(p > 0, p * log_p, zero)
            row_stats = torch.stack([(p * p).sum(-1), -plogp.sum(-1)], dim=-1)
            row_stats = torch.where(empty.unsqueeze(-1), zero, row_stats)
            row_stats = torch.where(torch.isnan(lse).unsqueeze(-1), float("nan"), row_stats)
    return out, lse, row_stats


def _planned_layout(layout, device, max_relative=None):
    passes = _plan_tensors(layout, device)
    if passes is None or max_relative is None:
        return passes, None
    return passes, _plan_buckets(layout, device, max_relative)


def _one_pass(q, k, v, table, pass_tensors, buckets, *, scale, key_mask, head_active, dropout_p, dropout_seed,
              want_stats):
    """One pass of _attention_over_plan: its output and log-sum-exp per token,
    and (with statistics) its scores, pairs and chunks' query rows, detached."""
    batch, heads, num_tokens, dim = q.shape
    device, dtype = q.device, q.dtype
    queries, chunk_tile, keys, bits, real, tokens = pass_tensors
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    tiles, chunks = queries.shape[0], keys.shape[0]
    chunk_queries = queries[chunk_tile]  # [C, 64]
    qc = q[:, :, chunk_queries.clamp_min(0)]  # [B, H, C, 64, D]
    kc = k[:, :, keys.clamp_min(0)]
    vc = v[:, :, keys.clamp_min(0)]
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, H, C, 64, 64]
    if table is not None:
        scores = scores + table.reshape(heads, -1)[:, buckets].unsqueeze(0)
    allowed = bits.view(1, 1, chunks, 64, 64)
    if key_mask is not None:
        usable = key_mask.to(torch.bool)[:, keys.clamp_min(0)]  # [B, C, 64]
        allowed = allowed & usable[:, None, :, None, :]
    if head_active is not None:
        allowed = allowed & head_active.to(device=device, dtype=torch.bool).view(1, heads, 1, 1, 1)
    scores = torch.where(allowed, scores, neg_inf)
    # per query row of each tile: the maximum and sum over the tile's chunks
    chunk_max = scores.detach().amax(-1)  # [B, H, C, 64]; NaN and +inf pass on
    index = chunk_tile.view(1, 1, -1, 1).expand_as(chunk_max)
    row_max = torch.full((batch, heads, tiles, 64), float("-inf"), dtype=dtype, device=device)
    row_max = row_max.scatter_reduce(2, index, chunk_max, "amax", include_self=True)
    safe_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    # a pair outside the layout scores -inf and weighs exp(-inf) = 0: no mask pass
    weights = torch.exp(scores - safe_max[:, :, chunk_tile, :, None])
    row_sum = torch.zeros_like(row_max).index_add(2, chunk_tile, weights.sum(-1))
    nonempty = row_sum > 0
    safe_sum = torch.where(nonempty, row_sum, torch.ones_like(row_sum))
    probs = weights / safe_sum[:, :, chunk_tile, :, None]
    lse = torch.where(nonempty, safe_max + torch.log(safe_sum), torch.full_like(row_sum, float("-inf")))
    lse = torch.where(row_max == float("inf"), torch.full_like(lse, float("nan")), lse)
    mixed = probs
    if dropout_p > 0:
        keep = dropout_keep_mask(dropout_seed, batch, heads, chunk_queries.clamp_min(0)[:, :, None],
                                 keys.clamp_min(0)[:, None, :], dropout_p)  # [B, H, C, 64, 64]
        mixed = torch.where(keep, probs / (1.0 - dropout_p), torch.zeros((), dtype=dtype, device=device))
    tile_out = torch.zeros(batch, heads, tiles, 64, dim, dtype=dtype, device=device)
    tile_out = tile_out.index_add(2, chunk_tile, torch.matmul(mixed, vc))
    # every token is a row of exactly one tile of the pass
    out = torch.zeros(batch, heads, num_tokens, dim, dtype=dtype, device=device)
    out = out.index_copy(2, tokens, tile_out.reshape(batch, heads, -1, dim)[:, :, real])
    token_lse = torch.full((batch, heads, num_tokens), float("-inf"), dtype=dtype, device=device)
    token_lse = token_lse.index_copy(2, tokens, lse.reshape(batch, heads, -1)[:, :, real])
    if not want_stats:
        return out, token_lse, None, None, None
    return out, token_lse, scores.detach(), allowed, chunk_queries


def _recompute_in_backward(q, k, v, table):
    """Whether this call recomputes its scores in backward rather than keep
    them (see recompute_in_backward)."""
    return (recompute_in_backward and torch.is_grad_enabled()
            and any(x is not None and x.requires_grad for x in (q, k, v, table))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._are_functorch_transforms_active())


def _attention_over_plan(q, k, v, passes, buckets, scale, table, key_mask, head_active, dropout_p,
                         dropout_seed, want_stats):
    """The op over the tile plan's passes, in q's dtype (float32 or float64):
    per pass, each chunk's 64 x 64 scores as one batched product with its
    tile's queries, a softmax per query row across its tile's chunks, and the
    passes merged through their log-sum-exp. Training calls recompute each
    pass in backward (as the strips do) rather than keep its scores and
    gathered rows. Returns (out, lse, stats)."""
    batch, heads, num_tokens, dim = q.shape
    device, dtype = q.device, q.dtype
    context = dict(scale=scale, key_mask=key_mask, head_active=head_active, dropout_p=dropout_p,
                   dropout_seed=dropout_seed, want_stats=want_stats)
    recompute = _recompute_in_backward(q, k, v, table)
    parts = []  # (out, lse, scores, allowed, chunk_queries) per pass; the last three for statistics
    for index, pass_tensors in enumerate(passes):
        args = (q, k, v, table, pass_tensors, None if buckets is None else buckets[index])
        if recompute:
            from torch.utils.checkpoint import checkpoint

            parts.append(checkpoint(_one_pass, *args, use_reentrant=False, **context))
        else:
            parts.append(_one_pass(*args, **context))
    out, lse = parts[0][0], parts[0][1]
    for part_out, part_lse, *_ in parts[1:]:
        total = torch.logaddexp(lse, part_lse)
        total = torch.where(torch.isnan(lse) | torch.isnan(part_lse), torch.full_like(total, float("nan")), total)
        zero = torch.zeros((), dtype=dtype, device=device)
        old_share = torch.where(lse == float("-inf"), zero, torch.exp(lse - total))
        new_share = torch.where(part_lse == float("-inf"), zero, torch.exp(part_lse - total))
        out = out * old_share.unsqueeze(-1) + part_out * new_share.unsqueeze(-1)
        lse = total
    stats = None
    if want_stats:
        with torch.no_grad():
            safe_lse = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
            sum_sq = torch.zeros_like(lse)
            entropy = torch.zeros_like(lse)
            for _out, _lse, scores, allowed, chunk_queries in parts:
                row_lse = safe_lse[:, :, chunk_queries.clamp_min(0)].unsqueeze(-1)
                log_p = scores - row_lse
                p = torch.where(allowed, torch.exp(log_p), torch.zeros((), dtype=dtype, device=device))
                plogp = torch.where(p > 0, p * log_p, torch.zeros((), dtype=dtype, device=device))
                rows = chunk_queries.clamp_min(0).view(1, 1, -1).expand(batch, heads, -1)
                sum_sq = sum_sq.scatter_add(2, rows, (p * p).sum(-1).reshape(batch, heads, -1))
                entropy = entropy.scatter_add(2, rows, -plogp.sum(-1).reshape(batch, heads, -1))
            stats = torch.stack([sum_sq, entropy], dim=-1)
            stats = torch.where(torch.isnan(lse).unsqueeze(-1), float("nan"), stats)
    return out, lse, stats


# Layouts whose tile plan has at least this many slots per grid pair (RANDOM
# at 10% has about 1, DENSE 1, STRIDED 0.17) compute in strips of query rows
# against all keys instead: as many scores, but plain matrix products without
# a gather of query and key rows per chunk. Tests set it to compare the forms.
strip_min_plan_fill = 0.5
_STRIP_ELEMENTS = 1 << 22  # scores per strip, over batch and heads: 16 MiB in float32


def _plan_fill(layout):
    """The full tile plan's slots over N^2 (cached), None without a plan."""
    def build(layout):
        plan = layout.full_tile_plan()
        if plan is None:
            return None
        slots = sum(int(one.keys.shape[0]) for one in plan) * 64 * 64
        return slots / float(layout.num_tokens) ** 2

    return layout._built_once("plan_fill", build)


def _rows_per_strip(layout, scores_per_row):
    return max(1, min(layout.num_tokens, _STRIP_ELEMENTS // max(1, scores_per_row)))


def _layout_form_host(layout, device, max_relative):
    """How the PyTorch path computes this layout: ("strips", (layout tensors,
    rows)), ("plan", (passes, buckets)) or ("gather", (layout tensors,
    rows)); cached on the layout. Strips also need _strip_bounds, which
    depend on the batch: kept apart, so that the other forms do not."""
    key = ("torch_form", str(torch.device(device)), max_relative, use_tile_plan, strip_min_plan_fill)

    def build(layout):
        fill = _plan_fill(layout) if use_tile_plan else None
        if fill is None:
            return "gather", _layout_tensors(layout, device, max_relative)
        if fill >= strip_min_plan_fill:
            return "strips", _layout_tensors(layout, device, max_relative)
        return "plan", _planned_layout(layout, device, max_relative)

    return layout._built_once(key, build, layout._device_cache)


# torch.compile runs these while it traces and keeps their results as
# constants of the graph (tensors stay graph inputs): host work without a
# graph break. Only strips read the batch (their bounds), so only layouts
# in strips specialise the graph on it.
@torch.compiler.assume_constant_result
def _layout_form_while_tracing(layout_serial, device, max_relative):
    return _layout_form_host(layout_by_serial(layout_serial), device, max_relative)


@torch.compiler.assume_constant_result
def _strip_bounds_while_tracing(layout_serial, rows_per_strip):
    return _strip_bounds(layout_by_serial(layout_serial), rows_per_strip)


def _layout_form(layout, device, max_relative, scores_per_row):
    """("strips", (strip bounds, layout tensors, rows)), ("plan", ...) or
    ("gather", ...): see _layout_form_host."""
    if torch.compiler.is_compiling():
        form, found = _layout_form_while_tracing(layout._serial, device, max_relative)
        if form == "strips":
            rows = _rows_per_strip(layout, static_int(scores_per_row))
            return form, (_strip_bounds_while_tracing(layout._serial, rows), *found)
        return form, found
    form, found = _layout_form_host(layout, device, max_relative)
    if form == "strips":
        return form, (_strip_bounds(layout, _rows_per_strip(layout, scores_per_row)), *found)
    return form, found


def sparse_attention_torch(query, key, value, layout, *, scale, rel_pos_bias=None, key_mask=None,
                           head_active=None, dropout_p=0.0, dropout_seed=0, want_stats=False):
    """Returns (out, lse, row_stats or None); differentiable in query, key, value, bias."""
    batch, heads, num_tokens, _ = query.shape
    max_relative = None if rel_pos_bias is None else (int(rel_pos_bias.shape[-1]) - 1) // 2
    form, found = _layout_form(layout, query.device, max_relative, batch * heads * num_tokens)
    compute_dtype = query.dtype if query.dtype == torch.float64 else torch.float32
    table = None if rel_pos_bias is None else rel_pos_bias.to(compute_dtype)
    if form == "strips":
        with torch.autocast(device_type=query.device.type, enabled=False):
            out, lse, stats = _attention_in_strips(
                query.to(compute_dtype), key.to(compute_dtype), value.to(compute_dtype), found,
                scale, table, key_mask, head_active, dropout_p, dropout_seed, want_stats)
        return out.to(query.dtype), lse, stats
    if form == "plan":
        passes, buckets = found
        # the products in compute_dtype, as the kernels' (autocast would make them 16-bit)
        with torch.autocast(device_type=query.device.type, enabled=False):
            out, lse, stats = _attention_over_plan(
                query.to(compute_dtype), key.to(compute_dtype), value.to(compute_dtype), passes, buckets,
                scale, table, key_mask, head_active, dropout_p, dropout_seed, want_stats)
        return out.to(query.dtype), lse, stats
    device = query.device
    tensors, rows = found
    cols = tensors["col_idx"].long()
    q = query.to(compute_dtype)
    k = key.to(compute_dtype)
    v = value.to(compute_dtype)

    scores = (q[:, :, rows] * k[:, :, cols]).sum(-1) * scale  # [B, heads, nnz]
    if rel_pos_bias is not None:
        table = rel_pos_bias.to(compute_dtype).reshape(heads, -1)
        scores = scores + table[:, tensors["bucket"]].unsqueeze(0)
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if key_mask is not None:
        allowed = allowed & key_mask.to(torch.bool)[:, cols].unsqueeze(1)
    if head_active is not None:
        allowed = allowed & head_active.to(device=device, dtype=torch.bool).view(1, heads, 1)
    neg_inf = torch.tensor(float("-inf"), dtype=compute_dtype, device=device)
    scores = torch.where(allowed, scores, neg_inf)

    index = rows.view(1, 1, -1).expand_as(scores)
    row_max = torch.full((batch, heads, num_tokens), float("-inf"), dtype=compute_dtype,
                         device=device)
    row_max = row_max.scatter_reduce(2, index, scores.detach(), "amax", include_self=True)
    safe_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    shifted = scores - safe_max[:, :, rows]
    weights = torch.where(allowed, torch.exp(shifted), torch.zeros_like(shifted))
    row_sum = torch.zeros_like(row_max).index_add(2, rows, weights)
    nonempty = row_sum > 0
    safe_sum = torch.where(nonempty, row_sum, torch.ones_like(row_sum))
    probs = weights / safe_sum[:, :, rows]
    lse = torch.where(nonempty, safe_max + torch.log(safe_sum), torch.full_like(row_sum, float("-inf")))
    # a +inf score makes its row NaN (exp(inf - inf)); its lse is NaN too, as the kernels give
    lse = torch.where(row_max == float("inf"), torch.full_like(lse, float("nan")), lse)

    mixed = probs
    if dropout_p > 0:
        keep = dropout_keep_mask(dropout_seed, batch, heads, rows, cols, dropout_p)
        mixed = torch.where(keep, probs / (1.0 - dropout_p), torch.zeros_like(probs))
    out = torch.zeros(batch, heads, num_tokens, v.shape[-1], dtype=compute_dtype, device=device)
    out = out.index_add(2, rows, mixed.unsqueeze(-1) * v[:, :, cols])

    row_stats = None
    if want_stats:
        with torch.no_grad():
            sum_sq = torch.zeros_like(row_sum).index_add(2, rows, probs * probs)
            plogp = torch.where(probs > 0, probs * torch.log(probs.clamp_min(1e-300)),
                                torch.zeros_like(probs))
            entropy = -torch.zeros_like(row_sum).index_add(2, rows, plogp)
            row_stats = torch.stack([sum_sq, entropy], dim=-1)
            row_stats = torch.where(torch.isnan(lse).unsqueeze(-1), float("nan"), row_stats)
    return out.to(query.dtype), lse, row_stats
