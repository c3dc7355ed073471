"""Stencil layouts: the same offsets from every query, clipped at the grid.

LONGFORMER's window and STRIDED's window and lattice give query (y, x) the
keys (y + dy, x + dx) for a fixed set of offsets (dy, dx), wherever they land
on the grid. The CPU stencil kernels
(csrc/attention_cpu_stencil.c) use that: eight neighbouring queries of an
image row meet eight neighbouring keys at every offset, so they need neither
indices nor masks per pair. LONGFORMER's global tokens fit too: every query
attends them (extra keys), and as queries they attend everything, which the
row kernel does (listed rows). Where the offsets fit in a box of at most
13 x 13 that they fill at least half of (a window), the forward runs on the
window kernel instead (csrc/attention_cpu_window.c): a 4 x 2 block of
queries in the lanes against the union of their windows.

A stencil is derived from the pattern's knobs and then checked pair for pair
against the layout's CSR rows, so a layout that is not what its pattern says
never reaches the stencil kernels.

Offsets that share divisors (s_y, s_x) (a dilated window, STRIDED's lattice
alone) link only tokens of the same class of rows and columns modulo the
steps; the window kernel runs each class as a grid of its own, its rows
s_y x W tokens apart, so a dilated window takes the box of its steps
(C: offset_steps in attention_cpu_window.c).

A window clamped to the grid (NATTEN's neighbourhood attention: every query
attends a whole k_h x k_w box of keys, moved inward at the grid's edges
rather than cut off) is not a stencil, since the edges shift its offsets; the
window kernel takes it as one with a flag (the packed stencil's trailing
word), moving the union of a block whose windows the edges shift and giving
such a block lane masks and bias tables of its own (_clamped_window finds it
in a custom layout).

AXIAL is a stencil too (offsets (0, dx) and (dy, 0)), but its column offsets
read every image row of the key panels for every strip of queries, and the
tile kernels, whose AXIAL chunks are full, were twice as fast at 64 x 64
(benchmarks/NOTES.md); so AXIAL keeps its tile plan.
"""

from __future__ import annotations

import numpy as np

from . import _tiles
from ._native import C
from .patterns import Layout, SparsityPattern, global_tokens

# The CPU forward and backward use stencils where they apply (float32); tests
# turn this off to compare with the other kernels.
use_stencil_cpu_kernel = True
# more offsets than this are not worth a stencil (a lattice of stride 1 is dense)
MAX_OFFSETS = 4096
# STRIDED's lattice runs on the tile kernels (lattice_split) when its residue
# classes hold at least this many tokens on average; tests turn the split off
# to compare it with the whole stencil.
MIN_CLASS_TOKENS = 8
use_lattice_split = True
# The CPU forward runs stencils whose offsets fit in a small box (windows) on
# the window kernel (csrc/attention_cpu_window.c), the others on the strip
# kernel; tests turn this off to compare the two.
use_window_kernel = True
# The strip backward sums the bias gradient per offset for stencils of
# offsets alone (custom windows past the window kernel's box, a dilated
# window; STRIDED on grids of 8 to 19 a side), which otherwise ran on the
# tiles or the rows; tests turn it off to compare.
use_strip_bias_backward = True
# A custom layout that is a window plus pairs beyond it in some rows (NATTEN's
# shifted window) runs the window on the window kernel and the rest on the
# tiles while the rest is at most this share of its pairs (_custom_split):
# against the tiles, forward+backward, the shifted 7 x 7 window took 1.04x
# the time with a share of 0.27 (12 x 12), 1.14x at 0.23 (14 x 14), 0.94-0.96x
# at 0.20 (16 x 16), 0.81x at 0.16 (20 x 20), 0.77x at 0.13 (24 x 24), 0.77x
# at 0.10 (32 x 32), 0.67x at 0.05 (64 x 64) (benchmarks/results/custom_layouts/
# shifted_window/, two runs each).
CUSTOM_SPLIT_MAX_REST = 0.21
# A custom layout that is a window clamped to the grid (NATTEN's neighbourhood)
# runs on the window kernel as a clamped stencil; read when a layout's
# stencil is first built (tests and benchmarks turn it off to compare with
# the split or the tiles that ran it before).
use_clamped_window = True
# A custom layout that is a stencil runs on the window kernel where that takes
# it (it won at every size measured, up to a tile plan's cpu_fill of 0.48 at
# 12 x 12: 0.49-0.55x dense SDPA against the tiles' 0.81-0.88x), else on the
# strips only while its CPU tile plan is sparser than this (cpu_fill): the
# strip kernel's cost per pair grows with the image rows its offsets reach,
# and layouts whose tiles fill well (AXIAL's rule, a 15 x 15 window) ran
# faster on the tiles
# (benchmarks/custom_layouts.py; results/custom_layouts/, two runs): the
# stencils won at cpu_fill 0.13-0.39, the tiles at 0.48-0.99 (0.5: 1.3-1.4x
# dense SDPA against the stencil's 2.0-2.1x), except a short cross at
# 16 x 16 (0.54), 14-18% faster on the stencil.
CUSTOM_STENCIL_MAX_FILL = 0.45
# ... and a custom stencil the window kernel takes runs there while its CPU
# tile plan fills less than this (cpu_fill): a neighbourhood covering most of
# a small grid (NAT's last stage, 7 x 7 tokens and a 7 x 7 kernel) ran faster
# on the tiles. Forward+backward, window kernel against tiles (ours / dense,
# benchmarks/window_or_tiles.py, results/clamped_window/window_or_tiles*/):
# the window won at cpu_fill 0.53-0.69 (11 x 11 kernel 9: 1.06 against 1.17;
# 12 x 12 kernel 11: 1.27 against 1.35; 3 x 3 dense at 0.56), the tiles from
# 0.73 (9 x 9 kernel 7: 0.90 against 1.06; 7 x 7 dense at 0.88: 0.86-0.93
# against 1.17-1.26; 13 x 13 kernel 11 at 0.83: 1.04 against 1.23).
CUSTOM_WINDOW_MAX_FILL = 0.71


