/* sparse_attention._C: the Python bindings.
 *
 * Each entry point takes every tensor through the DLPack bridge, checks it
 * against what the kernel needs (raising with the argument's name, the value
 * seen and the value expected), fills one sa_attention_params, releases the GIL
 * and runs the CPU or CUDA kernel. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL sparse_attention_ARRAY_API
#include <numpy/arrayobject.h>

#include <math.h>
#include <string.h>

#include "attention.h"
#include "attention_cpu_gather.h"
#include "attention_cpu_stencil.h"
#include "attention_cpu_window.h"
#include "dlpack_bridge.h"
#include "dropout_hash.h"
#include "dropout_mask.h"
#include "host_pool.h"
#include "layout.h"
#include "tile_plan.h"

#define MAX_VIEWS 24
#define ERR_LEN 512
/* bit of a packed stencil's flags word: a window clamped to the grid (sa_attention_params.stencil_clamped) */
#define STENCIL_FLAG_CLAMPED 1
/* bits 8-15 and 16-23 of the flags word: a clamped window's query strides
 * (rows, columns) minus one (sa_attention_params.stencil_stride_y, _x) */
#define STENCIL_STRIDE_Y_SHIFT 8
#define STENCIL_STRIDE_X_SHIFT 16
#define STENCIL_STRIDE_BITS ((0xFF << STENCIL_STRIDE_Y_SHIFT) | (0xFF << STENCIL_STRIDE_X_SHIFT))

/* The views one call holds; all released together on every path. */
typedef struct {
    sa_view views[MAX_VIEWS];
    int count;
    long long stream;
} view_set;

static sa_view *take(view_set *set, PyObject *obj, const char *name, int writable)
{
    if (obj == NULL || obj == Py_None) return NULL;
    sa_view *v = &set->views[set->count];
    if (sa_view_acquire(obj, name, writable, set->stream, v) < 0) return NULL;
    set->count++;
    return v;
}

static void release_all(view_set *set)
{
    for (int i = set->count - 1; i >= 0; i--) sa_view_release(&set->views[i]);
    set->count = 0;
}

static int raise_status(int status, const char *err)
{
    PyObject *type = PyExc_RuntimeError;
    if (status == SA_ERR_VALUE) type = PyExc_ValueError;
    else if (status == SA_ERR_MEMORY) type = PyExc_MemoryError;
    else if (status == SA_ERR_UNSUPPORTED) type = PyExc_TypeError;
    PyErr_SetString(type, err[0] ? err : "sparse attention kernel failed");
    return -1;
}

/* Byte range [lo, hi) a view can touch, for overlap checks. */
static void byte_span(const sa_view *v, uintptr_t *lo, uintptr_t *hi)
{
    int64_t first = 0, last = 0;
    for (int d = 0; d < v->ndim; d++) {
        if (v->shape[d] == 0) {
            *lo = *hi = (uintptr_t)v->data;
            return;
        }
        int64_t reach = (v->shape[d] - 1) * v->strides[d];
        if (reach < 0) first += reach; else last += reach;
    }
    int element = v->dtype.bits / 8;
    *lo = (uintptr_t)(v->data + first * element);
    *hi = (uintptr_t)(v->data + (last + 1) * element);
}

static int expect_disjoint(const sa_view *out, const sa_view *in)
{
    if (in == NULL || out == NULL) return 0;
    uintptr_t a0, a1, b0, b1;
    byte_span(out, &a0, &a1);
    byte_span(in, &b0, &b1);
    if (a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1) {
        PyErr_Format(PyExc_ValueError, "%s: output buffer overlaps input %s", out->name,
                     in->name);
        return -1;
    }
    return 0;
}

static int float_bits(int cuda) { return SA_DT_F32 | SA_DT_F64 | (cuda ? (SA_DT_F16 | SA_DT_BF16) : 0); }

static sa_dtype dtype_of(const sa_view *v)
{
    switch (sa_view_dtype_bit(v)) {
    case SA_DT_F64: return SA_F64;
    case SA_DT_F16: return SA_F16;
    case SA_DT_BF16: return SA_BF16;
    default: return SA_F32;
    }
}

static int accum_bit(sa_dtype dt) { return dt == SA_F64 ? SA_DT_F64 : SA_DT_F32; }

static int expect_same_dtype(const sa_view *v, const sa_view *ref)
{
    if (sa_view_dtype_bit(v) == sa_view_dtype_bit(ref)) return 0;
    PyErr_Format(PyExc_TypeError, "%s: expected dtype %s (the dtype of %s), got %s", v->name,
                 sa_dtype_bit_name(sa_view_dtype_bit(ref)), ref->name,
                 sa_dtype_bit_name(sa_view_dtype_bit(v)));
    return -1;
}

/* q, k, v and other row tensors: [B, heads, N, D], last dimension contiguous. */
static int check_row_tensor(const sa_view *v, const sa_view *q)
{
    if (sa_view_expect_same_device(v, q) < 0 || expect_same_dtype(v, q) < 0) return -1;
    if (sa_view_expect_shape(v, q->shape, 4) < 0) return -1;
    if (v->shape[0] * v->shape[1] * v->shape[2] * v->shape[3] == 0) return 0; /* no element read */
    if (v->shape[3] > 1 && v->strides[3] != 1) {
        PyErr_Format(PyExc_ValueError,
                     "%s: the last dimension must be contiguous (stride 1), got stride %lld",
                     v->name, (long long)v->strides[3]);
        return -1;
    }
    for (int d = 0; d < 3; d++) {
        if (v->strides[d] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative stride %lld in dimension %d", v->name,
                         (long long)v->strides[d], d);
            return -1;
        }
    }
    return 0;
}

static int check_buffer(const sa_view *v, const sa_view *q, int dtype_bit, const int64_t *shape,
                        int ndim)
{
    if (sa_view_expect_same_device(v, q) < 0 || sa_view_expect_dtype(v, dtype_bit) < 0 ||
        sa_view_expect_shape(v, shape, ndim) < 0 || sa_view_expect_contiguous(v) < 0)
        return -1;
    return 0;
}

static int is_cuda(const sa_view *v) { return v->device.device_type == kDLCUDA; }

static int check_device(const sa_view *q)
{
    if (q->device.device_type == kDLCPU) return 0;
    if (is_cuda(q)) {
#ifdef SA_WITH_CUDA
        return 0;
#else
        PyErr_SetString(PyExc_RuntimeError,
                        "query: tensor is on a CUDA device but this build of sparse_attention "
                        "has no CUDA kernels (rebuild with nvcc available, or "
                        "SPARSE_ATTENTION_CUDA=1 to require them)");
        return -1;
#endif
    }
    PyErr_Format(PyExc_ValueError,
                 "query: DLPack device type %d is not supported (expected CPU or CUDA)",
                 (int)q->device.device_type);
    return -1;
}

/* The layout: row_ptr int64 [N + 1], col_idx int32 [nnz]; on the CPU the
 * contents are checked too (a corrupted layout must not index out of range). */
static int check_layout(const sa_view *ptr, const sa_view *idx, const sa_view *q, int64_t n)
{
    int64_t ptr_shape[1] = {n + 1}, idx_shape[1] = {-1};
    if (check_buffer(ptr, q, SA_DT_I64, ptr_shape, 1) < 0 ||
        check_buffer(idx, q, SA_DT_I32, idx_shape, 1) < 0)
        return -1;
    if (is_cuda(q)) return 0; /* device copies come from layouts checked on the host */
    const int64_t *rp = (const int64_t *)ptr->data;
    const int32_t *ci = (const int32_t *)idx->data;
    int64_t nnz = idx->shape[0];
    if (rp[0] != 0 || rp[n] != nnz) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected offsets from 0 to %lld (the length of %s), got %lld to %lld",
                     ptr->name, (long long)nnz, idx->name, (long long)rp[0], (long long)rp[n]);
        return -1;
    }
    for (int64_t i = 0; i < n; i++) {
        if (rp[i + 1] < rp[i]) {
            PyErr_Format(PyExc_ValueError, "%s: offsets decrease at row %lld", ptr->name,
                         (long long)i);
            return -1;
        }
    }
    /* one branch-free pass (it vectorises; a loop that stops at the first bad
     * index does not, and cost a fifth of a small call's kernel time), then
     * the search for the position only when something is out of range */
    int32_t lowest = 0, highest = 0;
    for (int64_t e = 0; e < nnz; e++) {
        lowest = ci[e] < lowest ? ci[e] : lowest;
        highest = ci[e] > highest ? ci[e] : highest;
    }
    if (lowest >= 0 && (nnz == 0 || highest < n)) return 0;
    for (int64_t e = 0; e < nnz; e++) {
        if (ci[e] < 0 || ci[e] >= n) {
            PyErr_Format(PyExc_ValueError,
                         "%s: index %lld at position %lld is outside [0, %lld) tokens",
                         idx->name, (long long)ci[e], (long long)e, (long long)n);
            return -1;
        }
    }
    return 0;
}

typedef struct {
    PyObject *bias, *key_mask, *head_active;
    long long height, width;
    double scale, dropout_p;
    unsigned long long dropout_seed;
} common_options;

/* Checks and fills what forward and backward share. */
static int fill_common(view_set *set, sa_attention_params *p, const common_options *o,
                       const sa_view *q, const sa_view *k, const sa_view *v)
{
    if (sa_view_expect_ndim(q, 4) < 0 || sa_view_expect_dtype(q, float_bits(is_cuda(q))) < 0 ||
        check_device(q) < 0 || check_row_tensor(q, q) < 0 || check_row_tensor(k, q) < 0 ||
        check_row_tensor(v, q) < 0)
        return -1;
    p->batch = q->shape[0];
    p->heads = q->shape[1];
    p->num_tokens = q->shape[2];
    p->head_dim = q->shape[3];
    p->dtype = dtype_of(q);
    if (o->height < 1 || o->width < 1 || o->height * o->width != p->num_tokens) {
        PyErr_Format(PyExc_ValueError,
                     "height, width: %lld x %lld does not match the %lld tokens of query",
                     o->height, o->width, (long long)p->num_tokens);
        return -1;
    }
    if (p->num_tokens > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "query: %lld tokens exceed 32-bit token indices",
                     (long long)p->num_tokens);
        return -1;
    }
    p->height = o->height;
    p->width = o->width;
    char message[96]; /* PyErr_Format has no %g */
    if (!isfinite(o->scale)) {
        PyOS_snprintf(message, sizeof(message), "scale: expected a finite number, got %g", o->scale);
        PyErr_SetString(PyExc_ValueError, message);
        return -1;
    }
    p->scale = o->scale;
    if (!(o->dropout_p >= 0.0 && o->dropout_p < 1.0)) {
        PyOS_snprintf(message, sizeof(message), "dropout_p: expected a value in [0, 1), got %g",
                      o->dropout_p);
        PyErr_SetString(PyExc_ValueError, message);
        return -1;
    }
    p->dropout_p = o->dropout_p;
    p->dropout_seed = o->dropout_seed;
    for (int d = 0; d < 3; d++) {
        p->q_stride[d] = q->strides[d];
        p->k_stride[d] = k->strides[d];
        p->v_stride[d] = v->strides[d];
    }
    p->q = q->data;
    p->k = k->data;
    p->v = v->data;
    p->stream = (void *)(intptr_t)(set->stream < 0 ? 0 : set->stream);
    p->device_id = q->device.device_id;

    sa_view *bias = take(set, o->bias, "rel_pos_bias", 0);
    if (o->bias != Py_None && bias == NULL) return -1;
    if (bias) {
        int64_t shape[3] = {p->heads, -1, -1};
        if (check_buffer(bias, q, sa_view_dtype_bit(q), shape, 3) < 0) return -1;
        if (bias->shape[1] != bias->shape[2] || bias->shape[1] % 2 != 1) {
            PyErr_Format(PyExc_ValueError,
                         "rel_pos_bias: expected shape [heads, 2M+1, 2M+1], got [%lld, %lld, %lld]",
                         (long long)bias->shape[0], (long long)bias->shape[1],
                         (long long)bias->shape[2]);
            return -1;
        }
        p->bias_table = bias->data;
        p->max_relative = (bias->shape[1] - 1) / 2;
    }
    sa_view *mask = take(set, o->key_mask, "key_mask", 0);
    if (o->key_mask != Py_None && mask == NULL) return -1;
    if (mask) {
        int64_t shape[2] = {p->batch, p->num_tokens};
        if (sa_view_expect_same_device(mask, q) < 0 || sa_view_expect_dtype(mask, SA_DT_BOOL) < 0 ||
            sa_view_expect_shape(mask, shape, 2) < 0)
            return -1;
        p->key_mask = (const uint8_t *)mask->data;
        p->key_mask_stride[0] = mask->strides[0];
        p->key_mask_stride[1] = mask->strides[1];
    }
    sa_view *heads = take(set, o->head_active, "head_active", 0);
    if (o->head_active != Py_None && heads == NULL) return -1;
    if (heads) {
        int64_t shape[1] = {p->heads};
        if (check_buffer(heads, q, SA_DT_BOOL, shape, 1) < 0) return -1;
        p->head_active = (const uint8_t *)heads->data;
    }
    return 0;
}

