"""The functional op: ``sparse_scaled_dot_product_attention``.

Mirrors ``torch.nn.functional.scaled_dot_product_attention`` on a sparse layout:

    score(i, j) = scale * <q_i, k_j> + bias(i, j)      for (i, j) in the layout
    p_ij        = softmax over row i's allowed keys
    out_i       = sum_j dropout(p_ij) v_j

Takes torch tensors (autograd through our forward and backward kernels) or
NumPy arrays (forward only; torch is not needed).
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np

from . import _stencil
from ._native import C
from .patterns import Layout

_BACKENDS = ("auto", "native", "torch")


def _is_torch_tensor(x):
    torch = _torch_or_none()
    return torch is not None and isinstance(x, torch.Tensor)


_torch_module = None  # torch once imported, False where it is not installed


def _torch_or_none():
    global _torch_module
    if _torch_module is None:
        try:
            import torch
        except ImportError:  # pragma: no cover - the NumPy-only install
            torch = False
        _torch_module = torch
    return _torch_module or None


def _describe(x):
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    return f"{type(x).__name__} of shape {tuple(shape) if shape is not None else '?'} and dtype {dtype}"


def _check_rows(name, x, ref_shape=None):
    if len(x.shape) != 4:
        raise ValueError(f"{name}: expected 4 dimensions [batch, heads, tokens, head_dim], "
                         f"got shape {tuple(x.shape)}")
    if ref_shape is not None and tuple(x.shape) != tuple(ref_shape):
        raise ValueError(f"{name}: expected shape {tuple(ref_shape)} (the shape of query), "
                         f"got {tuple(x.shape)}")


def _validate_common(query, key, value, layout, scale, dropout_p):
    _check_rows("query", query)
    _check_rows("key", key, query.shape)
    _check_rows("value", value, query.shape)
    if not isinstance(layout, Layout):
        raise TypeError(f"layout: expected a sparse_attention.Layout (see build_layout), got "
                        f"{type(layout).__name__}")
    if layout.num_tokens != query.shape[2]:
        raise ValueError(f"layout: built for {layout.height} x {layout.width} = {layout.num_tokens} "
                         f"tokens, but query has {query.shape[2]} tokens")
    head_dim = query.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    # finite as comparisons, not math.isfinite: torch.compile makes a module's float attribute
    # symbolic once it has met two values, and traces comparisons of it but not math.isfinite
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not -math.inf < scale < math.inf:
        raise ValueError(f"scale: expected a finite real number, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a number in [0, 1), got {dropout_p!r}")
    return float(scale), float(dropout_p)


def _check_bias(bias, heads):
    if bias is None:
        return None
    if len(bias.shape) != 3 or bias.shape[0] != heads or bias.shape[1] != bias.shape[2] \
            or bias.shape[1] % 2 != 1:
        raise ValueError(f"rel_pos_bias: expected shape [heads={heads}, 2M+1, 2M+1], got "
                         f"{tuple(bias.shape)}")
    return int(bias.shape[1] - 1) // 2  # int(): torch.jit.trace hands shapes over as tensors


def _check_key_mask(key_mask, batch, num_tokens):
    if key_mask is None:
        return
    if tuple(key_mask.shape) != (batch, num_tokens):
        raise ValueError(f"key_mask: expected shape [batch={batch}, tokens={num_tokens}], got "
                         f"{tuple(key_mask.shape)}")
    if str(key_mask.dtype) not in ("bool", "torch.bool"):
        raise TypeError(f"key_mask: expected dtype bool, got {key_mask.dtype}")


def _check_head_active(head_active, heads):
    if head_active is None:
        return
    if tuple(head_active.shape) != (heads,):
        raise ValueError(f"head_active: expected shape [heads={heads}], got {tuple(head_active.shape)}")
    if str(head_active.dtype) not in ("bool", "torch.bool"):
        raise TypeError(f"head_active: expected dtype bool, got {head_active.dtype}")


def sparse_scaled_dot_product_attention(query, key, value, layout, *, scale=None, rel_pos_bias=None,
                                        key_mask=None, dropout_p=0.0, return_lse=False,
                                        dropout_seed=None, head_active=None, return_stats=False,
                                        backend="auto"):
    """Sparse scaled dot-product attention on ``layout``.

    Args:
        query, key, value: ``[B, heads, N, D]``, same dtype and device, last
            dimension contiguous (other strides free: views of a fused qkv
            projection need no copy). torch tensors or NumPy arrays.
        layout: a :class:`~sparse_attention.Layout` with ``num_tokens == N``.
        scale: multiplies q.k; default ``1 / sqrt(D)``.
        rel_pos_bias: ``[heads, 2M+1, 2M+1]`` table; bias(i, j) =
            table[h, clamp(yi-yj, -M, M) + M, clamp(xi-xj, -M, M) + M].
        key_mask: ``[B, N]`` bool, True where a key may be attended. A row left
            with no key gives output 0 (and lse = -inf).
        dropout_p: probability of zeroing an attention weight (kept ones are
            scaled by 1 / (1 - p)). Apply it in training only.
        dropout_seed: seed of the counter-based dropout generator; drawn from
            torch's generator when None.
        head_active: ``[heads]`` bool; inactive (pruned) heads are skipped by the
            kernels and output 0.
        return_lse: also return the log-sum-exp of each row, ``[B, heads, N]``.
        return_stats: also return per-row statistics ``[B, heads, N, 2]``:
            (sum_j p_ij^2, entropy -sum_j p_ij log p_ij), from the same pass.
        backend: "auto" (native kernels where they run, else PyTorch), "native"
            or "torch" (the pure-PyTorch gather implementation).

    Returns:
        ``out`` (``[B, heads, N, D]``), or a tuple ``(out, lse?, stats?)`` when
        ``return_lse`` / ``return_stats`` ask for more.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    if isinstance(query, np.ndarray):
        if not (isinstance(key, np.ndarray) and isinstance(value, np.ndarray)):
            raise TypeError("key, value: expected NumPy arrays like query, got "
                            f"{type(key).__name__} and {type(value).__name__}")
        if backend == "torch":
            raise ValueError("backend: 'torch' takes torch tensors; NumPy arrays run natively")
        out, lse, stats = _numpy_forward(query, key, value, layout, scale, rel_pos_bias, key_mask,
                                         dropout_p, dropout_seed, head_active, return_stats)
    elif _is_torch_tensor(query):
        from . import _torch_ops

        for name, x in (("key", key), ("value", value)):
            if not _is_torch_tensor(x):
                raise TypeError(f"{name}: expected a torch.Tensor like query, got {type(x).__name__}")
        out, lse, stats = _torch_ops.attention(query, key, value, layout, scale, rel_pos_bias,
                                               key_mask, dropout_p, dropout_seed, head_active,
                                               return_stats, backend)
    else:
        raise TypeError(f"query: expected a torch.Tensor or numpy.ndarray, got {type(query).__name__}")
    extras = ([lse] if return_lse else []) + ([stats] if return_stats else [])
    return (out, *extras) if extras else out


