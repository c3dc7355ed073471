"""Sparsity patterns and layouts.

A layout is the set of (query i, key j) token pairs that may attend, for an
H x W grid whose token t = y * W + x (the order of ``x.flatten(2)``). It is
stored as CSR (``indptr``, ``indices``) and its transpose, built in C in
O(nnz) memory; an N x N matrix exists only if you ask for ``to_dense()``.

For query i = (yi, xi), key j = (yj, xj) and r = kernel_size // 2:

========== =================================================================
DENSE      every pair
AXIAL      yi == yj or xi == xj
BLOCK      same block_size x block_size tile
LONGFORMER clipped (2r+1)^2 window, or i or j a global token; the g global
           tokens are floor((k + 0.5) * N / g), k = 0 .. g-1 (g is capped at N)
STRIDED    clipped window, or (yi - yj) % stride == 0 and (xi - xj) % stride == 0
RANDOM     i itself and K - 1 other keys, K = max(1, round(attention_ratio * N))
========== =================================================================

RANDOM's generator, so that anyone can rebuild a layout: row i runs SplitMix64
from the state ``seed ^ (0xD1B54A32D192ED03 * (i + 1))`` (64-bit wrap-around);
a draw below ``n`` is ``(next() * n) >> 64``. Floyd's algorithm picks K - 1
distinct values from the N - 1 other tokens (pool value v stands for token v if
v < i, else v + 1): for t = N-1-(K-1) .. N-2, draw v below t + 1, take token(v)
unless already taken, else token(t). The row is sorted ascending. C's round()
(half away from zero) gives K. The same seed gives the same layout everywhere.

``attention_ratio`` shapes RANDOM only; the other patterns accept and ignore it.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import threading
import warnings
import weakref

import numpy as np

from ._native import C


def tracing_with_fake_tensors() -> bool:
    """Whether tensors made here would be fake (shapes without data), as while
    torch.export traces: such tensors must not land in a cache that later
    eager calls read. (torch.compile runs our host work on real tensors.)"""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(torch.empty(()))


@contextlib.contextmanager
def building_cached_tensors():
    """Where tensors that later calls will read from a cache are made: outside
    inference mode (inference tensors cannot be saved for a backward) and
    outside torch.func's transforms (their wrappers die with the transform;
    constants made here are plain tensors that the transforms read as
    unbatched). Whether to keep the result: see tracing_with_fake_tensors."""
    import torch

    no_transforms = getattr(torch._C, "_DisableFuncTorch", None)
    with torch.inference_mode(False), (no_transforms() if no_transforms else contextlib.nullcontext()):
        yield


def static_int(value) -> int:
    """``value`` as a plain int; under torch.compile with dynamic shapes, one
    the graph specialises on (a guard per value, a recompile per new value).
    Layouts and tile plans are host structures per size: a symbolic size
    cannot pick one. (int() keeps a symbolic int symbolic; range() needs a
    concrete length.)"""
    return len(range(value))


def may_cache_tensors() -> bool:
    """False while the tensors just built must not outlive this call: fake
    tensors of a trace, or transform wrappers where torch cannot step outside
    its transforms."""
    import torch

    if tracing_with_fake_tensors():
        return False
    return hasattr(torch._C, "_DisableFuncTorch") or not torch._C._are_functorch_transforms_active()


def _tensor_of(array, device):
    """``array`` as a torch tensor on ``device``: on the CPU a view of the same
    memory, elsewhere one copy. The layout's arrays are read-only and its
    kernels only read them; a copy of each (1 GiB of int32 and int64 for
    RANDOM at 128 x 128) cost 3.5 s of page faults on a first call."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if torch.device(device).type == "cpu" else tensor.to(device)


class SparsityPattern(enum.Enum):
    """The sparsity patterns; see the module docstring for their definitions."""

    DENSE = "dense"
    AXIAL = "axial"
    BLOCK = "block"
    LONGFORMER = "longformer"
    STRIDED = "strided"
    RANDOM = "random"

    @classmethod
    def parse(cls, value, argument="sparsity_pattern") -> "SparsityPattern":
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for member in cls:
                if value.lower() in (member.value, member.name.lower()):
                    return member
        names = ", ".join(m.name for m in cls)
        raise ValueError(f"{argument}: unknown sparsity pattern {value!r}; expected one of {names}")