/* The CUDA kernels' long-row and long-column lists (int32 token ids). */
static int take_long_list(view_set *set, PyObject *obj, const char *name, const sa_view *q,
                          const int32_t **list, int64_t *count)
{
    if (obj == Py_None) return 0;
    sa_view *v = take(set, obj, name, 0);
    int64_t any[1] = {-1};
    if (!v || check_buffer(v, q, SA_DT_I32, any, 1) < 0) return -1;
    *list = (const int32_t *)v->data;
    *count = v->shape[0];
    if (!is_cuda(q)) { /* the CPU kernels index rows with it: check what we can read */
        const int64_t n = q->shape[2];
        for (int64_t t = 0; t < *count; t++) {
            if ((*list)[t] < 0 || (*list)[t] >= n) {
                PyErr_Format(PyExc_ValueError, "%s: entry %lld is %d, outside [0, %lld)", name,
                             (long long)t, (*list)[t], (long long)n);
                return -1;
            }
        }
    }
    return 0;
}

/* A packed stencil's numbers (E, G, L, then 2E + G + L more, then
 * optionally one word of flags), int32 and one-dimensional, on the device of
 * `device_of` (NULL: on the CPU); NULL with an exception set when they are
 * not. Only their count is checked here. */
static const int32_t *take_packed_stencil(view_set *set, PyObject *obj, const sa_view *device_of,
                                          int64_t *length_out)
{
    sa_view *packed = take(set, obj, "stencil", 0);
    int64_t any[1] = {-1};
    if (!packed) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "stencil: expected an int32 array, got None");
        return NULL;
    }
    if (device_of == NULL && packed->device.device_type != kDLCPU) {
        PyErr_SetString(PyExc_ValueError, "stencil: expected a CPU array");
        return NULL;
    }
    if (check_buffer(packed, device_of ? device_of : packed, SA_DT_I32, any, 1) < 0) return NULL;
    const int32_t *at = (const int32_t *)packed->data;
    const int64_t length = packed->shape[0];
    const int64_t body = length < 3 || at[0] < 0 || at[1] < 0 || at[2] < 0
                             ? -1 : 3 + 2 * (int64_t)at[0] + at[1] + at[2];
    if (body < 0 || (length != body && length != body + 1)) {
        PyErr_Format(PyExc_ValueError,
                     "stencil: expected E, G, L, then 2E + G + L numbers and optionally a flags word, got %lld "
                     "numbers", (long long)length);
        return NULL;
    }
    const int32_t flags = length > body ? at[body] : 0;
    if (flags & ~(STENCIL_FLAG_CLAMPED | STENCIL_STRIDE_BITS)) {
        PyErr_Format(PyExc_ValueError,
                     "stencil: unknown flags %d (known: %d, a window clamped to the grid, and its query strides "
                     "minus one in bits 8-15 and 16-23)", (int)flags, STENCIL_FLAG_CLAMPED);
        return NULL;
    }
    if ((flags & STENCIL_STRIDE_BITS) && !(flags & STENCIL_FLAG_CLAMPED)) {
        PyErr_SetString(PyExc_ValueError, "stencil: query strides are for a window clamped to the grid (flag 1)");
        return NULL;
    }
    *length_out = length;
    return at;
}

/* The flags word of a packed stencil (0 where it has none). */
static int32_t stencil_flags(const int32_t *at, int64_t length)
{
    const int64_t body = 3 + 2 * (int64_t)at[0] + at[1] + at[2];
    return length > body ? at[body] : 0;
}

/* A window clamped to the grid must be a whole box of offsets (each once;
 * in units of the divisors they share, for a dilated one), no taller or
 * wider than the smallest class of tokens they link, with nothing else: 0,
 * or -1 with an exception set. */
static int check_clamped_window(const int32_t *at, int64_t height, int64_t width, int stride_y, int stride_x)
{
    const int64_t offsets = at[0];
    const int32_t *pairs = at + 3;
    if (at[1] != 0 || at[2] != 0 || offsets == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "stencil: a window clamped to the grid takes offsets alone (no extra keys or listed rows)");
        return -1;
    }
    int64_t step[2], lo[2], size[2];
    sa_cpu_window_box(pairs, offsets, 1, step, lo, size);
    const int64_t box_h = size[0], box_w = size[1];
    if (box_h > height / step[0] || box_w > width / step[1] || box_h * box_w != offsets) {
        PyErr_Format(PyExc_ValueError,
                     "stencil: a window clamped to the grid must be a whole box of offsets (in steps of %lld x %lld) "
                     "within the %lld x %lld grid's every class of tokens; got %lld offsets in a %lld x %lld box",
                     (long long)step[0], (long long)step[1], (long long)height, (long long)width,
                     (long long)offsets, (long long)box_h, (long long)box_w);
        return -1;
    }
    if (stride_y > box_h || stride_x > box_w || !sa_cpu_window_stride_fits(stride_y, SA_WINDOW_BLOCK_ROWS) ||
        !sa_cpu_window_stride_fits(stride_x, SA_WINDOW_BLOCK_COLS)) {
        PyErr_Format(PyExc_ValueError,
                     "stencil: query strides %d x %d do not suit a %lld x %lld clamped window: each must be at most "
                     "the box, and divide or be a multiple of the window kernel's %d x %d blocks",
                     stride_y, stride_x, (long long)box_h, (long long)box_w, SA_WINDOW_BLOCK_ROWS,
                     SA_WINDOW_BLOCK_COLS);
        return -1;
    }
    uint8_t *seen = calloc((size_t)offsets, 1);
    if (!seen) {
        PyErr_NoMemory();
        return -1;
    }
    for (int64_t o = 0; o < offsets; o++) {
        const int64_t cell = (pairs[2 * o] / step[0] - lo[0]) * box_w + pairs[2 * o + 1] / step[1] - lo[1];
        if (seen[cell]) {
            free(seen);
            PyErr_Format(PyExc_ValueError, "stencil: offset (%d, %d) is given twice", pairs[2 * o],
                         pairs[2 * o + 1]);
            return -1;
        }
        seen[cell] = 1;
    }
    free(seen);
    return 0;
}

/* A stencil layout for the CPU stencil kernels (csrc/attention_cpu_stencil.c),
 * packed in one int32 array on the CPU: E, G, L, then E offsets (dy, dx), G
 * extra keys and L listed rows. Python checks that it describes the CSR
 * layout; here, that every number is safe to index with. */
static int take_stencil(view_set *set, PyObject *obj, const sa_view *q, sa_attention_params *p)
{
    if (obj == Py_None) return 0;
    if (is_cuda(q) || p->dtype != SA_F32) {
        PyErr_SetString(PyExc_ValueError, "stencil: the stencil kernels run on the CPU, in float32");
        return -1;
    }
    int64_t length = 0;
    const int32_t *at = take_packed_stencil(set, obj, q, &length);
    if (!at) return -1;
    const int64_t offsets = at[0], keys = at[1], rows = at[2], n = p->num_tokens;
    const int32_t flags = stencil_flags(at, length);
    const int clamped = (flags & STENCIL_FLAG_CLAMPED) != 0;
    const int stride_y = ((flags >> STENCIL_STRIDE_Y_SHIFT) & 0xFF) + 1;
    const int stride_x = ((flags >> STENCIL_STRIDE_X_SHIFT) & 0xFF) + 1;
    const int32_t *pairs = at + 3, *listed = pairs + 2 * offsets;
    for (int64_t o = 0; o < offsets; o++) {
        if (pairs[2 * o] <= -p->height || pairs[2 * o] >= p->height ||
            pairs[2 * o + 1] <= -p->width || pairs[2 * o + 1] >= p->width) {
            PyErr_Format(PyExc_ValueError, "stencil: offset %lld is (%d, %d), outside the %lld x %lld grid",
                         (long long)o, pairs[2 * o], pairs[2 * o + 1], (long long)p->height,
                         (long long)p->width);
            return -1;
        }
    }
    for (int64_t t = 0; t < keys + rows; t++) {
        if (listed[t] < 0 || listed[t] >= n) {
            PyErr_Format(PyExc_ValueError, "stencil: %s %lld is token %d, outside [0, %lld)",
                         t < keys ? "key" : "row", (long long)(t < keys ? t : t - keys), listed[t],
                         (long long)n);
            return -1;
        }
    }
    if (clamped && check_clamped_window(at, p->height, p->width, stride_y, stride_x) < 0) return -1;
    p->stencil_clamped = clamped;
    p->stencil_stride_y = stride_y;
    p->stencil_stride_x = stride_x;
    p->stencil_offsets = pairs;
    p->stencil_num_offsets = offsets;
    p->stencil_keys = listed;
    p->stencil_num_keys = keys;
    p->stencil_rows = listed + keys;
    p->stencil_num_rows = rows;
    return 0;
}

static char *window_takes_kwlist[] = {"stencil", "head_dim", NULL};

/* Whether the CPU window kernel runs a packed stencil at this head dim (the
 * rule of sa_cpu_window_fits, asked before the call is made). */
static PyObject *cpu_window_takes(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    PyObject *stencil_obj;
    long long head_dim;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OL", window_takes_kwlist, &stencil_obj, &head_dim)) return NULL;
    view_set set = {.count = 0, .stream = -1};
    int64_t length = 0;
    const int32_t *at = take_packed_stencil(&set, stencil_obj, NULL, &length);
    if (!at) goto fail;
    const int fits = sa_cpu_window_offsets_fit(at + 3, at[0], head_dim, at[1] == 0 && at[2] == 0);
    release_all(&set);
    return PyBool_FromLong(fits);
fail:
    release_all(&set);
    return NULL;
}

static int run_kernel(int cuda, int backward, sa_attention_params *p)
{
    char err[ERR_LEN] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
#ifdef SA_WITH_CUDA
    if (cuda)
        status = backward ? sa_cuda_backward(p, err, sizeof(err)) : sa_cuda_forward(p, err, sizeof(err));
    else
#endif
        status = backward ? sa_cpu_backward(p, err, sizeof(err)) : sa_cpu_forward(p, err, sizeof(err));
    Py_END_ALLOW_THREADS
    (void)cuda;
    return status == SA_OK ? 0 : raise_status(status, err);
}

