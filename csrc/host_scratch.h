/* Scratch blocks from the host buffer cache (host_pool.c) for kernels that
 * need copies within one call. Kept apart from host_pool.h so that kernel
 * sources do not include Python.h. */
#ifndef SA_HOST_SCRATCH_H
#define SA_HOST_SCRATCH_H

#include <stddef.h>

/* A block of at least `bytes` (64-byte aligned, contents undefined;
 * *block_bytes says how large), from the idle list where one fits, so that a
 * training loop's scratch does not fault in fresh pages each step. NULL when
 * out of memory. Hand it back with sa_pool_give. */
void *sa_pool_take(size_t bytes, size_t *block_bytes);
void sa_pool_give(void *block, size_t block_bytes);

#endif /* SA_HOST_SCRATCH_H */
