"""The host buffer cache behind the CPU op's outputs (csrc/host_pool.c)."""

import os
import subprocess
import sys
import threading

import pytest

torch = pytest.importorskip("torch")

import sparse_attention as sa  # noqa: E402
from sparse_attention import _C as C  # noqa: E402
from sparse_attention import build_layout, sparse_scaled_dot_product_attention  # noqa: E402

DEFAULT_LIMIT = 512 << 20


@pytest.fixture(autouse=True)
def default_limit():
    sa.set_buffer_cache_limit(DEFAULT_LIMIT)
    yield
    sa.set_buffer_cache_limit(DEFAULT_LIMIT)


def _inputs(side=9, heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, side * side, dim, generator=gen, requires_grad=True) for _ in range(3)]


def test_a_freed_output_buffer_serves_the_next_call():
    q, k, v = _inputs()
    layout = build_layout("longformer", 9, 9)
    with torch.no_grad():
        first = sparse_scaled_dot_product_attention(q, k, v, layout)
    pointer = first.data_ptr()
    del first
    before = sa.buffer_cache_info()
    with torch.no_grad():
        second = sparse_scaled_dot_product_attention(q, k, v, layout)
    after = sa.buffer_cache_info()
    assert second.data_ptr() == pointer
    assert after["reused"] >= before["reused"] + 1


def test_live_outputs_never_share_a_buffer():
    q, k, v = _inputs()
    layout = build_layout("block", 9, 9, block_size=3)
    with torch.no_grad():
        outs = [sparse_scaled_dot_product_attention(q, k, v, layout) for _ in range(4)]
    pointers = {o.data_ptr() for o in outs}
    assert len(pointers) == 4
    for a in outs[1:]:
        torch.testing.assert_close(a, outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["longformer", "block", "random", "strided", "axial"])