static char *forward_kwlist[] = {"query", "key", "value", "out", "lse", "row_ptr", "col_idx",
                                 "height", "width", "scale", "rel_pos_bias", "key_mask",
                                 "head_active", "dropout_p", "dropout_seed", "row_stats",
                                 "stream", "long_rows", "long_threshold", "reference_kernel",
                                 "tile_plan", "tile_passes", "long_row_splits", "split_workspace",
                                 "stencil", "long_rows_beside", "stencil_strips",
                                 "overlap_passes", NULL};

/* A tile plan for the tiled forward kernels (CUDA tensor cores, CPU panels;
 * sparse_attention/_tiles.py): one int32 buffer on q's device and, per pass,
 * six numbers on the host: tiles,
 * chunks, and the element offsets of tile_queries [tiles x 64], tile_chunk_ptr
 * [tiles + 1], chunk_keys [chunks x 64] and chunk_masks [chunks x 64 uint64]. */
typedef struct {
    int64_t count;
    int64_t fields[SA_MAX_PLAN_PASSES][6];
    const int32_t *base;
} tile_plan;


/* Reads a Python sequence of at most `max` ints into values; -1 with a
 * Python exception (naming `name`) when it is not one or is longer. */
static int read_int_sequence(PyObject *obj, const char *name, int64_t *values, Py_ssize_t max,
                             Py_ssize_t *length)
{
    PyObject *seq = PySequence_Fast(obj, "expected a sequence of integers");
    if (!seq) {
        PyErr_Format(PyExc_TypeError, "%s: expected a sequence of integers", name);
        return -1;
    }
    *length = PySequence_Fast_GET_SIZE(seq);
    if (*length > max) {
        PyErr_Format(PyExc_ValueError, "%s: %zd integers, expected at most %zd", name, *length, max);
        Py_DECREF(seq);
        return -1;
    }
    for (Py_ssize_t t = 0; t < *length; t++) {
        values[t] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, t));
        if (values[t] == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

static int take_tile_plan(view_set *set, PyObject *buffer_obj, PyObject *passes_obj,
                          const sa_view *q, tile_plan *plan)
{
    plan->count = 0;
    if (buffer_obj == Py_None && passes_obj == Py_None) return 0;
    if (buffer_obj == Py_None || passes_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError, "tile_plan, tile_passes: give both or neither");
        return -1;
    }
    sa_view *buffer = take(set, buffer_obj, "tile_plan", 0);
    int64_t any[1] = {-1};
    if (!buffer || check_buffer(buffer, q, SA_DT_I32, any, 1) < 0) return -1;
    int64_t values[6 * SA_MAX_PLAN_PASSES];
    Py_ssize_t length;
    if (read_int_sequence(passes_obj, "tile_passes", values, 6 * SA_MAX_PLAN_PASSES, &length) < 0) return -1;
    if (length == 0 || length % 6 != 0) {
        PyErr_Format(PyExc_ValueError,
                     "tile_passes: expected 6 integers per pass and 1 to %d passes, got %zd integers",
                     SA_MAX_PLAN_PASSES, length);
        return -1;
    }
    const int64_t size = buffer->shape[0];
    for (Py_ssize_t t = 0; t < length; t++) {
        if (values[t] < 0 || values[t] > size) {
            PyErr_Format(PyExc_ValueError, "tile_passes: entry %zd is %lld, outside [0, %lld]", t,
                         (long long)values[t], (long long)size);
            return -1;
        }
        plan->fields[t / 6][t % 6] = values[t];
    }
    plan->count = length / 6;
    for (int64_t i = 0; i < plan->count; i++) {
        const int64_t *f = plan->fields[i];
        const int64_t tiles = f[0], chunks = f[1];
        /* extents in int32 elements: queries, chunk offsets, keys, masks (two per word) */
        const int64_t extent[4] = {tiles * 64, tiles + 1, chunks * 64, chunks * 128};
        for (int e = 0; e < 4; e++) {
            if (f[2 + e] + extent[e] > size) {
                PyErr_Format(PyExc_ValueError,
                             "tile_passes: pass %lld, array %d ends at %lld, past the %lld-element "
                             "tile_plan", (long long)i, e, (long long)(f[2 + e] + extent[e]),
                             (long long)size);
                return -1;
            }
        }
        if (f[5] % 2) {
            PyErr_Format(PyExc_ValueError,
                         "tile_passes: pass %lld, the masks' offset %lld must be even (64-bit words)",
                         (long long)i, (long long)f[5]);
            return -1;
        }
    }
    plan->base = (const int32_t *)buffer->data;
    return 0;
}

static PyObject *attention_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    PyObject *q_obj, *k_obj, *v_obj, *out_obj, *lse_obj, *ptr_obj, *idx_obj;
    PyObject *stats_obj = Py_None, *long_rows_obj = Py_None;
    PyObject *plan_obj = Py_None, *passes_obj = Py_None, *workspace_obj = Py_None;
    PyObject *stencil_obj = Py_None;
    long long long_row_splits = 1;
    common_options o = {Py_None, Py_None, Py_None, 0, 0, NAN, 0.0, 0};
    long long stream = -1, long_threshold = INT64_MAX;
    int reference_kernel = 0, long_rows_beside = 0, stencil_strips = 0, overlap_passes = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOO|$LLdOOOdKOLOLpOOLOOppp", forward_kwlist,
                                     &q_obj, &k_obj, &v_obj, &out_obj, &lse_obj, &ptr_obj,
                                     &idx_obj, &o.height, &o.width, &o.scale, &o.bias,
                                     &o.key_mask, &o.head_active, &o.dropout_p,
                                     &o.dropout_seed, &stats_obj, &stream, &long_rows_obj,
                                     &long_threshold, &reference_kernel, &plan_obj, &passes_obj,
                                     &long_row_splits, &workspace_obj, &stencil_obj,
                                     &long_rows_beside, &stencil_strips, &overlap_passes))
        return NULL;
    view_set set = {.count = 0, .stream = stream};
    sa_attention_params p;
    memset(&p, 0, sizeof(p));
    sa_view *q = take(&set, q_obj, "query", 0), *k = q ? take(&set, k_obj, "key", 0) : NULL;
    sa_view *v = k ? take(&set, v_obj, "value", 0) : NULL;
    if (!v || fill_common(&set, &p, &o, q, k, v) < 0) goto fail;
    sa_view *out = take(&set, out_obj, "out", 1);
    if (!out) goto fail;
    if (check_buffer(out, q, sa_view_dtype_bit(q), q->shape, 4) < 0 ||
        expect_disjoint(out, q) < 0 || expect_disjoint(out, k) < 0 || expect_disjoint(out, v) < 0)
        goto fail;
    int64_t rows[3] = {p.batch, p.heads, p.num_tokens};
    sa_view *lse = take(&set, lse_obj, "lse", 1);
    if (!lse || check_buffer(lse, q, accum_bit(p.dtype), rows, 3) < 0) goto fail;
    sa_view *ptr = take(&set, ptr_obj, "row_ptr", 0);
    sa_view *idx = ptr ? take(&set, idx_obj, "col_idx", 0) : NULL;
    if (!idx || check_layout(ptr, idx, q, p.num_tokens) < 0) goto fail;
    if (stats_obj != Py_None) {
        int64_t stats_shape[4] = {p.batch, p.heads, p.num_tokens, 2};
        sa_view *stats = take(&set, stats_obj, "row_stats", 1);
        if (!stats || check_buffer(stats, q, accum_bit(p.dtype), stats_shape, 4) < 0) goto fail;
        p.row_stats = stats->data;
    }
    if (take_long_list(&set, long_rows_obj, "long_rows", q, &p.long_rows, &p.num_long_rows) < 0)
        goto fail;
    p.long_threshold = long_rows_obj != Py_None ? long_threshold : INT64_MAX;
    p.reference_kernel = reference_kernel;
    tile_plan plan;
    if (take_tile_plan(&set, plan_obj, passes_obj, q, &plan) < 0) goto fail;
    if (take_stencil(&set, stencil_obj, q, &p) < 0) goto fail;
    p.stencil_strips = stencil_strips;
    if (p.stencil_clamped && plan.count > 0) {
        PyErr_SetString(PyExc_ValueError, "stencil: a window clamped to the grid runs without a tile_plan");
        goto fail;
    }
    if (is_cuda(q) && p.stencil_offsets != NULL && plan.count > 0 && p.row_stats != NULL) {
        PyErr_SetString(PyExc_ValueError,
                        "row_stats: statistics need a single kernel on CUDA (a stencil with a "
                        "tile_plan merges two)");
        goto fail;
    }
    if (workspace_obj != Py_None) {
        if (!is_cuda(q) || p.num_long_rows == 0) {
            PyErr_SetString(PyExc_ValueError,
                            "split_workspace: splitting long rows needs CUDA tensors and long_rows");
            goto fail;
        }
        if (long_row_splits < 1 || long_row_splits > 65536) {
            PyErr_Format(PyExc_ValueError, "long_row_splits: expected 1 to 65536, got %lld",
                         long_row_splits);
            goto fail;
        }
        sa_view *workspace = take(&set, workspace_obj, "split_workspace", 1);
        int64_t needed[1] = {p.batch * p.heads * p.num_long_rows * long_row_splits * (p.head_dim + 5)};
        if (!workspace || check_buffer(workspace, q, accum_bit(p.dtype), needed, 1) < 0) goto fail;
        p.split_partials = workspace->data;
        p.long_row_splits = long_row_splits;
    }
    if (is_cuda(q) && plan.count > 1 && p.row_stats != NULL) {
        PyErr_SetString(PyExc_ValueError,
                        "row_stats: statistics on CUDA need a single-pass plan (the CUDA passes' "
                        "statistics are not merged; the CPU's are)");
        goto fail;
    }
    p.out = out->data;
    for (int d = 0; d < 3; d++) p.out_stride[d] = out->strides[d];
    p.lse = lse->data;
    p.row_ptr = (const int64_t *)ptr->data;
    p.col_idx = (const int32_t *)idx->data;
    p.nnz = idx->shape[0];
    if (plan.count > 0) {
        /* the device's forward takes the whole plan: the passes in order (later
         * ones merge into earlier ones), and the rows the plan leaves to the
         * block-per-row kernel (listed in long_rows) */
        p.plan_base = plan.base;
        p.plan_fields = &plan.fields[0][0];
        p.plan_num_passes = plan.count;
        p.long_rows_beside = long_rows_beside;
        p.overlap_passes = overlap_passes;
    }
    if (run_kernel(is_cuda(q), 0, &p) < 0) goto fail;
    release_all(&set);
    Py_RETURN_NONE;
fail:
    release_all(&set);
    return NULL;
}

static char *backward_kwlist[] = {"query", "key", "value", "out", "grad_out", "lse", "delta",
                                  "grad_query", "grad_key", "grad_value", "row_ptr", "col_idx",
                                  "col_ptr", "row_idx", "height", "width", "scale",
                                  "rel_pos_bias", "key_mask", "head_active", "dropout_p",
                                  "dropout_seed", "grad_scores", "stream", "long_rows",
                                  "long_cols", "long_threshold", "reference_kernel", "tile_plan",
                                  "tile_passes", "stencil", "stencil_strips", "grad_bias_rows",
                                  "tiled_backward_extras", "plan_scores", NULL};

