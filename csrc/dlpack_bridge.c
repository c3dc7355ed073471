/* DLPack consumer: every tensor that reaches a kernel passes through here. */
#include "dlpack_bridge.h"

#include <string.h>

/* Calls obj.__dlpack__(max_version=(1, 0)[, stream=...]); NULL with an exception
 * on failure. The argument objects are made once and kept. */
static PyObject *call_dlpack(PyObject *obj, int with_stream, long long stream)
{
    static PyObject *method_name, *version, *names_plain, *names_stream;
    if (method_name == NULL) {
        method_name = PyUnicode_InternFromString("__dlpack__");
        version = Py_BuildValue("(ii)", SA_DLPACK_MAJOR, SA_DLPACK_MINOR);
        names_plain = Py_BuildValue("(s)", "max_version");
        names_stream = Py_BuildValue("(ss)", "max_version", "stream");
        if (!method_name || !version || !names_plain || !names_stream) {
            Py_CLEAR(method_name);
            return NULL;
        }
    }
    if (!with_stream) {
        PyObject *args[2] = {obj, version};
        return PyObject_VectorcallMethod(method_name, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                         names_plain);
    }
    /* The spec reserves 0; the legacy default stream is spelled 1. */
    PyObject *s = PyLong_FromLongLong(stream == 0 ? 1 : stream);
    if (s == NULL) return NULL;
    PyObject *args[3] = {obj, version, s};
    PyObject *capsule = PyObject_VectorcallMethod(method_name, args,
                                                  1 | PY_VECTORCALL_ARGUMENTS_OFFSET, names_stream);
    Py_DECREF(s);
    return capsule;
}

/* Ask obj for a capsule. On a CUDA call (stream != -1) producers get our stream
 * so that they order their pending work before ours; a producer that refuses a
 * stream (a CPU array) is asked without one once its device says it is not CUDA.
 * max_version=(1, 0) asks for the versioned struct; producers that predate it
 * (TypeError on the keyword) are asked again the legacy way. */
static PyObject *request_capsule(PyObject *obj, const char *name, long long stream)
{
    PyObject *capsule = call_dlpack(obj, stream != -1, stream);
    if (capsule != NULL || stream == -1) {
        goto legacy_check;
    }
    /* refused with a stream: ask the device, and only CUDA tensors get one */
    PyObject *failure_type, *failure, *trace;
    PyErr_Fetch(&failure_type, &failure, &trace);
    PyObject *device = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    long device_type = -1;
    if (device != NULL && PyTuple_Check(device) && PyTuple_GET_SIZE(device) == 2) {
        device_type = PyLong_AsLong(PyTuple_GET_ITEM(device, 0));
    }
    Py_XDECREF(device);
    if (device_type == -1 || device_type == kDLCUDA) {
        if (device_type == -1 && !PyErr_Occurred()) {
            PyErr_Format(PyExc_TypeError,
                         "%s: __dlpack_device__() must return (device_type, device_id)", name);
        }
        if (device_type == kDLCUDA) {
            PyErr_Restore(failure_type, failure, trace);
        } else {
            Py_XDECREF(failure_type);
            Py_XDECREF(failure);
            Py_XDECREF(trace);
        }
        return NULL;
    }
    Py_XDECREF(failure_type);
    Py_XDECREF(failure);
    Py_XDECREF(trace);
    capsule = call_dlpack(obj, 0, -1);
legacy_check:
    if (capsule == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        /* a producer without max_version: the legacy call, stream only for CUDA */
        PyErr_Clear();
        PyObject *method = PyObject_GetAttrString(obj, "__dlpack__");
        if (method == NULL) return NULL;
        PyObject *empty = PyTuple_New(0), *kwargs = PyDict_New();
        if (empty && kwargs && stream != -1) {
            PyObject *device = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
            int cuda = device && PyTuple_Check(device) && PyTuple_GET_SIZE(device) == 2 &&
                       PyLong_AsLong(PyTuple_GET_ITEM(device, 0)) == kDLCUDA;
            Py_XDECREF(device);
            PyErr_Clear();
            PyObject *s = cuda ? PyLong_FromLongLong(stream == 0 ? 1 : stream) : NULL;
            if (s) {
                PyDict_SetItemString(kwargs, "stream", s);
                Py_DECREF(s);
            }
        }
        if (empty && kwargs) capsule = PyObject_Call(method, empty, kwargs);
        Py_XDECREF(empty);
        Py_XDECREF(kwargs);
        Py_DECREF(method);
    }
    return capsule;
}