_PATTERN_IDS = {
    SparsityPattern.DENSE: 0,
    SparsityPattern.AXIAL: 1,
    SparsityPattern.BLOCK: 2,
    SparsityPattern.LONGFORMER: 3,
    SparsityPattern.STRIDED: 4,
    SparsityPattern.RANDOM: 5,
}

# The knobs each pattern depends on; the others do not enter its cache key.
_RELEVANT = {
    SparsityPattern.DENSE: (),
    SparsityPattern.AXIAL: (),
    SparsityPattern.BLOCK: ("block_size",),
    SparsityPattern.LONGFORMER: ("kernel_size", "num_global_tokens"),
    SparsityPattern.STRIDED: ("kernel_size", "stride"),
    SparsityPattern.RANDOM: ("attention_ratio", "seed"),
}


# Rows with more keys than this are split over the warps of a block on CUDA.
LONG_ROW_THRESHOLD = 1024


def _as_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    return int(value)


_LAYOUT_SERIALS = itertools.count()
_LAYOUTS_BY_SERIAL: "weakref.WeakValueDictionary[int, Layout]" = weakref.WeakValueDictionary()


def layout_by_serial(serial: int) -> "Layout":
    """The live layout whose ``_serial`` is ``serial``. Functions that
    torch.compile runs while it traces (torch.compiler.assume_constant_result)
    take the layout's serial: handed the object itself, torch 2.13 fails to
    guard on it where it came out of another such function."""
    return _LAYOUTS_BY_SERIAL[serial]


