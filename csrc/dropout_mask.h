/* The dropout generator's keep mask as a tensor, for the PyTorch path (which
 * otherwise hashes every pair in int64 tensor arithmetic, about 130 ns a pair
 * on two cores). Same draw as the kernels: dropout_hash.h. */
#ifndef SA_DROPOUT_MASK_H
#define SA_DROPOUT_MASK_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t seed;
    uint32_t threshold;       /* sa_dropout_threshold(dropout_p) */
    int64_t batch, heads;
    const int64_t *rows;      /* num_rows query tokens */
    const int64_t *cols;      /* num_cols key tokens */
    int64_t num_rows, num_cols;
    /* 0: pairs (rows[e], cols[e]), num_rows == num_cols, keep is [batch, heads, num_rows];
     * 1: every (rows[i], cols[j]), keep is [batch, heads, num_rows, num_cols] */
    int outer;
    uint8_t *keep;            /* 1 where the pair survives */
} sa_dropout_mask_params;

/* Returns 0, or -1 with a message in err when no thread could start. */
int sa_cpu_dropout_mask(const sa_dropout_mask_params *p, int num_threads, char *err, size_t err_len);

#endif /* SA_DROPOUT_MASK_H */