static int take_capsule(PyObject *capsule, sa_view *view)
{
    const char *capsule_name = PyCapsule_GetName(capsule);
    if (capsule_name == NULL && PyErr_Occurred()) {
        return -1;
    }
    if (capsule_name != NULL && strcmp(capsule_name, SA_CAPSULE_VERSIONED) == 0) {
        DLManagedTensorVersioned *m = PyCapsule_GetPointer(capsule, SA_CAPSULE_VERSIONED);
        if (m == NULL) {
            return -1;
        }
        if (m->version.major != SA_DLPACK_MAJOR) {
            PyErr_Format(PyExc_BufferError,
                         "%s: DLPack version %u.%u is not supported (expected major version %d)",
                         view->name, m->version.major, m->version.minor, SA_DLPACK_MAJOR);
            return -1;
        }
        if (PyCapsule_SetName(capsule, SA_CAPSULE_VERSIONED_USED) < 0) {
            return -1;
        }
        view->managed = m;
        view->versioned = 1;
        view->read_only = (m->flags & SA_DLPACK_FLAG_READ_ONLY) != 0;
        return 0;
    }
    if (capsule_name != NULL && strcmp(capsule_name, SA_CAPSULE_LEGACY) == 0) {
        DLManagedTensor *m = PyCapsule_GetPointer(capsule, SA_CAPSULE_LEGACY);
        if (m == NULL) {
            return -1;
        }
        if (PyCapsule_SetName(capsule, SA_CAPSULE_LEGACY_USED) < 0) {
            return -1;
        }
        view->managed = m;
        view->versioned = 0;
        view->read_only = 0; /* the legacy struct cannot say */
        return 0;
    }
    if (capsule_name != NULL && (strcmp(capsule_name, SA_CAPSULE_LEGACY_USED) == 0 ||
                                 strcmp(capsule_name, SA_CAPSULE_VERSIONED_USED) == 0)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: this DLPack capsule was already consumed (a capsule can be used once)",
                     view->name);
        return -1;
    }
    PyErr_Format(PyExc_TypeError, "%s: capsule named '%s' is not a DLPack tensor", view->name,
                 capsule_name ? capsule_name : "(null)");
    return -1;
}

static DLTensor *view_tensor(const sa_view *view)
{
    if (view->versioned) {
        return &((DLManagedTensorVersioned *)view->managed)->dl_tensor;
    }
    return &((DLManagedTensor *)view->managed)->dl_tensor;
}

static int dtype_element_size(DLDataType dt)
{
    return dt.bits / 8;
}

