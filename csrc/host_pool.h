/* Host buffers for the op's outputs, kept for reuse when their tensors die.
 *
 * A training loop asks for the same few sizes every step: the output, its
 * log-sum-exp, three gradients. Buffers fresh from the system allocator are
 * new pages, and each page's first touch is a fault (several microseconds on
 * a virtual machine, about 4 ms a step for LONGFORMER at 64x64). Buffers from
 * here go back to an idle list when the last tensor on them is freed, so a
 * steady loop writes to pages it already has. At most `limit` idle bytes are
 * kept; past that, a returned buffer goes back to the system.
 */
#ifndef SA_HOST_POOL_H
#define SA_HOST_POOL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "dlpack_abi.h"
#include "host_scratch.h"

/* A legacy DLPack capsule ("dltensor") of a compact CPU tensor of this shape
 * and dtype, its buffer from the pool (contents undefined). NULL with a Python
 * exception on failure. */
PyObject *sa_pool_tensor(const int64_t *shape, int ndim, DLDataType dtype);

typedef struct {
    size_t limit;        /* idle bytes kept at most */
    size_t idle_bytes;   /* bytes on the idle list now */
    size_t idle_blocks;
    size_t lent_bytes;   /* bytes under live tensors */
    uint64_t reused;     /* requests served from the idle list */
    uint64_t fresh;      /* requests that took new memory */
} sa_pool_stats;

void sa_pool_get_stats(sa_pool_stats *stats);
/* Sets the idle limit; idle blocks above it go back to the system at once. */
void sa_pool_set_limit(size_t limit);
/* Returns every idle block to the system. */
void sa_pool_release_idle(void);

/* The most memory this process can hope to have, in bytes: the machine's
 * physical memory, or the control group's limit where that is lower (Linux).
 * 0 where neither can be read. */
uint64_t sa_host_memory_limit(void);

#endif /* SA_HOST_POOL_H */