static PyObject *attention_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    PyObject *q_obj, *k_obj, *v_obj, *out_obj, *go_obj, *lse_obj, *delta_obj, *gq_obj, *gk_obj,
        *gv_obj, *ptr_obj, *idx_obj, *cptr_obj, *ridx_obj;
    PyObject *gs_obj = Py_None, *long_rows_obj = Py_None, *long_cols_obj = Py_None;
    PyObject *plan_obj = Py_None, *passes_obj = Py_None;
    PyObject *stencil_obj = Py_None, *bias_rows_obj = Py_None;
    common_options o = {Py_None, Py_None, Py_None, 0, 0, NAN, 0.0, 0};
    long long stream = -1, long_threshold = INT64_MAX;
    int reference_kernel = 0, stencil_strips = 0, tiled_extras = 0, plan_scores = 0;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OOOOOOOOOOOOOO|$LLdOOOdKOLOOLpOOOpOpp", backward_kwlist, &q_obj, &k_obj,
            &v_obj, &out_obj, &go_obj, &lse_obj, &delta_obj, &gq_obj, &gk_obj, &gv_obj, &ptr_obj,
            &idx_obj, &cptr_obj, &ridx_obj, &o.height, &o.width, &o.scale, &o.bias, &o.key_mask,
            &o.head_active, &o.dropout_p, &o.dropout_seed, &gs_obj, &stream, &long_rows_obj,
            &long_cols_obj, &long_threshold, &reference_kernel, &plan_obj, &passes_obj,
            &stencil_obj, &stencil_strips, &bias_rows_obj, &tiled_extras, &plan_scores))
        return NULL;
    view_set set = {.count = 0, .stream = stream};
    sa_attention_params p;
    memset(&p, 0, sizeof(p));
    sa_view *q = take(&set, q_obj, "query", 0), *k = q ? take(&set, k_obj, "key", 0) : NULL;
    sa_view *v = k ? take(&set, v_obj, "value", 0) : NULL;
    if (!v || fill_common(&set, &p, &o, q, k, v) < 0) goto fail;
    sa_view *out = take(&set, out_obj, "out", 0);
    sa_view *go = out ? take(&set, go_obj, "grad_out", 0) : NULL;
    if (!go || check_row_tensor(out, q) < 0 || check_row_tensor(go, q) < 0) goto fail;
    int64_t rows[3] = {p.batch, p.heads, p.num_tokens};
    sa_view *lse = take(&set, lse_obj, "lse", 0);
    if (!lse || check_buffer(lse, q, accum_bit(p.dtype), rows, 3) < 0) goto fail;
    sa_view *delta = take(&set, delta_obj, "delta", 1);
    if (!delta || check_buffer(delta, q, accum_bit(p.dtype), rows, 3) < 0) goto fail;
    sa_view *grads[3];
    PyObject *grad_objs[3] = {gq_obj, gk_obj, gv_obj};
    const char *grad_names[3] = {"grad_query", "grad_key", "grad_value"};
    for (int g = 0; g < 3; g++) {
        grads[g] = take(&set, grad_objs[g], grad_names[g], 1);
        if (!grads[g] || check_buffer(grads[g], q, sa_view_dtype_bit(q), q->shape, 4) < 0) goto fail;
        const sa_view *inputs[5] = {q, k, v, out, go};
        for (int s = 0; s < 5; s++)
            if (expect_disjoint(grads[g], inputs[s]) < 0) goto fail;
        for (int s = 0; s < g; s++)
            if (expect_disjoint(grads[g], grads[s]) < 0) goto fail;
    }
    sa_view *ptr = take(&set, ptr_obj, "row_ptr", 0);
    sa_view *idx = ptr ? take(&set, idx_obj, "col_idx", 0) : NULL;
    if (!idx || check_layout(ptr, idx, q, p.num_tokens) < 0) goto fail;
    sa_view *cptr = take(&set, cptr_obj, "col_ptr", 0);
    sa_view *ridx = cptr ? take(&set, ridx_obj, "row_idx", 0) : NULL;
    if (!ridx || check_layout(cptr, ridx, q, p.num_tokens) < 0) goto fail;
    if (ridx->shape[0] != idx->shape[0]) {
        PyErr_Format(PyExc_ValueError, "row_idx: expected %lld entries (as col_idx), got %lld",
                     (long long)idx->shape[0], (long long)ridx->shape[0]);
        goto fail;
    }
    tile_plan plan;
    if (take_tile_plan(&set, plan_obj, passes_obj, q, &plan) < 0) goto fail;
    int64_t plan_slots = 0;
    for (int64_t i = 0; i < plan.count; i++) plan_slots += plan.fields[i][1] * 64 * 64;
    if (plan_scores && (!is_cuda(q) || plan.count == 0 || gs_obj == Py_None || !tiled_extras ||
                        plan_slots < idx->shape[0])) {
        PyErr_SetString(PyExc_ValueError,
                        "plan_scores: takes a CUDA call with a tile_plan that holds every pair, "
                        "grad_scores and tiled_backward_extras");
        goto fail;
    }
    if (gs_obj != Py_None) {
        /* plan order: one slot per (pass, chunk, row, column) of the plan, which
         * is at least nnz; the row kernels, should they run instead, use the
         * first batch x heads x nnz entries */
        int64_t gs_shape[3] = {p.batch, p.heads, plan_scores ? plan_slots : idx->shape[0]};
        sa_view *gs = take(&set, gs_obj, "grad_scores", 1);
        if (!gs || check_buffer(gs, q, accum_bit(p.dtype), gs_shape, 3) < 0) goto fail;
        p.grad_scores = gs->data;
    }
    p.tiled_backward_extras = tiled_extras;
    if (take_long_list(&set, long_rows_obj, "long_rows", q, &p.long_rows, &p.num_long_rows) < 0 ||
        take_long_list(&set, long_cols_obj, "long_cols", q, &p.long_cols, &p.num_long_cols) < 0)
        goto fail;
    if ((long_rows_obj == Py_None) != (long_cols_obj == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "long_rows, long_cols: give both or neither");
        goto fail;
    }
    p.long_threshold = long_rows_obj != Py_None ? long_threshold : INT64_MAX;
    p.reference_kernel = reference_kernel;
    p.out = out->data;
    p.grad_out = go->data;
    for (int d = 0; d < 3; d++) {
        p.out_stride[d] = out->strides[d];
        p.grad_out_stride[d] = go->strides[d];
    }
    p.lse = lse->data;
    p.delta = delta->data;
    p.grad_q = grads[0]->data;
    p.grad_k = grads[1]->data;
    p.grad_v = grads[2]->data;
    p.row_ptr = (const int64_t *)ptr->data;
    p.col_idx = (const int32_t *)idx->data;
    p.col_ptr = (const int64_t *)cptr->data;
    p.row_idx = (const int32_t *)ridx->data;
    p.nnz = idx->shape[0];
    if (plan.count > 0) {
        const int cpu_ok = !is_cuda(q) && p.dtype == SA_F32 && p.num_long_rows == 0;
        const int cuda_ok = is_cuda(q) && (p.dtype == SA_F16 || p.dtype == SA_BF16);
        if ((p.grad_scores != NULL && !plan_scores) || !(cpu_ok || cuda_ok)) {
            PyErr_SetString(PyExc_ValueError,
                            "tile_plan: the tiled backward takes float32 on the CPU (without long "
                            "rows) or float16/bfloat16 on CUDA, without a bias gradient in CSR "
                            "order (grad_scores; plan_scores on CUDA)");
            goto fail;
        }
        p.plan_base = plan.base;
        p.plan_fields = &plan.fields[0][0];
        p.plan_num_passes = plan.count;
    }
    p.stencil_strips = stencil_strips;
    if (take_stencil(&set, stencil_obj, q, &p) < 0) goto fail;
    if (p.stencil_clamped && plan.count > 0) {
        PyErr_SetString(PyExc_ValueError, "stencil: a window clamped to the grid runs without a tile_plan");
        goto fail;
    }
    if (p.stencil_offsets != NULL && p.grad_scores != NULL) {
        PyErr_SetString(PyExc_ValueError,
                        "stencil: the stencil backward gives no bias gradient (grad_scores; "
                        "grad_bias_rows on the window kernel)");
        goto fail;
    }
    if (bias_rows_obj != Py_None) {
        /* only the window, strip, tile and gather backwards fill it; the generic row kernels would
         * leave it unwritten */
        const int window_ok = p.stencil_offsets != NULL && !p.stencil_strips && sa_cpu_window_fits(&p);
        const int strips_ok = p.stencil_offsets != NULL && sa_cpu_stencil_sums_bias_grad(&p);
        const int gather_ok = sa_cpu_rows_on_gather(p.head_dim, p.num_tokens) && p.grad_scores == NULL;
        if (is_cuda(q) || p.dtype != SA_F32 || p.bias_table == NULL ||
            (p.stencil_offsets != NULL ? !(window_ok || strips_ok) : (plan.count == 0 && !gather_ok))) {
            PyErr_SetString(PyExc_ValueError,
                            "grad_bias_rows: takes a float32 CPU call with rel_pos_bias and a tile_plan, "
                            "a stencil that the window kernel runs, a stencil of offsets alone, or both, "
                            "or rows that the gather kernels run (head dims up to 128)");
            goto fail;
        }
        const int64_t side = 2 * p.max_relative + 1;
        int64_t shape[3] = {p.batch, p.heads, side * side};
        sa_view *bias_rows = take(&set, bias_rows_obj, "grad_bias_rows", 1);
        if (!bias_rows || check_buffer(bias_rows, q, accum_bit(p.dtype), shape, 3) < 0) goto fail;
        p.grad_bias_rows = (float *)bias_rows->data;
    }
    /* whether grad_scores comes back in plan order: the tensor-core dQ runs
     * (the same test the CUDA backward makes) */
    int scores_in_plan = 0;
#ifdef SA_WITH_CUDA
    if (plan_scores) {
        p.plan_scores_stride = plan_slots;
        scores_in_plan = sa_cuda_tiled_grad_query_applies(&p);
        if (!scores_in_plan) p.plan_scores_stride = 0;
    }
#endif
    if (run_kernel(is_cuda(q), 1, &p) < 0) goto fail;
    release_all(&set);
    return PyBool_FromLong(scores_in_plan);
fail:
    release_all(&set);
    return NULL;
}

static char *bias_grad_kwlist[] = {"grad_scores", "bucket_perm", "bucket_ptr", "grad_table",
                                   "stream", NULL};

