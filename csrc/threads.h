/* A parallel-for over [0, count) on short-lived POSIX threads.
 *
 * Threads are created per call and joined before it returns, so nothing
 * survives a fork (DataLoader workers) and nothing competes with torch's own
 * OpenMP runtime between calls. Work is handed out in chunks of `grain`
 * items from an atomic counter; the calling thread works too. */
#ifndef SA_THREADS_H
#define SA_THREADS_H

#include <stdint.h>

typedef void (*sa_range_fn)(void *ctx, int64_t begin, int64_t end);

/* Returns 0, or -1 when no thread could be started and the work did not run. */
int sa_parallel_for(int64_t count, int64_t grain, int num_threads, sa_range_fn fn, void *ctx);

int sa_default_num_threads(void);

#endif /* SA_THREADS_H */
