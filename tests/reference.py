"""The oracle: dense, masked, float64 attention in plain PyTorch.

Builds the N x N matrices the kernels never build, from the layout's dense mask
and the definitions of DESIGN.md. Only for tests."""

import torch

from sparse_attention._torch_impl import dropout_keep_mask_torch


def random_inputs(batch, heads, n, dim, seed=0, bias_side=7):
    """([q, k, v], bias table) in float64 from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64) for _ in range(3)]
    bias = torch.randn(heads, bias_side, bias_side, generator=gen, dtype=torch.float64)
    return tensors, bias


def dense_bias(table, height, width):
    """[heads, N, N] bias from a [heads, 2M+1, 2M+1] table."""
    m = (table.shape[-1] - 1) // 2
    ys = torch.arange(height * width) // width
    xs = torch.arange(height * width) % width
    dy = (ys[:, None] - ys[None, :]).clamp(-m, m) + m
    dx = (xs[:, None] - xs[None, :]).clamp(-m, m) + m
    return table[:, dy, dx]


def reference_attention(q, k, v, layout, *, scale=None, bias=None, key_mask=None, dropout_p=0.0,
                        dropout_seed=0, head_active=None):
    """Returns (out, lse, probabilities) in float64."""
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    batch, heads, n, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        scores = scores + dense_bias(bias.to(torch.float64), layout.height, layout.width)[None]
    allowed = torch.from_numpy(layout.to_dense())[None, None].expand(batch, heads, n, n)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    if head_active is not None:
        allowed = allowed & head_active.view(1, heads, 1, 1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # only a row without keys (lse -inf) shifts by 0; a +inf lse leaves exp(inf - inf), NaN, as softmax does
    probs = torch.exp(scores - torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)[..., None])
    probs = torch.where(allowed, probs, torch.zeros_like(probs))
    mixed = probs
    if dropout_p > 0:
        # the generator in tensor arithmetic, not the extension's C loop
        keep = dropout_keep_mask_torch(dropout_seed, batch, heads, torch.arange(n)[:, None],
                                       torch.arange(n)[None], dropout_p)  # [B, H, n, n]
        mixed = torch.where(keep, probs / (1 - dropout_p), torch.zeros_like(probs))
    return mixed @ v, lse, probs


def assert_forward_matches_reference(out, lse, ref_out, ref_lse, tol):
    """out and lse (any device and dtype) against the reference's: within tol,
    and -inf in lse exactly where the reference has it."""
    out, lse = out.double().cpu(), lse.double().cpu()
    assert (out - ref_out).abs().max() < tol
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() < tol


def assert_backward_matches_reference(attention, layout, inputs, grad_out, **args):
    """The float32 op's gradients of q, k, v (from ``inputs`` rounded to float32)
    against the float64 reference's on the same rounded values."""
    leaves = [t.float().requires_grad_(True) for t in inputs]
    attention(*leaves, layout, **args).backward(grad_out.float())
    ref = [t.float().double().requires_grad_(True) for t in inputs]
    reference_attention(*ref, layout, **args)[0].backward(grad_out.double())
    for leaf, r in zip(leaves, ref):
        assert (leaf.grad.double() - r.grad).abs().max() < 5e-5 * max(1.0, r.grad.abs().max().item())


def call_with(module, flag, value, fn, *args, **kwargs):
    """fn(*args, **kwargs) with ``module.flag`` set to ``value`` for the call."""
    before = getattr(module, flag)
    setattr(module, flag, value)
    try:
        return fn(*args, **kwargs)
    finally:
        setattr(module, flag, before)


def reference_statistics(probs):
    """(sum_j p_ij^2, -sum_j p_ij log p_ij) per row from reference_attention's
    probabilities, as the kernels' row statistics."""
    logs = torch.where(probs > 0, probs.log(), torch.zeros_like(probs))
    return torch.stack([(probs * probs).sum(-1), -(probs * logs).sum(-1)], -1)