static PyObject *bias_grad(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    PyObject *gs_obj, *perm_obj, *bptr_obj, *table_obj;
    long long stream = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|$L", bias_grad_kwlist, &gs_obj,
                                     &perm_obj, &bptr_obj, &table_obj, &stream))
        return NULL;
    view_set set = {.count = 0, .stream = stream};
    sa_view *gs = take(&set, gs_obj, "grad_scores", 0);
    sa_view *perm = gs ? take(&set, perm_obj, "bucket_perm", 0) : NULL;
    sa_view *bptr = perm ? take(&set, bptr_obj, "bucket_ptr", 0) : NULL;
    sa_view *table = bptr ? take(&set, table_obj, "grad_table", 1) : NULL;
    if (!table) goto fail;
    int64_t any3[3] = {-1, -1, -1};
    if (check_buffer(gs, gs, SA_DT_F32 | SA_DT_F64, any3, 3) < 0) goto fail;
    /* perm lists the entries that hold a pair: all of them in CSR order, only
     * some of the slots in the CUDA backward's plan order */
    int64_t any1[1] = {-1};
    if (check_buffer(perm, gs, SA_DT_I64, any1, 1) < 0 || check_buffer(bptr, gs, SA_DT_I64, any1, 1) < 0)
        goto fail;
    if (perm->shape[0] > gs->shape[2]) {
        PyErr_Format(PyExc_ValueError,
                     "bucket_perm: expected at most %lld entries (grad_scores' last dimension), got %lld",
                     (long long)gs->shape[2], (long long)perm->shape[0]);
        goto fail;
    }
    int64_t buckets = bptr->shape[0] - 1;
    int64_t table_shape[2] = {gs->shape[1], buckets};
    if (buckets < 1 || check_buffer(table, gs, sa_view_dtype_bit(gs), table_shape, 2) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bucket_ptr: expected at least 2 entries");
        goto fail;
    }
    if (!is_cuda(gs)) {
        const int64_t *bp = (const int64_t *)bptr->data, *pm = (const int64_t *)perm->data;
        if (bp[0] != 0 || bp[buckets] != perm->shape[0]) {
            PyErr_SetString(PyExc_ValueError,
                            "bucket_ptr: expected offsets from 0 to the length of bucket_perm");
            goto fail;
        }
        for (int64_t t = 0; t < buckets; t++) {
            if (bp[t + 1] < bp[t]) {
                PyErr_SetString(PyExc_ValueError, "bucket_ptr: offsets decrease");
                goto fail;
            }
        }
        for (int64_t e = 0; e < perm->shape[0]; e++) {
            if (pm[e] < 0 || pm[e] >= gs->shape[2]) {
                PyErr_SetString(PyExc_ValueError,
                                "bucket_perm: entry outside [0, grad_scores' last dimension)");
                goto fail;
            }
        }
    } else if (check_device(gs) < 0) {
        goto fail;
    }
    sa_bias_grad_params p = {gs->shape[0], gs->shape[1], gs->shape[2], buckets,
                             dtype_of(gs), gs->data, (const int64_t *)perm->data,
                             (const int64_t *)bptr->data, table->data,
                             (void *)(intptr_t)(stream < 0 ? 0 : stream),
                             gs->device.device_id};
    char err[ERR_LEN] = "";
    int status;
    int cuda = is_cuda(gs);
    Py_BEGIN_ALLOW_THREADS
#ifdef SA_WITH_CUDA
    if (cuda) status = sa_cuda_bias_grad(&p, err, sizeof(err));
    else
#endif
        status = sa_cpu_bias_grad(&p, err, sizeof(err));
    Py_END_ALLOW_THREADS
    (void)cuda;
    if (status != SA_OK) {
        raise_status(status, err);
        goto fail;
    }
    release_all(&set);
    Py_RETURN_NONE;
fail:
    release_all(&set);
    return NULL;
}

static char *dropout_mask_kwlist[] = {"seed", "dropout_p", "rows", "cols", "keep", NULL};

static PyObject *dropout_mask(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    PyObject *seed_obj, *rows_obj, *cols_obj, *keep_obj;
    double dropout_p;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OdOOO", dropout_mask_kwlist, &seed_obj, &dropout_p,
                                     &rows_obj, &cols_obj, &keep_obj))
        return NULL;
    if (!PyLong_Check(seed_obj)) {
        PyErr_Format(PyExc_TypeError, "seed: expected an int, got %s", Py_TYPE(seed_obj)->tp_name);
        return NULL;
    }
    unsigned long long seed = PyLong_AsUnsignedLongLong(seed_obj);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "seed: expected an integer in [0, 2**64)");
        return NULL;
    }
    if (!(dropout_p >= 0.0 && dropout_p < 1.0)) {
        PyErr_Format(PyExc_ValueError, "dropout_p: expected a probability in [0, 1), got %g", dropout_p);
        return NULL;
    }
    view_set set = {.count = 0, .stream = -1};
    sa_view *rows = take(&set, rows_obj, "rows", 0);
    sa_view *cols = rows ? take(&set, cols_obj, "cols", 0) : NULL;
    sa_view *keep = cols ? take(&set, keep_obj, "keep", 1) : NULL;
    if (!keep) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "rows, cols and keep: expected tensors, got None");
        goto fail;
    }
    if (rows->device.device_type != kDLCPU) {
        PyErr_SetString(PyExc_ValueError, "rows: expected a CPU tensor (the mask is drawn on the CPU)");
        goto fail;
    }
    int64_t any1[1] = {-1};
    if (check_buffer(rows, rows, SA_DT_I64, any1, 1) < 0 || check_buffer(cols, rows, SA_DT_I64, any1, 1) < 0)
        goto fail;
    int outer = keep->ndim == 4;
    int64_t shape[4] = {-1, -1, rows->shape[0], cols->shape[0]};
    if (!outer && rows->shape[0] != cols->shape[0]) {
        PyErr_Format(PyExc_ValueError,
                     "cols: expected %lld entries (as rows) for a [batch, heads, pairs] mask, got %lld",
                     (long long)rows->shape[0], (long long)cols->shape[0]);
        goto fail;
    }
    if (check_buffer(keep, rows, SA_DT_BOOL, shape, outer ? 4 : 3) < 0) goto fail;
    sa_dropout_mask_params p = {(uint64_t)seed, sa_dropout_threshold(dropout_p), keep->shape[0],
                                keep->shape[1], (const int64_t *)rows->data, (const int64_t *)cols->data,
                                rows->shape[0], cols->shape[0], outer, (uint8_t *)keep->data};
    char err[ERR_LEN] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = sa_cpu_dropout_mask(&p, sa_cpu_get_num_threads(), err, sizeof(err));
    Py_END_ALLOW_THREADS
    if (status != 0) {
        PyErr_SetString(PyExc_RuntimeError, err);
        goto fail;
    }
    release_all(&set);
    Py_RETURN_NONE;
fail:
    release_all(&set);
    return NULL;
}

static PyObject *new_array(int64_t length, int typenum)
{
    npy_intp dims[1] = {(npy_intp)length};
    return PyArray_SimpleNew(1, dims, typenum);
}

static char *layout_kwlist[] = {"pattern", "height", "width", "kernel_size", "block_size",
                                "stride", "num_global_tokens", "attention_ratio", "seed", NULL};

/* Allocations succeed far past the memory there is (the system overcommits), so
 * a layout too large to hold would end with the process killed while the
 * indices are written, not with an exception. 0, or -1 with a MemoryError set. */
static int check_layout_fits(const sa_layout_spec *spec, int64_t nnz)
{
    static const char *const names[SA_PATTERN_COUNT] = {"DENSE", "AXIAL", "BLOCK", "LONGFORMER", "STRIDED",
                                                        "RANDOM"};
    const uint64_t tokens = (uint64_t)(spec->height * spec->width);
    const uint64_t needed = (uint64_t)nnz * 2 * sizeof(int32_t) + 2 * (tokens + 1) * sizeof(int64_t);
    const uint64_t available = sa_host_memory_limit();
    if (available == 0 || needed <= available) return 0;
    const char *name = spec->pattern >= 0 && spec->pattern < SA_PATTERN_COUNT ? names[spec->pattern] : "?";
    char message[ERR_LEN];
    snprintf(message, sizeof(message),
             "build_layout: the %s layout of a %lld x %lld grid holds %lld pairs; its key indices and their "
             "transpose need %.1f GB, more than the %.1f GB of memory this process can have (a structured "
             "pattern, a lower attention_ratio or a smaller map would fit)",
             name, (long long)spec->height, (long long)spec->width, (long long)nnz, (double)needed / 1e9,
             (double)available / 1e9);
    PyErr_SetString(PyExc_MemoryError, message);
    return -1;
}

static PyObject *build_layout(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    sa_layout_spec spec;
    memset(&spec, 0, sizeof(spec));
    long long height, width, kernel_size, block_size, stride, num_global;
    unsigned long long seed;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iLLLLLLdK", layout_kwlist, &spec.pattern,
                                     &height, &width, &kernel_size, &block_size, &stride,
                                     &num_global, &spec.attention_ratio, &seed))
        return NULL;
    spec.height = height;
    spec.width = width;
    spec.kernel_size = kernel_size;
    spec.block_size = block_size;
    spec.stride = stride;
    spec.num_global_tokens = num_global;
    spec.seed = seed;
    char err[ERR_LEN] = "";
    if (sa_layout_validate(&spec, err, sizeof(err)) < 0) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    int64_t n = spec.height * spec.width;
    PyObject *row_ptr = new_array(n + 1, NPY_INT64), *col_idx = NULL, *col_ptr = NULL,
             *row_idx = NULL;
    if (!row_ptr) return NULL;
    int64_t *rp = PyArray_DATA((PyArrayObject *)row_ptr);
    const int threads = sa_cpu_get_num_threads();
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = sa_layout_count(&spec, rp, threads, err, sizeof(err));
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_SetString(PyExc_ValueError, err);
        goto fail;
    }
    if (check_layout_fits(&spec, rp[n]) < 0) goto fail;
    col_idx = new_array(rp[n], NPY_INT32);
    col_ptr = new_array(n + 1, NPY_INT64);
    row_idx = new_array(rp[n], NPY_INT32);
    if (!col_idx || !col_ptr || !row_idx) goto fail;
    int32_t *ci = PyArray_DATA((PyArrayObject *)col_idx);
    Py_BEGIN_ALLOW_THREADS
    status = sa_layout_fill(&spec, rp, ci, threads, err, sizeof(err));
    if (status == 0)
        status = sa_layout_transpose(n, rp, ci, PyArray_DATA((PyArrayObject *)col_ptr),
                                     PyArray_DATA((PyArrayObject *)row_idx), threads);
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_SetString(PyExc_MemoryError, err[0] ? err : "out of memory while building a layout");
        goto fail;
    }
    return Py_BuildValue("(NNNN)", row_ptr, col_idx, col_ptr, row_idx);
fail:
    Py_XDECREF(row_ptr);
    Py_XDECREF(col_idx);
    Py_XDECREF(col_ptr);
    Py_XDECREF(row_idx);
    return NULL;
}

/* A height x width grid's size: 0, or -1 with a ValueError set. */
static int check_grid(long long height, long long width)
{
    if (height < 1 || width < 1 || height >= INT32_MAX || width >= INT32_MAX || height * width >= INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "height, width: expected a grid of 1 to 2**31 - 2 tokens, got %lld x %lld",
                     height, width);
        return -1;
    }
    return 0;
}

/* A layout's CSR as CPU views: offsets int64 [num_tokens + 1] and keys int32
 * [nnz], named ptr_name and idx_name in errors; views go in set. Only their
 * types, devices and shapes are checked here. 0, or -1 with the error set. */
static int take_cpu_csr(view_set *set, PyObject *ptr_obj, PyObject *idx_obj, int64_t num_tokens,
                        const char *ptr_name, const char *idx_name, sa_view **ptr, sa_view **idx)
{
    sa_view *rp = take(set, ptr_obj, ptr_name, 0);
    sa_view *ci = rp ? take(set, idx_obj, idx_name, 0) : NULL;
    if (!ci) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_TypeError, "%s, %s: expected arrays, got None", ptr_name, idx_name);
        return -1;
    }
    if (rp->device.device_type != kDLCPU || ci->device.device_type != kDLCPU) {
        PyErr_Format(PyExc_ValueError, "%s, %s: expected CPU arrays", ptr_name, idx_name);
        return -1;
    }
    int64_t tokens[1] = {num_tokens + 1}, any1[1] = {-1};
    if (check_buffer(rp, rp, SA_DT_I64, tokens, 1) < 0 || check_buffer(ci, rp, SA_DT_I32, any1, 1) < 0) return -1;
    *ptr = rp;
    *idx = ci;
    return 0;
}

