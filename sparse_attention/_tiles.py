"""Tile plans: a layout regrouped for the tensor-core CUDA forward kernel.

The kernel gives each thread block a tile of up to 64 queries that lie close
together on the grid (a patch, a row segment or a column segment). The keys
any of those queries attend are listed once per tile, 64 to a chunk, and a
64 x 64 bit mask per chunk says which query attends which key. The block then
computes a 64 x 64 score tile per chunk with tensor-core instructions and
throws away the masked entries.

Patterns with two kinds of neighbours (AXIAL: the query's row and its column)
waste most of such a tile: row segments share the row but not the columns.
The plan may therefore split the pairs into passes, each with its own tiling
(the same-row pairs in row segments, the rest in column segments); a later
pass merges its partial softmax into the earlier one through the log-sum-exp.
Every (query, key) pair of the layout lies in exactly one chunk of one pass,
except the pairs of "long" rows: a row with far more keys than the typical row
(LONGFORMER's global tokens attend everything) would keep its whole tile's
block busy while the others idle, so such rows are left out of the plan and
handled by the block-per-row kernel (``long_rows``).
"""

from __future__ import annotations

import numpy as np

from ._native import C

TILE = 64  # queries per tile and keys per chunk; fixed by the kernels
# The CPU forward over tile plans (float32, torch and NumPy alike); tests turn
# it off to compare it with the row-by-row kernel.
use_tiled_cpu_kernel = True
# On the CPU a masked-out slot of a chunk costs as much as a used one, so the
# tiled kernel only pays when the slots it computes are this full (its
# cpu_fill). Rows against tiles, float32, 12 heads, D=64, stencils off
# (benchmarks/NOTES.md, on the shared and on the CPU plans): tiles lost at
# cpu_fill 0.03-0.11 (1.1-5x slower), tied forward+backward around 0.14-0.15
# (forward 1.04-1.3x slower) and won forward+backward from 0.158 on (0.86x
# and less; RANDOM 50% at 14 x 14, cpu_fill 0.44: 0.37x).
CPU_MIN_FILL = 0.15
# Where the rows run on the gather kernels (float32, head dims up to 128, those
# that are not multiples of 8 on padded copies; csrc/attention_cpu_gather.c,
# attention_cpu.c), they are 2-3x faster and the
# tiles must fill this many times as much to win. Forward+backward, tiles /
# rows (12 heads, benchmarks/results/gather_rows/choice_*): RANDOM at
# cpu_fill 0.2 1.55-1.82, 0.3 1.09-1.31, 0.4 0.84-1.00 (D=16, 32), 0.5 0.71-0.82
# (D=16 to 64); BLOCK 5 x 5 at 0.42 0.74-0.92. D=128 (2 heads, 64 x 64,
# choice_d128): 0.2 1.59, 0.3 1.10, 0.45 0.76. Forward alone the tiles win only
# from about 0.5. A factor, not a second limit, so that tests moving
# CPU_MIN_FILL to 0 or inf still force the tiles or the rows.
GATHER_FILL_FACTOR = 2.6
# tile shapes (rows x columns of the grid) tried for every pass
_SHAPES = ((8, 8), (4, 16), (16, 4), (2, 32), (32, 2), (1, 64), (64, 1))
# The CPU kernels also try tiles of 36 to 64 tokens whose sides are not
# powers of two: a layout whose blocks are 7 x 7 (Swin's windows) or 12 x 12
# straddles every 8 x 8 tile, so each tile's queries reach up to four blocks'
# keys (BLOCK with block_size 7 at 56 x 56: a cpu_fill of 0.245 on 8 x 8
# tiles, 2.4x the time forward+backward of 7 x 7 ones). Such a shape is taken
# only where its estimate is well below the best of _SHAPES, since its rows
# are not the eight-token runs the bias tiles are filled fastest from.
_CPU_EXTRA_SHAPES = tuple((rows, cols) for rows in range(3, 17) for cols in range(3, 17)
                          if 36 <= rows * cols <= 64 and (rows, cols) not in _SHAPES)