def bias_training_inputs(layout, bias_side, batch=2, heads=3, dim=20):
    """(q, k, v, bias, grad_out, args) for a training-like call: a key mask,
    the second head pruned and dropout, seeded by bias_side."""
    n = layout.num_tokens
    (q, k, v), bias = random_inputs(batch, heads, n, dim, seed=bias_side, bias_side=bias_side)
    key_mask = torch.rand(batch, n, generator=torch.Generator().manual_seed(2)) > 0.25
    active = torch.tensor([head != 1 for head in range(heads)])
    args = dict(key_mask=key_mask, head_active=active, dropout_p=0.2, dropout_seed=7)
    grad_out = torch.randn(batch, heads, n, dim, generator=torch.Generator().manual_seed(3))
    return q, k, v, bias, grad_out, args


def bias_gradients(attention, layout, q, k, v, bias, grad_out, **args):
    """The float32 op's four gradients (q, k, v, the bias table)."""
    leaves = [t.float().requires_grad_(True) for t in (q, k, v, bias)]
    attention(*leaves[:3], layout, rel_pos_bias=leaves[3], **args).backward(grad_out.float())
    return [leaf.grad for leaf in leaves]


def assert_bias_gradients_match_reference(got, layout, q, k, v, bias, grad_out, **args):
    ref = [t.float().double().requires_grad_(True) for t in (q, k, v, bias)]
    reference_attention(*ref[:3], layout, bias=ref[3], **args)[0].backward(grad_out.double())
    for name, mine, r in zip(("q", "k", "v", "bias"), got, ref):
        error = (mine.double() - r.grad).abs().max().item()
        assert error < 5e-5 * max(1.0, r.grad.abs().max().item()), f"grad {name}: {error}"



def reference_tile_pass(layout, shape, select, left_out):
    """(queries, chunk_ptr, keys, masks) of a tile-plan pass, tile by tile in
    plain Python from the definition in sparse_attention/_tiles.py: the tiles
    of ``shape`` in row-major order, query (y, x) at slot (y % th) * tw + x % tw,
    a tile's keys the distinct keys of its queries' pairs for which
    ``select(query, key)`` holds, ascending, 64 to a chunk; rows in
    ``left_out`` read -1 and add no keys."""
    import numpy as np

    height, width = layout.height, layout.width
    th, tw = shape
    tiles_x = -(-width // tw)
    num_tiles = -(-height // th) * tiles_x
    queries = np.full((num_tiles, 64), -1, dtype=np.int32)
    chunk_ptr, all_keys, all_masks = [0], [], []
    for tile in range(num_tiles):
        y0, x0 = tile // tiles_x * th, tile % tiles_x * tw
        pairs = []
        for y in range(y0, min(y0 + th, height)):
            for x in range(x0, min(x0 + tw, width)):
                query = y * width + x
                if query in left_out:
                    continue
                slot = (y - y0) * tw + x - x0
                queries[tile, slot] = query
                keys = layout.indices[layout.indptr[query]:layout.indptr[query + 1]]
                pairs += [(slot, int(key)) for key in keys if select(query, int(key))]
        union = sorted({key for _, key in pairs})
        chunks = -(-len(union) // 64)
        keys = np.full((chunks, 64), -1, dtype=np.int32)
        masks = np.zeros((chunks, 64), dtype=np.uint64)
        for rank, key in enumerate(union):
            keys[rank // 64, rank % 64] = key
        rank_of = {key: rank for rank, key in enumerate(union)}
        for slot, key in pairs:
            rank = rank_of[key]
            masks[rank // 64, slot] |= np.uint64(1) << np.uint64(rank % 64)
        all_keys.append(keys)
        all_masks.append(masks)
        chunk_ptr.append(chunk_ptr[-1] + chunks)
    return (queries, np.array(chunk_ptr, dtype=np.int32), np.concatenate(all_keys).reshape(-1, 64),
            np.concatenate(all_masks).reshape(-1, 64).view(np.int64))


def step_matches_eager(compiled, twin, x, key_mask, tol):
    """One step of a compiled module and its eager twin (same weights): equal
    outputs within tol, and the backward of the same loss run on both."""
    got, expected = compiled(x, key_mask=key_mask), twin(x, key_mask=key_mask)
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    got.square().sum().backward()
    expected.square().sum().backward()


def assert_learns_the_teacher(module, teacher, x, steps):
    """``steps`` of Adam on the MSE to ``teacher(x)`` (a module of the same
    shape) give every parameter a finite gradient and at least halve the loss."""
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(module(x), target)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