/* An optional int32 CPU list for a check on layouts: None is empty. 0, or -1 with the error set. */
static int take_cpu_int32_list(view_set *set, PyObject *obj, const char *name, const sa_view *device_of,
                               const int32_t **list, int64_t *count)
{
    *list = NULL;
    *count = 0;
    if (obj == NULL || obj == Py_None) return 0;
    sa_view *v = take(set, obj, name, 0);
    int64_t any1[1] = {-1};
    if (!v) return -1;
    if (v->device.device_type != kDLCPU) {
        PyErr_Format(PyExc_ValueError, "%s: expected a CPU array", name);
        return -1;
    }
    if (check_buffer(v, device_of, SA_DT_I32, any1, 1) < 0) return -1;
    *list = (const int32_t *)v->data;
    *count = v->shape[0];
    return 0;
}

/* The stencil rule's offsets: pairs within the grid's span, distinct, none
 * on the lattice. 0, or -1 with a ValueError set. */
/* Offsets as (dy, dx) pairs within the grid's span. 0; 1 where the rule names a pair twice (an offset
 * repeated, or one on the lattice), which no layout matches since its kernels would count that pair twice;
 * -1 with a ValueError set. */
static int check_stencil_offsets(const int32_t *offsets, int64_t count, long long height, long long width,
                                 long long lattice_stride)
{
    if (count % 2) {
        PyErr_Format(PyExc_ValueError, "offsets: expected (dy, dx) pairs, got %lld numbers", (long long)count);
        return -1;
    }
    const int64_t table_w = 2 * width - 1;
    uint8_t *seen = calloc((size_t)((2 * height - 1) * table_w), 1);
    if (!seen) {
        PyErr_NoMemory();
        return -1;
    }
    int status = 0;
    for (int64_t o = 0; o < count / 2 && status >= 0; o++) {
        const long long dy = offsets[2 * o], dx = offsets[2 * o + 1];
        if (dy <= -height || dy >= height || dx <= -width || dx >= width) {
            PyErr_Format(PyExc_ValueError, "offsets: (%lld, %lld) is off the %lld x %lld grid's span", dy, dx,
                         height, width);
            status = -1;
        } else if ((lattice_stride && dy % lattice_stride == 0 && dx % lattice_stride == 0) ||
                   seen[(dy + height - 1) * table_w + dx + width - 1]++) {
            status = 1;
        }
    }
    free(seen);
    return status;
}

/* Tokens of a list in [0, N). 0; 1 where `distinct` and a token repeats; -1 with a ValueError set. */
static int check_token_list(const int32_t *list, int64_t count, int64_t num_tokens, int distinct, const char *name)
{
    uint8_t *seen = distinct ? calloc((size_t)num_tokens, 1) : NULL;
    if (distinct && !seen) {
        PyErr_NoMemory();
        return -1;
    }
    int status = 0;
    for (int64_t t = 0; t < count && status >= 0; t++) {
        if (list[t] < 0 || list[t] >= num_tokens) {
            PyErr_Format(PyExc_ValueError, "%s: entry %lld is %d, outside [0, %lld)", name, (long long)t, list[t],
                         (long long)num_tokens);
            status = -1;
        } else if (distinct && seen[list[t]]++) {
            status = 1;
        }
    }
    free(seen);
    return status;
}

static char *stencil_matches_kwlist[] = {"indptr", "indices", "height", "width", "offsets", "keys", "rows",
                                         "lattice_stride", NULL};

/* sa_layout_matches_stencil on a layout's CSR: True or False. */
static PyObject *stencil_matches(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    PyObject *indptr_obj, *indices_obj, *offsets_obj, *keys_obj = Py_None, *rows_obj = Py_None, *result = NULL;
    long long height, width, lattice_stride = 0;
    view_set set = {.count = 0, .stream = -1};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOLLO|OOL", stencil_matches_kwlist, &indptr_obj, &indices_obj,
                                     &height, &width, &offsets_obj, &keys_obj, &rows_obj, &lattice_stride))
        return NULL;
    if (check_grid(height, width) < 0) return NULL;
    if (lattice_stride < 0) {
        PyErr_Format(PyExc_ValueError, "lattice_stride: expected >= 1, or 0 for no lattice, got %lld",
                     lattice_stride);
        return NULL;
    }
    sa_view *rp, *ci;
    const int64_t n = height * width;
    sa_stencil_rule rule = {.lattice_stride = lattice_stride};
    int64_t offset_numbers;
    if (take_cpu_csr(&set, indptr_obj, indices_obj, n, "indptr", "indices", &rp, &ci) < 0) goto done;
    if (offsets_obj == Py_None) {
        PyErr_SetString(PyExc_TypeError, "offsets: expected an array, got None");
        goto done;
    }
    if (take_cpu_int32_list(&set, offsets_obj, "offsets", rp, &rule.offsets, &offset_numbers) < 0 ||
        take_cpu_int32_list(&set, keys_obj, "keys", rp, &rule.keys, &rule.num_keys) < 0 ||
        take_cpu_int32_list(&set, rows_obj, "rows", rp, &rule.rows, &rule.num_rows) < 0)
        goto done;
    const int offsets_repeat = check_stencil_offsets(rule.offsets, offset_numbers, height, width, lattice_stride);
    const int keys_repeat = offsets_repeat < 0 ? -1 : check_token_list(rule.keys, rule.num_keys, n, 1, "keys");
    if (keys_repeat < 0 || check_token_list(rule.rows, rule.num_rows, n, 0, "rows") < 0) goto done;
    rule.num_offsets = offset_numbers / 2;
    char err[ERR_LEN] = "";
    const int64_t *row_ptr = (const int64_t *)rp->data;
    if (sa_layout_check_offsets(n, row_ptr, ci->shape[0], "indptr", "indices", err, sizeof(err)) < 0) {
        PyErr_SetString(PyExc_ValueError, err);
        goto done;
    }
    if (offsets_repeat || keys_repeat) {
        Py_INCREF(Py_False);
        result = Py_False;
        goto done;
    }
    int status;
    const int threads = sa_cpu_get_num_threads();
    Py_BEGIN_ALLOW_THREADS
    status = sa_layout_matches_stencil(height, width, row_ptr, (const int32_t *)ci->data, &rule, threads);
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_SetString(PyExc_MemoryError, "out of memory for the stencil check's tables");
        goto done;
    }
    result = PyBool_FromLong(status);
done:
    release_all(&set);
    return result;
}

static char *transpose_kwlist[] = {"indptr", "indices", "num_tokens", NULL};

/* A custom layout's CSR (NumPy arrays, any DLPack CPU buffers), checked in full,
 * and its transpose as (col_ptr, row_idx): what build_layout returns beside
 * the CSR of a built-in pattern. */
static PyObject *layout_transpose(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    PyObject *indptr_obj, *indices_obj, *col_ptr = NULL, *row_idx = NULL;
    long long num_tokens;
    view_set set = {.count = 0, .stream = -1};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOL", transpose_kwlist, &indptr_obj, &indices_obj,
                                     &num_tokens))
        return NULL;
    if (num_tokens < 1 || num_tokens >= INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "num_tokens: expected 1 to 2**31 - 2, got %lld", num_tokens);
        return NULL;
    }
    sa_view *rp, *ci;
    if (take_cpu_csr(&set, indptr_obj, indices_obj, num_tokens, "indptr", "indices", &rp, &ci) < 0) goto fail;
    const int64_t *row_ptr = (const int64_t *)rp->data, nnz = ci->shape[0];
    const int32_t *col_idx = (const int32_t *)ci->data;
    char err[ERR_LEN] = "";
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = sa_layout_check_csr(num_tokens, row_ptr, col_idx, nnz, err, sizeof(err));
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_SetString(PyExc_ValueError, err);
        goto fail;
    }
    col_ptr = new_array(num_tokens + 1, NPY_INT64);
    row_idx = new_array(nnz, NPY_INT32);
    if (!col_ptr || !row_idx) goto fail;
    const int threads = sa_cpu_get_num_threads();
    Py_BEGIN_ALLOW_THREADS
    status = sa_layout_transpose(num_tokens, row_ptr, col_idx, PyArray_DATA((PyArrayObject *)col_ptr),
                                 PyArray_DATA((PyArrayObject *)row_idx), threads);
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_SetString(PyExc_MemoryError, "out of memory while transposing a layout");
        goto fail;
    }
    release_all(&set);
    return Py_BuildValue("(NN)", col_ptr, row_idx);
fail:
    release_all(&set);
    Py_XDECREF(col_ptr);
    Py_XDECREF(row_idx);
    return NULL;
}

/* ---- tile plans ----------------------------------------------------------- */

static char *plan_kwlist[] = {"row_ptr", "col_idx", "height", "width", "tile_h", "tile_w", "pairs", "left_out",
                              "tiles", "chunk_ptr", NULL};

/* The layout's CSR and the pass's knobs, checked; *nnz set. Views go in set. */
static int take_plan_spec(view_set *set, PyObject *row_ptr_obj, PyObject *col_idx_obj, PyObject *left_out_obj,
                          sa_plan_spec *spec, int64_t *nnz)
{
    sa_view *rp, *ci;
    if (check_grid(spec->height, spec->width) < 0 ||
        take_cpu_csr(set, row_ptr_obj, col_idx_obj, spec->height * spec->width, "row_ptr", "col_idx", &rp, &ci) < 0)
        return -1;
    spec->row_ptr = (const int64_t *)rp->data;
    spec->col_idx = (const int32_t *)ci->data;
    spec->left_out = NULL;
    *nnz = ci->shape[0];
    if (left_out_obj != NULL && left_out_obj != Py_None) {
        sa_view *lo = take(set, left_out_obj, "left_out", 0);
        int64_t tokens[1] = {spec->height * spec->width};
        if (!lo || check_buffer(lo, rp, SA_DT_BOOL, tokens, 1) < 0) return -1;
        spec->left_out = (const uint8_t *)lo->data;
    }
    char err[ERR_LEN] = "";
    if (sa_plan_check(spec, *nnz, err, sizeof(err)) < 0) {
        PyErr_SetString(PyExc_ValueError, err);
        return -1;
    }
    return 0;
}

/* One plan entry point's arguments: parsed with `format` (it says which of
 * tile_h, tile_w and pairs are required), the CSR and left_out taken into
 * spec and checked; tiles and chunk_ptr as given (Py_None when absent). */
typedef struct {
    sa_plan_spec spec;
    int64_t nnz;
    PyObject *tiles, *chunk_ptr;
} plan_call;

static int begin_plan_call(view_set *set, PyObject *args, PyObject *kwargs, const char *format, plan_call *call)
{
    PyObject *rp_obj, *ci_obj, *left_out_obj = Py_None;
    long long height, width, tile_h = 1, tile_w = 1;
    int pairs = SA_PLAN_PAIRS_ALL;
    call->tiles = call->chunk_ptr = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format, plan_kwlist, &rp_obj, &ci_obj, &height, &width, &tile_h,
                                     &tile_w, &pairs, &left_out_obj, &call->tiles, &call->chunk_ptr))
        return -1;
    call->spec = (sa_plan_spec){.height = height, .width = width, .tile_h = tile_h, .tile_w = tile_w, .pairs = pairs};
    return take_plan_spec(set, rp_obj, ci_obj, left_out_obj, &call->spec, &call->nnz);
}

static void raise_plan_error(const char *err)
{
    PyErr_SetString(strstr(err, "memory") ? PyExc_MemoryError : PyExc_ValueError, err);
}