def test_outputs_and_gradients_match_with_the_cache_off(pattern):
    q, k, v = _inputs(side=11, seed=3)
    layout = build_layout(pattern, 11, 11)
    grad = torch.randn(2, 2, 121, 8, generator=torch.Generator().manual_seed(9))
    results = []
    for limit in (0, DEFAULT_LIMIT, DEFAULT_LIMIT):  # the second cached run reuses the first's buffers
        sa.set_buffer_cache_limit(limit)
        for t in (q, k, v):
            t.grad = None
        out = sparse_scaled_dot_product_attention(q, k, v, layout)
        out.backward(grad)
        results.append([out.detach().clone()] + [t.grad.clone() for t in (q, k, v)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_limit_zero_keeps_nothing_idle_and_empty_releases():
    block = C.pool_tensor((1000,), 2, 32)
    del block
    assert sa.buffer_cache_info()["idle_bytes"] > 0
    sa.empty_buffer_cache()
    info = sa.buffer_cache_info()
    assert info["idle_bytes"] == 0 and info["idle_blocks"] == 0
    sa.set_buffer_cache_limit(0)
    del_me = C.pool_tensor((1000,), 2, 32)
    del del_me
    assert sa.buffer_cache_info()["idle_bytes"] == 0


def test_the_oldest_idle_blocks_go_first_past_the_limit():
    sa.empty_buffer_cache()
    sa.set_buffer_cache_limit(3 * 4096)
    blocks = [torch.from_dlpack(C.pool_tensor((1024,), 2, 32)) for _ in range(5)]
    pointers = [b.data_ptr() for b in blocks]
    while blocks:  # freed first to last: the last three stay
        blocks.pop(0)
    info = sa.buffer_cache_info()
    assert info["idle_blocks"] == 3 and info["idle_bytes"] == 3 * 4096
    again = [torch.from_dlpack(C.pool_tensor((1024,), 2, 32)) for _ in range(3)]
    assert {b.data_ptr() for b in again} == set(pointers[2:])


def test_lent_bytes_follow_live_tensors():
    before = sa.buffer_cache_info()["lent_bytes"]
    t = torch.from_dlpack(C.pool_tensor((3, 4096), 2, 64))
    assert sa.buffer_cache_info()["lent_bytes"] == before + 3 * 4096 * 8
    view = t[1]
    del t
    assert sa.buffer_cache_info()["lent_bytes"] == before + 3 * 4096 * 8  # the view keeps it
    del view
    assert sa.buffer_cache_info()["lent_bytes"] == before


def test_padded_head_dims_return_their_scratch_and_reuse_it():
    """A head dim of 12 runs the gather kernels on copies padded to 16 whose
    blocks come from the cache: none is still lent after the step, and a
    second step takes no fresh memory."""
    layout = build_layout("random", 16, 16, attention_ratio=0.2)
    q, k, v = (t.detach()[..., :12].contiguous().requires_grad_() for t in _inputs(side=16, dim=16))
    before = C.cpu_gather_forwards(), C.cpu_gather_backwards()

    def step():
        out = sparse_scaled_dot_product_attention(q, k, v, layout)
        out.backward(torch.ones_like(out))
        for t in (q, k, v):
            t.grad = None

    step()
    assert (C.cpu_gather_forwards(), C.cpu_gather_backwards()) == (before[0] + 1, before[1] + 1)
    info = sa.buffer_cache_info()
    step()
    after = sa.buffer_cache_info()
    assert after["lent_bytes"] == info["lent_bytes"] == 0
    assert after["fresh"] == info["fresh"] and after["reused"] > info["reused"]


def test_tensors_freed_on_other_threads_return_safely():
    before = sa.buffer_cache_info()["lent_bytes"]
    tensors = [torch.from_dlpack(C.pool_tensor((257 + i % 5, 33), 2, 32)) for i in range(400)]
    for i, t in enumerate(tensors):
        t.fill_(i)
    chunks = [tensors[i::4] for i in range(4)]
    del tensors

    def drop(chunk):
        for i, t in enumerate(chunk):
            assert float(t[0, 0]) == float(t[-1, -1])
        chunk.clear()

    threads = [threading.Thread(target=drop, args=(c,)) for c in chunks]
    del chunks
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sa.buffer_cache_info()["lent_bytes"] == before


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="num_bytes"):
        sa.set_buffer_cache_limit(1.5)
    with pytest.raises(ValueError, match="num_bytes"):
        sa.set_buffer_cache_limit(-1)
    with pytest.raises(ValueError, match="shape\\[1\\] is -2"):
        C.pool_tensor((3, -2), 2, 32)
    with pytest.raises(ValueError, match="dimensions"):
        C.pool_tensor((1,) * 9, 2, 32)
    with pytest.raises(ValueError, match="bits"):
        C.pool_tensor((3,), 2, 12)
    with pytest.raises(OverflowError):
        C.pool_tensor((2**40, 2**40), 2, 32)


def test_an_unconsumed_capsule_returns_its_buffer():
    before = sa.buffer_cache_info()["lent_bytes"]
    capsule = C.pool_tensor((64, 64), 2, 32)
    assert sa.buffer_cache_info()["lent_bytes"] == before + 64 * 64 * 4
    del capsule
    assert sa.buffer_cache_info()["lent_bytes"] == before


def _limit_seen_with_env(value):
    env = dict(os.environ, SPARSE_ATTENTION_BUFFER_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", "import sparse_attention as sa; print(sa.buffer_cache_info()['limit'])"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_environment_sets_the_limit():
    done = _limit_seen_with_env("1.5")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) == int(1.5 * 2**20)
    bad = _limit_seen_with_env("lots")
    assert bad.returncode != 0
    assert "SPARSE_ATTENTION_BUFFER_CACHE_MB" in bad.stderr


def test_with_the_cache_off_outputs_are_ordinary_resizable_tensors():
    q, k, v = _inputs()
    layout = build_layout("axial", 9, 9)
    with torch.no_grad():
        cached = sparse_scaled_dot_product_attention(q, k, v, layout)
        sa.set_buffer_cache_limit(0)
        before = sa.buffer_cache_info()
        plain = sparse_scaled_dot_product_attention(q, k, v, layout)
        after = sa.buffer_cache_info()
    assert (after["reused"], after["fresh"]) == (before["reused"], before["fresh"])
    torch.testing.assert_close(plain, cached, rtol=0, atol=0)
    plain.resize_(1000, 1000)
    with pytest.raises(RuntimeError, match="not resizable"):
        cached.resize_(1000, 1000)
