"""torch side of the op: custom operators around the native kernels, so that
autograd runs our backward kernels and torch.compile sees one opaque op."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.autograd import forward_ad as _forward_ad

from . import _stencil, _tiles
from . import functional as _functional
from ._native import C
from ._torch_impl import sparse_attention_torch
from .functional import (_check_bias, _check_head_active, _check_key_mask, _validate_common)
from .patterns import LONG_ROW_THRESHOLD, _tensor_of, layout_by_serial, static_int

_NATIVE_CPU_DTYPES = (torch.float32, torch.float64)
# taken by the CPU kernels through float32 copies (computed as the CUDA kernels
# accumulate them, in float32; the output rounded back): the PyTorch path took
# 2.3-2.7 s for an AXIAL 64x64 bfloat16 forward this way takes 14 ms
_WIDENED_CPU_DTYPES = (torch.float16, torch.bfloat16)
_NATIVE_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _accum_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# DLPack (code, bits) of the dtypes the CPU kernels write
_POOLED_DTYPES = {torch.float32: (2, 32), torch.float64: (2, 64)}


def _kernel_output(shape, dtype, device):
    """An uninitialised tensor for a kernel to fill. On the CPU its buffer
    comes from the extension's cache and goes back there when the tensor is
    freed: a training loop then writes to pages it already has instead of
    faulting in fresh ones every step (csrc/host_pool.h)."""
    code = _POOLED_DTYPES.get(dtype)
    if device.type != "cpu" or code is None or not _functional.buffer_cache_on:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_dlpack(C.pool_tensor(shape, *code))


# torch's current CUDA stream as a raw handle: what torch.compile's generated
# code reads. torch.cuda.current_stream() builds a Stream object for it, about
# 15 us of an eager call's 60-80 us of host time (H200 host, profiled).
_raw_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_of(device):
    if device.type == "cuda":
        if _raw_current_stream is not None and device.index is not None:
            return _raw_current_stream(device.index)
        return torch.cuda.current_stream(device).cuda_stream
    return -1


def native_supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when the native kernels run on (device, dtype); otherwise the reason."""
    if device.type == "cpu":
        if dtype in _NATIVE_CPU_DTYPES or dtype in _WIDENED_CPU_DTYPES:
            return None
        return f"the CPU kernels take float32 or float64 (float16 and bfloat16 through float32), not {dtype}"
    if device.type == "cuda":
        if not C.WITH_CUDA:
            return "this build has no CUDA kernels (nvcc was not found when it was built)"
        if dtype in _NATIVE_CUDA_DTYPES:
            return None
        return f"the CUDA kernels take float16, bfloat16, float32 or float64, not {dtype}"
    if device.type == "meta":
        return None  # shapes only, through the op's fake kernel (see attention)
    return f"no native kernels for device type {device.type!r}"


# torch.Tensor.__dlpack__ is Python code that, for our calls (consumer stream =
# torch's current stream), adds nothing to the capsule it gets from this
# function but ~7 us; a small attention passes eight or more tensors. Where the
# function is missing the C side asks __dlpack__ as usual.
_to_capsule = getattr(torch._C, "_to_dlpack_versioned", None)


def _detached(x):
    """x as the C entry points should receive it: a DLPack capsule of the
    detached tensor (or the tensor itself), None stays None."""
    if x is None:
        return None
    if x.requires_grad:  # detach() makes a new tensor object, a microsecond each
        x = x.detach()
    return _to_capsule(x) if _to_capsule is not None else x


def _seed_value(seed):
    return seed if isinstance(seed, int) else int(seed.item())


# Tests set this to check the fast CUDA kernels against the simple ones.
use_reference_cuda_kernels = False
# The tensor-core forward (tile plans) where it applies; tests turn it off to
# compare it with the other CUDA kernels.
use_tiled_cuda_kernel = True
tiled_passes_run = 0  # passes launched on the tensor-core kernel, for tests
tiled_backwards_run = 0  # tiled CPU backward calls, for tests
stencil_forwards_run = 0  # stencil CPU kernel calls, for tests
stencil_backwards_run = 0
_TILED_DTYPES = (torch.float16, torch.bfloat16)
_TILED_MAX_HEAD_DIM = 128
_capable_devices = {}