static PyObject *plan_union_sizes(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    view_set set = {.count = 0, .stream = -1};
    plan_call call;
    PyObject *sizes = NULL;
    if (begin_plan_call(&set, args, kwargs, "OOLLLLi|OOO", &call) < 0) goto fail;
    if (call.chunk_ptr != Py_None) {
        PyErr_SetString(PyExc_TypeError, "chunk_ptr: plan_union_sizes takes no chunk_ptr");
        goto fail;
    }
    const sa_plan_spec spec = call.spec;
    const int64_t num_tiles = sa_plan_num_tiles(&spec);
    const int64_t *tiles = NULL;
    int64_t count = num_tiles;
    if (call.tiles != Py_None) {
        sa_view *tv = take(&set, call.tiles, "tiles", 0);
        int64_t any1[1] = {-1};
        if (!tv || check_buffer(tv, tv, SA_DT_I64, any1, 1) < 0) goto fail;
        tiles = (const int64_t *)tv->data;
        count = tv->shape[0];
        for (int64_t t = 0; t < count; t++) {
            if (tiles[t] < 0 || tiles[t] >= num_tiles) {
                PyErr_Format(PyExc_ValueError, "tiles: entry %lld is %lld, outside [0, %lld)", (long long)t,
                             (long long)tiles[t], (long long)num_tiles);
                goto fail;
            }
        }
    }
    sizes = new_array(count, NPY_INT64);
    if (!sizes) goto fail;
    char err[ERR_LEN] = "";
    int status;
    int64_t *out = PyArray_DATA((PyArrayObject *)sizes);
    Py_BEGIN_ALLOW_THREADS
    status = sa_plan_union_sizes(&spec, tiles, count, out, sa_cpu_get_num_threads(), err, sizeof(err));
    Py_END_ALLOW_THREADS
    if (status < 0) {
        raise_plan_error(err);
        goto fail;
    }
    release_all(&set);
    return sizes;
fail:
    Py_XDECREF(sizes);
    release_all(&set);
    return NULL;
}

static PyObject *plan_pair_counts(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    view_set set = {.count = 0, .stream = -1};
    plan_call call;
    PyObject *counts = NULL;
    if (begin_plan_call(&set, args, kwargs, "OOLL|LLiOOO", &call) < 0) goto fail;
    if (call.tiles != Py_None || call.chunk_ptr != Py_None) {
        PyErr_SetString(PyExc_TypeError, "plan_pair_counts: takes no tiles and no chunk_ptr");
        goto fail;
    }
    counts = new_array(SA_PLAN_PAIRS_COUNT, NPY_INT64);
    if (!counts) goto fail;
    int64_t *out = PyArray_DATA((PyArrayObject *)counts);
    Py_BEGIN_ALLOW_THREADS
    sa_plan_pair_counts(&call.spec, sa_cpu_get_num_threads(), out);
    Py_END_ALLOW_THREADS
    release_all(&set);
    return counts;
fail:
    release_all(&set);
    return NULL;
}

static PyObject *plan_fill(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    view_set set = {.count = 0, .stream = -1};
    plan_call call;
    PyObject *queries = NULL, *keys = NULL, *masks = NULL;
    if (begin_plan_call(&set, args, kwargs, "OOLLLLi|OOO", &call) < 0) goto fail;
    if (call.tiles != Py_None || call.chunk_ptr == Py_None) {
        PyErr_SetString(PyExc_TypeError, "plan_fill: takes chunk_ptr and no tiles");
        goto fail;
    }
    const sa_plan_spec spec = call.spec;
    const int64_t num_tiles = sa_plan_num_tiles(&spec);
    sa_view *cp = take(&set, call.chunk_ptr, "chunk_ptr", 0);
    int64_t tiles_plus_one[1] = {num_tiles + 1};
    if (!cp || check_buffer(cp, cp, SA_DT_I32, tiles_plus_one, 1) < 0) goto fail;
    const int32_t *chunk_ptr = (const int32_t *)cp->data;
    if (chunk_ptr[0] != 0) {
        PyErr_SetString(PyExc_ValueError, "chunk_ptr: expected offsets from 0");
        goto fail;
    }
    for (int64_t t = 0; t < num_tiles; t++) {
        if (chunk_ptr[t + 1] < chunk_ptr[t]) {
            PyErr_Format(PyExc_ValueError, "chunk_ptr: offsets decrease at tile %lld", (long long)t);
            goto fail;
        }
    }
    const int64_t num_chunks = chunk_ptr[num_tiles];
    npy_intp tile_dims[2] = {(npy_intp)num_tiles, SA_PLAN_TILE}, chunk_dims[2] = {(npy_intp)num_chunks, SA_PLAN_TILE};
    queries = PyArray_SimpleNew(2, tile_dims, NPY_INT32);
    keys = PyArray_SimpleNew(2, chunk_dims, NPY_INT32);
    masks = PyArray_SimpleNew(2, chunk_dims, NPY_INT64);
    if (!queries || !keys || !masks) goto fail;
    char err[ERR_LEN] = "";
    int status;
    int32_t *q = PyArray_DATA((PyArrayObject *)queries), *k = PyArray_DATA((PyArrayObject *)keys);
    uint64_t *m = PyArray_DATA((PyArrayObject *)masks);
    Py_BEGIN_ALLOW_THREADS
    status = sa_plan_fill(&spec, chunk_ptr, q, k, m, sa_cpu_get_num_threads(), err, sizeof(err));
    Py_END_ALLOW_THREADS
    if (status < 0) {
        raise_plan_error(err);
        goto fail;
    }
    release_all(&set);
    return Py_BuildValue("(NNN)", queries, keys, masks);
fail:
    Py_XDECREF(queries);
    Py_XDECREF(keys);
    Py_XDECREF(masks);
    release_all(&set);
    return NULL;
}

static PyObject *set_num_threads(PyObject *self, PyObject *arg)
{
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0 || n > 256) {
        PyErr_Format(PyExc_ValueError, "num_threads: expected 0 (all cores) to 256, got %ld", n);
        return NULL;
    }
    sa_cpu_set_num_threads((int)n);
    Py_RETURN_NONE;
}

/* Turns the gather kernels on or off; returns whether they were on. */
static PyObject *set_gather_kernels(PyObject *self, PyObject *arg)
{
    (void)self;
    const int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    const int before = sa_cpu_get_gather_kernels();
    sa_cpu_set_gather_kernels(on);
    return PyBool_FromLong(before);
}

static PyObject *gather_kernels_on(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(sa_cpu_get_gather_kernels());
}

static char *gather_blocking_kwlist[] = {"block_tokens", "range_rows", NULL};

/* Sets the gather kernels' key blocks (block_tokens 0: by the L2 size, > 0:
 * always, that size, < 0: never; range_rows 0: the default) and returns the
 * settings before, as (block_tokens, range_rows). */
static PyObject *set_gather_blocking(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    long long block_tokens, range_rows = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "L|L", gather_blocking_kwlist, &block_tokens, &range_rows))
        return NULL;
    if (range_rows < 0 || range_rows > SA_GATHER_RANGE_ROWS) {
        PyErr_Format(PyExc_ValueError, "range_rows: expected 0 (the default) to %d, got %lld", SA_GATHER_RANGE_ROWS,
                     range_rows);
        return NULL;
    }
    int64_t before_block, before_range;
    sa_cpu_get_gather_blocking(&before_block, &before_range);
    sa_cpu_set_gather_blocking(block_tokens, range_rows);
    return Py_BuildValue("(LL)", (long long)before_block, (long long)before_range);
}

static char *gather_takes_kwlist[] = {"head_dim", "num_tokens", NULL};

/* Whether float32 calls of this head dim and token count run their rows on
 * the gather kernels (switch included): Python's choice between the rows and
 * the tiles asks, rather than restating the rule. */
static PyObject *gather_takes(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    long long head_dim, num_tokens;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LL", gather_takes_kwlist, &head_dim, &num_tokens)) return NULL;
    return PyBool_FromLong(sa_cpu_rows_on_gather(head_dim, num_tokens));
}

static char *gather_ranges_kwlist[] = {"batch_heads", "num_tokens", NULL};

/* Ranges per (batch, head) of a gather dQ pass over batch_heads x num_tokens
 * rows, as set now: Python weighs their bias tables against a score
 * gradient per pair. */
static PyObject *gather_ranges_per_head(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    long long batch_heads, num_tokens;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LL", gather_ranges_kwlist, &batch_heads, &num_tokens))
        return NULL;
    if (batch_heads < 1) {
        PyErr_Format(PyExc_ValueError, "batch_heads: expected 1 or more, got %lld", batch_heads);
        return NULL;
    }
    if (num_tokens < 0) {
        PyErr_Format(PyExc_ValueError, "num_tokens: expected 0 or more, got %lld", num_tokens);
        return NULL;
    }
    return PyLong_FromLongLong(sa_gather_ranges_per_head(batch_heads, num_tokens));
}

static PyObject *get_num_threads(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLong(sa_cpu_get_num_threads());
}

static PyObject *cuda_device_count(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
#ifdef SA_WITH_CUDA
    char err[ERR_LEN] = "";
    int count = sa_cuda_device_count(err, sizeof(err));
    return PyLong_FromLong(count < 0 ? 0 : count);
#else
    return PyLong_FromLong(0);
#endif
}

/* The dispatch counters the tests read: COUNTER(name, source) defines name()
 * returning source(); CUDA_COUNTER gives 0 in a build without CUDA. */
#define COUNTER(name, source)                                \
    static PyObject *name(PyObject *self, PyObject *unused) \
    {                                                        \
        (void)self;                                          \
        (void)unused;                                        \
        return PyLong_FromLongLong(source());                \
    }
#ifdef SA_WITH_CUDA
#define CUDA_COUNTER(name, source) COUNTER(name, source)
#else
static long long sa_no_cuda_counter(void) { return 0; }
#define CUDA_COUNTER(name, source) COUNTER(name, sa_no_cuda_counter)
#endif

COUNTER(cpu_window_forwards, sa_cpu_window_forwards)
COUNTER(cpu_gather_forwards, sa_cpu_gather_forwards)
COUNTER(cpu_gather_backwards, sa_cpu_gather_backwards)
COUNTER(cpu_gather_blocked_calls, sa_cpu_gather_blocked_calls)
COUNTER(cpu_window_backwards, sa_cpu_window_backwards)
COUNTER(cpu_wide_kernels, sa_cpu_wide_kernels)
CUDA_COUNTER(cuda_lean_passes, sa_cuda_lean_passes)
CUDA_COUNTER(cuda_beside_forwards, sa_cuda_beside_forwards)
CUDA_COUNTER(cuda_overlapped_passes, sa_cuda_overlapped_passes)
CUDA_COUNTER(cuda_tiled_grad_query_passes, sa_cuda_tiled_grad_query_passes)
CUDA_COUNTER(cuda_tiled_grad_key_value_passes, sa_cuda_tiled_grad_key_value_passes)

/* Sizes and offsets of our DLPack declarations, checked by the tests. */
static PyObject *dlpack_abi(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue(
        "{s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n}",
        "DLDevice", (Py_ssize_t)sizeof(DLDevice), "DLDataType", (Py_ssize_t)sizeof(DLDataType),
        "DLTensor", (Py_ssize_t)sizeof(DLTensor), "DLManagedTensor",
        (Py_ssize_t)sizeof(DLManagedTensor), "DLManagedTensorVersioned",
        (Py_ssize_t)sizeof(DLManagedTensorVersioned), "DLTensor.device",
        (Py_ssize_t)offsetof(DLTensor, device), "DLTensor.ndim",
        (Py_ssize_t)offsetof(DLTensor, ndim), "DLTensor.dtype",
        (Py_ssize_t)offsetof(DLTensor, dtype), "DLTensor.shape",
        (Py_ssize_t)offsetof(DLTensor, shape), "DLTensor.strides",
        (Py_ssize_t)offsetof(DLTensor, strides), "DLTensor.byte_offset",
        (Py_ssize_t)offsetof(DLTensor, byte_offset), "DLManagedTensor.manager_ctx",
        (Py_ssize_t)offsetof(DLManagedTensor, manager_ctx), "DLManagedTensor.deleter",
        (Py_ssize_t)offsetof(DLManagedTensor, deleter), "DLManagedTensorVersioned.manager_ctx",
        (Py_ssize_t)offsetof(DLManagedTensorVersioned, manager_ctx),
        "DLManagedTensorVersioned.deleter", (Py_ssize_t)offsetof(DLManagedTensorVersioned, deleter),
        "DLManagedTensorVersioned.flags", (Py_ssize_t)offsetof(DLManagedTensorVersioned, flags),
        "DLManagedTensorVersioned.dl_tensor",
        (Py_ssize_t)offsetof(DLManagedTensorVersioned, dl_tensor), "DLDataType.lanes",
        (Py_ssize_t)offsetof(DLDataType, lanes));
}

