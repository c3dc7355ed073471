"""Layouts of the user's own patterns.

Four ways in, from the most convenient to the most direct:

- ``layout_from_rule(rule, height, width)``: a function of grid coordinates,
  ``rule(yi, xi, yj, xj) -> bool array``, evaluated on NumPy integer arrays
  (the query's row and column as a column vector, the key's as a row vector)
  a block of query rows at a time, so no N x N array is ever held;
- ``layout_from_mask(mask, height, width)``: an N x N boolean mask (NumPy or
  torch), for small grids and for layouts that already exist as a mask;
- ``layout_from_csr(height, width, indptr, indices)``: the CSR itself;
- ``layout_from_mask_mod(mask_mod, height, width)``: a FlexAttention
  ``mask_mod(b, h, q_idx, kv_idx)`` over flat token indices, as it is;
- ``neighborhood_layout(height, width, kernel_size, dilation=1)``: NATTEN's
  neighbourhood attention, built straight into the CSR.

Layouts of one grid combine as sets of pairs (``a | b``, ``a & b``,
``a - b``: combine_layouts). ``CustomPattern(rule)`` wraps a rule so that
``EnhancedSparseAttention`` can build its layout for every map size it meets
(``sparsity_pattern=CustomPattern(rule)``), and pattern_from_spec reads
``module:name`` on the command lines.

Every path ends in C, which checks the CSR in full (offsets from 0 to nnz that
never decrease, keys in range and strictly ascending per row) and builds the
transpose. A custom layout runs on every kernel: the tile kernels plan it like
any other; one whose rows are the same offsets from every query, clipped at
the grid (a dilated or one-sided window), runs on the CPU stencil kernels;
NATTEN's neighbourhood (a whole box clamped to the grid) runs on the window
kernel as a clamped stencil; one that holds a window in every row and more
pairs in some runs the window there and the rest on the tiles (see
_stencil.py). Rows may be empty: such a query gets output 0, gradient 0 and
lse -inf, as a row that a key mask empties.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np

from ._native import C
from ._stencil import class_positions, stride_leaders
from .patterns import Layout, _as_int

# query rows of the grid evaluated per call of a rule: about this many pairs
_RULE_BLOCK_PAIRS = 1 << 22


def _grid(height, width):
    height = _as_int(height, "height")
    width = _as_int(width, "width")
    if height < 1:
        raise ValueError(f"height: expected >= 1, got {height}")
    if width < 1:
        raise ValueError(f"width: expected >= 1, got {width}")
    if height * width >= (1 << 31) - 1:
        raise ValueError(f"height, width: expected fewer than 2**31 - 1 tokens, got {height} x {width}")
    return height, width


def name_of(function) -> str:
    """The name a rule, mask_mod or builder goes by: its ``__name__`` (its
    function's, for a functools.partial), "custom" for a lambda or where it
    has none."""
    named = getattr(function, "func", function)
    name = getattr(named, "__name__", "custom")
    return "custom" if name == "<lambda>" else str(name)


def _name(name, default):
    name = default if name is None else name
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    return name


def layout_from_csr(height, width, indptr, indices, *, name="custom") -> Layout:
    """A layout from its CSR on a height x width grid (token t = y * width + x):
    ``indptr`` (N + 1 offsets, any integer dtype) and ``indices`` (the keys of
    every row, strictly ascending, any integer dtype). Raises ValueError naming
    the first bad row."""
    height, width = _grid(height, width)
    n = height * width
    arrays = []
    for label, array, dtype in (("indptr", indptr, np.int64), ("indices", indices, np.int32)):
        if hasattr(array, "detach"):  # a torch tensor
            array = array.detach().cpu().numpy()
        array = np.asarray(array)
        if array.ndim != 1:
            raise ValueError(f"{label}: expected a 1-D array, got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{label}: expected integers, got dtype {array.dtype}")
        if label == "indices" and array.size and (array.min() < 0 or array.max() >= n):
            raise ValueError(f"indices: keys must lie in [0, {n}) for a {height} x {width} grid, got "
                             f"[{array.min()}, {array.max()}]")
        arrays.append(np.ascontiguousarray(array, dtype=dtype))
    indptr, indices = arrays
    if indptr.shape != (n + 1,):
        raise ValueError(f"indptr: expected shape ({n + 1},) for a {height} x {width} grid, got {indptr.shape}")
    col_ptr, row_indices = C.layout_transpose(indptr, indices, n)
    return Layout(None, height, width, indptr, indices, col_ptr, row_indices, name=_name(name, "custom"))


_AXIS_NAMES = {1: "a 1-tuple", 2: "(rows, cols)", 3: "(depth, rows, cols)"}


def _axis_values(value, label, count=2):
    """One int >= 1 per axis, from an int or a tuple of ``count``."""
    values = (value,) * count if not isinstance(value, (tuple, list)) else tuple(value)
    if len(values) != count:
        raise ValueError(f"{label}: expected an int or {_AXIS_NAMES[count]}, got {value!r}")
    values = tuple(_as_int(x, label) for x in values)
    if min(values) < 1:
        raise ValueError(f"{label}: expected >= 1, got {value!r}")
    return values


def _neighborhood_axis(size, kernel, dilation, stride, causal):
    """Per coordinate of an axis of ``size`` tokens, its keys on that axis as
    a run: (first, count) int64 arrays, the keys being first, first +
    dilation, ... (its own residue class modulo ``dilation``, indexed within
    the class below).

    Not causal: the ``kernel`` keys centred on the query's stride group
    leader (the group's middle member, the right one of two; the class's
    last where the group is cut short), the window moved inward at the ends
    (with stride 1, _stencil.clamped_axis_keys's clamped window). Where a
    class holds fewer than ``kernel`` tokens, every class takes as many as
    the smallest holds, so that rows stay equal.

    Causal: the keys up to the query itself, reaching back ``kernel`` - 1
    before the group's last member (cut at the class's start)."""
    step = min(dilation, size)
    residue, index, class_size = class_positions(size, step)
    if causal:
        last = np.minimum(index - index % stride + stride - 1, class_size - 1)
        first = np.maximum(0, last - kernel + 1)
        count = index - first + 1
    else:
        count = np.full(size, min(kernel, int(class_size.min())), dtype=np.int64)
        first = np.clip(stride_leaders(index, stride, class_size) - kernel // 2, 0, class_size - count)
    return residue + step * first, count


def neighborhood_layout(height, width, kernel_size=7, *, dilation=1, stride=1, is_causal=False,
                        name=None) -> Layout:
    """NATTEN's neighbourhood attention: query (y, x) attends the kernel_size
    tokens of each axis nearest to it, a window moved inward at the grid's
    edges rather than cut off, so every query has the same number of keys
    (kernel_size[0] x kernel_size[1]; on an axis shorter than the kernel,
    all of it). With ``dilation`` d, tokens attend within their residue class
    modulo d (DiNAT): every d-th token, the window clamped in that class.
    With ``stride`` s (NATTEN's generalised neighbourhood attention), the
    queries of each run of s along an axis share one window, their middle
    member's (stride == kernel_size is blocked window attention);
    ``is_causal`` keeps, on that axis, the keys at or before the query,
    reaching back kernel_size - 1 from the last member of its stride group.
    ``kernel_size``, ``dilation``, ``stride`` and ``is_causal`` take a value
    or (rows, cols); an even kernel reaches one token further before the
    query than after it. The same keys as NATTEN's ``na2d`` with the same
    arguments (tested against it where it is installed).

    Built straight into the CSR (O(nnz)). Plain and dilated, it runs on the
    CPU window kernel as a clamped stencil up to a 13 x 13 kernel (dilated:
    each class of tokens as a grid of its own), unless it covers so much of
    a small grid that the tiles run it faster (_stencil.CUSTOM_WINDOW_MAX_FILL);
    with query strides of 2, 4 or 8 (those that divide the window kernel's
    4 x 2 blocks of queries or are multiples of them) it runs there too;
    causal with stride 1 it is a clipped stencil; other strides go where
    their tile plans send them, as any custom layout."""
    height, width = _grid(height, width)
    settings = _neighborhood_settings(2, kernel_size, dilation, stride, is_causal)
    indptr, indices = _neighborhood_csr((height, width), *settings)
    return layout_from_csr(height, width, indptr, indices, name=_name(name, _neighborhood_name(*settings)))


def neighborhood_layout_3d(depth, height, width, kernel_size=7, *, dilation=1, stride=1, is_causal=False,
                           name=None) -> Layout:
    """NATTEN's 3-D neighbourhood attention (``na3d``: video, volumes) over a
    depth x height x width map, the rule of :func:`neighborhood_layout` on
    each of the three axes; ``kernel_size``, ``dilation``, ``stride`` and
    ``is_causal`` take a value or (depth, rows, cols). The layout lies on the
    (depth x height) x width grid, whose token order (z x height + y) x width
    + x is that of a ``[D, H, W]`` map flattened, so the op takes it for
    ``[B, heads, D*H*W, head_dim]`` tensors as they are; a relative position
    bias given with it is indexed on that flat grid, not by (dz, dy, dx).
    It runs on the tile kernels (the window kernels know 2-D windows only)."""
    depth = _as_int(depth, "depth")
    if depth < 1:
        raise ValueError(f"depth: expected >= 1, got {depth}")
    height, width = _grid(height, width)
    flat_height, width = _grid(depth * height, width)
    settings = _neighborhood_settings(3, kernel_size, dilation, stride, is_causal)
    indptr, indices = _neighborhood_csr((depth, height, width), *settings)
    return layout_from_csr(flat_height, width, indptr, indices, name=_name(name, _neighborhood_name(*settings)))


def _neighborhood_settings(count, kernel_size, dilation, stride, is_causal):
    """(kernel, dilation, stride, causal) per axis, checked."""
    kernel = _axis_values(kernel_size, "kernel_size", count)
    dilation = _axis_values(dilation, "dilation", count)
    stride = _axis_values(stride, "stride", count)
    causal = _axis_flags(is_causal, "is_causal", count)
    if any(s > k for s, k in zip(stride, kernel)):
        raise ValueError(f"stride: expected <= kernel_size on each axis (NATTEN's rule), got stride "
                         f"{stride} for kernel_size {kernel}")
    return kernel, dilation, stride, causal


def _neighborhood_name(kernel, dilation, stride, causal):
    name = "neighborhood " + "x".join(map(str, kernel))
    plain = (1,) * len(kernel)
    for label, value in (("dilated", dilation), ("stride", stride)):
        if value != plain:
            name += f" {label} " + "x".join(map(str, value))
    if any(causal):
        name += " causal " + "x".join("yes" if c else "no" for c in causal)
    return name


def _neighborhood_csr(shape, kernel, dilation, stride, causal):
    """The CSR of a neighbourhood on a map of ``shape`` (any number of axes,
    tokens in row-major order): every query's keys are the product of its
    runs on each axis (_neighborhood_axis). O(nnz)."""
    runs = [_neighborhood_axis(*args) for args in zip(shape, kernel, dilation, stride, causal)]
    num_tokens = int(np.prod(shape))
    coords = np.unravel_index(np.arange(num_tokens, dtype=np.int64), shape)
    counts = np.ones(num_tokens, dtype=np.int64)
    for (_, count), coord in zip(runs, coords):
        counts *= count[coord]
    indptr = np.zeros(num_tokens + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    query = np.repeat(np.arange(num_tokens, dtype=np.int64), counts)
    # the key's place in its query's row, read as mixed-radix digits, last axis fastest: keys ascend along
    # each axis, so row-major products ascend within every row
    local = np.arange(indptr[-1], dtype=np.int64) - indptr[query]
    indices = np.zeros_like(local)
    place = 1
    for axis in reversed(range(len(shape))):
        first, count = runs[axis]
        coord = coords[axis][query]
        radix = count[coord]
        indices += (first[coord] + dilation[axis] * (local % radix)) * place
        local //= radix
        place *= shape[axis]
    return indptr, indices


def _axis_flags(value, label, count=2):
    """One bool per axis, from a bool or a tuple of ``count`` bools."""
    values = (value,) * count if not isinstance(value, (tuple, list)) else tuple(value)
    if len(values) != count or not all(isinstance(x, (bool, np.bool_)) for x in values):
        raise ValueError(f"{label}: expected a bool or {_AXIS_NAMES[count]} of bools, got {value!r}")
    return tuple(bool(x) for x in values)


def layout_from_mask(mask, height, width, *, name="custom") -> Layout:
    """A layout from an N x N boolean mask (N = height * width; NumPy array or
    torch tensor), True where query i may attend key j. O(N^2) to read: for
    small grids, and for layouts that exist as masks already."""
    height, width = _grid(height, width)
    n = height * width
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask: expected a bool array, got dtype {mask.dtype}")
    if mask.shape != (n, n):
        raise ValueError(f"mask: expected shape ({n}, {n}) for a {height} x {width} grid, got {mask.shape}")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(mask.sum(axis=1), out=indptr[1:])
    indices = np.nonzero(mask)[1]  # row-major: ascending within each row
    return layout_from_csr(height, width, indptr, indices, name=name)


def _max_offset(value, height, width):
    """(rows, columns) of a rule's reach, clipped to the grid, or None."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        rows, cols = (_as_int(v, "max_offset") for v in pair)
    except (TypeError, ValueError):
        raise TypeError(f"max_offset: expected an int or a pair of ints (rows, columns), got {value!r}") from None
    if rows < 0 or cols < 0:
        raise ValueError(f"max_offset: expected offsets >= 0, got {value!r}")
    return min(rows, height - 1), min(cols, width - 1)


def _checked(allowed, shape):
    allowed = np.asarray(allowed.detach().cpu().numpy() if hasattr(allowed, "detach") else allowed)
    if allowed.dtype != np.bool_:
        raise TypeError(f"rule: expected it to return a bool array, got dtype {allowed.dtype} "
                        f"(compare, and combine with & and |)")
    try:
        return np.broadcast_to(allowed, shape)
    except ValueError:
        raise ValueError(f"rule: expected a result that broadcasts to {shape} (query rows, keys), "
                         f"got shape {allowed.shape}") from None


def layout_from_rule(rule, height, width, *, name=None, max_offset=None) -> Layout:
    """A layout from ``rule(yi, xi, yj, xj)``: called with int64 arrays, the
    query's row and column of shape [r, 1] and the keys' (of shape [1, N], or
    [r, K] with ``max_offset``), it returns a bool array that broadcasts to
    their shape, True where the query may attend the key. It is called on
    blocks of query rows (about 4 M pairs a call), so it must be elementwise.
    ``name`` defaults to the rule's ``__name__`` (``"custom"`` for a lambda).

    ``max_offset`` (an int, or (rows, columns)) promises that the rule is
    False for keys more than that many image rows or columns from the query:
    only the keys of that box around each query are asked about, so a local
    pattern costs O(N x box) instead of O(N^2) to build (the dilated window
    below at 128 x 128: 0.1 s instead of 4.7 s). Keys outside the box are
    left out whatever the rule would say.

    Example, a 7 x 7 window dilated by 2 (every other row and column)::

        def dilated(yi, xi, yj, xj):
            dy, dx = yi - yj, xi - xj
            return (abs(dy) <= 6) & (abs(dx) <= 6) & (dy % 2 == 0) & (dx % 2 == 0)

        layout = layout_from_rule(dilated, 128, 128, max_offset=6)
    """
    if not callable(rule):
        raise TypeError(f"rule: expected a callable rule(yi, xi, yj, xj), got {type(rule).__name__}")
    height, width = _grid(height, width)
    name = _name(name, name_of(rule))
    reach = _max_offset(max_offset, height, width)
    n = height * width
    tokens = np.arange(n, dtype=np.int64)
    if reach is None:
        key_y, key_x = (tokens // width)[None, :], (tokens % width)[None, :]
        box = n
    else:
        # the box's offsets row by row: for each query its keys come out ascending
        dy, dx = np.meshgrid(np.arange(-reach[0], reach[0] + 1), np.arange(-reach[1], reach[1] + 1),
                             indexing="ij")
        dy, dx = dy.reshape(1, -1), dx.reshape(1, -1)
        box = dy.size
    step = max(1, _RULE_BLOCK_PAIRS // box)
    counts = np.zeros(n, dtype=np.int64)
    pieces = []
    for start in range(0, n, step):
        rows = tokens[start:start + step, None]
        query_y, query_x = rows // width, rows % width
        if reach is None:
            allowed = _checked(rule(query_y, query_x, key_y, key_x), (rows.shape[0], n))
            keys = None
        else:
            ys, xs = query_y + dy, query_x + dx
            on_grid = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
            ys, xs = np.where(on_grid, ys, query_y), np.where(on_grid, xs, query_x)  # the rule sees grid tokens
            allowed = _checked(rule(query_y, query_x, ys, xs), (rows.shape[0], box)) & on_grid
            keys = ys * width + xs
        counts[start:start + rows.shape[0]] = allowed.sum(axis=1)
        if keys is None:
            pieces.append(np.nonzero(allowed)[1].astype(np.int32))
        else:
            pieces.append(keys[allowed].astype(np.int32))  # row-major: per row, ascending
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return layout_from_csr(height, width, indptr, np.concatenate(pieces), name=name)


def layout_from_mask_mod(mask_mod, height, width, *, name=None, max_offset=None) -> Layout:
    """A layout from a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``: the
    same function, over flat token indices (t = y * width + x), gives the
    same pairs here. It is called with torch int64 tensors that broadcast
    (queries [r, 1], keys [1, N], or [r, K] with ``max_offset``; see
    layout_from_rule) and b = h = 0: a layout is shared by every batch and
    head, so a mask that depends on them has no layout. Needs torch."""
    import torch

    if not callable(mask_mod):
        raise TypeError(f"mask_mod: expected a callable mask_mod(b, h, q_idx, kv_idx), "
                        f"got {type(mask_mod).__name__}")
    width_ = _grid(height, width)[1]
    zero = torch.zeros((), dtype=torch.int64)

    def rule(yi, xi, yj, xj):
        queries = torch.from_numpy(np.ascontiguousarray(yi * width_ + xi))
        keys = torch.from_numpy(np.ascontiguousarray(yj * width_ + xj))
        allowed = mask_mod(zero, zero, queries, keys)
        if not isinstance(allowed, torch.Tensor):
            raise TypeError(f"mask_mod: expected it to return a bool tensor, got {type(allowed).__name__}")
        return allowed

    return layout_from_rule(rule, height, width, name=_name(name, name_of(mask_mod)), max_offset=max_offset)


def _pair_codes(layout):
    """Every pair of ``layout`` as query * N + key, ascending (CSR order)."""
    return layout.row_ids() * layout.num_tokens + layout.indices


def combine_layouts(first, second, how) -> Layout:
    """The pairs of two layouts of one grid, combined: ``how`` is "union",
    "intersection" or "difference" (``first | second``, ``first & second``,
    ``first - second`` on Layout objects). The result is a custom layout
    named after both."""
    if not isinstance(first, Layout) or not isinstance(second, Layout):
        raise TypeError(f"combine_layouts: expected two Layouts, got {type(first).__name__} and "
                        f"{type(second).__name__}")
    if (first.height, first.width) != (second.height, second.width):
        raise ValueError(f"combine_layouts: the layouts cover different grids, {first.height} x {first.width} "
                         f"and {second.height} x {second.width}")
    # both code lists are sorted and unique (CSR order, keys strictly rising); each result is too
    operations = {"union": (np.union1d, "|"),
                  "intersection": (lambda a, b: np.intersect1d(a, b, assume_unique=True), "&"),
                  "difference": (lambda a, b: np.setdiff1d(a, b, assume_unique=True), "-")}
    if how not in operations:
        raise ValueError(f"how: expected one of {sorted(operations)}, got {how!r}")
    combine, symbol = operations[how]
    n = first.num_tokens
    codes = combine(_pair_codes(first), _pair_codes(second))
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(codes // n, minlength=n), out=indptr[1:])
    return layout_from_csr(first.height, first.width, indptr, codes % n,
                           name=f"({first.name} {symbol} {second.name})")


class CustomPattern:
    """A rule (see layout_from_rule; ``max_offset`` as there) as a pattern:
    ``pattern(height, width)`` builds its layout for that grid once and keeps it. Give it to
    ``EnhancedSparseAttention(..., sparsity_pattern=CustomPattern(rule))``.
    A module that holds one pickles when the rule does (a function defined at
    the top level of a module, not a lambda)."""

    def __init__(self, rule, name=None, max_offset=None):
        if not callable(rule):
            raise TypeError(f"rule: expected a callable rule(yi, xi, yj, xj), got {type(rule).__name__}")
        self.rule = rule
        self.name = _name(name, name_of(rule))
        _max_offset(max_offset, 1, 1)  # checked now, not at the first map
        self.max_offset = max_offset
        self._layouts = {}

    def __call__(self, height, width) -> Layout:
        key = (_as_int(height, "height"), _as_int(width, "width"))
        layout = self._layouts.get(key)
        if layout is None:
            layout = layout_from_rule(self.rule, *key, name=self.name, max_offset=self.max_offset)
            self._layouts[key] = layout
        return layout

    # the built layouts are a cache: cheaper to rebuild than to store
    def __getstate__(self):
        return {"rule": self.rule, "name": self.name, "max_offset": self.max_offset}

    def __setstate__(self, state):
        self.__init__(state["rule"], state["name"], state.get("max_offset"))

    def __repr__(self):
        return f"CustomPattern({self.name})"


class _NamedBuilder:
    """A builder (height, width) -> Layout named on a command line, with the
    ``name`` the command lines print."""

    def __init__(self, builder):
        self.builder = builder
        self.name = name_of(builder)

    def __call__(self, height, width) -> Layout:
        return self.builder(height, width)


def pattern_from_spec(spec, argument="--patterns"):
    """A pattern named on a command line (``demo``, ``bench``): a built-in
    name, or ``module:name`` for a pattern of one's own, importable from the
    current directory: a CustomPattern, a rule (yi, xi, yj, xj) (made a
    CustomPattern) or a builder (height, width) -> Layout. The result has a
    ``name``; layout_of() gives its layout for a grid."""
    from .patterns import SparsityPattern

    if ":" not in spec:
        return SparsityPattern.parse(spec, argument)
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{argument}: cannot import {module_name!r} (for {spec!r}): {error}") from None
    target = getattr(module, attribute, None)
    if target is None:
        raise ValueError(f"{argument}: module {module_name!r} has no {attribute!r} (for {spec!r})")
    if isinstance(target, CustomPattern):
        return target
    if not callable(target):
        raise TypeError(f"{argument}: {spec!r} is a {type(target).__name__}, expected a rule, a builder "
                        f"or a CustomPattern")
    required = [p for p in inspect.signature(target).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) == 4:
        return CustomPattern(target)
    if len(required) == 2:
        return _NamedBuilder(target)
    raise TypeError(f"{argument}: {spec!r} takes {len(required)} arguments; expected a rule (yi, xi, yj, xj) "
                    f"or a builder (height, width)")


def layout_of(pattern, height, width) -> Layout:
    """The layout of a built-in pattern (its default knobs) or of a pattern of
    one's own (a callable (height, width) -> Layout) on a grid."""
    from .patterns import SparsityPattern, build_layout

    if isinstance(pattern, SparsityPattern):
        return build_layout(pattern, height, width)
    return pattern(height, width)