static int fill_from_tensor(sa_view *view)
{
    const DLTensor *t = view_tensor(view);
    if (t->ndim < 0 || t->ndim > SA_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s: %d dimensions are not supported (at most %d)",
                     view->name, (int)t->ndim, SA_MAX_DIMS);
        return -1;
    }
    if (t->dtype.lanes != 1) {
        PyErr_Format(PyExc_TypeError, "%s: vector dtypes (lanes=%u) are not supported",
                     view->name, (unsigned)t->dtype.lanes);
        return -1;
    }
    if (t->dtype.bits == 0 || t->dtype.bits % 8 != 0) {
        PyErr_Format(PyExc_TypeError, "%s: dtype with %u bits is not supported", view->name,
                     (unsigned)t->dtype.bits);
        return -1;
    }
    view->device = t->device;
    view->dtype = t->dtype;
    view->ndim = t->ndim;
    int64_t numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative extent %lld in dimension %d",
                         view->name, (long long)t->shape[d], d);
            return -1;
        }
        view->shape[d] = t->shape[d];
        numel *= t->shape[d];
    }
    if (t->strides != NULL) {
        for (int d = 0; d < t->ndim; d++) {
            view->strides[d] = t->strides[d];
        }
    } else {
        int64_t step = 1;
        for (int d = t->ndim - 1; d >= 0; d--) {
            view->strides[d] = step;
            step *= t->shape[d] > 0 ? t->shape[d] : 1;
        }
    }
    if (t->data == NULL && numel > 0) {
        PyErr_Format(PyExc_ValueError, "%s: tensor with %lld elements has a NULL data pointer",
                     view->name, (long long)numel);
        return -1;
    }
    view->data = (char *)t->data + t->byte_offset;
    int element = dtype_element_size(t->dtype);
    if (numel > 0 && ((uintptr_t)view->data % (uintptr_t)element) != 0) {
        PyErr_Format(PyExc_ValueError, "%s: data pointer is not aligned to its %d-byte elements",
                     view->name, element);
        return -1;
    }
    return 0;
}

