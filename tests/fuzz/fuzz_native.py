"""Coverage-guided fuzzing (atheris/libFuzzer) of the C entry points: the layout
builder's knobs and the op's argument checks. Any exception other than the
documented ValueError / TypeError / MemoryError, and any crash, is a finding.
Coverage feedback is Python-level (the harness's branches); the C code is not
built with libFuzzer instrumentation, so the search inside it is random.

    python tests/fuzz/fuzz_native.py -max_total_time=60 tests/fuzz/corpus
"""

import glob
import importlib.util
import os
import sys

import atheris
import numpy as np


def load_extension():
    """sparse_attention._C alone: the package would import torch, which is slow to instrument."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = glob.glob(os.path.join(root, "sparse_attention", "_C*.so"))
    if not paths:
        import sparse_attention._C as module  # an installed copy
        return module
    spec = importlib.util.spec_from_file_location("sparse_attention._C", paths[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


C = load_extension()

EXPECTED = (ValueError, TypeError, MemoryError, OverflowError)
DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.bool_, np.uint8]


@atheris.instrument_func
def fuzz_layout(data):
    pattern = data.ConsumeIntInRange(-2, 7)
    height = data.ConsumeIntInRange(-3, 24)
    width = data.ConsumeIntInRange(-3, 24)
    knobs = [data.ConsumeIntInRange(-5, 2**40) if data.ConsumeBool() else data.ConsumeIntInRange(-2, 9)
             for _ in range(4)]
    ratio = data.ConsumeRegularFloat() if data.ConsumeBool() else data.ConsumeProbability()
    seed = data.ConsumeIntInRange(0, 2**64 - 1)
    try:
        row_ptr, col_idx, col_ptr, row_idx = C.build_layout(pattern, height, width, *knobs, ratio, seed)
    except EXPECTED:
        return
    n = height * width
    assert row_ptr.shape == (n + 1,) and row_ptr[0] == 0 and row_ptr[-1] == col_idx.shape[0]
    assert np.all(np.diff(row_ptr) >= 1), "every row holds its own token"
    assert col_idx.size == 0 or (col_idx.min() >= 0 and col_idx.max() < n)
    assert np.array_equal(np.sort(row_idx), np.sort(np.repeat(np.arange(n), np.diff(row_ptr)))) \
        if n <= 64 else True


@atheris.instrument_func
def random_array(data, shape):
    dtype = DTYPES[data.ConsumeIntInRange(0, len(DTYPES) - 1)] if data.ConsumeIntInRange(0, 5) == 0 \
        else np.float32
    array = np.zeros([max(s, 0) for s in shape], dtype=dtype)
    choice = data.ConsumeIntInRange(0, 6)
    if choice == 0 and array.ndim >= 2:
        array = np.swapaxes(array, -1, -2)  # last dimension strided
    elif choice == 1 and array.ndim >= 1 and array.shape[0] > 1:
        array = array[::2]
    elif choice == 2:
        array.setflags(write=False)
    elif choice == 3 and array.ndim >= 1:
        array = array[..., None]
    return array


@atheris.instrument_func
def fuzz_forward(data):
    b, h = data.ConsumeIntInRange(0, 2), data.ConsumeIntInRange(0, 3)
    height, width = data.ConsumeIntInRange(1, 5), data.ConsumeIntInRange(1, 5)
    n, d = height * width, data.ConsumeIntInRange(0, 9)
    row_ptr, col_idx, _, _ = C.build_layout(data.ConsumeIntInRange(0, 5), height, width, 3, 2, 3, 1, 0.5, 1)
    if data.ConsumeBool():
        col_idx = col_idx.copy()
        if col_idx.size:
            col_idx[data.ConsumeIntInRange(0, col_idx.size - 1)] = data.ConsumeIntInRange(-5, 2 * n)
    shapes = [(b, h, n, d)] * 4 + [(b, h, n)]
    arrays = [random_array(data, [s + (data.ConsumeIntInRange(-1, 1) if data.ConsumeIntInRange(0, 7) == 0 else 0)
                                  for s in shape]) for shape in shapes]
    bias = random_array(data, (h, 3, 3)) if data.ConsumeBool() else None
    mask = random_array(data, (b, n)).astype(bool) if data.ConsumeBool() else None
    try:
        C.attention_forward(*arrays, row_ptr, col_idx, height=data.ConsumeIntInRange(0, 6),
                            width=width, scale=data.ConsumeRegularFloat(), rel_pos_bias=bias,
                            key_mask=mask, dropout_p=data.ConsumeRegularFloat(),
                            dropout_seed=data.ConsumeIntInRange(0, 2**64 - 1))
    except EXPECTED:
        pass


@atheris.instrument_func
def test_one_input(raw):
    data = atheris.FuzzedDataProvider(raw)
    if data.ConsumeBool():
        fuzz_layout(data)
    else:
        fuzz_forward(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