class Layout:
    """An immutable sparsity layout over an H x W grid (CSR plus transpose).

    Attributes: ``pattern`` (a SparsityPattern, or None for a custom layout),
    ``name`` (the pattern's name, or the custom layout's), ``height``,
    ``width``, ``num_tokens``, ``nnz``, ``density``, ``indptr`` (int64, N+1),
    ``indices`` (int32, nnz, ascending per row), ``col_ptr`` / ``row_indices``
    (the transpose), ``params`` (the knobs). Custom layouts come from
    sparse_attention.layout_from_rule, layout_from_mask and layout_from_csr,
    which check the CSR in full.
    """

    def __init__(self, pattern, height, width, indptr, indices, col_ptr, row_indices, params=None, name=None):
        if pattern is None:
            if name is None:
                name = "custom"
            if not isinstance(name, str) or not name:
                raise TypeError(f"name: expected a non-empty str, got {name!r}")
            self.pattern, self.name = None, name
        else:
            self.pattern = SparsityPattern.parse(pattern, "pattern")
            if name is not None and name != self.pattern.name:
                raise ValueError(f"name: a {self.pattern.name} layout is named {self.pattern.name}, got {name!r}")
            self.name = self.pattern.name
        self.height = _as_int(height, "height")
        self.width = _as_int(width, "width")
        self.num_tokens = self.height * self.width
        self.params = dict(params or {})
        arrays = {}
        for name, array, dtype in (("indptr", indptr, np.int64), ("indices", indices, np.int32),
                                   ("col_ptr", col_ptr, np.int64),
                                   ("row_indices", row_indices, np.int32)):
            array = np.ascontiguousarray(array, dtype=dtype)
            array.setflags(write=False)
            arrays[name] = array
        self.indptr = arrays["indptr"]
        self.indices = arrays["indices"]
        self.col_ptr = arrays["col_ptr"]
        self.row_indices = arrays["row_indices"]
        self._validate()
        self.nnz = int(self.indices.shape[0])
        self.density = self.nnz / float(self.num_tokens) ** 2
        self._reset_caches()

    def _reset_caches(self):
        # a number that names this layout to host work run while torch.compile
        # traces (an int crosses into it where the object cannot: see
        # layout_by_serial)
        self._serial = next(_LAYOUT_SERIALS)
        _LAYOUTS_BY_SERIAL[self._serial] = self
        self._lock = threading.Lock()
        self._device_cache = {}
        self._buckets = {}
        self._plan_cache = {}
        self._row_ids = None

    # Pickling (torch.save of a whole model, DataLoader workers) keeps the CSR
    # and the knobs; the lock cannot travel and the caches hold device tensors
    # and plans that are cheaper to rebuild than to store.
    def __getstate__(self):
        return {name: getattr(self, name) for name in
                ("pattern", "name", "height", "width", "params", "indptr", "indices", "col_ptr",
                 "row_indices")}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise TypeError(f"Layout state: expected a dict, got {type(state).__name__}")
        self.__init__(**state)

    # A layout never changes after it is built, so copies (copy.deepcopy of a
    # model for an EMA or a checkpoint) share it and its caches.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def _validate(self):
        n = self.num_tokens
        for ptr_name, idx_name in (("indptr", "indices"), ("col_ptr", "row_indices")):
            ptr, idx = getattr(self, ptr_name), getattr(self, idx_name)
            if ptr.shape != (n + 1,):
                raise ValueError(f"{ptr_name}: expected shape ({n + 1},) for a {self.height} x "
                                 f"{self.width} grid, got {ptr.shape}")
            if ptr[0] != 0 or ptr[-1] != idx.shape[0] or np.any(np.diff(ptr) < 0):
                raise ValueError(f"{ptr_name}: expected non-decreasing offsets from 0 to "
                                 f"{idx.shape[0]} (the length of {idx_name})")
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"{idx_name}: token indices must lie in [0, {n}), got "
                                 f"[{idx.min()}, {idx.max()}]")
        if self.indices.shape != self.row_indices.shape:
            raise ValueError("row_indices: expected as many entries as indices, got "
                             f"{self.row_indices.shape[0]} and {self.indices.shape[0]}")

    def __repr__(self):
        knobs = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return (f"Layout({self.name}, {self.height}x{self.width}, nnz={self.nnz}, "
                f"density={self.density:.4f}{', ' + knobs if knobs else ''})")

    # pairs of two layouts of one grid combined, as custom layouts (custom_layouts.combine_layouts)
    def __or__(self, other):
        return self._combined(other, "union")

    def __and__(self, other):
        return self._combined(other, "intersection")

    def __sub__(self, other):
        return self._combined(other, "difference")

    def _combined(self, other, how):
        if not isinstance(other, Layout):
            return NotImplemented
        from .custom_layouts import combine_layouts

        return combine_layouts(self, other, how)

    def neighbors(self, i: int) -> np.ndarray:
        """The keys query token ``i`` may attend, ascending."""
        i = _as_int(i, "i")
        if not 0 <= i < self.num_tokens:
            raise IndexError(f"i: token {i} outside [0, {self.num_tokens})")
        return self.indices[self.indptr[i]:self.indptr[i + 1]]

    def degrees(self) -> np.ndarray:
        """Number of keys of every query row."""
        return np.diff(self.indptr)

    def row_ids(self) -> np.ndarray:
        """The query row of each CSR entry (int64, nnz)."""
        with self._lock:
            if self._row_ids is None:
                ids = np.repeat(np.arange(self.num_tokens, dtype=np.int64), self.degrees())
                ids.setflags(write=False)
                self._row_ids = ids
            return self._row_ids

    def to_dense(self) -> np.ndarray:
        """The N x N boolean mask. O(N^2) memory: for tests and pictures only."""
        dense = np.zeros((self.num_tokens, self.num_tokens), dtype=bool)
        dense[self.row_ids(), self.indices] = True
        return dense

    def bias_buckets(self, max_relative: int):
        """For the relative position bias with clamp M: (bucket, perm, ptr).

        bucket[p] is the flat index into the (2M+1) x (2M+1) table of CSR entry
        p; perm lists the entries grouped by bucket (stable) and ptr the offsets
        of each bucket in perm. The backward kernel sums per bucket in this order.
        """
        m = _as_int(max_relative, "max_relative")
        with self._lock:
            cached = self._buckets.get(m)
        if cached is not None:
            return cached
        # per-token coordinates gathered in int32, then a radix sort where the
        # buckets fit 16 bits: for RANDOM at 64 x 64 (8.4 M pairs) the int64
        # arithmetic and comparison sort took 1.5 s of a module's first call
        side = 2 * m + 1
        tokens = np.arange(self.num_tokens, dtype=np.int32 if side * side < 1 << 31 else np.int64)
        bucket = None
        for coordinate, scale in ((tokens // self.width, side), (tokens % self.width, 1)):
            offset = np.repeat(coordinate, self.degrees()) - coordinate[self.indices]
            np.clip(offset, -m, m, out=offset)
            offset += m
            if scale != 1:
                offset *= scale
            bucket = offset if bucket is None else bucket + offset
        keys = bucket.astype(np.uint16) if side * side <= 1 << 16 else bucket
        perm = np.argsort(keys, kind="stable").astype(np.int64)
        bucket = bucket.astype(np.int64)
        ptr = np.zeros((2 * m + 1) ** 2 + 1, dtype=np.int64)
        np.cumsum(np.bincount(bucket, minlength=(2 * m + 1) ** 2), out=ptr[1:])
        for array in (bucket, perm, ptr):
            array.setflags(write=False)
        result = (bucket, perm, ptr)
        with self._lock:
            self._buckets[m] = result
        return result

    def is_symmetric(self) -> bool:
        """Whether key j is attended by query i exactly when key i is by query j
        (the transpose equals the CSR), worked out once."""
        return self._built_once("symmetric", lambda layout: bool(
            np.array_equal(layout.indptr, layout.col_ptr) and np.array_equal(layout.indices, layout.row_indices)))

    def tile_plan(self):
        """The plan of the CUDA tensor-core forward (see _tiles.py), built once;
        None when the layout is too large to plan."""
        from ._tiles import build_tile_plan

        def build(layout):
            passes = layout._gpu_passes()
            shared = layout._cached_plan("cpu", passes)
            return shared if shared is not None else build_tile_plan(layout, passes=passes)

        return self._built_once("plan", build)

    def _gpu_passes(self):
        """tile_plan()'s choice of passes, worked out once."""
        from ._tiles import choose_passes

        return self._built_once("gpu_passes", choose_passes)

    def _cpu_passes(self):
        """cpu_tile_plan()'s choice of passes, worked out once."""
        return self._cpu_choice()[0]

    def _cpu_choice(self):
        """(cpu_tile_plan()'s passes, their sampled fill estimate), worked out once."""
        from ._tiles import choose_passes

        return self._built_once("cpu_choice", lambda layout: choose_passes(layout, for_cpu=True, with_estimate=True))

    def _is_built(self, key) -> bool:
        with self._lock:
            return key in self._plan_cache

    def _cached_plan(self, device, passes):
        """The plan the other device ("cpu" or "gpu") has already built when it
        chose the same ``passes``, else None: where the CPU and the GPU choose
        alike they share one plan, but neither works out the other's choice
        only to compare (the GPU's cost RANDOM at 256 x 256 0.4 s on the CPU)."""
        with self._lock:
            if device == "cpu":
                choice = self._plan_cache.get("cpu_choice")
                chosen, plan_key = (None if choice is None else choice[0]), "cpu_plan"
            else:
                chosen, plan_key = self._plan_cache.get("gpu_passes"), "plan"
            if passes is None or chosen != passes:
                return None
            return self._plan_cache.get(plan_key)

    def cpu_tile_plan(self):
        """The plan the CPU tile kernels run, built once: its tile shapes are
        chosen by the slots the CPU computes (see _tiles._estimate_cost); the
        same object as tile_plan() where that is built and chose the same
        passes."""
        from ._tiles import build_tile_plan

        def build(layout):
            passes = layout._cpu_passes()
            if passes is None:
                return None
            shared = layout._cached_plan("gpu", passes)
            return shared if shared is not None else build_tile_plan(layout, passes=passes)

        return self._built_once("cpu_plan", build)

    def counted_cpu_fill(self):
        """cpu_tile_plan()'s cpu_fill as counted from every tile's distinct keys
        without building the plan (_tiles.counted_cpu_fill), worked out once;
        None without a plan."""
        from ._tiles import counted_cpu_fill

        def count(layout):
            passes = layout._cpu_passes()
            return None if passes is None else counted_cpu_fill(layout, passes)

        return self._built_once("counted_cpu_fill", count)

    def full_tile_plan(self):
        """The tile plan with the long rows kept in it (every pair planned), for
        the CUDA tensor-core backward; the same object as tile_plan() when that
        leaves no row out."""
        from ._tiles import build_tile_plan

        def build(layout):
            plan = layout.tile_plan()
            if plan is None or not plan.long_rows.size:
                return plan
            return build_tile_plan(layout, keep_long_rows=True)

        return self._built_once("full_plan", build)

    def stencil(self):
        """The layout as the CPU stencil kernels take it (see _stencil.py): one
        int32 array, built and checked against the CSR rows once; None when the
        layout is not a stencil layout."""
        from ._stencil import stencil_of

        return self._built_once("stencil", stencil_of)

    def stencil_split(self):
        """STRIDED's window as a stencil and its lattice as a tile plan for the
        CPU kernels (see _stencil.lattice_split), built once; None when the
        layout does not split."""
        from ._stencil import lattice_split

        return self._built_once("split", lattice_split)

    def packed_tile_plan(self, full=False, cpu=False):
        """(buffer, passes, long_rows) of the tile plan (of full_tile_plan() with
        full, of cpu_tile_plan() with cpu) as the C entry point takes it (NumPy
        arrays, built once), or None without a plan."""
        def pack(layout):
            plan = layout.full_tile_plan() if full else layout.cpu_tile_plan() if cpu else layout.tile_plan()
            if plan is None:
                return None
            buffer, passes = plan.packed()
            buffer.setflags(write=False)
            return buffer, [int(x) for x in passes], plan.long_rows if plan.long_rows.size else None

        return self._built_once("packed_full" if full else "packed_cpu" if cpu else "packed", pack)

    def _built_once(self, key, build, cache=None):
        """build(self), cached under key (None results too) in cache: the plan
        cache, or the device cache for tensors."""
        cache = self._plan_cache if cache is None else cache
        with self._lock:
            if key in cache:
                return cache[key]
        if cache is self._device_cache:
            import torch

            with building_cached_tensors():
                value = build(self)
            if not may_cache_tensors():
                return value
        else:
            value = build(self)
        with self._lock:
            cache[key] = value
        return value

    def tile_plan_tensors(self, device):
        """The tile plan on ``device`` as the C entry point takes it: a dict with
        ``buffer`` (one int32 tensor), ``passes`` (six ints per pass), ``num_passes``,
        ``long_rows`` (int32 tensor or None) and ``long_row_max_keys``; copied once.
        On the CPU, of cpu_tile_plan(). None without a plan."""
        import torch

        on_cpu = torch.device(device).type == "cpu"

        def build(layout):
            plan = layout.cpu_tile_plan() if on_cpu else layout.tile_plan()
            if plan is None:
                return None
            buffer, passes, _ = layout.packed_tile_plan(cpu=on_cpu)
            return {
                "buffer": _tensor_of(buffer, device),
                "passes": passes,
                "num_passes": len(plan),
                "fill": plan.fill,
                "long_rows": _tensor_of(plan.long_rows, device) if plan.long_rows.size else None,
                "long_row_max_keys": (int(layout.degrees()[plan.long_rows].max())
                                      if plan.long_rows.size else 0),
            }

        return self._built_once(("tiles", str(torch.device(device))), build, self._device_cache)

    def full_tile_plan_tensors(self, device):
        """(buffer tensor on ``device``, six ints per pass) of full_tile_plan(),
        copied once; None without a plan."""
        import torch

        def build(layout):
            packed = layout.packed_tile_plan(full=True)
            return None if packed is None else (_tensor_of(packed[0], device), packed[1])

        return self._built_once(("full_tiles", str(torch.device(device))), build, self._device_cache)

    def plan_score_buckets_tensors(self, device, max_relative, full):
        """TilePlan.score_buckets of tile_plan() (of full_tile_plan() with full)
        as int64 tensors on ``device``, copied once; None without a plan."""
        import torch

        def build(layout):
            plan = layout.full_tile_plan() if full else layout.tile_plan()
            if plan is None:
                return None
            perm, ptr = plan.score_buckets(layout.width, max_relative)
            return _tensor_of(perm, device), _tensor_of(ptr, device)

        key = ("plan_scores", bool(full), int(max_relative), str(torch.device(device)))
        return self._built_once(key, build, self._device_cache)

    def row_ids_tensor(self, device):
        """row_ids() on ``device`` (int64), cached; only the PyTorch path needs it."""
        import torch

        return self._built_once(("row_ids", str(torch.device(device))),
                                lambda layout: _tensor_of(layout.row_ids(), device), self._device_cache)

    def torch_tensors(self, device, max_relative=None):
        """The layout as torch tensors on ``device``, copied there once and cached."""
        import torch

        device = torch.device(device)

        def build(layout):
            tensors = {
                "row_ptr": _tensor_of(layout.indptr, device),
                "col_idx": _tensor_of(layout.indices, device),
            }
            if layout.is_symmetric():
                # the transpose is the layout itself: the same tensors, which tells
                # the CUDA backward that the tile plan serves dK and dV too
                tensors["col_ptr"], tensors["row_idx"] = tensors["row_ptr"], tensors["col_idx"]
            else:
                tensors["col_ptr"] = _tensor_of(layout.col_ptr, device)
                tensors["row_idx"] = _tensor_of(layout.row_indices, device)
            if device.type == "cuda":
                # rows / columns the CUDA kernels give a whole block (see cuda/attention_cuda.cu)
                long_rows = np.nonzero(layout.degrees() > LONG_ROW_THRESHOLD)[0].astype(np.int32)
                long_cols = np.nonzero(np.diff(layout.col_ptr) > LONG_ROW_THRESHOLD)[0].astype(np.int32)
                if long_rows.size or long_cols.size:
                    tensors["long_rows"] = _tensor_of(long_rows, device)
                    tensors["long_cols"] = _tensor_of(long_cols, device)
            if max_relative is not None:
                bucket, perm, ptr = layout.bias_buckets(max_relative)
                tensors["bucket"] = _tensor_of(bucket, device)
                tensors["bucket_perm"] = _tensor_of(perm, device)
                tensors["bucket_ptr"] = _tensor_of(ptr, device)
            return tensors

        return self._built_once((str(device), max_relative), build, self._device_cache)


@functools.lru_cache(maxsize=128)
def _cached_layout(pattern, height, width, knobs):
    params = dict(knobs)
    full = dict(kernel_size=7, block_size=8, stride=7, num_global_tokens=1, attention_ratio=0.5,
                seed=0)
    full.update(params)
    arrays = C.build_layout(_PATTERN_IDS[pattern], height, width, full["kernel_size"],
                            full["block_size"], full["stride"], full["num_global_tokens"],
                            float(full["attention_ratio"]), full["seed"])
    return Layout(pattern, height, width, *arrays, params=params)


def build_layout(pattern, height, width, *, kernel_size=7, block_size=8, stride=None,
                 num_global_tokens=1, attention_ratio=0.5, seed=0) -> Layout:
    """Build (or fetch from the cache) the layout of ``pattern`` on a height x width grid.

    ``stride`` defaults to ``kernel_size``. Bad knobs raise ValueError naming the
    knob and its value. Layouts are cached per (pattern, size, relevant knobs).
    """
    pattern = SparsityPattern.parse(pattern, "pattern")
    height = _as_int(height, "height")
    width = _as_int(width, "width")
    kernel_size = _as_int(kernel_size, "kernel_size")
    block_size = _as_int(block_size, "block_size")
    stride = kernel_size if stride is None else _as_int(stride, "stride")
    num_global_tokens = _as_int(num_global_tokens, "num_global_tokens")
    seed = _as_int(seed, "seed")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed}")
    if isinstance(attention_ratio, bool) or not isinstance(attention_ratio, (int, float, np.floating)):
        raise TypeError(f"attention_ratio: expected a float, got {type(attention_ratio).__name__}")
    attention_ratio = float(attention_ratio)
    if not 0.0 < attention_ratio <= 1.0:
        raise ValueError(f"attention_ratio: expected a value in (0, 1], got {attention_ratio}")
    values = dict(kernel_size=kernel_size, block_size=block_size, stride=stride,
                  num_global_tokens=num_global_tokens, attention_ratio=attention_ratio, seed=seed)
    # validated in C for every knob, so that a bad knob is reported even where irrelevant
    C.build_layout(_PATTERN_IDS[SparsityPattern.DENSE], 1, 1, kernel_size, block_size, stride,
                   num_global_tokens if pattern is not SparsityPattern.LONGFORMER else 0,
                   attention_ratio, seed)
    if height < 1:
        raise ValueError(f"height: expected >= 1, got {height}")
    if width < 1:
        raise ValueError(f"width: expected >= 1, got {width}")
    knobs = tuple((name, values[name]) for name in _RELEVANT[pattern])
    return _cached_layout(pattern, height, width, knobs)


def global_tokens(num_tokens: int, num_global_tokens: int) -> np.ndarray:
    """The LONGFORMER global tokens floor((k + 0.5) * N / g), k = 0 .. g-1."""
    g = min(num_global_tokens, num_tokens)
    k = np.arange(g, dtype=np.int64)
    return ((2 * k + 1) * num_tokens) // (2 * max(g, 1))