int sa_view_acquire(PyObject *obj, const char *name, int writable, long long stream,
                    sa_view *view)
{
    memset(view, 0, sizeof(*view));
    view->name = name;
    PyObject *capsule;
    if (PyCapsule_CheckExact(obj)) {
        Py_INCREF(obj);
        capsule = obj;
    } else if (PyObject_HasAttrString(obj, "__dlpack__")) {
        capsule = request_capsule(obj, name, stream);
        if (capsule == NULL) {
            return -1;
        }
    } else {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected a tensor or array that supports DLPack (torch.Tensor, "
                     "numpy.ndarray), got %s",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (!PyCapsule_CheckExact(capsule)) {
        PyErr_Format(PyExc_TypeError, "%s: __dlpack__() returned %s, not a capsule", name,
                     Py_TYPE(capsule)->tp_name);
        Py_DECREF(capsule);
        return -1;
    }
    if (take_capsule(capsule, view) < 0) {
        Py_DECREF(capsule);
        return -1;
    }
    view->capsule = capsule;
    if (fill_from_tensor(view) < 0) {
        sa_view_release(view);
        return -1;
    }
    if (writable && view->read_only) {
        PyErr_Format(PyExc_ValueError, "%s: output buffer is read-only", name);
        sa_view_release(view);
        return -1;
    }
    return 0;
}

void sa_view_release(sa_view *view)
{
    if (view->managed != NULL) {
        if (view->versioned) {
            DLManagedTensorVersioned *m = view->managed;
            if (m->deleter != NULL) {
                m->deleter(m);
            }
        } else {
            DLManagedTensor *m = view->managed;
            if (m->deleter != NULL) {
                m->deleter(m);
            }
        }
        view->managed = NULL;
    }
    Py_CLEAR(view->capsule);
}

int sa_view_dtype_bit(const sa_view *view)
{
    DLDataType dt = view->dtype;
    if (dt.code == kDLFloat && dt.bits == 16) return SA_DT_F16;
    if (dt.code == kDLBfloat && dt.bits == 16) return SA_DT_BF16;
    if (dt.code == kDLFloat && dt.bits == 32) return SA_DT_F32;
    if (dt.code == kDLFloat && dt.bits == 64) return SA_DT_F64;
    if ((dt.code == kDLBool || dt.code == kDLUInt) && dt.bits == 8) return SA_DT_BOOL;
    if (dt.code == kDLInt && dt.bits == 32) return SA_DT_I32;
    if (dt.code == kDLInt && dt.bits == 64) return SA_DT_I64;
    return 0;
}

const char *sa_dtype_bit_name(int bit)
{
    switch (bit) {
    case SA_DT_F16: return "float16";
    case SA_DT_BF16: return "bfloat16";
    case SA_DT_F32: return "float32";
    case SA_DT_F64: return "float64";
    case SA_DT_BOOL: return "bool";
    case SA_DT_I32: return "int32";
    case SA_DT_I64: return "int64";
    default: return "an unsupported dtype";
    }
}

int sa_view_expect_dtype(const sa_view *view, int allowed)
{
    int bit = sa_view_dtype_bit(view);
    if (bit & allowed) {
        return 0;
    }
    char expected[128] = "";
    for (int b = SA_DT_F16; b <= SA_DT_I64; b <<= 1) {
        if (allowed & b) {
            if (expected[0] != '\0') {
                strncat(expected, " or ", sizeof(expected) - strlen(expected) - 1);
            }
            strncat(expected, sa_dtype_bit_name(b), sizeof(expected) - strlen(expected) - 1);
        }
    }
    PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got %s (DLPack code %u, %u bits)",
                 view->name, expected, bit ? sa_dtype_bit_name(bit) : "an unsupported dtype",
                 (unsigned)view->dtype.code, (unsigned)view->dtype.bits);
    return -1;
}

int sa_view_expect_ndim(const sa_view *view, int ndim)
{
    if (view->ndim == ndim) {
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions, got %d", view->name, ndim,
                 view->ndim);
    return -1;
}

static void format_shape(char *buf, size_t len, const int64_t *shape, int ndim)
{
    size_t used = 0;
    used += (size_t)snprintf(buf, len, "[");
    for (int d = 0; d < ndim && used < len; d++) {
        if (shape[d] < 0) {
            used += (size_t)snprintf(buf + used, len - used, "%s*", d ? ", " : "");
        } else {
            used += (size_t)snprintf(buf + used, len - used, "%s%lld", d ? ", " : "",
                                     (long long)shape[d]);
        }
    }
    if (used < len) {
        snprintf(buf + used, len - used, "]");
    }
}

int sa_view_expect_shape(const sa_view *view, const int64_t *shape, int ndim)
{
    int ok = view->ndim == ndim;
    for (int d = 0; ok && d < ndim; d++) {
        ok = shape[d] < 0 || shape[d] == view->shape[d];
    }
    if (ok) {
        return 0;
    }
    char want[160], got[160];
    format_shape(want, sizeof(want), shape, ndim);
    format_shape(got, sizeof(got), view->shape, view->ndim);
    PyErr_Format(PyExc_ValueError, "%s: expected shape %s, got %s", view->name, want, got);
    return -1;
}

int sa_view_expect_contiguous(const sa_view *view)
{
    for (int d = 0; d < view->ndim; d++)
        if (view->shape[d] == 0) return 0; /* nothing is addressed */
    int64_t step = 1;
    for (int d = view->ndim - 1; d >= 0; d--) {
        if (view->shape[d] > 1 && view->strides[d] != step) {
            PyErr_Format(PyExc_ValueError,
                         "%s: expected a contiguous (row-major) buffer; dimension %d has stride "
                         "%lld, expected %lld",
                         view->name, d, (long long)view->strides[d], (long long)step);
            return -1;
        }
        step *= view->shape[d];
    }
    return 0;
}

int sa_view_expect_same_device(const sa_view *view, const sa_view *ref)
{
    if (view->device.device_type == ref->device.device_type &&
        view->device.device_id == ref->device.device_id) {
        return 0;
    }
    PyErr_Format(PyExc_ValueError,
                 "%s: expected the device of %s (DLPack type %d, id %d), got type %d, id %d",
                 view->name, ref->name, (int)ref->device.device_type, (int)ref->device.device_id,
                 (int)view->device.device_type, (int)view->device.device_id);
    return -1;
}