/* Reads a tensor through the bridge and reports what it saw: for the tests of
 * the bridge itself (pointer identity, strides, read-only flag, versions). */
static PyObject *inspect_tensor(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"tensor", "writable", NULL};
    PyObject *obj;
    int writable = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|p", kwlist, &obj, &writable)) return NULL;
    sa_view v;
    if (sa_view_acquire(obj, "tensor", writable, -1, &v) < 0) return NULL;
    PyObject *shape = PyTuple_New(v.ndim), *strides = PyTuple_New(v.ndim);
    if (!shape || !strides) {
        Py_XDECREF(shape);
        Py_XDECREF(strides);
        sa_view_release(&v);
        return NULL;
    }
    for (int d = 0; d < v.ndim; d++) {
        PyTuple_SET_ITEM(shape, d, PyLong_FromLongLong(v.shape[d]));
        PyTuple_SET_ITEM(strides, d, PyLong_FromLongLong(v.strides[d]));
    }
    PyObject *result = Py_BuildValue(
        "{s:K,s:i,s:i,s:N,s:N,s:i,s:i,s:i,s:i}", "data", (unsigned long long)(uintptr_t)v.data,
        "device_type", (int)v.device.device_type, "device_id", (int)v.device.device_id, "shape",
        shape, "strides", strides, "dtype_code", (int)v.dtype.code, "dtype_bits",
        (int)v.dtype.bits, "versioned", v.versioned, "read_only", v.read_only);
    sa_view_release(&v);
    return result;
}

/* pool_tensor(shape, code, bits): a capsule of a pooled, compact CPU tensor */
static PyObject *pool_tensor(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *shape_obj;
    int code, bits;
    if (!PyArg_ParseTuple(args, "Oii", &shape_obj, &code, &bits)) return NULL;
    int64_t shape[SA_MAX_DIMS];
    Py_ssize_t ndim;
    if (read_int_sequence(shape_obj, "pool_tensor: shape (dimensions)", shape, SA_MAX_DIMS, &ndim) < 0)
        return NULL;
    if (code < 0 || code > 255 || bits <= 0 || bits > 255) {
        return PyErr_Format(PyExc_ValueError, "pool_tensor: dtype code %d and bits %d, expected "
                            "0..255 and 1..255", code, bits);
    }
    DLDataType dtype = {(uint8_t)code, (uint8_t)bits, 1};
    return sa_pool_tensor(shape, (int)ndim, dtype);
}

static PyObject *pool_stats(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    sa_pool_stats st;
    sa_pool_get_stats(&st);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K}", "limit", (unsigned long long)st.limit,
                         "idle_bytes", (unsigned long long)st.idle_bytes, "idle_blocks",
                         (unsigned long long)st.idle_blocks, "lent_bytes",
                         (unsigned long long)st.lent_bytes, "reused", (unsigned long long)st.reused,
                         "fresh", (unsigned long long)st.fresh);
}

static PyObject *pool_set_limit(PyObject *self, PyObject *arg)
{
    (void)self;
    long long limit = PyLong_AsLongLong(arg);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    if (limit < 0) return PyErr_Format(PyExc_ValueError, "limit is %lld bytes, expected >= 0", limit);
    sa_pool_set_limit((size_t)limit);
    Py_RETURN_NONE;
}

static PyObject *pool_release(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    sa_pool_release_idle();
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"attention_forward", (PyCFunction)(void (*)(void))attention_forward,
     METH_VARARGS | METH_KEYWORDS, "Forward kernel; writes out, lse and optional row_stats in place."},
    {"attention_backward", (PyCFunction)(void (*)(void))attention_backward,
     METH_VARARGS | METH_KEYWORDS, "Backward kernel; writes grad_query, grad_key, grad_value in place."},
    {"bias_grad", (PyCFunction)(void (*)(void))bias_grad, METH_VARARGS | METH_KEYWORDS,
     "Reduces per-pair score gradients into the relative position bias gradient."},
    {"dropout_mask", (PyCFunction)(void (*)(void))dropout_mask, METH_VARARGS | METH_KEYWORDS,
     "Writes the dropout generator's keep mask for (rows[e], cols[e]) or every (rows[i], cols[j])."},
    {"build_layout", (PyCFunction)(void (*)(void))build_layout, METH_VARARGS | METH_KEYWORDS,
     "Builds a layout; returns (row_ptr, col_idx, col_ptr, row_idx) NumPy arrays."},
    {"layout_transpose", (PyCFunction)(void (*)(void))layout_transpose, METH_VARARGS | METH_KEYWORDS,
     "Checks a custom layout's CSR (indptr, indices, num_tokens) and returns its transpose (col_ptr, row_idx)."},
    {"stencil_matches", (PyCFunction)(void (*)(void))stencil_matches, METH_VARARGS | METH_KEYWORDS,
     "Whether a layout's CSR rows, the listed ones aside, are exactly a stencil's: its window's offsets clipped "
     "at the grid, a lattice of the given stride (0: none) and the extra keys. False for a rule that names a pair "
     "twice (a repeated offset or key, an offset on the lattice)."},
    {"plan_union_sizes", (PyCFunction)(void (*)(void))plan_union_sizes, METH_VARARGS | METH_KEYWORDS,
     "Distinct keys of each tile of a tile-plan pass (every tile, or the listed ones)."},
    {"plan_pair_counts", (PyCFunction)(void (*)(void))plan_pair_counts, METH_VARARGS | METH_KEYWORDS,
     "Pairs of each selection (all, same row, other rows, same column, other columns), rows left out not counted."},
    {"plan_fill", (PyCFunction)(void (*)(void))plan_fill, METH_VARARGS | METH_KEYWORDS,
     "A tile-plan pass from a layout's CSR: returns (queries, keys, masks) NumPy arrays."},
    {"set_num_threads", set_num_threads, METH_O, "Sets the CPU kernels' thread count (0: all cores)."},
    {"set_gather_kernels", set_gather_kernels, METH_O,
     "Turns the float32 gather row kernels on or off (for comparisons); returns whether they were on."},
    {"set_gather_blocking", (PyCFunction)(void (*)(void))set_gather_blocking, METH_VARARGS | METH_KEYWORDS,
     "Sets the gather kernels' key blocks: block_tokens 0 by the L2 size, > 0 always that size, < 0 never; "
     "range_rows 0 the default. Returns the settings before."},
    {"cpu_gather_blocked_calls", cpu_gather_blocked_calls, METH_NOARGS,
     "Forward and backward calls that ran the gather kernels in key blocks."},
    {"gather_kernels_on", gather_kernels_on, METH_NOARGS, "Whether the float32 gather row kernels are switched on."},
    {"gather_takes", (PyCFunction)(void (*)(void))gather_takes, METH_VARARGS | METH_KEYWORDS,
     "Whether float32 rows of this head dim and token count run on the gather kernels."},
    {"gather_ranges_per_head", (PyCFunction)(void (*)(void))gather_ranges_per_head, METH_VARARGS | METH_KEYWORDS,
     "Ranges per (batch, head) of a gather dQ pass over batch_heads x num_tokens rows, each with its own bias table."},
    {"cpu_gather_forwards", cpu_gather_forwards, METH_NOARGS, "Forward calls that ran the gather row kernels."},
    {"cpu_gather_backwards", cpu_gather_backwards, METH_NOARGS, "Backward calls that ran the gather row kernels."},
    {"get_num_threads", get_num_threads, METH_NOARGS, "The CPU kernels' thread count."},
    {"cuda_device_count", cuda_device_count, METH_NOARGS,
     "Visible CUDA devices (0 without CUDA support or driver)."},
    {"cuda_lean_passes", cuda_lean_passes, METH_NOARGS,
     "Tile-plan passes run on the lean tensor-core kernel so far (tests check the dispatch)."},
    {"cpu_window_takes", (PyCFunction)(void (*)(void))cpu_window_takes, METH_VARARGS | METH_KEYWORDS,
     "Whether the CPU window kernel runs this packed stencil at this head dim."},
    {"cpu_window_forwards", cpu_window_forwards, METH_NOARGS,
     "Forwards that ran on the CPU window kernel so far (tests check the dispatch)."},
    {"cpu_window_backwards", cpu_window_backwards, METH_NOARGS,
     "Backwards that ran on the CPU window kernel so far (tests check the dispatch)."},
    {"cpu_wide_kernels", cpu_wide_kernels, METH_NOARGS,
     "1 where the CPU kernels take their 32-register paths (x86-64-v4, not turned off by "
     "SPARSE_ATTENTION_NARROW_KERNELS), else 0."},
    {"cuda_beside_forwards", cuda_beside_forwards, METH_NOARGS,
     "Forwards that ran their long rows on a second stream so far (tests check the dispatch)."},
    {"cuda_overlapped_passes", cuda_overlapped_passes, METH_NOARGS,
     "Merging passes launched to overlap the pass before them so far (tests check the dispatch)."},
    {"cuda_tiled_grad_query_passes", cuda_tiled_grad_query_passes, METH_NOARGS,
     "Plan passes whose dQ ran on the tensor-core kernel so far (tests check the dispatch)."},
    {"cuda_tiled_grad_key_value_passes", cuda_tiled_grad_key_value_passes, METH_NOARGS,
     "Plan passes whose dK and dV ran on the tensor-core kernel so far (tests check the dispatch)."},
    {"dlpack_abi", dlpack_abi, METH_NOARGS, "Sizes and offsets of the DLPack structs."},
    {"pool_tensor", pool_tensor, METH_VARARGS,
     "A DLPack capsule of a compact CPU tensor (shape, dtype code, bits) on a reusable buffer."},
    {"pool_stats", pool_stats, METH_NOARGS, "The host buffer cache's limit, idle and lent bytes, reuse counts."},
    {"pool_set_limit", pool_set_limit, METH_O, "Sets how many idle bytes the host buffer cache keeps."},
    {"pool_release", pool_release, METH_NOARGS, "Returns the host buffer cache's idle blocks to the system."},
    {"inspect_tensor", (PyCFunction)(void (*)(void))inspect_tensor, METH_VARARGS | METH_KEYWORDS,
     "What the DLPack bridge sees of a tensor."},
    {NULL, NULL, 0, NULL}};

static int module_exec(PyObject *module)
{
    if (PyArray_ImportNumPyAPI() < 0) return -1;
#ifdef SA_WITH_CUDA
    int with_cuda = 1;
#else
    int with_cuda = 0;
#endif
    if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) < 0) return -1;
    if (PyModule_AddStringConstant(module, "COMPILER", __VERSION__) < 0) return -1;
    if (PyModule_AddIntConstant(module, "CPU_MAX_HEAD_DIM", 1024) < 0) return -1;
    return 0;
}

static PyModuleDef_Slot module_slots[] = {{Py_mod_exec, module_exec}, {0, NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C",
    "Native kernels of sparse_attention: layouts, CPU and CUDA attention, DLPack bridge.", 0,
    module_methods, module_slots, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&module_def); }
