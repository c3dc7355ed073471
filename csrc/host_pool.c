/* The host buffer cache behind sa_pool_tensor(); see host_pool.h for why. */
#include "host_pool.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dlpack_bridge.h" /* SA_MAX_DIMS */
#define SA_POOL_ALIGN 64
#define SA_POOL_PAGE 4096

/* An idle block keeps its list link in its own first bytes. */
typedef struct idle_block {
    struct idle_block *next;
    size_t bytes;
} idle_block;

/* One tensor's DLPack record; the deleter finds the block through it. */
typedef struct {
    DLManagedTensor managed;
    int64_t shape[SA_MAX_DIMS];
    void *block;
    size_t bytes;
} pool_lease;

/* The lock is taken by DLPack deleters too, which run on whatever thread frees
 * the tensor's storage, with or without the GIL. */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t fork_handlers_once = PTHREAD_ONCE_INIT;
static idle_block *idle_head;  /* most recently returned first */
static sa_pool_stats pool = {.limit = (size_t)512 << 20};

static void lock_before_fork(void) { pthread_mutex_lock(&pool_lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&pool_lock); }

/* a fork between another thread's lock and unlock would leave the child's copy locked */
static void register_fork_handlers(void)
{
    pthread_atfork(lock_before_fork, unlock_after_fork, unlock_after_fork);
}

static size_t rounded_bytes(size_t bytes)
{
    if (bytes < sizeof(idle_block)) bytes = sizeof(idle_block);
#ifdef SA_EXACT_HOST_BLOCKS
    /* the sanitizer build: no slack past a tensor's end, so the address
       sanitizer sees a kernel's overrun */
    return bytes;
#endif
    size_t unit = bytes >= SA_POOL_PAGE ? SA_POOL_PAGE : SA_POOL_ALIGN;
    return (bytes + unit - 1) / unit * unit;
}

/* Under the lock: detaches the oldest idle blocks until at most `limit` idle
 * bytes remain, and returns them as a list for free_blocks (outside the lock).
 * The list is newest first, so what stays is its longest head within limit. */
static idle_block *detach_past(size_t limit)
{
    if (pool.idle_bytes <= limit) return NULL;
    idle_block **link = &idle_head;
    size_t kept = 0;
    while (*link != NULL && kept + (*link)->bytes <= limit) {
        kept += (*link)->bytes;
        link = &(*link)->next;
    }
    idle_block *dropped = *link;
    *link = NULL;
    for (idle_block *b = dropped; b != NULL; b = b->next) pool.idle_blocks--;
    pool.idle_bytes = kept;
    return dropped;
}

static void free_blocks(idle_block *list)
{
    while (list != NULL) {
        idle_block *next = list->next;
        free(list);
        list = next;
    }
}

static void *take_block(size_t bytes)
{
    pthread_mutex_lock(&pool_lock);
    for (idle_block **link = &idle_head; *link != NULL; link = &(*link)->next) {
        if ((*link)->bytes == bytes) {
            idle_block *found = *link;
            *link = found->next;
            pool.idle_bytes -= bytes;
            pool.idle_blocks--;
            pool.lent_bytes += bytes;
            pool.reused++;
            pthread_mutex_unlock(&pool_lock);
            return found;
        }
    }
    pool.fresh++;
    pool.lent_bytes += bytes;
    pthread_mutex_unlock(&pool_lock);
    void *block = NULL;
    if (posix_memalign(&block, SA_POOL_ALIGN, bytes) != 0) block = NULL;
    if (block == NULL) {
        pthread_mutex_lock(&pool_lock);
        pool.lent_bytes -= bytes;
        pthread_mutex_unlock(&pool_lock);
    }
    return block;
}

static void return_block(void *block, size_t bytes)
{
    pthread_mutex_lock(&pool_lock);
    pool.lent_bytes -= bytes;
    if (bytes > pool.limit) {
        pthread_mutex_unlock(&pool_lock);
        free(block);
        return;
    }
    idle_block *node = block;
    node->bytes = bytes;
    node->next = idle_head;
    idle_head = node;
    pool.idle_bytes += bytes;
    pool.idle_blocks++;
    idle_block *dropped = detach_past(pool.limit);
    pthread_mutex_unlock(&pool_lock);
    free_blocks(dropped);
}

static void lease_deleter(DLManagedTensor *managed)
{
    pool_lease *lease = managed->manager_ctx;
    return_block(lease->block, lease->bytes);
    free(lease);
}