def _numpy_forward(query, key, value, layout, scale, bias, key_mask, dropout_p, dropout_seed,
                   head_active, want_stats):
    scale, dropout_p = _validate_common(query, key, value, layout, scale, dropout_p)
    batch, heads, num_tokens, head_dim = query.shape
    for name, x in (("key", key), ("value", value)):
        if x.dtype != query.dtype:
            raise TypeError(f"{name}: expected dtype {query.dtype} (the dtype of query), got {x.dtype}")
    narrow = None
    if query.dtype == np.float16:
        # the float32 kernels on widened copies, as for torch's 16-bit CPU tensors
        narrow = query.dtype
        query, key, value = (x.astype(np.float32) for x in (query, key, value))
    if query.dtype not in (np.float32, np.float64):
        raise TypeError(f"query: expected dtype float16, float32 or float64 on the CPU, got {query.dtype}")
    _check_bias(bias, heads)
    if bias is not None:
        bias = np.ascontiguousarray(bias, dtype=query.dtype)
    _check_key_mask(key_mask, batch, num_tokens)
    _check_head_active(head_active, heads)
    if head_active is not None:
        head_active = np.ascontiguousarray(head_active)
    seed = int(dropout_seed) if dropout_seed is not None else int(np.random.randint(0, 2**62))
    out = np.empty(query.shape, dtype=query.dtype)
    lse = np.empty((batch, heads, num_tokens), dtype=query.dtype)
    stats = np.empty((batch, heads, num_tokens, 2), dtype=query.dtype) if want_stats else None
    plan = {}
    kind = _stencil.cpu_kernel_choice(layout, query.shape[-1]) if query.dtype == np.float32 else None
    if kind == "split":
        window, buffer, passes = layout.stencil_split()
        plan = dict(stencil=window, tile_plan=buffer, tile_passes=passes)
    elif kind == "stencil":
        plan = dict(stencil=layout.stencil())
    elif kind == "tiles":
        buffer, passes, long_rows = layout.packed_tile_plan(cpu=True)
        plan = dict(tile_plan=buffer, tile_passes=passes, long_rows=long_rows)
    C.attention_forward(query, key, value, out, lse, layout.indptr, layout.indices,
                        height=layout.height, width=layout.width, scale=scale, rel_pos_bias=bias,
                        key_mask=key_mask, head_active=head_active, dropout_p=dropout_p,
                        dropout_seed=seed, row_stats=stats, **plan)
    return (out if narrow is None else out.astype(narrow)), lse, stats


