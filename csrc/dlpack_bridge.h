/* Taking tensors from Python objects through DLPack, without copies.
 *
 * One view per argument. sa_view_acquire() asks the object for a capsule
 * (versioned first, legacy as fallback), takes ownership of it and checks the
 * spec's rules; sa_view_release() runs the producer's deleter exactly once.
 */
#ifndef SA_DLPACK_BRIDGE_H
#define SA_DLPACK_BRIDGE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "dlpack_abi.h"

#define SA_MAX_DIMS 8

typedef struct {
    const char *name;        /* the argument's name, for error messages */
    PyObject *capsule;       /* owned reference, NULL when empty */
    void *managed;           /* DLManagedTensor or DLManagedTensorVersioned */
    int versioned;
    int read_only;
    DLDevice device;
    DLDataType dtype;
    int ndim;
    int64_t shape[SA_MAX_DIMS];
    int64_t strides[SA_MAX_DIMS]; /* in elements, filled in when the producer gave NULL */
    char *data;              /* first element: data + byte_offset */
} sa_view;

/* Which dtypes an argument admits, as a bit set. */
enum {
    SA_DT_F16 = 1 << 0,
    SA_DT_BF16 = 1 << 1,
    SA_DT_F32 = 1 << 2,
    SA_DT_F64 = 1 << 3,
    SA_DT_BOOL = 1 << 4,  /* bool or uint8 */
    SA_DT_I32 = 1 << 5,
    SA_DT_I64 = 1 << 6
};

/* Returns 0 and fills view, or -1 with a Python exception set.
 * stream: for CUDA producers, the consumer stream handed to __dlpack__
 * (-1 when the caller does not care). */
int sa_view_acquire(PyObject *obj, const char *name, int writable,
                    long long stream, sa_view *view);
void sa_view_release(sa_view *view);

/* One of the SA_DT_* bits for the view's dtype, or 0 when it is none of them. */
int sa_view_dtype_bit(const sa_view *view);
const char *sa_dtype_bit_name(int bit);

/* Raise TypeError unless the view's dtype is in allowed (a set of SA_DT_* bits). */
int sa_view_expect_dtype(const sa_view *view, int allowed);
/* Raise ValueError unless ndim matches. */
int sa_view_expect_ndim(const sa_view *view, int ndim);
/* Raise ValueError unless the view has this exact shape (-1 entries match anything). */
int sa_view_expect_shape(const sa_view *view, const int64_t *shape, int ndim);
/* Raise ValueError unless the view is compact row-major. */
int sa_view_expect_contiguous(const sa_view *view);
/* Raise ValueError unless both views live on the same device. */
int sa_view_expect_same_device(const sa_view *view, const sa_view *ref);

#endif /* SA_DLPACK_BRIDGE_H */