_CPU_EXTRA_SHAPE_GAIN = 0.85
_CPU_EXTRA_CANDIDATES = 4  # the extra shapes with the best sampled estimates, then counted tile by tile
# plans of layouts with more pairs than this are not built: the C planner
# takes about a second per 100 M pairs, once per layout. A plan holds 12
# bytes a slot (a key and a mask word), and a chunk's 64 keys each belong to
# at least one pair, so a plan stays within about 12 bytes a pair.
MAX_PAIRS = 1 << 30
# a row is long when it has more keys than both of these
LONG_ROW_MIN_KEYS = 1024
LONG_ROW_FACTOR = 8  # times the median row
# a second pass costs about this many chunks per tile (the merge reads and
# rewrites the output)
_PASS_COST_PER_TILE = 0.5
# what a CPU tile costs beyond its slots (packing its queries, its row
# state), in chunks; a guess that keeps a tile of one query from looking free
_CPU_COST_PER_TILE = 0.02


class TilePlan:
    """The passes (TilePass) and the rows left to the block-per-row kernel."""

    def __init__(self, passes, long_rows, planned_pairs):
        self.passes = passes
        self.long_rows = long_rows  # int32, ascending
        self.planned_pairs = planned_pairs
        slots = sum(one.num_chunks for one in passes) * TILE * TILE
        self.fill = planned_pairs / slots if slots else 1.0  # used share of the chunks' slots
        self._cpu_fill = None

    @property
    def cpu_fill(self) -> float:
        """The used share of the slots the CPU kernels compute: they stop at a
        tile's last query and a chunk's last key (rounded up to 8), so small
        grids, whose tiles are mostly padding, fill more than ``fill`` says."""
        if self._cpu_fill is None:
            computed = 0
            for one in self.passes:
                rows = _slots_in_use(one.queries)
                cols = (_slots_in_use(one.keys) + 7) // 8 * 8
                ends = np.concatenate([[0], np.cumsum(cols, dtype=np.int64)])
                per_tile = ends[one.chunk_ptr[1:]] - ends[one.chunk_ptr[:-1]]
                computed += int(np.dot(rows.astype(np.int64), per_tile))
            self._cpu_fill = self.planned_pairs / computed if computed else 1.0
        return self._cpu_fill

    def __len__(self):
        return len(self.passes)

    def __iter__(self):
        return iter(self.passes)

    def __getitem__(self, index):
        return self.passes[index]

    def packed(self):
        """One int32 buffer holding every pass's arrays, and six numbers per pass
        (tiles, chunks, offsets of queries, chunk_ptr, keys, masks) as the C
        entry point takes them."""
        parts, fields, offset = [], [], 0
        for one in self.passes:
            numbers = [one.queries.shape[0], one.num_chunks]
            for array in (one.queries, one.chunk_ptr, one.keys, one.masks):
                flat = np.ascontiguousarray(array).reshape(-1).view(np.int32)
                if offset % 2:  # the masks are 64-bit words
                    parts.append(np.zeros(1, dtype=np.int32))
                    offset += 1
                numbers.append(offset)
                parts.append(flat)
                offset += flat.size
            fields.extend(numbers)
        return np.concatenate(parts), fields


    @property
    def num_slots(self) -> int:
        """Slots of all passes' chunks (64 x 64 each): the length of a (batch,
        head)'s plan-order score gradients."""
        return sum(one.num_chunks for one in self.passes) * TILE * TILE

    def score_buckets(self, width, max_relative):
        """(perm, ptr), int64: the plan's pairs grouped by relative position
        bucket, as Layout.bias_buckets groups the CSR entries, but naming each
        pair by its slot in the CUDA backward's plan-order score gradients
        (pass offset + (chunk x 64 + row) x 64 + column). Within a bucket the
        slots ascend, so the bias gradient sums in a fixed order."""
        m = int(max_relative)
        side = 2 * m + 1
        bucket_type = np.uint16 if side * side <= 1 << 16 else np.int32  # uint16 sorts by radix
        slots, buckets = [], []
        offset = 0
        for one in self.passes:
            step = max(1, (1 << 22) // (TILE * TILE))  # chunks at a time: bounded scratch
            for first in range(0, one.num_chunks, step):
                queries, keys, bits = one.chunk_pairs(first, step)
                # the flat index of a set bit is its slot: (chunk x 64 + row) x 64 + column
                at = np.flatnonzero(bits)
                buckets.append(slot_buckets(queries, keys, width, m).reshape(-1)[at].astype(bucket_type))
                slots.append(at + (offset + first * TILE * TILE))
            offset += one.num_chunks * TILE * TILE
        slots = np.concatenate(slots) if slots else np.zeros(0, dtype=np.int64)
        buckets = np.concatenate(buckets) if buckets else np.zeros(0, dtype=bucket_type)
        order = np.argsort(buckets, kind="stable")  # slots ascend already
        ptr = np.zeros(side * side + 1, dtype=np.int64)
        np.cumsum(np.bincount(buckets, minlength=side * side), out=ptr[1:])
        return slots[order].astype(np.int64), ptr


class TilePass:
    """One kernel launch: ``queries`` [tiles, 64] (-1 pads), ``chunk_ptr``
    [tiles + 1], ``keys`` [chunks, 64] (-1 pads), ``masks`` [chunks, 64]
    (bit c of word r: query r of the tile attends key c of the chunk)."""

    def __init__(self, shape, queries, chunk_ptr, keys, masks):
        self.shape = shape
        self.queries = queries
        self.chunk_ptr = chunk_ptr
        self.keys = keys
        self.masks = masks

    @property
    def num_chunks(self) -> int:
        return int(self.keys.shape[0])

    def chunk_pairs(self, first=0, count=None):
        """(queries, keys, bits) of chunks first .. first + count: each chunk's
        tile tokens and key tokens [c, 64] (int64, -1 pads) and its pairs as
        bool [c, 64, 64] (row, column), none on padding."""
        end = self.num_chunks if count is None else min(self.num_chunks, first + count)
        chunk_tile = np.repeat(np.arange(self.queries.shape[0]), np.diff(self.chunk_ptr))[first:end]
        queries = self.queries[chunk_tile].astype(np.int64)
        keys = self.keys[first:end].astype(np.int64)
        words = np.ascontiguousarray(self.masks[first:end]).view(np.uint8)
        bits = np.unpackbits(words, axis=-1, bitorder="little").reshape(-1, TILE, TILE).astype(bool)
        bits &= (queries >= 0)[:, :, None] & (keys >= 0)[:, None, :]
        return queries, keys, bits

    def pairs(self):
        """(query, key) of every set bit, for tests."""
        chunk_tile = np.repeat(np.arange(self.queries.shape[0]), np.diff(self.chunk_ptr))
        words = self.masks.view(np.uint64)
        bits = (words[:, :, None] >> np.arange(TILE, dtype=np.uint64)) & np.uint64(1)
        chunk, row, col = np.nonzero(bits)
        return self.queries[chunk_tile[chunk], row], self.keys[chunk, col]


def _slots_in_use(ids):
    """Per row of ``ids`` [r, 64] (-1 pads): 1 + its last slot that holds a
    token, 0 for none, as the CPU kernels count the rows and keys they compute."""
    present = np.asarray(ids) >= 0
    last = TILE - np.argmax(present[:, ::-1], axis=1)
    return np.where(present.any(axis=1), last, 0).astype(np.int64)


def slot_buckets(queries, keys, width, max_relative):
    """[c, 64, 64] int64: the relative position bias bucket (flat index into
    the (2M+1) x (2M+1) table, as Layout.bias_buckets) of every (row, column)
    slot of chunks with tile tokens and key tokens ``queries``, ``keys`` [c, 64];
    padding slots get some bucket, which their (unset) pair bits leave unread."""
    m = int(max_relative)
    queries, keys = np.maximum(queries, 0), np.maximum(keys, 0)
    dy = np.clip(queries[:, :, None] // width - keys[:, None, :] // width, -m, m) + m
    dx = np.clip(queries[:, :, None] % width - keys[:, None, :] % width, -m, m) + m
    return dy * (2 * m + 1) + dx


# the pairs a pass holds, as the C planner names them
PAIRS_ALL, PAIRS_SAME_ROW, PAIRS_OTHER_ROWS, PAIRS_SAME_COLUMN, PAIRS_OTHER_COLUMNS = range(5)


def _num_tiles(height, width, shape):
    return -(-height // shape[0]) * -(-width // shape[1])


def _long_rows(layout):
    degrees = layout.degrees()
    if degrees.size == 0:
        return np.zeros(0, dtype=np.int32)
    limit = max(LONG_ROW_MIN_KEYS, LONG_ROW_FACTOR * float(np.median(degrees)))
    return np.flatnonzero(degrees > limit).astype(np.int32)


def _csr(layout, shape, pairs, left_out):
    """The C planner's arguments for one tiling of ``layout``."""
    return (layout.indptr, layout.indices, layout.height, layout.width, shape[0], shape[1], pairs, left_out)


def _build_pass(layout, shape, pairs, left_out):
    """One pass: the C planner lists every tile's keys (ascending, 64 to a
    chunk) and sets the mask bits of the selected pairs."""
    args = _csr(layout, shape, pairs, left_out)
    sizes = C.plan_union_sizes(*args)
    chunks = -(-sizes // TILE)  # at most one per pair, so below 2**31 for MAX_PAIRS pairs
    chunk_ptr = np.zeros(sizes.size + 1, dtype=np.int32)
    np.cumsum(chunks, out=chunk_ptr[1:])
    queries, keys, masks = C.plan_fill(*args, chunk_ptr=chunk_ptr)
    return TilePass(shape, queries, chunk_ptr, keys, masks)


def _estimate_cost(layout, shape, pairs, left_out, for_cpu, samples=12):
    """(cost, merge cost) of a tiling of ``shape`` for the selected pairs,
    estimated from evenly spaced tiles (``samples`` None: all of them), in
    64 x 64 chunks. On the GPU a chunk
    costs the same however full, so the cost is the chunks, and a second
    pass's merge costs per tile. The CPU kernels compute only a tile's rows
    that hold a query and a chunk's columns up to its last key (rounded up to
    8), so there the cost is those slots (plus a little per tile), and a merge
    costs per query row: on a grid 14 wide, AXIAL's row pass as one image row
    a tile computes a quarter of the slots of four rows a tile."""
    num_tiles = _num_tiles(layout.height, layout.width, shape)
    if samples is None:  # every tile, each with its own number of queries
        picked = np.arange(num_tiles, dtype=np.int64)
    else:
        picked = np.unique(np.linspace(0, num_tiles - 1, min(samples, num_tiles)).astype(np.int64))
    sizes = C.plan_union_sizes(*_csr(layout, shape, pairs, left_out), tiles=picked).astype(np.int64)
    if not for_cpu:
        return (-(-sizes // TILE)).mean() * num_tiles, _PASS_COST_PER_TILE * num_tiles
    queries = _tile_queries(layout, shape, left_out, picked if samples is None else None)
    per_tile = (queries * _computed_columns(sizes)).mean() / (TILE * TILE) + _CPU_COST_PER_TILE
    return per_tile * num_tiles, _PASS_COST_PER_TILE * num_tiles * np.mean(queries) / TILE


def _tile_queries(layout, shape, left_out, tiles=None):
    """Queries per tile of ``shape`` in the plan: of each of ``tiles`` (tiles at
    the grid's far edges are cut short), or None: the mean; either scaled by
    the share of rows left in the plan."""
    kept = (layout.num_tokens - (0 if left_out is None else int(left_out.sum()))) / max(1, layout.num_tokens)
    if tiles is None:
        return layout.num_tokens * kept / _num_tiles(layout.height, layout.width, shape)
    across = -(-layout.width // shape[1])
    tile_rows = np.minimum(shape[0], layout.height - tiles // across * shape[0])
    tile_cols = np.minimum(shape[1], layout.width - tiles % across * shape[1])
    return tile_rows * tile_cols * kept


def _computed_columns(sizes):
    """The key columns the CPU kernels compute for tiles of ``sizes`` distinct
    keys: whole chunks, and the last one's keys rounded up to 8."""
    return sizes // TILE * TILE + -(-(sizes % TILE) // 8) * 8


def counted_cpu_fill(layout, passes):
    """The cpu_fill a plan of ``passes`` (choose_passes) would have, from every
    tile's count of distinct keys and its last query slot, without building
    it: the planner's first step alone (no keys, no masks)."""
    long_rows, left_out, planned = _planned_rows(layout, False)
    ys, xs = np.divmod(np.arange(layout.num_tokens, dtype=np.int64), layout.width)
    in_plan = np.ones(layout.num_tokens, dtype=bool)
    in_plan[long_rows] = False
    computed = 0
    for shape, pairs in passes:
        num_tiles = _num_tiles(layout.height, layout.width, shape)
        tile_of = (ys // shape[0] * -(-layout.width // shape[1]) + xs // shape[1])[in_plan]
        # as the planner places them: query (dy, dx) of a tile in slot dy x columns + dx, and the
        # kernels compute the rows up to the last slot that holds one
        slot = ((ys % shape[0]) * shape[1] + xs % shape[1])[in_plan]
        rows = np.zeros(num_tiles, dtype=np.int64)
        np.maximum.at(rows, tile_of, slot + 1)
        tiles = np.arange(num_tiles, dtype=np.int64)
        sizes = C.plan_union_sizes(*_csr(layout, shape, pairs, left_out), tiles=tiles).astype(np.int64)
        computed += int(np.dot(rows, _computed_columns(sizes)))
    return planned / computed if computed else 1.0


# Whether the CPU tile kernels take a layout is decided by its built plan's
# cpu_fill, but where the sampled estimate of the chosen passes is low a
# count of every tile's keys comes first, and a count this far short of
# CPU_MIN_FILL leaves the layout to the rows unplanned: RANDOM at 1% on
# 256 x 256 counts in 0.1 s a plan that takes 1.4 s to build (and 0.26 s to
# measure) only to be thrown away. The count is the built plan's cpu_fill
# (tests/test_tiles.py); the margin only spares a plan when floats round.
_COUNTED_FILL_MARGIN = 0.99
# sampled estimates from this multiple of CPU_MIN_FILL on build the plan uncounted
_SAMPLED_FILL_SURE = 2.0


def cpu_min_fill(layout, head_dim=None) -> float:
    """The cpu_fill from which the CPU tile kernels take ``layout`` in float32
    rather than the rows: CPU_MIN_FILL, times GATHER_FILL_FACTOR where the
    rows of ``head_dim`` (None: unknown) run on the gather kernels."""
    if head_dim is not None and C.gather_takes(int(head_dim), layout.num_tokens):
        return CPU_MIN_FILL * GATHER_FILL_FACTOR
    return CPU_MIN_FILL


def cpu_plan_pays(layout, head_dim=None) -> bool:
    """Whether the CPU tile kernels take ``layout``: its cpu_tile_plan() exists
    and fills at least cpu_min_fill() of the slots they compute. Not cached:
    tests and benchmarks move CPU_MIN_FILL."""
    min_fill = cpu_min_fill(layout, head_dim)
    passes, sampled = layout._cpu_choice()
    if passes is None:
        return False
    if not layout._is_built("cpu_plan") and sampled < _SAMPLED_FILL_SURE * min_fill:
        if layout.counted_cpu_fill() < _COUNTED_FILL_MARGIN * min_fill:
            return False
    plan = layout.cpu_tile_plan()
    return plan is not None and plan.cpu_fill >= min_fill


def _best_shape(layout, pairs, left_out, for_cpu, pair_count=None):
    """(shape, cost, merge cost) of the tile shape that costs least for the
    selected pairs: on the CPU, of _SHAPES and, for a pass of all pairs where
    one wins clearly, _CPU_EXTRA_SHAPES (a same-row or same-column pass has
    its natural shape among _SHAPES). Those are not tried where the shape hardly matters
    (all of _SHAPES within 10% of each other: keys far from the queries, as
    RANDOM's, whose planning they would slow five-fold) or where the best of
    _SHAPES is already so full, given the ``pair_count`` selected pairs, that
    none could win."""
    seen = set()

    def estimates(shapes, samples=12):
        found = []
        for shape in shapes:
            shape = (min(shape[0], layout.height), min(shape[1], layout.width))
            if shape in seen:
                continue
            seen.add(shape)
            found.append((shape, *_estimate_cost(layout, shape, pairs, left_out, for_cpu, samples)))
        return found

    standard = estimates(_SHAPES)
    best = min(standard, key=lambda found: found[1])
    if not for_cpu or pairs != PAIRS_ALL or max(found[1] for found in standard) < 1.1 * best[1]:
        return best
    if pair_count is not None and pair_count / (TILE * TILE) >= _CPU_EXTRA_SHAPE_GAIN * best[1]:
        return best
    # Sampled tiles of a shape that does not divide the grid over- or
    # under-count its cut-short edge tiles (a cross on a 32 x 32 grid took a
    # 3 x 14 plan filling 0.096 of its slots, for 0.299 on 8 x 8): the
    # samples pick a few candidates, and every tile is counted for those and
    # for the best standard shape they must beat (all 51 counted in full
    # took AXIAL's planning at 128 x 128 from 51 ms to 736)
    sampled = sorted(estimates(_CPU_EXTRA_SHAPES), key=lambda found: found[1])[:_CPU_EXTRA_CANDIDATES]
    counted = [(shape, *_estimate_cost(layout, shape, pairs, left_out, for_cpu, samples=None))
               for shape, _, _ in sampled]
    extra = min(counted, key=lambda found: found[1], default=None)
    exact = _estimate_cost(layout, best[0], pairs, left_out, for_cpu, samples=None)
    return extra if extra is not None and extra[1] < _CPU_EXTRA_SHAPE_GAIN * exact[0] else best


def _planned_rows(layout, keep_long_rows):
    """(long rows, left_out mask or None, pairs planned)."""
    n = layout.num_tokens
    long_rows = np.zeros(0, dtype=np.int32) if keep_long_rows else _long_rows(layout)
    left_out = None
    if long_rows.size:
        left_out = np.zeros(n, dtype=bool)
        left_out[long_rows] = True
    return long_rows, left_out, layout.nnz - int(layout.degrees()[long_rows].sum())


def choose_passes(layout, keep_long_rows=False, for_cpu=False, with_estimate=False):
    """The passes of the plan as [(shape, pairs)]: one tiling of every pair, or
    two (same row and other rows, or same column and other columns) where
    that costs less (see _estimate_cost); None when the layout is too large
    to plan (see MAX_PAIRS). With ``with_estimate``, (passes, estimated fill):
    the planned pairs over the slots of the sampled estimate (on the CPU, of
    the slots the kernels compute), which the per-tile and merge costs in the
    estimate put below the plan's; (None, 0.0) for no plan."""
    if layout.num_tokens == 0 or layout.nnz > MAX_PAIRS:
        return (None, 0.0) if with_estimate else None
    _, left_out, planned = _planned_rows(layout, keep_long_rows)
    shape, cost, _ = _best_shape(layout, PAIRS_ALL, left_out, for_cpu, planned)
    options = [(cost, [(shape, PAIRS_ALL)])]
    # a split can only win where one pass leaves chunks well short of full
    splits, counts = (), None
    whole_chunks = _estimate_cost(layout, shape, PAIRS_ALL, left_out, False)[0] if for_cpu else cost
    if whole_chunks * TILE * TILE > 1.25 * max(1, planned):
        splits = ((PAIRS_SAME_ROW, PAIRS_OTHER_ROWS), (PAIRS_SAME_COLUMN, PAIRS_OTHER_COLUMNS))
        # the GPU's and the CPU's choice count the same pairs (0.13 s each for RANDOM at 256 x 256)
        counts = layout._built_once(f"pair_counts_{keep_long_rows}", lambda layout: C.plan_pair_counts(
            layout.indptr, layout.indices, layout.height, layout.width, left_out=left_out))
    for first_pairs, second_pairs in splits:
        if counts[first_pairs] == 0 or counts[second_pairs] == 0:
            continue
        first = _best_shape(layout, first_pairs, left_out, for_cpu)
        second = _best_shape(layout, second_pairs, left_out, for_cpu)
        options.append((first[1] + second[1] + second[2], [(first[0], first_pairs), (second[0], second_pairs)]))
    cost, passes = min(options, key=lambda option: option[0])
    return (passes, planned / max(cost * TILE * TILE, 1.0)) if with_estimate else passes


def build_tile_plan(layout, keep_long_rows=False, passes=None):
    """``layout``'s TilePlan (of ``passes`` from choose_passes, by default the
    GPU's choice), or None when the layout is too large to plan (see
    MAX_PAIRS). With keep_long_rows the long rows stay in the plan, which then
    holds every pair: the CUDA tensor-core backward takes such a plan, where
    one block walking a long row's many chunks costs less than the row and
    column kernels doing the whole backward."""
    if passes is None:
        passes = choose_passes(layout, keep_long_rows)
    if passes is None:
        return None
    long_rows, left_out, planned = _planned_rows(layout, keep_long_rows)
    plan = [_build_pass(layout, shape, pairs, left_out) for shape, pairs in passes]
    return TilePlan(plan, long_rows, planned)


def build_lattice_plan(height, width, stride):
    """A one-pass TilePlan of the lattice pairs of STRIDED: query (y, x) and key
    (y', x') with y - y' and x - x' multiples of ``stride``. Tokens with the same
    (y mod stride, x mod stride) all attend each other and nothing else of the
    lattice, so each such residue class is a dense block: its tokens are the
    queries of its tiles and the keys of every one of its chunks, all mask bits
    set. Tiles and chunks hold up to 64 tokens; the last of a class holds the
    rest, and the CPU kernels compute only the slots that hold a token."""
    n = height * width
    ys, xs = np.divmod(np.arange(n, dtype=np.int64), width)
    residue = (ys % stride) * stride + xs % stride
    order = np.argsort(residue, kind="stable").astype(np.int32)  # ascending within a class
    counts = np.bincount(residue, minlength=stride * stride)
    tile_queries, chunk_keys, chunk_masks, chunks_per_tile = [], [], [], []
    start = 0
    for count in counts[counts > 0]:
        pieces = -(-int(count) // TILE)
        # the class's tokens, 64 to a row, the last row padded with -1: its tiles' queries, and the
        # keys of each of its tiles' chunks
        members = np.full(pieces * TILE, -1, dtype=np.int32)
        members[:count] = order[start:start + count]
        start += count
        members = members.reshape(pieces, TILE)
        present = members >= 0
        sizes = present.sum(axis=1)
        words = np.where(sizes < TILE, (np.uint64(1) << sizes.astype(np.uint64)) - np.uint64(1), ~np.uint64(0))
        tile_queries.append(members)
        chunk_keys.append(np.tile(members, (pieces, 1)))
        # [tile, chunk, slot]: every key of the chunk for each slot that holds a query
        chunk_masks.append(np.where(present[:, None, :], words[None, :, None], np.uint64(0)).reshape(-1, TILE))
        chunks_per_tile.extend([pieces] * pieces)
    chunk_ptr = np.zeros(len(chunks_per_tile) + 1, dtype=np.int32)
    np.cumsum(chunks_per_tile, out=chunk_ptr[1:])
    one = TilePass(None, np.concatenate(tile_queries), chunk_ptr, np.concatenate(chunk_keys),
                   np.concatenate(chunk_masks).view(np.int64))
    pairs = int((counts.astype(np.int64) ** 2).sum())
    return TilePlan([one], np.zeros(0, dtype=np.int32), pairs)