def set_num_threads(num_threads: int) -> None:
    """Threads of the CPU kernels; 0 means every core this process may use."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads: expected an int, got {type(num_threads).__name__}")
    C.set_num_threads(int(num_threads))


def get_num_threads() -> int:
    """Threads the CPU kernels use."""
    return C.get_num_threads()


def set_buffer_cache_limit(num_bytes: int) -> None:
    """How many bytes of idle host buffers the CPU op keeps for its next calls.

    The op's outputs on the CPU (attention output, log-sum-exp, gradients)
    live in buffers that go back to a cache when their tensors are freed, so a
    training loop reuses pages it already touched instead of faulting in new
    ones every step. 0 turns the cache off: outputs then come from
    ``torch.empty``. The default is 512 MiB, or
    ``SPARSE_ATTENTION_BUFFER_CACHE_MB`` when that is set at import."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, numbers.Integral):
        raise TypeError(f"num_bytes: expected an int, got {type(num_bytes).__name__}")
    if num_bytes < 0:
        raise ValueError(f"num_bytes: expected >= 0, got {num_bytes}")
    _set_buffer_cache_limit(int(num_bytes))


# read by the op on every CPU call; off, outputs come from torch.empty as
# any op's would (resizable storage)
buffer_cache_on = True


def _set_buffer_cache_limit(num_bytes):
    global buffer_cache_on
    C.pool_set_limit(num_bytes)
    buffer_cache_on = num_bytes > 0


def buffer_cache_info() -> dict:
    """The host buffer cache: limit, idle_bytes, idle_blocks, lent_bytes (under
    live tensors), reused and fresh (requests served from the cache and from
    new memory so far)."""
    return C.pool_stats()


def empty_buffer_cache() -> None:
    """Returns the cache's idle buffers to the system (live tensors keep theirs)."""
    C.pool_release()


def _buffer_cache_limit_from_env():
    value = os.environ.get("SPARSE_ATTENTION_BUFFER_CACHE_MB")
    if value is None or value.strip() == "":
        return
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"SPARSE_ATTENTION_BUFFER_CACHE_MB: expected a number of MiB, got {value!r}") from None
    if not megabytes >= 0:
        raise ValueError(f"SPARSE_ATTENTION_BUFFER_CACHE_MB: expected >= 0, got {value!r}")
    _set_buffer_cache_limit(int(megabytes * 2**20))


_buffer_cache_limit_from_env()