def _tensor_core_capable(device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    capable = _capable_devices.get(index)
    if capable is None:
        capable = _capable_devices[index] = torch.cuda.get_device_capability(index)[0] >= 8
    return capable


_NO_PLAN = (None, [], None, 0, None, None, [], None, None)
# keys per block when a long row is split across blocks (tests set it lower)
split_segment_keys = 512
# CUDA forwards with a tile plan: run the rows the plan leaves out (LONGFORMER's
# global tokens) on a second stream beside the plan's passes rather than after
# them (H200, LONGFORMER 128x128 graphed: 0.129 -> 0.120 ms, the same bits).
# SPARSE_ATTENTION_LONG_ROWS_BESIDE=0 turns it off; benchmarks/gpu_bench.py
# times both ways.
long_rows_beside = os.environ.get("SPARSE_ATTENTION_LONG_ROWS_BESIDE", "1") != "0"
# CUDA backwards with a tile plan that leaves no row out, without bias or
# dropout: dQ on tensor cores over the plan's passes, and dK / dV too for a
# symmetric layout (the lean forward's conditions; the row and column kernels
# otherwise). On an H200 it took AXIAL's forward+backward at 128x128 from
# 7.5 to 0.82 ms; SPARSE_ATTENTION_TILED_BACKWARD=0 turns it off.
use_tiled_cuda_backward = os.environ.get("SPARSE_ATTENTION_TILED_BACKWARD", "1") != "0"
# With it, a plan that leaves long rows out (LONGFORMER's global tokens) is
# planned again with them kept in, for the backward alone: one block walks a
# global row's chunks while the rest of the grid does the other tiles, instead
# of the row and column kernels doing the whole backward.
# SPARSE_ATTENTION_TILED_BACKWARD_LONG_ROWS=0 turns it off.
tiled_backward_long_rows = os.environ.get("SPARSE_ATTENTION_TILED_BACKWARD_LONG_ROWS", "1") != "0"
# The tensor-core backward for calls with a relative position bias or dropout
# too (what EnhancedSparseAttention trains with by default): the bias and the
# dropout factor enter its scores, and dQ writes each pair's score gradient in
# plan order for the bias gradient (TilePlan.score_buckets). Off until its
# tests have run on a device: SPARSE_ATTENTION_TILED_BACKWARD_EXTRAS=1 turns it on.
use_tiled_cuda_backward_extras = os.environ.get("SPARSE_ATTENTION_TILED_BACKWARD_EXTRAS", "0") == "1"
# Statistics over a plan of several passes (AXIAL) on the general tensor-core
# forward, each merging pass folding its rows' statistics into the earlier
# pass's by their shares of the merged softmax (cuda/tensor_core.cuh
# merge_stats), instead of the whole forward on the row kernels. Off until run
# on a device: SPARSE_ATTENTION_TILED_STATS_PASSES=1 turns it on.
merge_stats_cuda_passes = os.environ.get("SPARSE_ATTENTION_TILED_STATS_PASSES", "0") == "1"
# CUDA forwards with a plan of several passes (AXIAL's rows, then columns): on
# compute capability 9.0 each merging pass starts while the one before drains
# (programmatic dependent launch). SPARSE_ATTENTION_OVERLAP_PASSES=0 turns it
# off; benchmarks/gpu_bench.py times both ways.
overlap_passes = os.environ.get("SPARSE_ATTENTION_OVERLAP_PASSES", "1") != "0"


def _tiled_applies(device, dtype, head_dim) -> bool:
    """Whether the tensor-core forward takes these CUDA arguments."""
    return (device.type == "cuda" and use_tiled_cuda_kernel and not use_reference_cuda_kernels
            and dtype in _TILED_DTYPES and head_dim <= _TILED_MAX_HEAD_DIM
            and _tensor_core_capable(device))


def _cpu_tensors(layout, key, arrays):
    """The int32 arrays (None entries pass through) as CPU tensors over the
    same memory, cached under key (the layout's arrays are read-only)."""
    return layout._built_once((key, "cpu"), lambda _: tuple(_tensor_of(a, "cpu") if a is not None else None
                                                           for a in arrays), layout._device_cache)


def _tile_plan_for(layout, device, dtype, head_dim, want_stats, max_relative=None):
    """(buffer, passes, long_rows, long_row_splits, stencil, backward_buffer,
    backward_passes, score_perm, score_ptr) of the tile plan when a tiled
    forward (CUDA tensor cores, CPU panels) applies to these arguments, else
    _NO_PLAN. On the CPU a stencil layout gets its stencil: (None, [], None, 0,
    stencil, None, [], None, None), with the layout's tile plan as the
    backward's where a bias needs it (_cpu_bias_backward_plan); or STRIDED's
    window stencil with its lattice plan: (buffer, passes, None, 0, stencil,
    None, [], None, None). The
    backward's plan is the CUDA plan with its long rows kept in (see
    tiled_backward_long_rows), where the plan leaves rows out. score_perm and
    score_ptr group the backward plan's pairs by bias bucket, for a CUDA call
    with a bias whose backward may run on tensor cores (see
    use_tiled_cuda_backward_extras). A CUDA call with statistics over a plan
    of several passes gets no forward plan but, with the extras on, the plan
    as its backward's: (None, [], None, 0, None, buffer, passes, score_perm,
    score_ptr)."""
    if device.type == "cpu":
        kind = _stencil.cpu_kernel_choice(layout, head_dim) if dtype == torch.float32 else None
        if kind == "split":
            window, buffer, passes = layout.stencil_split()
            window, buffer = _cpu_tensors(layout, "split", (window, buffer))
            return buffer, passes, None, 0, window, None, [], None, None
        if kind == "stencil":
            (stencil,) = _cpu_tensors(layout, "stencil", (layout.stencil(),))
            backward_buffer, backward_passes = _cpu_bias_backward_plan(layout, head_dim, max_relative)
            return None, [], None, 0, stencil, backward_buffer, backward_passes, None, None
        if kind is None:
            return _NO_PLAN
        plan = layout.tile_plan_tensors(device)
        return plan["buffer"], plan["passes"], plan["long_rows"], 0, None, None, [], None, None
    if not _tiled_applies(device, dtype, head_dim):
        return _NO_PLAN
    plan = layout.tile_plan_tensors(device)
    if plan is None:
        return _NO_PLAN
    if want_stats and plan["num_passes"] > 1 and not merge_stats_cuda_passes:
        # the CUDA passes do not merge statistics (the CPU's do): the forward
        # runs the row kernels, but with the extras on the backward, which
        # needs only the forward's lse, still takes the plan (AXIAL in a
        # module that tracks statistics, as it does by default)
        if (not (use_tiled_cuda_backward and use_tiled_cuda_backward_extras)
                or plan["long_rows"] is not None):
            return _NO_PLAN
        score_perm = score_ptr = None
        if max_relative is not None:
            score_perm, score_ptr = _score_buckets(layout, device, max_relative, full=False)
        return (None, [], None, 0, None, plan["buffer"], plan["passes"], score_perm, score_ptr)
    splits = 0
    if plan["long_rows"] is not None and split_segment_keys > 0:
        splits = max(1, min(65536, -(-plan["long_row_max_keys"] // split_segment_keys)))
    backward_buffer, backward_passes = None, []
    if plan["long_rows"] is not None and use_tiled_cuda_backward and tiled_backward_long_rows:
        backward_buffer, backward_passes = layout.full_tile_plan_tensors(device)
    score_perm = score_ptr = None
    backward_planned = plan["long_rows"] is None or backward_buffer is not None
    if (max_relative is not None and use_tiled_cuda_backward and use_tiled_cuda_backward_extras
            and backward_planned):
        score_perm, score_ptr = _score_buckets(layout, device, max_relative, full=backward_buffer is not None)
    return (plan["buffer"], plan["passes"], plan["long_rows"], splits, None,
            backward_buffer, backward_passes, score_perm, score_ptr)


def _cpu_bias_backward_plan(layout, head_dim, max_relative):
    """(buffer, passes) of the layout's tile plan for the backward of a CPU
    stencil call with a bias that neither the window kernel nor the strips
    sum (LONGFORMER with kernel_size over 13: its global token is a listed
    row): the tile backward gives it at about the stencil's cost where the
    row kernels took over twice as long. (None, []) where that does not
    apply. Stencils of offsets alone (STRIDED on grids of 8 to 19 a side,
    whose lattice offsets leave the window's box; custom windows) sum it on
    the strips."""
    # the layout's own NumPy stencil, not its tensor: under torch.export that
    # tensor may be a tracer's, whose data C cannot read
    stencil = layout.stencil()
    if (max_relative is None or not _tiles.use_tiled_cpu_kernel
            or (_stencil.use_window_kernel and _stencil.window_takes(stencil, head_dim))
            or _stencil.sums_bias_grad(stencil)):
        return None, []
    if not _tiles.cpu_plan_pays(layout, head_dim) or layout.cpu_tile_plan().long_rows.size:
        return None, []
    tensors = layout.tile_plan_tensors(torch.device("cpu"))
    return tensors["buffer"], tensors["passes"]


def _score_buckets(layout, device, max_relative, full):
    """(perm, ptr) of the plan's score buckets, or (None, None) where its
    plan-order score gradients would take more than PLAN_SCORES_MAX_SLOTS_PER_PAIR
    slots a pair (RANDOM at 10%: about 10): the bias gradient then comes from the
    row kernels' CSR-order scores."""
    plan = layout.full_tile_plan() if full else layout.tile_plan()
    if plan is None or plan.num_slots > PLAN_SCORES_MAX_SLOTS_PER_PAIR * max(1, layout.nnz):
        return None, None
    return layout.plan_score_buckets_tensors(device, max_relative, full)


# The plan-order score gradients take a float per slot of the plan (AXIAL and
# BLOCK: one a pair; LONGFORMER's 7 x 7 windows about 5, STRIDED's about 7)
# where the row kernels' take one a pair.
PLAN_SCORES_MAX_SLOTS_PER_PAIR = 8


# Fewest blocks for the segments of the split long rows: below it, segments
# half as long paid (H200, LONGFORMER 64x64, 8 heads: 64 -> 128 blocks, 0.86x
# the graphed forward); at it, they did not (128x128: 256 -> 512 blocks, 1.06x).
LONG_ROW_MIN_BLOCKS = 256


def segments_for_grid(splits: int, rows: int) -> int:
    """Segments per long row, given the plan's count at split_segment_keys keys
    each and the rows (batch x heads x long rows): up to twice as many while
    the blocks number fewer than LONG_ROW_MIN_BLOCKS."""
    if rows <= 0 or rows * splits >= LONG_ROW_MIN_BLOCKS:
        return splits
    return min(2 * splits, 65536, max(splits, -(-LONG_ROW_MIN_BLOCKS // rows)))


def _kernel_switches():
    """The module switches that steer the choice of kernel and plan (tests flip them)."""
    return (_stencil.use_stencil_cpu_kernel, _stencil.use_lattice_split, _stencil.use_window_kernel,
            _stencil.use_strip_bias_backward, _stencil.CUSTOM_STENCIL_MAX_FILL,
            _stencil.CUSTOM_WINDOW_MAX_FILL, _tiles.use_tiled_cpu_kernel,
            _tiles.CPU_MIN_FILL, _tiles.GATHER_FILL_FACTOR,
            C.gather_kernels_on(),
            use_tiled_cuda_kernel, use_reference_cuda_kernels,
            split_segment_keys, use_tiled_cuda_backward, tiled_backward_long_rows,
            use_tiled_cuda_backward_extras, merge_stats_cuda_passes)


def _layout_and_plan_eager(layout, device, dtype, head_dim, max_relative, want_stats):
    """The layout's tensors and its tile plan (host work), worked out once per
    layout and set of arguments: the choice of kernel alone took about a fifth
    of a small call's Python time."""
    key = ("host", device, dtype, head_dim, max_relative, want_stats, _kernel_switches())
    found = layout._device_cache.get(key)  # one dict read: atomic under the GIL
    if found is None:  # built and cached as the layout's device tensors are (inference mode, tracing)
        found = layout._built_once(key, lambda layout: (
            _op_layout_tensors(layout.torch_tensors(device, max_relative)),
            _tile_plan_for(layout, device, dtype, head_dim, want_stats, max_relative)), layout._device_cache)
    return found


def _op_layout_tensors(tensors):
    """The layout's tensors in the order the op takes them (None where a
    layout has none): a tuple, which torch.compile reads without guards."""
    return tuple(tensors.get(name) for name in ("row_ptr", "col_idx", "col_ptr", "row_idx", "bucket_perm",
                                                "bucket_ptr", "long_rows", "long_cols"))


@torch.compiler.assume_constant_result
def _layout_and_plan_while_tracing(layout_serial, device, dtype, head_dim, max_relative, want_stats):
    """_layout_and_plan_eager, run while torch.compile traces: host work kept
    out of the graph without a graph break; its tensors stay graph inputs."""
    return _layout_and_plan_eager(layout_by_serial(layout_serial), device, dtype, head_dim, max_relative,
                                  want_stats)


def _cuda_extras(device, long_rows, long_cols, backward=False):
    if device.type != "cuda":
        return {}
    extras = dict(long_rows=long_rows, long_threshold=LONG_ROW_THRESHOLD,
                  reference_kernel=use_reference_cuda_kernels)
    if backward:
        extras["long_cols"] = long_cols
    return extras


def _forward_impl(query, key, value, row_ptr, col_idx, col_ptr, row_idx, bucket_perm, bucket_ptr,
                  long_rows, long_cols, height, width, scale, bias, key_mask, head_active,
                  dropout_p, seed, want_stats, tile_plan, tile_passes, plan_long_rows,
                  long_row_splits, stencil, backward_plan=None, backward_passes=(),
                  score_perm=None, score_ptr=None):
    batch, heads, num_tokens, _ = query.shape
    accum = _accum_dtype(query.dtype)
    out = _kernel_output(query.shape, query.dtype, query.device)
    lse = _kernel_output((batch, heads, num_tokens), accum, query.device)
    stats = (_kernel_output((batch, heads, num_tokens, 2), accum, query.device)
             if want_stats else torch.empty(0, dtype=accum, device=query.device))
    d = _detached
    common = dict(height=height, width=width, scale=scale, rel_pos_bias=d(bias),
                  key_mask=d(key_mask), head_active=d(head_active), dropout_p=dropout_p,
                  dropout_seed=_seed_value(seed), row_stats=d(stats) if want_stats else None,
                  stream=_stream_of(query.device))
    if stencil is not None:
        global stencil_forwards_run
        stencil_forwards_run += 1
        # with a plan, its passes hold the pairs the stencil leaves out (STRIDED's lattice)
        lattice = dict(tile_plan=d(tile_plan), tile_passes=tile_passes) if tile_plan is not None else {}
        if not _stencil.use_window_kernel:
            lattice["stencil_strips"] = True
        C.attention_forward(d(query), d(key), d(value), d(out), d(lse), d(row_ptr), d(col_idx),
                            stencil=d(stencil), **lattice, **common)
        return out, lse, stats
    if tile_plan is not None:
        # the passes run in order in one call, then the long rows the plan leaves out
        global tiled_passes_run
        tiled_passes_run += len(tile_passes) // 6
        if plan_long_rows is not None and long_row_splits > 0:
            # each long row's keys in segments, one block each, merged afterwards
            long_row_splits = segments_for_grid(long_row_splits, batch * heads * plan_long_rows.shape[0])
            workspace = torch.empty(batch * heads * plan_long_rows.shape[0] * long_row_splits
                                    * (query.shape[-1] + 5), dtype=accum, device=query.device)
            common.update(long_row_splits=long_row_splits, split_workspace=d(workspace))
        extras = _cuda_extras(query.device, None, None)
        extras["long_rows"] = d(plan_long_rows)
        if plan_long_rows is not None and long_rows_beside and query.device.type == "cuda":
            extras["long_rows_beside"] = True
        if len(tile_passes) > 6 and overlap_passes and query.device.type == "cuda":
            extras["overlap_passes"] = True
        C.attention_forward(d(query), d(key), d(value), d(out), d(lse), d(row_ptr), d(col_idx),
                            tile_plan=d(tile_plan), tile_passes=tile_passes, **extras, **common)
        return out, lse, stats
    C.attention_forward(d(query), d(key), d(value), d(out), d(lse), d(row_ptr), d(col_idx),
                        **common, **_cuda_extras(query.device, d(long_rows), d(long_cols)))
    return out, lse, stats


def _forward_schema(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    row_ptr: torch.Tensor, col_idx: torch.Tensor, col_ptr: torch.Tensor,
                    row_idx: torch.Tensor, bucket_perm: Optional[torch.Tensor],
                    bucket_ptr: Optional[torch.Tensor], long_rows: Optional[torch.Tensor],
                    long_cols: Optional[torch.Tensor], height: int, width: int, scale: float,
                    bias: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
                    head_active: Optional[torch.Tensor], dropout_p: float, seed: torch.Tensor,
                    want_stats: bool, tile_plan: Optional[torch.Tensor], tile_passes: list[int],
                    plan_long_rows: Optional[torch.Tensor], long_row_splits: int,
                    stencil: Optional[torch.Tensor], backward_plan: Optional[torch.Tensor],
                    backward_passes: list[int], score_perm: Optional[torch.Tensor],
                    score_ptr: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(query, key, value, row_ptr, col_idx, col_ptr, row_idx, bucket_perm,
                         bucket_ptr, long_rows, long_cols, height, width, scale, bias, key_mask,
                         head_active, dropout_p, seed, want_stats, tile_plan, tile_passes,
                         plan_long_rows, long_row_splits, stencil)


# The op as torch.compile sees it (one opaque node); eager calls skip the
# dispatcher's overhead through _EagerAttention below.
_forward = torch.library.custom_op("sparse_attention::forward", mutates_args=())(_forward_schema)


@_forward.register_fake
def _forward_fake(query, key, value, row_ptr, col_idx, col_ptr, row_idx, bucket_perm, bucket_ptr,
                  long_rows, long_cols, height, width, scale, bias, key_mask,
                  head_active, dropout_p, seed, want_stats, tile_plan, tile_passes,
                  plan_long_rows, long_row_splits, stencil, backward_plan, backward_passes,
                  score_perm, score_ptr):
    batch, heads, num_tokens, _ = query.shape
    accum = _accum_dtype(query.dtype)
    stats_shape = (batch, heads, num_tokens, 2) if want_stats else (0,)
    return (query.new_empty(query.shape), query.new_empty((batch, heads, num_tokens), dtype=accum),
            query.new_empty(stats_shape, dtype=accum))


def _backward_impl(grad_out, query, key, value, out, lse, row_ptr, col_idx, col_ptr, row_idx,
                   bucket_perm, bucket_ptr, long_rows, long_cols, height, width, scale, bias,
                   key_mask, head_active, dropout_p, seed, tile_plan=None, tile_passes=(),
                   plan_long_rows=None, stencil=None, backward_plan=None, backward_passes=(),
                   score_perm=None, score_ptr=None):
    batch, heads, num_tokens, _ = query.shape
    if batch * heads == 0:  # nothing attended (an empty bias table reads to the C side as none)
        grad_bias = torch.zeros_like(bias) if bias is not None else query.new_empty(0)
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value), grad_bias
    accum = _accum_dtype(query.dtype)
    device = query.device
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grads = [_kernel_output(query.shape, query.dtype, device) for _ in range(3)]
    delta = _kernel_output((batch, heads, num_tokens), accum, device)
    plan = _backward_plan(device, bias, tile_plan, tile_passes, plan_long_rows, stencil,
                          backward_plan, backward_passes, query.shape[-1], score_perm)
    grad_scores = bias_rows = scores_buffer = None
    if bias is not None and device.type == "cpu" and (plan or _gather_sums_bias_per_head(
            query, bucket_ptr.shape[0] - 1, col_idx.shape[0])):
        # the window, tile and gather kernels sum the bias gradient per (batch, head)
        # themselves, with no score gradient per pair
        bias_rows = _kernel_output((batch, heads, bucket_ptr.shape[0] - 1), accum, device)
        plan["grad_bias_rows"] = bias_rows
    elif bias is not None and plan:
        # the tensor-core dQ writes the score gradients in plan order; should the
        # row kernels run instead (the C side decides), they fill the first
        # batch x heads x nnz entries in CSR order
        slots = sum(plan["tile_passes"][1::6]) * _tiles.TILE * _tiles.TILE
        scores_buffer = torch.empty(batch * heads * slots, dtype=accum, device=device)
        grad_scores = scores_buffer.view(batch, heads, slots)
        plan["plan_scores"] = True
    elif bias is not None:
        grad_scores = torch.empty(batch, heads, col_idx.shape[0], dtype=accum, device=device)
    stream = _stream_of(device)
    d = _detached
    scores_in_plan = C.attention_backward(d(query), d(key), d(value), d(out), d(grad_out), d(lse), d(delta),
                         d(grads[0]), d(grads[1]), d(grads[2]), d(row_ptr), d(col_idx), d(col_ptr),
                         d(row_idx), height=height, width=width, scale=scale, rel_pos_bias=d(bias),
                         key_mask=d(key_mask), head_active=d(head_active), dropout_p=dropout_p,
                         dropout_seed=_seed_value(seed), grad_scores=d(grad_scores), stream=stream,
                         **_cuda_extras(device, d(long_rows), d(long_cols), backward=True), **plan)
    if bias_rows is not None:
        grad_table = bias_rows[0].clone()
        for b in range(1, batch):  # batch by batch: the same sum whatever the threads
            grad_table += bias_rows[b]
        grad_bias = grad_table.view(bias.shape).to(bias.dtype)
    elif bias is not None:
        grad_table = torch.empty(heads, bucket_ptr.shape[0] - 1, dtype=accum, device=device)
        if scores_in_plan:
            C.bias_grad(grad_scores, score_perm, score_ptr, grad_table, stream=stream)
        else:
            if scores_buffer is not None:
                grad_scores = scores_buffer[:batch * heads * col_idx.shape[0]].view(batch, heads, -1)
            C.bias_grad(grad_scores, bucket_perm, bucket_ptr, grad_table, stream=stream)
        grad_bias = grad_table.view(bias.shape).to(bias.dtype)
    else:
        grad_bias = torch.empty(0, dtype=query.dtype, device=device)
    return grads[0], grads[1], grads[2], grad_bias


def _gather_sums_bias_per_head(query, bias_entries, pairs):
    """Whether the gather kernels' dQ pass sums the bias gradient per (batch,
    head): float32 rows they take, where their per-range bias tables take no
    more room than the score gradient per pair they save (a wide bias over a
    very sparse layout is cheaper per pair)."""
    batch, heads, num_tokens = query.shape[:3]
    if query.dtype != torch.float32 or not C.gather_takes(query.shape[-1], num_tokens):
        return False
    return C.gather_ranges_per_head(batch * heads, num_tokens) * bias_entries <= pairs


def _backward_plan(device, bias, tile_plan, tile_passes, plan_long_rows, stencil,
                   backward_plan=None, backward_passes=(), head_dim=0, score_perm=None):
    """The plan for the tiled or stencil CPU backward when it applies (float32
    plans only reach here), or for the CUDA backward's tensor-core gradients,
    else nothing: the row and column kernels run. With a bias, a stencil plan
    comes back where the window kernel runs it or the stencil is offsets
    alone (the window, strip and tile kernels give the bias gradient on the
    CPU; the strips not for extra keys or listed rows); elsewhere the
    layout's tile plan (backward_plan, from _cpu_bias_backward_plan) runs the
    backward if the forward planned one."""
    global stencil_backwards_run, tiled_backwards_run
    if device.type == "cuda":
        # every pair must be in the plan (no rows left out), which only this side
        # knows: the tiled kernels add only the plan's pairs, so a forward plan
        # that leaves long rows out hands over its full twin (backward_plan). A
        # bias needs the plan's score buckets (score_perm, built where the
        # extras are on). The C side falls back to the row and column kernels
        # where the lean kernel's own conditions (head dim, alignment; a bias or
        # dropout without tiled_backward_extras) fail
        # (C.cuda_tiled_grad_*_passes count what ran).
        if not use_tiled_cuda_backward or (tile_plan is None and backward_plan is None):
            return {}
        if bias is not None and (score_perm is None or not use_tiled_cuda_backward_extras):
            return {}
        extras = dict(tiled_backward_extras=True) if use_tiled_cuda_backward_extras else {}
        if plan_long_rows is not None or tile_plan is None:
            # the backward's own plan: the forward's with its long rows kept in,
            # or the plan a forward with statistics could not take
            if backward_plan is None or (plan_long_rows is not None and not tiled_backward_long_rows):
                return {}
            return dict(tile_plan=_detached(backward_plan), tile_passes=list(backward_passes), **extras)
        return dict(tile_plan=_detached(tile_plan), tile_passes=tile_passes, **extras)
    if device.type == "cpu" and stencil is not None:
        if not _stencil.use_stencil_cpu_kernel:
            return {}
        if (bias is not None and not (_stencil.use_window_kernel and _stencil.window_takes(stencil, head_dim))
                and not _stencil.sums_bias_grad(stencil)):
            if backward_plan is None or tile_plan is not None:
                return {}  # the bias gradient comes from the row kernels
            # the tile kernels give it (_cpu_bias_backward_plan)
            tiled_backwards_run += 1
            return dict(tile_plan=_detached(backward_plan), tile_passes=list(backward_passes))
        stencil_backwards_run += 1
        plan = dict(stencil=_detached(stencil))
        if not _stencil.use_window_kernel:
            plan["stencil_strips"] = True
        if tile_plan is not None:  # the lattice's pairs add to the stencil's gradients
            plan.update(tile_plan=_detached(tile_plan), tile_passes=tile_passes)
        return plan
    if (device.type != "cpu" or tile_plan is None or plan_long_rows is not None
            or not _tiles.use_tiled_cpu_kernel):
        return {}
    tiled_backwards_run += 1
    return dict(tile_plan=_detached(tile_plan), tile_passes=tile_passes)


def _backward_schema(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     row_ptr: torch.Tensor, col_idx: torch.Tensor, col_ptr: torch.Tensor,
                     row_idx: torch.Tensor, bucket_perm: Optional[torch.Tensor],
                     bucket_ptr: Optional[torch.Tensor], long_rows: Optional[torch.Tensor],
                     long_cols: Optional[torch.Tensor], height: int, width: int, scale: float,
                     bias: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
                     head_active: Optional[torch.Tensor], dropout_p: float, seed: torch.Tensor,
                     tile_plan: Optional[torch.Tensor], tile_passes: list[int],
                     plan_long_rows: Optional[torch.Tensor], stencil: Optional[torch.Tensor],
                     backward_plan: Optional[torch.Tensor], backward_passes: list[int],
                     score_perm: Optional[torch.Tensor], score_ptr: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_out, query, key, value, out, lse, row_ptr, col_idx, col_ptr,
                          row_idx, bucket_perm, bucket_ptr, long_rows, long_cols, height, width,
                          scale, bias, key_mask, head_active, dropout_p, seed, tile_plan,
                          tile_passes, plan_long_rows, stencil, backward_plan, backward_passes,
                          score_perm, score_ptr)


_backward = torch.library.custom_op("sparse_attention::backward", mutates_args=())(_backward_schema)


@_backward.register_fake
def _backward_fake(grad_out, query, key, value, out, lse, row_ptr, col_idx, col_ptr, row_idx,
                   bucket_perm, bucket_ptr, long_rows, long_cols, height, width, scale, bias, key_mask, head_active,
                   dropout_p, seed, tile_plan, tile_passes, plan_long_rows, stencil,
                   backward_plan, backward_passes, score_perm, score_ptr):
    grad_bias = bias.new_empty(bias.shape) if bias is not None else query.new_empty((0,))
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_bias


def _setup_context(ctx, inputs, output):
    (query, key, value, row_ptr, col_idx, col_ptr, row_idx, bucket_perm, bucket_ptr, long_rows,
     long_cols, height, width, scale, bias, key_mask, head_active, dropout_p, seed, _stats,
     _plan, _passes, _plan_long_rows, _splits, _stencil_plan, _backward_plan_buffer,
     _backward_passes, _score_perm, _score_ptr) = inputs
    out, lse, _stats = output
    ctx.save_for_backward(query, key, value, out, lse, row_ptr, col_idx, col_ptr, row_idx,
                          bucket_perm, bucket_ptr, long_rows, long_cols, bias, key_mask, head_active,
                          seed, _plan, _plan_long_rows, _stencil_plan, _backward_plan_buffer,
                          _score_perm, _score_ptr)
    ctx.args = (height, width, scale, dropout_p, list(_passes), list(_backward_passes))


def _backward_rule(ctx, grad_out, _grad_lse, _grad_stats):
    (query, key, value, out, lse, row_ptr, col_idx, col_ptr, row_idx, bucket_perm, bucket_ptr,
     long_rows, long_cols, bias, key_mask, head_active, seed, plan, plan_long_rows,
     stencil, backward_plan, score_perm, score_ptr) = ctx.saved_tensors
    height, width, scale, dropout_p, passes, backward_passes = ctx.args
    grad_q, grad_k, grad_v, grad_bias = _backward(
        grad_out, query, key, value, out, lse, row_ptr, col_idx, col_ptr, row_idx, bucket_perm,
        bucket_ptr, long_rows, long_cols, height, width, scale, bias, key_mask, head_active,
        dropout_p, seed, plan, passes, plan_long_rows, stencil, backward_plan, backward_passes,
        score_perm, score_ptr)
    return (grad_q, grad_k, grad_v) + (None,) * 11 + (
        grad_bias if bias is not None else None,) + (None,) * 14


_forward.register_autograd(_backward_rule, setup_context=_setup_context)

# positions in the op's argument list
_BIAS = 14


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, without the dispatcher:
    in eager mode that saves tens of microseconds per call, which is most of
    the time of a small attention on a GPU."""

    @staticmethod
    def forward(ctx, query, key, value, bias, args, layout):
        out, lse, stats = _forward_impl(query, key, value, *args[3:_BIAS], bias, *args[_BIAS + 1:])
        ctx.save_for_backward(query, key, value, out, lse, bias)
        ctx.args = args
        ctx.layout = layout
        ctx.mark_non_differentiable(lse, stats)
        return out, lse, stats

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, _grad_stats):
        query, key, value, out, lse, bias = ctx.saved_tensors
        a = ctx.args
        if torch.is_grad_enabled():
            # create_graph=True (gradient penalties, higher derivatives): the
            # kernels' gradients carry no graph, so this backward runs the
            # differentiable PyTorch path, same pairs and same dropout draw.
            grads = _differentiable_backward(grad_out, query, key, value, bias, ctx.layout, a)
            return grads + (None, None)
        grad_q, grad_k, grad_v, grad_bias = _backward_impl(
            grad_out, query, key, value, out, lse, *a[3:_BIAS], bias, *a[_BIAS + 1:19], *a[20:23], *a[24:29])
        return grad_q, grad_k, grad_v, (grad_bias if bias is not None else None), None, None


def _differentiable_backward(grad_out, query, key, value, bias, layout, args):
    """The gradients of the forward in args with respect to query, key, value
    and bias, as tensors that can be differentiated again."""
    scale, key_mask, head_active, dropout_p, seed = args[13], args[15], args[16], args[17], args[18]
    out, _, _ = sparse_attention_torch(query, key, value, layout, scale=scale, rel_pos_bias=bias,
                                       key_mask=key_mask, head_active=head_active, dropout_p=dropout_p,
                                       dropout_seed=seed if dropout_p > 0 else 0)
    inputs = [x for x in (query, key, value, bias) if x is not None and x.requires_grad]
    found = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True, allow_unused=True))
    grads = []
    for x in (query, key, value, bias):
        grad = next(found) if x is not None and x.requires_grad else None
        if grad is None and x is not None and x.requires_grad:
            grad = torch.zeros_like(x)
        grads.append(grad)
    return tuple(grads)


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

    # Meta tensors (model summaries, deferred initialisation) take the custom
    # op, whose fake kernel gives the shapes, as torch.compile's tracing does;
    # torch.jit.trace records the custom op (our kernels' outputs would be
    # constants of its graph).
    compiling = torch.compiler.is_compiling() or device.type == "meta" or torch.jit.is_tracing()
    if dropout_p > 0 and dropout_seed is None:
        # a tensor, so that torch.compile keeps it in the graph (no .item() here)
        seed_tensor = torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cpu")
        if not compiling and not torch._C._are_functorch_transforms_active():
            # eager: the host integer (a CPU tensor, no device sync), which the
            # PyTorch path's C mask loop takes and its tensor arithmetic does not need
            seed_tensor = int(seed_tensor)
    else:
        seed = int(dropout_seed or 0)
        if not 0 <= seed < 2**63:
            raise ValueError(f"dropout_seed: expected an integer in [0, 2**63), got {seed}")
        # eager calls take the integer as it is; the compiled op needs a tensor
        seed_tensor = torch.full((1,), seed, dtype=torch.int64, device="cpu") if compiling else seed

    reason = native_supports(device, query.dtype)
    if reason is None and (torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0):
        # torch.func.vmap / grad / jacrev wrap tensors the kernels cannot read,
        # and forward-mode AD needs tangents they do not compute; the PyTorch
        # path is made of operators that every transform knows
        reason = ("torch.func transforms (vmap, grad, jacrev, ...) and forward-mode AD run the "
                  "PyTorch path")
    if backend == "native" and reason is not None:
        raise RuntimeError(f"backend='native': {reason}")
    if backend == "torch" or reason is not None:
        return sparse_attention_torch(query, key, value, layout, scale=scale, rel_pos_bias=bias,
                                      key_mask=key_mask, head_active=head_active,
                                      dropout_p=dropout_p,
                                      # a seed tensor stays in torch.compile's and
                                      # torch.jit.trace's graphs (no host read)
                                      dropout_seed=seed_tensor if dropout_p > 0 else 0,
                                      want_stats=want_stats)

    narrow = None
    if device.type == "cpu" and query.dtype in _WIDENED_CPU_DTYPES:
        # differentiable casts: the gradients come back in the caller's dtype
        narrow = query.dtype
        query, key, value = query.float(), key.float(), value.float()
    host_args = (device, query.dtype, static_int(query.shape[-1]), max_relative, want_stats)
    if torch.compiler.is_compiling():
        tensors, plan = _layout_and_plan_while_tracing(layout._serial, *host_args)
    else:
        tensors, plan = _layout_and_plan_eager(layout, *host_args)
    table = None
    if bias is not None:
        table = bias if bias.dtype == query.dtype else bias.to(query.dtype)
        table = table.contiguous()
    # The transpose and the bias buckets ride along as inputs: only backward reads them.
    args = (query, key, value, *tensors, layout.height, layout.width, scale,
            table, key_mask, head_active, dropout_p, seed_tensor, want_stats, *plan)
    if compiling:
        out, lse, stats = _forward(*args)
    elif torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (query, key, value, table)):
        out, lse, stats = _EagerAttention.apply(query, key, value, table, args, layout)
    else:  # nothing to differentiate: no autograd node (its bookkeeping costs more than small calls)
        out, lse, stats = _forward_impl(query, key, value, *args[3:_BIAS], table, *args[_BIAS + 1:])
    if narrow is not None:
        out = out.to(narrow)
    return out, lse, (stats if want_stats else None)