def _window(radius, height, width):
    dy = np.arange(-min(radius, height - 1), min(radius, height - 1) + 1)
    dx = np.arange(-min(radius, width - 1), min(radius, width - 1) + 1)
    return [(int(a), int(b)) for a in dy for b in dx]


def axial_offsets(height, width):
    """AXIAL as offsets (not used for dispatch; see the module's docstring)."""
    return [(0, dx) for dx in range(-(width - 1), width)] + [(dy, 0) for dy in range(-(height - 1), height) if dy]


def _describe(layout: Layout):
    """(offsets, extra keys, listed rows) that the pattern's knobs promise, or None."""
    h, w, n = layout.height, layout.width, layout.num_tokens
    knobs = layout.params
    empty = np.zeros(0, dtype=np.int64)
    if layout.pattern is SparsityPattern.LONGFORMER:
        radius = int(knobs.get("kernel_size", 7)) // 2
        glob = global_tokens(n, int(knobs.get("num_global_tokens", 1))).astype(np.int64)
        return _window(radius, h, w), glob, glob
    if layout.pattern is SparsityPattern.STRIDED:
        kernel = int(knobs.get("kernel_size", 7))
        stride = int(knobs.get("stride", kernel))
        if stride < 1:
            return None
        offsets = set(_window(kernel // 2, h, w))
        lattice_y = range(-((h - 1) // stride) * stride, h, stride)
        lattice_x = range(-((w - 1) // stride) * stride, w, stride)
        if len(lattice_y) * len(lattice_x) > MAX_OFFSETS:
            return None
        offsets.update((a, b) for a in lattice_y for b in lattice_x)
        return sorted(offsets), empty, empty
    if layout.pattern is None:
        return _offsets_of_custom(layout), empty, empty
    return None


def _offsets_of_custom(layout: Layout):
    """Every (dy, dx) that some pair of a custom layout spans: the stencil the
    layout is, if it is one (_matches then checks every row against it), or
    None where there are too many to be worth one."""
    h, w = layout.height, layout.width
    if layout.nnz == 0:
        return None
    queries = layout.row_ids()
    keys = layout.indices.astype(np.int64)
    codes = (keys // w - queries // w + h - 1) * (2 * w - 1) + (keys % w - queries % w + w - 1)
    present = np.zeros((2 * h - 1) * (2 * w - 1), dtype=bool)
    present[codes] = True
    if int(present.sum()) > MAX_OFFSETS:
        return None
    dy, dx = np.divmod(np.flatnonzero(present), 2 * w - 1)
    return [(int(a) - (h - 1), int(b) - (w - 1)) for a, b in zip(dy, dx)]


def _offset_table(offsets, height, width):
    """[2H - 1, 2W - 1] bool: which (dy, dx) are among ``offsets``, indexed by
    (dy + H - 1, dx + W - 1)."""
    present = np.zeros((2 * height - 1, 2 * width - 1), dtype=bool)
    dy = np.array([o[0] for o in offsets], dtype=np.int64)
    dx = np.array([o[1] for o in offsets], dtype=np.int64)
    present[dy + height - 1, dx + width - 1] = True
    return present


def _pairs_by_offset(layout: Layout, present, queries, keys):
    """For pairs (queries, keys), whether their offset is in the table ``present``."""
    h, w = layout.height, layout.width
    return present[keys // w - queries // w + h - 1, keys % w - queries % w + w - 1]


def _clipped_counts(offsets, height, width):
    """Per token, how many of ``offsets`` land on the grid from it: the pairs a
    clipped stencil gives its row."""
    ys, xs = np.divmod(np.arange(height * width, dtype=np.int64), width)
    counts = np.zeros(height * width, dtype=np.int64)
    for a, b in offsets:
        counts += (ys + a >= 0) & (ys + a < height) & (xs + b >= 0) & (xs + b < width)
    return counts


def _matches(layout: Layout, offsets, keys=None, rows=None, lattice_stride=0) -> bool:
    """Whether the CSR rows outside ``rows`` are exactly the stencil's pairs:
    ``offsets`` clipped at the grid, the lattice of ``lattice_stride`` (0:
    none) and the extra ``keys``; False where the rule names a pair twice.
    Checked in C, row by row (the whole
    stencil in NumPy took 10 s for STRIDED at 224 x 224, O(offsets x N))."""
    def int32s(values):
        return None if values is None else np.ascontiguousarray(values, dtype=np.int32).reshape(-1)

    return C.stencil_matches(layout.indptr, layout.indices, layout.height, layout.width, int32s(offsets),
                             int32s(keys), int32s(rows), lattice_stride)


def stencil_of(layout: Layout):
    """The layout as the stencil kernels take it (one int32 array: E, G, L, the E
    offsets as (dy, dx), the G extra keys, the L listed rows, and for a window
    clamped to the grid a last word CLAMPED), or None when the layout is
    neither. Checked against the CSR rows."""
    described = _describe(layout)
    if described is None:
        return None
    offsets, keys, rows = described
    if offsets is None or not offsets or len(offsets) > MAX_OFFSETS or not _matches(layout, offsets, keys, rows):
        if layout.pattern is None and use_clamped_window:
            found = _clamped_window(layout)
            if found is not None:
                box, strides = found
                return _pack(box, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), clamped=True,
                             strides=strides)
        return None
    return _pack(offsets, keys, rows)


def class_positions(size: int, step: int):
    """Per coordinate of an axis of ``size`` tokens split into classes
    modulo ``step``: its class (residue), its position in the class, and
    the class's size, as int64 arrays."""
    coords = np.arange(size, dtype=np.int64)
    residue = coords % step
    return residue, coords // step, (size - residue + step - 1) // step


def stride_leaders(position, stride, class_size):
    """Per class position, the one whose window it takes: itself, or with a
    query stride the middle member of its run of ``stride`` (the right one
    of two; the class's last where the run is cut short)."""
    if stride == 1:
        return position
    return np.minimum(position - position % stride + stride // 2, class_size - 1)


def clamped_axis_keys(size: int, lo: int, box: int, step: int = 1, stride: int = 1):
    """Per coordinate of an axis of ``size`` tokens, the ``box`` keys a
    clamped window gives it on that axis, as a (size, box) int64 array: in
    its class of coordinates modulo ``step`` (a grid of its own, as the C
    kernel runs it), the box [leader + lo, leader + lo + box) moved back
    inside the class, the leader being the coordinate itself or, with a
    query ``stride``, the middle member of its run (see stride_leaders). Every
    class must hold ``box`` tokens."""
    residue, position, class_size = class_positions(size, step)
    start = np.clip(stride_leaders(position, stride, class_size) + lo, 0, class_size - box)
    return residue[:, None] + step * (start[:, None] + np.arange(box)[None, :])


# the window kernel's blocks of queries (rows, columns): a clamped window's
# query stride along an axis must divide the block's extent or be a multiple
# of it (C's sa_cpu_window_stride_fits; its binding refuses other strides)
WINDOW_BLOCK = (4, 2)


def _stride_fits(stride, block):
    return block % stride == 0 or stride % block == 0


def _axis_stride(observed, centre, lo_at_centre, box, step, size, block):
    """The smallest query stride that, with the box's top ``lo`` measured at
    the centre coordinate, gives every coordinate of the axis its observed
    window start (class positions), among those the window kernel's blocks
    take; None when none does."""
    _, position, class_size = class_positions(size, step)
    for stride in range(1, box + 1):
        if not _stride_fits(stride, block):
            continue
        leaders = stride_leaders(position, stride, class_size)
        lo = lo_at_centre - int(leaders[centre])
        predicted = np.clip(leaders + lo, 0, class_size - box)
        if np.array_equal(predicted, observed):
            return stride, lo
    return None


def _axis_step(offsets):
    """The divisor all of one axis's offsets share, as C takes it (1 where all are 0)."""
    step = int(np.gcd.reduce(np.abs(offsets))) if offsets.size else 0
    return step or 1


def _clamped_window(layout: Layout):
    """(offsets, query strides) of the box a custom layout is, clamped to the
    grid (every query attends the whole box, moved inward at the edges;
    NATTEN's neighbourhood attention), dilated or not, with or without query
    strides (its generalised form: runs of queries share one window), or
    None. The box's size is read off the centre query's keys, the strides
    and the box's place from every row's and column's first key; every row
    is then checked against the CSR the C kernel's rule gives (the steps the
    offsets share split the grid into classes of tokens, each clamped as a
    grid of its own)."""
    h, w, n = layout.height, layout.width, layout.num_tokens
    if layout.nnz == 0:
        return None
    centre_y, centre_x = h // 2, w // 2
    keys = layout.neighbors(centre_y * w + centre_x).astype(np.int64)
    if keys.size == 0 or layout.nnz != n * keys.size:
        return None
    dy, dx = keys // w - centre_y, keys % w - centre_x
    step_y, step_x = _axis_step(dy), _axis_step(dx)
    box_h, box_w = (int(dy.max()) - int(dy.min())) // step_y + 1, (int(dx.max()) - int(dx.min())) // step_x + 1
    if keys.size != box_h * box_w or box_h > h // step_y or box_w > w // step_x:
        return None  # not a whole box, or a class too short for it
    if not np.array_equal(layout.degrees(), np.full(n, keys.size)):
        return None
    # first keys of the centre column's and centre row's queries, as class positions
    first = layout.indices[layout.indptr[:-1]].astype(np.int64)
    rows_first = first[np.arange(h) * w + centre_x] // w // step_y
    cols_first = first[centre_y * w + np.arange(w)] % w // step_x
    found_y = _axis_stride(rows_first, centre_y, int(rows_first[centre_y]), box_h, step_y, h, WINDOW_BLOCK[0])
    found_x = _axis_stride(cols_first, centre_x, int(cols_first[centre_x]), box_w, step_x, w, WINDOW_BLOCK[1])
    if found_y is None or found_x is None:
        return None
    (stride_y, lo_y), (stride_x, lo_x) = found_y, found_x
    rows = clamped_axis_keys(h, lo_y, box_h, step_y, stride_y)
    cols = clamped_axis_keys(w, lo_x, box_w, step_x, stride_x)
    expected = (rows[:, None, :, None] * w + cols[None, :, None, :]).reshape(-1)
    if not np.array_equal(layout.indices, expected):
        return None
    offsets = [((lo_y + a) * step_y, (lo_x + b) * step_x) for a in range(box_h) for b in range(box_w)]
    return offsets, (stride_y, stride_x)


def is_clamped(stencil) -> bool:
    """Whether a packed stencil is a window clamped to the grid."""
    body = 3 + 2 * int(stencil[0]) + int(stencil[1]) + int(stencil[2])
    return len(stencil) > body and bool(int(stencil[body]) & CLAMPED)


def window_takes(stencil, head_dim: int) -> bool:
    """Whether the CPU window kernel runs this packed stencil (a CPU tensor or
    array from stencil_of) at this head dim: C's own rule (offsets within a
    13 x 13 box that they fill at least half of, head dims up to 256). Only
    the window backward gives the bias gradient (per batch and head), so the
    backward asks here first."""
    return C.cpu_window_takes(stencil, head_dim)


def sums_bias_grad(stencil) -> bool:
    """Whether the strip backward gives this packed stencil's bias gradient
    itself: offsets alone (no extra keys, no listed rows), whose pairs each
    take one cell of the bias table per offset; with use_strip_bias_backward.
    Never a clamped window, which the strips do not run."""
    return (use_strip_bias_backward and int(stencil[1]) == 0 and int(stencil[2]) == 0
            and not is_clamped(stencil))


# bit of a packed stencil's flags word (its last, where present): a window clamped to the grid
CLAMPED = 1
# bits 8-15 and 16-23 of the flags word: a clamped window's query strides (rows, columns) minus one
_STRIDE_SHIFTS = (8, 16)


def query_strides(stencil):
    """A packed stencil's query strides (rows, columns): (1, 1) but for a
    clamped window in NATTEN's generalised form."""
    body = 3 + 2 * int(stencil[0]) + int(stencil[1]) + int(stencil[2])
    flags = int(stencil[body]) if len(stencil) > body else 0
    return tuple(((flags >> shift) & 0xFF) + 1 for shift in _STRIDE_SHIFTS)


def _pack(offsets, keys, rows, clamped=False, strides=(1, 1)):
    word = CLAMPED | sum((stride - 1) << shift for stride, shift in zip(strides, _STRIDE_SHIFTS))
    flags = np.array([word] if clamped else [], dtype=np.int64)
    packed = np.concatenate([np.array([len(offsets), keys.size, rows.size], dtype=np.int64),
                             np.array(offsets, dtype=np.int64).reshape(-1), keys, rows, flags])
    packed = packed.astype(np.int32)
    packed.setflags(write=False)
    return packed


def lattice_split(layout: Layout):
    """STRIDED with its lattice apart: (the window's stencil without the lattice's
    offsets, the lattice's tile plan as (buffer, passes)), or None.

    On the stencil kernel the lattice's offsets cost far more per pair than the
    window's: they reach every lattice row of the key panels for every strip
    of queries (at 64 x 64, STRIDED ran at a quarter of its FLOP-bound speed
    where LONGFORMER's window ran at over a third). But tokens with the same
    position modulo the stride attend each other and nothing else of the
    lattice: dense blocks, which the tile kernels run at full fill. The window
    stays on the stencil kernel and the lattice's passes merge into its
    result. The CSR rows are checked against the window and the lattice
    first; the split is exact by construction (an offset is in the lattice or
    it is not)."""
    if layout.pattern is None:
        return _custom_split(layout)
    if layout.pattern is not SparsityPattern.STRIDED:
        return None
    h, w, n = layout.height, layout.width, layout.num_tokens
    kernel = int(layout.params.get("kernel_size", 7))
    stride = int(layout.params.get("stride", kernel))
    classes = min(stride, h) * min(stride, w)
    if stride < 2 or n < MIN_CLASS_TOKENS * classes:
        return None
    window = [(a, b) for a, b in _window(kernel // 2, h, w) if a % stride or b % stride]
    if not window:
        return None
    # checked against this window and lattice, not as the whole stencil: past MAX_OFFSETS lattice
    # offsets (sides over 225 at stride 7) the whole is no stencil, but the split still is, and ran
    # 4.5x faster than the rows
    if not _matches(layout, window, lattice_stride=stride):
        return None
    empty = np.zeros(0, dtype=np.int64)
    buffer, passes = _tiles.build_lattice_plan(h, w, stride).packed()
    buffer.setflags(write=False)
    return _pack(window, empty, empty), buffer, [int(x) for x in passes]


def _custom_stencil_pays(layout: Layout) -> bool:
    plan = layout.cpu_tile_plan() if _tiles.use_tiled_cpu_kernel else None
    if use_window_kernel and window_takes(layout.stencil(), 64):  # the box rule; head dims alike
        return plan is None or plan.cpu_fill < CUSTOM_WINDOW_MAX_FILL
    if is_clamped(layout.stencil()):
        return False  # only the window kernel runs it; the rows would run it in C
    return plan is None or plan.cpu_fill < CUSTOM_STENCIL_MAX_FILL


def _custom_split(layout: Layout):
    """A custom layout that is a window the window kernel runs plus more
    pairs in some rows, as lattice_split's (stencil, plan buffer, passes):
    NATTEN's neighbourhood, a window shifted inward at the borders, holds the
    clipped window in every row and reaches further in the border rows. The
    window is the centre token's offsets; every row must hold all of them
    that land on the grid, and the rest of the pairs (at most
    CUSTOM_SPLIT_MAX_REST of them) take a tile plan of their own, which
    merges into the window's result as STRIDED's lattice does. None where
    that does not hold."""
    from .custom_layouts import layout_from_csr

    h, w, n = layout.height, layout.width, layout.num_tokens
    if layout.nnz == 0 or layout.stencil() is not None:
        return None
    centre = (h // 2) * w + w // 2
    keys = layout.neighbors(centre).astype(np.int64)
    if keys.size == 0:
        return None
    offsets = list(zip((keys // w - centre // w).tolist(), (keys % w - centre % w).tolist()))
    window = _pack(offsets, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if not window_takes(window, 64):  # the box rule; any head dim the kernel takes reads it alike
        return None
    queries, keys = layout.row_ids(), layout.indices.astype(np.int64)
    in_window = _pairs_by_offset(layout, _offset_table(offsets, h, w), queries, keys)
    if int((~in_window).sum()) > CUSTOM_SPLIT_MAX_REST * layout.nnz:
        return None
    # pairs are unique, so a row holding as many window pairs as land on the grid holds them all
    if not np.array_equal(np.bincount(queries[in_window], minlength=n), _clipped_counts(offsets, h, w)):
        return None
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(queries[~in_window], minlength=n), out=indptr[1:])
    plan = layout_from_csr(h, w, indptr, keys[~in_window], name=f"{layout.name}, past the window").cpu_tile_plan()
    if plan is None or plan.long_rows.size:
        return None
    buffer, passes = plan.packed()
    buffer.setflags(write=False)
    return window, buffer, [int(x) for x in passes]


def cpu_kernel_choice(layout: Layout, head_dim=None):
    """Which float32 CPU kernels take ``layout``: "split" (STRIDED's window on the
    stencil, its lattice on the tiles), "stencil", "tiles" or None (the row
    kernels). ``head_dim`` (None: unknown) says whether the rows would run on
    the gather kernels, which move the line between the tiles and the rows
    (_tiles.cpu_min_fill). The torch and NumPy paths both ask here, so both
    run the same kernels and give the same bits."""
    if use_stencil_cpu_kernel:
        if use_lattice_split and layout.stencil_split() is not None:
            return "split"
        if layout.stencil() is not None and (layout.pattern is not None or _custom_stencil_pays(layout)):
            return "stencil"
    # sparse chunks lose to the rows (statistics merge across passes on the CPU)
    if _tiles.use_tiled_cpu_kernel and _tiles.cpu_plan_pays(layout, head_dim):
        return "tiles"
    return None


def cpu_route_name(layout: Layout, head_dim=None) -> str:
    """cpu_kernel_choice in the words the benchmarks' tables use."""
    kind = cpu_kernel_choice(layout, head_dim) or "rows"
    if kind == "stencil" and is_clamped(layout.stencil()):
        return "window (clamped)"
    return {"split": "window + tiles", "stencil": "window"}.get(kind, kind)
