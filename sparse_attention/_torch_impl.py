"""Sparse attention in plain PyTorch, gather based: the path of
``use_cuda_kernel=False`` and of devices our kernels do not cover.

Same semantics as the kernels (csrc/attention_cpu_body.h), same dropout mask.
Memory is O(B * heads * nnz * D): the scores live on the layout's nnz entries,
never on an N x N matrix. Autograd differentiates it.
"""

from __future__ import annotations

import torch

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


def dropout_keep_mask(seed: int, batch: int, heads: int, rows: torch.Tensor, cols: torch.Tensor,
                      dropout_p: float) -> torch.Tensor:
    """Boolean [batch, heads, nnz]: True where pair (rows[e], cols[e]) survives dropout."""
    threshold = min(int(dropout_p * 4294967296.0), 4294967295)
    device = rows.device
    row_keys = []
    for b in range(batch):
        for h in range(heads):
            x = _mix32_int((seed & _MASK32) ^ 0x9E3779B9)
            x = _mix32_int(x ^ ((seed >> 32) & _MASK32))
            x = _mix32_int(x ^ (b & _MASK32))
            row_keys.append(_mix32_int(x ^ (h & _MASK32)))
    keys = torch.tensor(row_keys, dtype=torch.int64, device=device).view(batch, heads, 1)
    query_keys = mix32(keys ^ (rows.to(torch.int64) & _MASK32))
    return mix32(query_keys ^ (cols.to(torch.int64) & _MASK32)) >= threshold


@torch.compiler.disable
def _layout_tensors(layout, device, max_relative):
    """The layout's device tensors and each pair's row (NumPy work, kept out of
    torch.compile's graphs)."""
    return layout.torch_tensors(device, max_relative), layout.row_ids_tensor(device)


def sparse_attention_torch(query, key, value, layout, *, scale, rel_pos_bias=None, key_mask=None,
                           head_active=None, dropout_p=0.0, dropout_seed=0, want_stats=False):
    """Returns (out, lse, row_stats or None); differentiable in query, key, value, bias."""
    batch, heads, num_tokens, _ = query.shape
    device = query.device
    max_relative = None if rel_pos_bias is None else (rel_pos_bias.shape[-1] - 1) // 2
    tensors, rows = _layout_tensors(layout, device, max_relative)
    cols = tensors["col_idx"].long()
    compute_dtype = query.dtype if query.dtype == torch.float64 else torch.float32
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
