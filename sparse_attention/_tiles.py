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
Every (query, key) pair of the layout lies in exactly one chunk of one pass.
"""

from __future__ import annotations

import numpy as np

TILE = 64  # queries per tile and keys per chunk; fixed by the kernel
# tile shapes (rows x columns of the grid) tried for every pass
_SHAPES = ((8, 8), (4, 16), (16, 4), (2, 32), (32, 2), (1, 64), (64, 1))
# plans whose presence matrix (tiles x tokens) would exceed this are not built
MAX_PRESENCE = 1 << 27
# nor plans of layouts with more pairs than this (planning time grows with them)
MAX_PAIRS = 1 << 24
# a second pass costs about this many chunks per tile (the merge reads and
# rewrites the output)
_PASS_COST_PER_TILE = 0.5


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

    def pairs(self):
        """(query, key) of every set bit, for tests."""
        chunk_tile = np.repeat(np.arange(self.queries.shape[0]), np.diff(self.chunk_ptr))
        words = self.masks.view(np.uint64)
        bits = (words[:, :, None] >> np.arange(TILE, dtype=np.uint64)) & np.uint64(1)
        chunk, row, col = np.nonzero(bits)
        return self.queries[chunk_tile[chunk], row], self.keys[chunk, col]


def _tile_ids(height, width, shape):
    """Tile and slot of every token for tiles of ``shape``, and the tiles' queries."""
    th, tw = min(shape[0], height), min(shape[1], width)
    ys, xs = np.divmod(np.arange(height * width, dtype=np.int64), width)
    tiles_x = -(-width // tw)
    tile = (ys // th) * tiles_x + xs // tw
    slot = (ys % th) * tw + xs % tw
    num_tiles = int(tile.max()) + 1 if tile.size else 0
    queries = np.full((num_tiles, TILE), -1, dtype=np.int32)
    queries[tile, slot] = np.arange(height * width, dtype=np.int32)
    return tile, slot, queries


def _presence(tile, rows, cols, num_tiles, num_tokens):
    presence = np.zeros((num_tiles, num_tokens), dtype=bool)
    presence[tile[rows], cols] = True
    return presence


def _build_pass(height, width, shape, rows, cols):
    n = height * width
    tile, slot, queries = _tile_ids(height, width, shape)
    num_tiles = queries.shape[0]
    presence = _presence(tile, rows, cols, num_tiles, n)
    counts = presence.sum(axis=1)
    chunk_ptr = np.zeros(num_tiles + 1, dtype=np.int32)
    np.cumsum(-(-counts // TILE), out=chunk_ptr[1:])
    num_chunks = int(chunk_ptr[-1])
    # rank of each key in its tile's ascending union
    rank = np.cumsum(presence, axis=1, dtype=np.int32) - 1
    del presence
    keys = np.full((num_chunks, TILE), -1, dtype=np.int32)
    pt = tile[rows]
    pr = rank[pt, cols]
    owner = chunk_ptr[pt].astype(np.int64) + pr // TILE
    keys[owner, pr % TILE] = cols
    # Pairs come row by row with ascending keys, so those sharing a mask word
    # (same query, same chunk) are consecutive: OR each run of bits at once.
    masks = np.zeros(num_chunks * TILE, dtype=np.uint64)
    if rows.size:
        word = owner * TILE + slot[rows]
        bits = np.left_shift(np.uint64(1), (pr % TILE).astype(np.uint64))
        starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
        masks[word[starts]] = np.bitwise_or.reduceat(bits, starts)
    return TilePass(shape, queries, chunk_ptr, keys, masks.view(np.int64).reshape(num_chunks, TILE))


def _pairs_of_rows(indptr, queries):
    """CSR positions of the pairs of ``queries``, row by row."""
    starts, lengths = indptr[queries], indptr[queries + 1] - indptr[queries]
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(int(lengths.sum()), dtype=np.int64)


def _estimate_chunks(layout, shape, selected, samples=32):
    """Chunks a tiling of ``shape`` needs for the selected pairs, estimated
    from evenly spaced tiles."""
    height, width = layout.height, layout.width
    _, _, queries = _tile_ids(height, width, shape)
    num_tiles = queries.shape[0]
    picked = np.unique(np.linspace(0, num_tiles - 1, min(samples, num_tiles)).astype(np.int64))
    members = queries[picked]
    which = np.repeat(np.arange(picked.size), (members >= 0).sum(axis=1))
    rows = members[members >= 0].astype(np.int64)
    positions = _pairs_of_rows(layout.indptr, rows)
    sample_of_pair = np.repeat(which, np.diff(layout.indptr)[rows])
    if selected is not None:
        keep = selected[positions]
        positions, sample_of_pair = positions[keep], sample_of_pair[keep]
    presence = np.zeros((picked.size, height * width), dtype=bool)
    presence[sample_of_pair, layout.indices[positions]] = True
    per_tile = (-(-presence.sum(axis=1) // TILE)).mean()
    return per_tile * num_tiles, num_tiles


def _best_shape(layout, selected):
    """The tile shape with the fewest (estimated) chunks for the selected pairs."""
    best = None
    seen = set()
    for shape in _SHAPES:
        shape = (min(shape[0], layout.height), min(shape[1], layout.width))
        if shape in seen:
            continue
        seen.add(shape)
        chunks, tiles = _estimate_chunks(layout, shape, selected)
        if best is None or chunks < best[1]:
            best = (shape, chunks, tiles)
    return best


def build_tile_plan(layout):
    """The passes of ``layout``'s tile plan (a list of TilePass), or None when
    the layout is too large to plan (see MAX_PRESENCE and MAX_PAIRS)."""
    n = layout.num_tokens
    height, width = layout.height, layout.width
    if n == 0 or -(-n // TILE) * n > MAX_PRESENCE or layout.nnz > MAX_PAIRS:
        return None
    rows = layout.row_ids()
    cols = layout.indices.astype(np.int64)
    shape, chunks, _ = _best_shape(layout, None)
    options = [(chunks, [(shape, None)])]
    for same in (rows // width == cols // width, rows % width == cols % width):
        if same.all() or not same.any():
            continue
        first = _best_shape(layout, same)
        second = _best_shape(layout, ~same)
        cost = first[1] + second[1] + _PASS_COST_PER_TILE * second[2]
        options.append((cost, [(first[0], same), (second[0], ~same)]))
    _, passes = min(options, key=lambda option: option[0])
    plan = []
    for shape, selection in passes:
        if selection is None:
            plan.append(_build_pass(height, width, shape, rows, cols))
        else:
            plan.append(_build_pass(height, width, shape, rows[selection], cols[selection]))
    return plan
