"""The DLPack bridge: ABI layout, zero-copy, strides, ownership, refusals."""

import ctypes
import gc
import sys

import numpy as np
import pytest
import torch

from sparse_attention import build_layout
from sparse_attention._native import C


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]


def test_struct_sizes_and_offsets_match_the_specification():
    abi = C.dlpack_abi()
    assert abi["DLDevice"] == ctypes.sizeof(DLDevice)
    assert abi["DLDataType"] == ctypes.sizeof(DLDataType)
    assert abi["DLTensor"] == ctypes.sizeof(DLTensor)
    assert abi["DLManagedTensor"] == ctypes.sizeof(DLManagedTensor)
    assert abi["DLManagedTensorVersioned"] == ctypes.sizeof(DLManagedTensorVersioned)
    for field in ("device", "ndim", "dtype", "shape", "strides", "byte_offset"):
        assert abi[f"DLTensor.{field}"] == getattr(DLTensor, field).offset, field
    for field in ("manager_ctx", "deleter"):
        assert abi[f"DLManagedTensor.{field}"] == getattr(DLManagedTensor, field).offset
    for field in ("manager_ctx", "deleter", "flags", "dl_tensor"):
        assert abi[f"DLManagedTensorVersioned.{field}"] == getattr(DLManagedTensorVersioned, field).offset
    assert abi["DLDataType.lanes"] == DLDataType.lanes.offset


@pytest.mark.parametrize("make", [lambda: torch.randn(3, 4, 5), lambda: np.random.rand(3, 4, 5)])
def test_sees_the_callers_memory(make):
    x = make()
    seen = C.inspect_tensor(x)
    pointer = x.data_ptr() if isinstance(x, torch.Tensor) else x.ctypes.data
    assert seen["data"] == pointer
    assert seen["shape"] == (3, 4, 5)
    assert seen["strides"] == (20, 5, 1)
    assert seen["device_type"] == 1


def test_versioned_capsules_are_used_when_offered():
    assert C.inspect_tensor(torch.zeros(2))["versioned"] == 1
    assert C.inspect_tensor(np.zeros(2))["versioned"] == 1


def test_legacy_capsule_and_byte_offset_of_views():
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    view = base[1:, 2:]  # storage offset, non-contiguous
    seen = C.inspect_tensor(torch.utils.dlpack.to_dlpack(view))
    assert seen["versioned"] == 0
    assert seen["data"] == view.data_ptr()
    assert seen["strides"] == (6, 1)


def test_kernel_writes_into_the_callers_buffer():
    layout = build_layout("axial", 4, 4)
    q = torch.randn(1, 2, 16, 8)
    out = torch.full_like(q, float("nan"))
    lse = torch.empty(1, 2, 16)
    pointer = out.data_ptr()
    C.attention_forward(q, q, q, out, lse, layout.indptr, layout.indices, height=4, width=4,
                        scale=0.5)
    assert out.data_ptr() == pointer and torch.isfinite(out).all()
    out_np = np.full((1, 2, 16, 8), np.nan, dtype=np.float32)
    C.attention_forward(q.numpy(), q.numpy(), q.numpy(), out_np, lse.numpy(), layout.indptr,
                        layout.indices, height=4, width=4, scale=0.5)
    np.testing.assert_array_equal(out_np, out.numpy())


def test_read_only_output_is_refused():
    layout = build_layout("axial", 2, 2)
    q = np.random.rand(1, 1, 4, 2).astype(np.float32)
    out = np.empty_like(q)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out: output buffer is read-only"):
        C.attention_forward(q, q, q, out, np.empty((1, 1, 4), np.float32), layout.indptr,
                            layout.indices, height=2, width=2, scale=1.0)


def test_overlapping_output_is_refused():
    layout = build_layout("axial", 2, 2)
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="overlaps input query"):
        C.attention_forward(q, q.clone(), q.clone(), q, torch.empty(1, 1, 4), layout.indptr,
                            layout.indices, height=2, width=2, scale=1.0)


def test_consumed_capsule_is_refused_and_deleter_runs_once():
    x = np.zeros(5)
    before = sys.getrefcount(x)
    capsule = x.__dlpack__()
    assert sys.getrefcount(x) > before  # the capsule keeps the array alive
    C.inspect_tensor(capsule)
    gc.collect()
    assert sys.getrefcount(x) == before  # our release ran the deleter
    with pytest.raises(ValueError, match="already consumed"):
        C.inspect_tensor(capsule)
    del capsule
    gc.collect()
    assert sys.getrefcount(x) == before  # and the capsule's destructor did not run it again


def test_not_a_tensor_and_foreign_capsules():
    with pytest.raises(TypeError, match="supports DLPack"):
        C.inspect_tensor([1, 2, 3])
    import datetime
    capsule = datetime.datetime_CAPI
    with pytest.raises(TypeError, match="is not a DLPack tensor"):
        C.inspect_tensor(capsule)


def test_requires_grad_tensors_are_exported_detached_by_the_op():
    layout = build_layout("axial", 2, 2)
    q = torch.randn(1, 1, 4, 2, requires_grad=True)
    from sparse_attention import sparse_scaled_dot_product_attention
    assert sparse_scaled_dot_product_attention(q, q, q, layout).requires_grad


def test_reference_counts_unchanged_after_calls_and_errors():
    layout = build_layout("axial", 3, 3)
    q = torch.randn(1, 1, 9, 4)
    out, lse = torch.empty_like(q), torch.empty(1, 1, 9)
    counts = [sys.getrefcount(t) for t in (q, out, lse)]
    for _ in range(50):
        C.attention_forward(q, q, q, out, lse, layout.indptr, layout.indices, height=3,
                            width=3, scale=1.0)
        with pytest.raises(ValueError):
            C.attention_forward(q, q, q, out, lse, layout.indptr, layout.indices, height=2,
                                width=3, scale=1.0)
    assert [sys.getrefcount(t) for t in (q, out, lse)] == counts