/* A capsule nobody consumed still owns its tensor. */
static void capsule_destructor(PyObject *capsule)
{
    if (!PyCapsule_IsValid(capsule, SA_CAPSULE_LEGACY)) return;
    DLManagedTensor *managed = PyCapsule_GetPointer(capsule, SA_CAPSULE_LEGACY);
    if (managed != NULL && managed->deleter != NULL) managed->deleter(managed);
}

PyObject *sa_pool_tensor(const int64_t *shape, int ndim, DLDataType dtype)
{
    pthread_once(&fork_handlers_once, register_fork_handlers);
    if (ndim < 0 || ndim > SA_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "pool_tensor: shape has %d dimensions, expected 0 to %d",
                     ndim, SA_MAX_DIMS);
        return NULL;
    }
    if (dtype.lanes != 1 || dtype.bits == 0 || dtype.bits % 8 != 0) {
        PyErr_Format(PyExc_ValueError, "pool_tensor: dtype of %d bits and %d lanes, expected whole "
                     "bytes and 1 lane", (int)dtype.bits, (int)dtype.lanes);
        return NULL;
    }
    size_t count = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) {
            PyErr_Format(PyExc_ValueError, "pool_tensor: shape[%d] is %lld, expected >= 0", d,
                         (long long)shape[d]);
            return NULL;
        }
        if (shape[d] != 0 && count > (SIZE_MAX / 16) / (size_t)shape[d]) {
            PyErr_SetString(PyExc_OverflowError, "pool_tensor: the shape's element count overflows");
            return NULL;
        }
        count *= (size_t)shape[d];
    }
    size_t bytes = rounded_bytes(count * (dtype.bits / 8));
    pool_lease *lease = calloc(1, sizeof(pool_lease));
    if (lease == NULL) return PyErr_NoMemory();
    lease->block = take_block(bytes);
    if (lease->block == NULL) {
        free(lease);
        return PyErr_NoMemory();
    }
    lease->bytes = bytes;
    memcpy(lease->shape, shape, (size_t)ndim * sizeof(int64_t));
    DLTensor *t = &lease->managed.dl_tensor;
    t->data = lease->block;
    t->device = (DLDevice){kDLCPU, 0};
    t->ndim = ndim;
    t->dtype = dtype;
    t->shape = lease->shape;
    t->strides = NULL;
    t->byte_offset = 0;
    lease->managed.manager_ctx = lease;
    lease->managed.deleter = lease_deleter;
    PyObject *capsule = PyCapsule_New(&lease->managed, SA_CAPSULE_LEGACY, capsule_destructor);
    if (capsule == NULL) lease_deleter(&lease->managed);
    return capsule;
}

void sa_pool_get_stats(sa_pool_stats *stats)
{
    pthread_mutex_lock(&pool_lock);
    *stats = pool;
    pthread_mutex_unlock(&pool_lock);
}

void sa_pool_set_limit(size_t limit)
{
    pthread_mutex_lock(&pool_lock);
    pool.limit = limit;
    idle_block *dropped = detach_past(limit);
    pthread_mutex_unlock(&pool_lock);
    free_blocks(dropped);
}

void sa_pool_release_idle(void)
{
    pthread_mutex_lock(&pool_lock);
    idle_block *dropped = detach_past(0);
    pthread_mutex_unlock(&pool_lock);
    free_blocks(dropped);
}

void *sa_pool_take(size_t bytes, size_t *block_bytes)
{
    *block_bytes = rounded_bytes(bytes);
    return take_block(*block_bytes);
}

void sa_pool_give(void *block, size_t block_bytes)
{
    if (block != NULL) return_block(block, block_bytes);
}

/* A control group file holding one byte count; 0 for "max", absent or unreadable. */
static uint64_t cgroup_limit(const char *path)
{
    FILE *fh = fopen(path, "r");
    if (!fh) return 0;
    uint64_t value = 0;
    if (fscanf(fh, "%" SCNu64, &value) != 1) value = 0;
    fclose(fh);
    return value;
}

uint64_t sa_host_memory_limit(void)
{
    uint64_t limit = 0;
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
    const long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page_size > 0) limit = (uint64_t)pages * (uint64_t)page_size;
#endif
    /* cgroup v2, then v1 (whose "no limit" is a huge number, above the machine's memory) */
    const char *paths[] = {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"};
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
        const uint64_t group = cgroup_limit(paths[i]);
        if (group > 0 && (limit == 0 || group < limit)) limit = group;
    }
    return limit;
}
