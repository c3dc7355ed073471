"""Pictures: what a layout allows and what a module's heads actually attend."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .patterns import Layout, SparsityPattern, build_layout


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline") \
            and not _has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has_display():
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def default_query_points(height: int, width: int):
    """Centre, top-left corner, and the middle of the top edge, as (y, x)."""
    points = [(height // 2, width // 2), (0, 0), (0, width // 2)]
    unique = []
    for p in points:
        if p not in unique:
            unique.append(p)
    return unique


def _check_points(points, height, width):
    checked = []
    for p in points:
        if len(p) != 2:
            raise ValueError(f"query_points: expected (y, x) pairs, got {p!r}")
        y, x = int(p[0]), int(p[1])
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(f"query_points: ({y}, {x}) lies outside the {height} x {width} map")
        checked.append((y, x))
    return checked


def draw_layout(layout: Layout, query_points=None, ax=None, title: Optional[str] = None):
    """Draw which keys the chosen query pixels may attend, on the H x W grid.

    Each query gets its own colour; the query pixel itself is marked with a
    cross. Returns the matplotlib Figure.
    """
    plt = _pyplot()
    points = _check_points(query_points or default_query_points(layout.height, layout.width),
                           layout.height, layout.width)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4, 4 * layout.height / max(layout.width, 1) + 0.4))
    else:
        fig = ax.figure
    image = np.ones((layout.height, layout.width, 3))
    colours = plt.get_cmap("tab10")
    for index, (y, x) in enumerate(points):
        keys = layout.neighbors(y * layout.width + x)
        colour = np.array(colours(index % 10)[:3])
        ys, xs = np.divmod(keys, layout.width)
        image[ys, xs] = 0.35 * image[ys, xs] + 0.65 * colour
    ax.imshow(image, interpolation="nearest")
    for index, (y, x) in enumerate(points):
        ax.plot([x], [y], marker="x", color="black", markersize=6)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{layout.name}: density {layout.density:.3f}", fontsize=9)
    return fig


def draw_patterns(height=24, width=24, patterns: Optional[Sequence] = None, save_path=None, **knobs):
    """One panel per pattern (the README's pictures): built-in patterns (a
    name or a SparsityPattern, built with ``knobs``) and patterns of one's
    own (a CustomPattern or a builder (height, width) -> Layout, such as
    ``functools.partial(neighborhood_layout, kernel_size=7)``); by default
    the five built-in ones. Returns the Figure."""
    from .custom_layouts import layout_of

    plt = _pyplot()
    patterns = [SparsityPattern.parse(p, "patterns") if isinstance(p, (str, SparsityPattern)) else p
                for p in (patterns or [p for p in SparsityPattern if p is not SparsityPattern.DENSE])]
    fig, axes = plt.subplots(1, len(patterns), figsize=(3.2 * len(patterns), 3.6))
    axes = np.atleast_1d(axes)
    for ax, pattern in zip(axes, patterns):
        if isinstance(pattern, SparsityPattern):
            layout = build_layout(pattern, height, width, **knobs)
        else:
            layout = layout_of(pattern, height, width)
        draw_layout(layout, ax=ax)
    fig.tight_layout()
    if save_path:
        fig.savefig(save_path, dpi=110)
    return fig


def visualize_attention_patterns(module, input_tensor, query_points=None, heads=None, save_path=None):
    """Layout and actual attention weights of a few query pixels, per head.

    Args:
        module: an :class:`~sparse_attention.EnhancedSparseAttention`.
        input_tensor: ``[B, C, H, W]``; the first batch element is drawn.
        query_points: (y, x) pixels; default centre, a corner and an edge.
        heads: head indices to draw (default: up to the first 4).
        save_path: write a PNG there as well.

    Returns:
        matplotlib Figure: row 0 shows the layout of every query point; each
        further row one head, with the weights p_ij the chosen queries gave
        (exact, from the kernel's log-sum-exp; no N x N matrix is formed).
    """
    import torch

    plt = _pyplot()
    if not hasattr(module, "attention_weights"):
        raise TypeError(f"module: expected an EnhancedSparseAttention, got {type(module).__name__}")
    if not isinstance(input_tensor, torch.Tensor) or input_tensor.dim() != 4:
        raise ValueError("input_tensor: expected a [B, C, H, W] tensor, got "
                         f"{getattr(input_tensor, 'shape', type(input_tensor).__name__)}")
    height, width = input_tensor.shape[-2:]
    points = _check_points(query_points or default_query_points(height, width), height, width)
    heads = list(range(min(module.num_heads, 4))) if heads is None else list(heads)
    for h in heads:
        if not 0 <= int(h) < module.num_heads:
            raise ValueError(f"heads: head {h} outside [0, {module.num_heads})")
    layout = module.layout_for(height, width)
    tokens = [y * width + x for y, x in points]
    was_training = module.training
    module.eval()
    try:
        weights = module.attention_weights(input_tensor[:1], tokens)
    finally:
        module.train(was_training)
    stats = module.get_attention_stats()
    fig, axes = plt.subplots(len(heads) + 1, len(points),
                             figsize=(2.8 * len(points), 2.8 * (len(heads) + 1)), squeeze=False)
    for col, (y, x) in enumerate(points):
        draw_layout(layout, [(y, x)], ax=axes[0, col], title=f"layout of ({y}, {x})")
        keys, w = weights[col]
        for row, h in enumerate(heads, start=1):
            grid = np.full((height, width), np.nan)
            ky, kx = np.divmod(keys.numpy(), width)
            grid[ky, kx] = w[0, h].numpy()
            ax = axes[row, col]
            shown = ax.imshow(grid, cmap="viridis", interpolation="nearest")
            ax.plot([x], [y], marker="x", color="red", markersize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"head {h}: max {np.nanmax(grid):.2f}", fontsize=8)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    # the module's running statistics, from its forward passes so far (this picture's pass is not one)
    summary = (f"mean {stats.mean:.3g}, entropy {stats.entropy:.3g} nats over {stats.num_forward_passes} "
               f"forward passes" if stats.num_forward_passes else "no statistics recorded yet")
    fig.suptitle(f"{layout.name} ({height}x{width}, density {layout.density:.3f}); {summary}", fontsize=9)
    fig.tight_layout()
    if save_path:
        fig.savefig(save_path, dpi=110)
    return fig
