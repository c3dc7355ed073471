#define _GNU_SOURCE
#include "threads.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#define SA_MAX_THREADS 256

typedef struct {
    sa_range_fn fn;
    void *ctx;
    int64_t count, grain;
    atomic_llong next;
} shared_work;

static void drain(shared_work *w)
{
    for (;;) {
        int64_t begin = atomic_fetch_add(&w->next, w->grain);
        if (begin >= w->count) return;
        int64_t end = begin + w->grain < w->count ? begin + w->grain : w->count;
        w->fn(w->ctx, begin, end);
    }
}

static void *worker_main(void *arg)
{
    drain((shared_work *)arg);
    return NULL;
}

#ifdef _OPENMP
static volatile int forked_child = 0;

static void mark_forked_child(void) { forked_child = 1; }

/* registered when the extension loads, before any fork it could miss */
__attribute__((constructor)) static void watch_for_fork(void)
{
    pthread_atfork(NULL, NULL, mark_forked_child);
}
#endif

int sa_parallel_for(int64_t count, int64_t grain, int num_threads, sa_range_fn fn, void *ctx)
{
    if (count <= 0) return 0;
    if (grain < 1) grain = 1;
    int64_t chunks = (count + grain - 1) / grain;
    int threads = num_threads < 1 ? 1 : num_threads;
    if (threads > SA_MAX_THREADS) threads = SA_MAX_THREADS;
    if (threads > chunks) threads = (int)chunks;
    shared_work w = {fn, ctx, count, grain, 0};
    if (threads == 1) {
        drain(&w);
        return 0;
    }
#ifdef _OPENMP
    /* On the OpenMP runtime torch uses (the same libgomp once torch is loaded):
     * its pool is reused instead of starting threads per call, and its idle
     * threads do not spin against ours after every torch op. GNU OpenMP does
     * not survive fork, so a forked child starts POSIX threads instead. */
    if (!forked_child) {
#pragma omp parallel num_threads(threads)
        drain(&w);
        return 0;
    }
#endif
    pthread_t ids[SA_MAX_THREADS];
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&ids[started], NULL, worker_main, &w) == 0) started++;
    }
    drain(&w); /* runs everything alone if no thread could start */
    for (int t = 0; t < started; t++) pthread_join(ids[t], NULL);
    return 0;
}

int sa_default_num_threads(void)
{
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
