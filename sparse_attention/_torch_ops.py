"""torch side of the op: custom operators around the native kernels, so that
autograd runs our backward kernels and torch.compile sees one opaque op."""

from __future__ import annotations

from typing import Optional

import torch

from ._native import C
from ._torch_impl import _layout_tensors, sparse_attention_torch
from .functional import (_check_bias, _check_head_active, _check_key_mask, _validate_common)

_NATIVE_CPU_DTYPES = (torch.float32, torch.float64)
_NATIVE_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _accum_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stream_of(device):
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return -1


def native_supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when the native kernels run on (device, dtype); otherwise the reason."""
    if device.type == "cpu":
        if dtype in _NATIVE_CPU_DTYPES:
            return None
        return f"the CPU kernels take float32 or float64, not {dtype}"
    if device.type == "cuda":
        if not C.WITH_CUDA:
            return "this build has no CUDA kernels (nvcc was not found when it was built)"
        if dtype in _NATIVE_CUDA_DTYPES:
            return None
        return f"the CUDA kernels take float16, bfloat16, float32 or float64, not {dtype}"
    return f"no native kernels for device type {device.type!r}"


def _detached(x):
    return x.detach() if x is not None else None


# Tests set this to check the fast CUDA kernels against the simple ones.
use_reference_cuda_kernels = False
# The tensor-core forward (tile plans) where it applies; tests turn it off to
# compare it with the other CUDA kernels.
use_tiled_cuda_kernel = True
_TILED_DTYPES = (torch.float16, torch.bfloat16)
tiled_passes_run = 0  # passes launched on the tensor-core kernel, for tests
_TILED_MAX_HEAD_DIM = 128


def _tensor_core_capable(device) -> bool:
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _tile_plan_for(layout, query, want_stats) -> list:
    """The flattened tile plan (4 tensors per pass) when the tensor-core forward
    applies to these arguments, else an empty list."""
    if (query.device.type != "cuda" or not use_tiled_cuda_kernel or use_reference_cuda_kernels
            or query.dtype not in _TILED_DTYPES or query.shape[-1] > _TILED_MAX_HEAD_DIM
            or not _tensor_core_capable(query.device)):
        return []
    plan = layout.tile_plan_tensors(query.device)
    if plan is None or (want_stats and len(plan) > 1):
        return []  # statistics cannot be merged across passes
    return [t for one_pass in plan for t in one_pass]


def _cuda_extras(device, long_rows, long_cols, backward=False):
    if device.type != "cuda":
        return {}
    from .patterns import LONG_ROW_THRESHOLD

    extras = dict(long_rows=long_rows, long_threshold=LONG_ROW_THRESHOLD,
                  reference_kernel=use_reference_cuda_kernels)
    if backward:
        extras["long_cols"] = long_cols
    return extras


@torch.library.custom_op("sparse_attention::forward", mutates_args=())
def _forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, row_ptr: torch.Tensor,
             col_idx: torch.Tensor, col_ptr: torch.Tensor, row_idx: torch.Tensor,
             bucket_perm: Optional[torch.Tensor], bucket_ptr: Optional[torch.Tensor],
             long_rows: Optional[torch.Tensor], long_cols: Optional[torch.Tensor],
             height: int, width: int, scale: float,
             bias: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
             head_active: Optional[torch.Tensor], dropout_p: float, seed: torch.Tensor,
             want_stats: bool, tile_plan: list[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, num_tokens, _ = query.shape
    accum = _accum_dtype(query.dtype)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    lse = torch.empty(batch, heads, num_tokens, dtype=accum, device=query.device)
    stats = (torch.empty(batch, heads, num_tokens, 2, dtype=accum, device=query.device)
             if want_stats else torch.empty(0, dtype=accum, device=query.device))
    common = dict(height=height, width=width, scale=scale, rel_pos_bias=_detached(bias),
                  key_mask=key_mask, head_active=head_active, dropout_p=dropout_p,
                  dropout_seed=int(seed.item()), row_stats=stats if want_stats else None,
                  stream=_stream_of(query.device))
    if tile_plan:
        # one launch per pass; later passes merge into what the earlier ones wrote
        global tiled_passes_run
        for first in range(0, len(tile_plan), 4):
            tiled_passes_run += 1
            queries, chunk_ptr, keys, masks = tile_plan[first:first + 4]
            C.attention_forward(query.detach(), key.detach(), value.detach(), out, lse, row_ptr,
                                col_idx, tile_queries=queries, tile_chunk_ptr=chunk_ptr,
                                chunk_keys=keys, chunk_masks=masks, merge_previous=first > 0,
                                **common)
        return out, lse, stats
    C.attention_forward(query.detach(), key.detach(), value.detach(), out, lse, row_ptr, col_idx,
                        **common, **_cuda_extras(query.device, long_rows, long_cols))
    return out, lse, stats


@_forward.register_fake
def _forward_fake(query, key, value, row_ptr, col_idx, col_ptr, row_idx, bucket_perm, bucket_ptr,
                  long_rows, long_cols, height, width, scale, bias, key_mask,
                  head_active, dropout_p, seed, want_stats, tile_plan):
    batch, heads, num_tokens, _ = query.shape
    accum = _accum_dtype(query.dtype)
    stats_shape = (batch, heads, num_tokens, 2) if want_stats else (0,)
    return (query.new_empty(query.shape), query.new_empty((batch, heads, num_tokens), dtype=accum),
            query.new_empty(stats_shape, dtype=accum))


@torch.library.custom_op("sparse_attention::backward", mutates_args=())
def _backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
              col_ptr: torch.Tensor, row_idx: torch.Tensor, bucket_perm: Optional[torch.Tensor],
              bucket_ptr: Optional[torch.Tensor], long_rows: Optional[torch.Tensor],
              long_cols: Optional[torch.Tensor], height: int, width: int, scale: float,
              bias: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
              head_active: Optional[torch.Tensor], dropout_p: float,
              seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, num_tokens, _ = query.shape
    accum = _accum_dtype(query.dtype)
    device = query.device
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grads = [torch.empty(query.shape, dtype=query.dtype, device=device) for _ in range(3)]
    delta = torch.empty(batch, heads, num_tokens, dtype=accum, device=device)
    grad_scores = None
    if bias is not None:
        grad_scores = torch.empty(batch, heads, col_idx.shape[0], dtype=accum, device=device)
    stream = _stream_of(device)
    C.attention_backward(query.detach(), key.detach(), value.detach(), out.detach(),
                         grad_out.detach(), lse.detach(), delta, grads[0], grads[1], grads[2], row_ptr,
                         col_idx, col_ptr, row_idx, height=height, width=width, scale=scale,
                         rel_pos_bias=_detached(bias), key_mask=key_mask, head_active=head_active,
                         dropout_p=dropout_p, dropout_seed=int(seed.item()), grad_scores=grad_scores,
                         stream=stream, **_cuda_extras(device, long_rows, long_cols, backward=True))
    if bias is not None:
        grad_table = torch.empty(heads, bucket_ptr.shape[0] - 1, dtype=accum, device=device)
        C.bias_grad(grad_scores, bucket_perm, bucket_ptr, grad_table, stream=stream)
        grad_bias = grad_table.view(bias.shape).to(bias.dtype)
    else:
        grad_bias = torch.empty(0, dtype=query.dtype, device=device)
    return grads[0], grads[1], grads[2], grad_bias


@_backward.register_fake
def _backward_fake(grad_out, query, key, value, out, lse, row_ptr, col_idx, col_ptr, row_idx,
                   bucket_perm, bucket_ptr, long_rows, long_cols, height, width, scale, bias, key_mask, head_active,
                   dropout_p, seed):
    grad_bias = bias.new_empty(bias.shape) if bias is not None else query.new_empty((0,))
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_bias


def _setup_context(ctx, inputs, output):
    (query, key, value, row_ptr, col_idx, col_ptr, row_idx, bucket_perm, bucket_ptr, long_rows,
     long_cols, height, width, scale, bias, key_mask, head_active, dropout_p, seed, _stats,
     _plan) = inputs
    out, lse, _stats = output
    ctx.save_for_backward(query, key, value, out, lse, row_ptr, col_idx, col_ptr, row_idx,
                          bucket_perm, bucket_ptr, long_rows, long_cols, bias, key_mask, head_active,
                          seed)
    ctx.args = (height, width, scale, dropout_p)
    ctx.plan_length = len(_plan)


def _backward_rule(ctx, grad_out, _grad_lse, _grad_stats):
    (query, key, value, out, lse, row_ptr, col_idx, col_ptr, row_idx, bucket_perm, bucket_ptr,
     long_rows, long_cols, bias, key_mask, head_active, seed) = ctx.saved_tensors
    height, width, scale, dropout_p = ctx.args
    grad_q, grad_k, grad_v, grad_bias = _backward(
        grad_out, query, key, value, out, lse, row_ptr, col_idx, col_ptr, row_idx, bucket_perm,
        bucket_ptr, long_rows, long_cols, height, width, scale, bias, key_mask, head_active,
        dropout_p, seed)
    return (grad_q, grad_k, grad_v) + (None,) * 11 + (
        grad_bias if bias is not None else None,) + (None,) * 5 + ([None] * ctx.plan_length,)

_forward.register_autograd(_backward_rule, setup_context=_setup_context)


def attention(query, key, value, layout, scale, bias, key_mask, dropout_p, dropout_seed,
              head_active, want_stats, backend):
    """Validates torch arguments, then runs the native op or the PyTorch path."""
    scale, dropout_p = _validate_common(query, key, value, layout, scale, dropout_p)
    batch, heads, num_tokens, _ = query.shape
    device = query.device
    for name, x in (("key", key), ("value", value)):
        if x.dtype != query.dtype:
            raise TypeError(f"{name}: expected dtype {query.dtype} (the dtype of query), got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of query), got {x.device}")
    if not query.is_floating_point():
        raise TypeError(f"query: expected a floating-point dtype, got {query.dtype}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got "
                             f"strides {x.stride()}; call .contiguous() first")
    max_relative = _check_bias(bias, heads)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"rel_pos_bias: expected a torch.Tensor, got {type(bias).__name__}")
        if bias.device != device:
            raise ValueError(f"rel_pos_bias: expected device {device}, got {bias.device}")
    _check_key_mask(key_mask, batch, num_tokens)
    if key_mask is not None and key_mask.device != device:
        raise ValueError(f"key_mask: expected device {device}, got {key_mask.device}")
    _check_head_active(head_active, heads)
    if head_active is not None:
        head_active = head_active.to(device).contiguous()

    if dropout_p > 0 and dropout_seed is None:
        # a tensor, so that torch.compile keeps it in the graph (no .item() here)
        seed_tensor = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    else:
        seed = int(dropout_seed or 0)
        if not 0 <= seed < 2**63:
            raise ValueError(f"dropout_seed: expected an integer in [0, 2**63), got {seed}")
        seed_tensor = torch.full((1,), seed, dtype=torch.int64)

    reason = native_supports(device, query.dtype)
    if backend == "native" and reason is not None:
        raise RuntimeError(f"backend='native': {reason}")
    if backend == "torch" or reason is not None:
        return sparse_attention_torch(query, key, value, layout, scale=scale, rel_pos_bias=bias,
                                      key_mask=key_mask, head_active=head_active,
                                      dropout_p=dropout_p, dropout_seed=int(seed_tensor.item()),
                                      want_stats=want_stats)

    tensors = _layout_tensors(layout, device, max_relative)
    table = None
    if bias is not None:
        table = bias if bias.dtype == query.dtype else bias.to(query.dtype)
        table = table.contiguous()
    # The transpose and the bias buckets ride along as inputs: only backward reads them.
    out, lse, stats = _forward(query, key, value, tensors["row_ptr"], tensors["col_idx"],
                               tensors["col_ptr"], tensors["row_idx"], tensors.get("bucket_perm"),
                               tensors.get("bucket_ptr"), tensors.get("long_rows"),
                               tensors.get("long_cols"), layout.height, layout.width, scale,
                               table, key_mask, head_active, dropout_p, seed_tensor, want_stats,
                               _tile_plan_for(layout, query, want_stats))
    return out, lse, (stats if want_stats else None)
