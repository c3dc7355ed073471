// CUDA kernels of sparse scaled dot-product attention, the same semantics as
// csrc/attention_cpu_body.h (which they are tested against).
//
// Layout of this file: helpers, forward kernel, backward kernels, bias-gradient
// kernel, launchers, the extern "C" entry points of csrc/attention.h.
//
// One warp per query row (forward, dQ) or per key column (dK, dV): lane l owns
// head-dim elements l, l + 32, ... so every load of a row is coalesced, and dot
// products finish with a butterfly of shuffles. Keys are visited in the layout's
// order with a streaming softmax; indices are fetched 32 at a time, one per
// lane, and broadcast. Accumulation is in float (double for double inputs).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <atomic>
#include <cstdio>
#include <mutex>

#include "attention.h"
#include "dropout_hash.h"
#include "kernel_common.cuh"

namespace {

using namespace sa_kernels;

// ---- forward ---------------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
forward_kernel(const sa_attention_params p) {
    using A = typename Accum<T>::type;
    const int lane = threadIdx.x % kWarp;
    const int64_t item = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
    const int64_t n = p.num_tokens, dim = p.head_dim;
    if (item >= p.batch * p.heads * n) return;
    const int64_t i = item % n, bh = item / n, h = bh % p.heads, b = bh / p.heads;
    const A scale = A(p.scale);
    const uint32_t threshold = sa_dropout_threshold(p.dropout_p);
    const A keep_scale = p.dropout_p > 0 ? A(1.0 / (1.0 - p.dropout_p)) : A(1);

    A q[VEC], acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; e++) acc[e] = A(0);
    A run_max = -CUDART_INF_F, run_sum = 0, run_sq = 0, run_shifted = 0;
    bool saw_nan = false;  // a NaN score makes the row NaN, as in PyTorch
    if (head_runs(p, h)) {
        load_row<T, VEC>(row_of<T>(p.q, p.q_stride, b, h, i), lane, dim, q);
        const uint32_t query_key = sa_dropout_query_key(sa_dropout_row_key(p.dropout_seed, b, h), i);
        const int64_t begin = p.row_ptr[i], end = p.row_ptr[i + 1];
        for (int64_t base = begin; base < end; base += kWarp) {
            const int64_t mine = base + lane;
            const int32_t my_key = mine < end ? p.col_idx[mine] : 0;
            const int count = end - base < kWarp ? int(end - base) : kWarp;
            for (int c = 0; c < count; c++) {
                const int32_t j = __shfl_sync(0xffffffffu, my_key, c);
                if (!key_allowed(p, b, j)) continue;
                A k[VEC], v[VEC];
                load_row<T, VEC>(row_of<T>(p.k, p.k_stride, b, h, j), lane, dim, k);
                load_row<T, VEC>(row_of<T>(p.v, p.v_stride, b, h, j), lane, dim, v);
                A partial = 0;
#pragma unroll
                for (int e = 0; e < VEC; e++) partial += q[e] * k[e];
                const A s = scale * warp_sum(partial) + bias_at<T>(p, h, i, j);
                saw_nan |= !(s < CUDART_INF_F);  // NaN or +inf: exp(inf - inf) in the softmax
                if (s > run_max) {
                    if (run_sum > 0) {
                        const A r = exp_acc(run_max - s);
                        run_shifted = r * (run_shifted + run_sum * (run_max - s));
                        run_sum *= r;
                        run_sq *= r * r;
#pragma unroll
                        for (int e = 0; e < VEC; e++) acc[e] *= r;
                    }
                    run_max = s;
                }
                const A ex = exp_acc(s - run_max);
                run_sum += ex;
                run_sq += ex * ex;
                run_shifted += ex * (s - run_max);
                A weight = ex * keep_scale;
                if (threshold > 0 && !sa_dropout_keep(query_key, j, threshold)) weight = 0;
#pragma unroll
                for (int e = 0; e < VEC; e++) acc[e] += weight * v[e];
            }
        }
    }
    T *out = static_cast<T *>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
    A *lse = static_cast<A *>(p.lse) + item;
    A *stats = p.row_stats ? static_cast<A *>(p.row_stats) + 2 * item : nullptr;
    if (saw_nan) run_sum = run_max = run_sq = run_shifted = A(NAN);
    const A inv = run_sum > 0 || saw_nan ? A(1) / run_sum : A(0);
#pragma unroll
    for (int e = 0; e < VEC; e++) {
        int64_t d = e * kWarp + lane;
        if (d < dim) out[d] = from_acc<T>(acc[e] * inv);
    }
    if (lane == 0) {
        const bool live = run_sum > 0 || saw_nan;
        *lse = live ? run_max + log_acc(run_sum) : -CUDART_INF_F;
        if (stats) {
            stats[0] = live ? run_sq * inv * inv : A(0);
            stats[1] = live ? log_acc(run_sum) - run_shifted * inv : A(0);
        }
    }
}

// ---- backward --------------------------------------------------------------

// delta_i = <dO_i, O_i>
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
delta_kernel(const sa_attention_params p) {
    using A = typename Accum<T>::type;
    const int lane = threadIdx.x % kWarp;
    const int64_t item = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
    const int64_t n = p.num_tokens;
    if (item >= p.batch * p.heads * n) return;
    const int64_t i = item % n, bh = item / n, h = bh % p.heads, b = bh / p.heads;
    A go[VEC], o[VEC];
    load_row<T, VEC>(row_of<T>(p.grad_out, p.grad_out_stride, b, h, i), lane, p.head_dim, go);
    load_row<T, VEC>(row_of<T>(p.out, p.out_stride, b, h, i), lane, p.head_dim, o);
    A partial = 0;
#pragma unroll
    for (int e = 0; e < VEC; e++) partial += go[e] * o[e];
    partial = warp_sum(partial);
    if (lane == 0) static_cast<A *>(p.delta)[item] = partial;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
grad_query_kernel(const sa_attention_params p) {
    using A = typename Accum<T>::type;
    const int lane = threadIdx.x % kWarp;
    const int64_t item = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
    const int64_t n = p.num_tokens, dim = p.head_dim;
    if (item >= p.batch * p.heads * n) return;
    const int64_t i = item % n, bh = item / n, h = bh % p.heads, b = bh / p.heads;
    const A scale = A(p.scale);
    const uint32_t threshold = sa_dropout_threshold(p.dropout_p);
    const A keep_scale = p.dropout_p > 0 ? A(1.0 / (1.0 - p.dropout_p)) : A(1);
    const A lse = static_cast<const A *>(p.lse)[item];
    A *grad_scores = p.grad_scores ? static_cast<A *>(p.grad_scores) + bh * p.nnz : nullptr;
    const int64_t begin = p.row_ptr[i], end = p.row_ptr[i + 1];
    A acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; e++) acc[e] = A(0);
    if (!head_runs(p, h) || lse == -CUDART_INF_F) {
        if (grad_scores)
            for (int64_t pos = begin + lane; pos < end; pos += kWarp) grad_scores[pos] = A(0);
    } else {
        A q[VEC], go[VEC];
        load_row<T, VEC>(row_of<T>(p.q, p.q_stride, b, h, i), lane, dim, q);
        load_row<T, VEC>(row_of<T>(p.grad_out, p.grad_out_stride, b, h, i), lane, dim, go);
        const A delta = static_cast<const A *>(p.delta)[item];
        const uint32_t query_key = sa_dropout_query_key(sa_dropout_row_key(p.dropout_seed, b, h), i);
        for (int64_t base = begin; base < end; base += kWarp) {
            const int64_t mine = base + lane;
            const int32_t my_key = mine < end ? p.col_idx[mine] : 0;
            const int count = end - base < kWarp ? int(end - base) : kWarp;
            A my_ds = 0;
            for (int c = 0; c < count; c++) {
                const int32_t j = __shfl_sync(0xffffffffu, my_key, c);
                A ds = 0;
                if (key_allowed(p, b, j)) {
                    A k[VEC], v[VEC];
                    load_row<T, VEC>(row_of<T>(p.k, p.k_stride, b, h, j), lane, dim, k);
                    load_row<T, VEC>(row_of<T>(p.v, p.v_stride, b, h, j), lane, dim, v);
                    A qk = 0, gv = 0;
#pragma unroll
                    for (int e = 0; e < VEC; e++) {
                        qk += q[e] * k[e];
                        gv += go[e] * v[e];
                    }
                    qk = warp_sum(qk);
                    gv = warp_sum(gv);
                    const A prob = exp_acc(scale * qk + bias_at<T>(p, h, i, j) - lse);
                    A kept = keep_scale;
                    if (threshold > 0 && !sa_dropout_keep(query_key, j, threshold)) kept = 0;
                    ds = prob * (kept * gv - delta);
#pragma unroll
                    for (int e = 0; e < VEC; e++) acc[e] += ds * k[e];
                }
                if (lane == c) my_ds = ds;
            }
            if (grad_scores && mine < end) grad_scores[mine] = my_ds;
        }
    }
    T *grad_q = static_cast<T *>(p.grad_q) + item * dim;
#pragma unroll
    for (int e = 0; e < VEC; e++) {
        int64_t d = e * kWarp + lane;
        if (d < dim) grad_q[d] = from_acc<T>(acc[e] * scale);
    }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
grad_key_value_kernel(const sa_attention_params p) {
    using A = typename Accum<T>::type;
    const int lane = threadIdx.x % kWarp;
    const int64_t item = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
    const int64_t n = p.num_tokens, dim = p.head_dim;
    if (item >= p.batch * p.heads * n) return;
    const int64_t j = item % n, bh = item / n, h = bh % p.heads, b = bh / p.heads;
    const A scale = A(p.scale);
    const uint32_t threshold = sa_dropout_threshold(p.dropout_p);
    const A keep_scale = p.dropout_p > 0 ? A(1.0 / (1.0 - p.dropout_p)) : A(1);
    A acc_k[VEC], acc_v[VEC];
#pragma unroll
    for (int e = 0; e < VEC; e++) acc_k[e] = acc_v[e] = A(0);
    if (head_runs(p, h) && key_allowed(p, b, j)) {
        A k[VEC], v[VEC];
        load_row<T, VEC>(row_of<T>(p.k, p.k_stride, b, h, j), lane, dim, k);
        load_row<T, VEC>(row_of<T>(p.v, p.v_stride, b, h, j), lane, dim, v);
        const uint32_t row_key = sa_dropout_row_key(p.dropout_seed, b, h);
        const A *lse_row = static_cast<const A *>(p.lse) + bh * n;
        const A *delta_row = static_cast<const A *>(p.delta) + bh * n;
        const int64_t begin = p.col_ptr[j], end = p.col_ptr[j + 1];
        for (int64_t base = begin; base < end; base += kWarp) {
            const int64_t mine = base + lane;
            const int32_t my_query = mine < end ? p.row_idx[mine] : 0;
            const int count = end - base < kWarp ? int(end - base) : kWarp;
            for (int c = 0; c < count; c++) {
                const int32_t i = __shfl_sync(0xffffffffu, my_query, c);
                const A lse = lse_row[i];
                if (lse == -CUDART_INF_F) continue;
                A q[VEC], go[VEC];
                load_row<T, VEC>(row_of<T>(p.q, p.q_stride, b, h, i), lane, dim, q);
                load_row<T, VEC>(row_of<T>(p.grad_out, p.grad_out_stride, b, h, i), lane, dim, go);
                A qk = 0, gv = 0;
#pragma unroll
                for (int e = 0; e < VEC; e++) {
                    qk += q[e] * k[e];
                    gv += go[e] * v[e];
                }
                qk = warp_sum(qk);
                gv = warp_sum(gv);
                const A prob = exp_acc(scale * qk + bias_at<T>(p, h, i, j) - lse);
                A kept = keep_scale;
                if (threshold > 0 && !sa_dropout_keep(sa_dropout_query_key(row_key, i), j, threshold))
                    kept = 0;
                const A ds = prob * (kept * gv - delta_row[i]);
                const A dropped_prob = prob * kept;
#pragma unroll
                for (int e = 0; e < VEC; e++) {
                    acc_k[e] += ds * q[e];
                    acc_v[e] += dropped_prob * go[e];
                }
            }
        }
    }
    T *grad_k = static_cast<T *>(p.grad_k) + item * dim;
    T *grad_v = static_cast<T *>(p.grad_v) + item * dim;
#pragma unroll
    for (int e = 0; e < VEC; e++) {
        int64_t d = e * kWarp + lane;
        if (d < dim) {
            grad_k[d] = from_acc<T>(acc_k[e] * scale);
            grad_v[d] = from_acc<T>(acc_v[e]);
        }
    }
}

// One block per (h, bucket); a fixed tree, so the sum is the same run after run.
template <typename A>
__global__ void bias_grad_kernel(const sa_bias_grad_params p) {
    constexpr int kThreads = 128;
    __shared__ A partial[kThreads];
    const int64_t h = blockIdx.x / p.num_buckets, t = blockIdx.x % p.num_buckets;
    const int64_t begin = p.bucket_ptr[t], count = p.bucket_ptr[t + 1] - begin;
    const A *scores = static_cast<const A *>(p.grad_scores);
    A sum = 0;
    for (int64_t b = 0; b < p.batch; b++) {
        const A *row = scores + (b * p.heads + h) * p.nnz;
        for (int64_t q = threadIdx.x; q < count; q += kThreads) sum += row[p.bucket_perm[begin + q]];
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
        __syncthreads();
    }
    if (threadIdx.x == 0) static_cast<A *>(p.grad_table)[blockIdx.x] = partial[0];
}


// ---- fast kernels ------------------------------------------------------------
//
// Lane-parallel over keys: each lane scores a different key of the row (its
// whole dot product, the query row read from shared memory as a broadcast), so
// a chunk of 32 keys needs one max and one sum reduction instead of a
// reduction per key. Values are then accumulated key by key with coalesced row
// loads, the lane owning head-dim elements lane, lane + 32, ...
//
// WARPS warps share one row: each takes every WARPS-th chunk of 32 keys and
// the partial results are merged in shared memory. The row kernels run with
// WARPS = 1 and skip rows longer than long_threshold; those (the global
// tokens of LONGFORMER, every row of DENSE) go to a launch with WARPS = 8.

constexpr int kLongWarps = 8;

// The largest non-NaN value of the warp (-inf if none), the same in every lane:
// callers branch on it, and lanes that disagreed would leave the warp's
// shuffles unmatched (a NaN score is tracked on its own).
template <typename A> __device__ __forceinline__ A warp_max(A x) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        A other = __shfl_xor_sync(0xffffffffu, x, offset);
        x = (other > x || x != x) ? other : x;
    }
    return x;
}

// <row, vec> with vec in shared memory; 16-byte loads when the rows allow.
template <typename T, typename A>
__device__ __forceinline__ A dot_shared(const T *row, const A *vec, int64_t dim, bool aligned) {
    A sum = 0;
    if (aligned) {
        constexpr int kPer = 16 / sizeof(T);
        for (int64_t d = 0; d < dim; d += kPer) {
            const uint4 raw = *reinterpret_cast<const uint4 *>(row + d);
            const T *vals = reinterpret_cast<const T *>(&raw);
#pragma unroll
            for (int t = 0; t < kPer; t++) sum += to_acc(vals[t]) * vec[d + t];
        }
    } else {
        for (int64_t d = 0; d < dim; d++) sum += to_acc(row[d]) * vec[d];
    }
    return sum;
}

template <typename T, typename A>
__device__ __forceinline__ void stage_row(A *dst, const T *row, int lane, int64_t dim) {
    for (int64_t d = lane; d < dim; d += kWarp) dst[d] = to_acc(row[d]);
    __syncwarp();
}

// Which (b, h, row) this warp works on, and its rank among the row's warps.
// Listed rows split in `splits` segments get one block per segment.
template <int WARPS>
__device__ __forceinline__ bool locate(const sa_attention_params &p, const int32_t *list,
                                       int64_t list_len, int64_t &b, int64_t &h, int64_t &row,
                                       int &rank, int64_t splits = 1, int64_t *segment = nullptr) {
    const int warp = threadIdx.x / kWarp;
    int64_t item;
    if (WARPS == 1) {
        item = (int64_t)blockIdx.x * kWarpsPerBlock + warp;
        rank = 0;
        if (item >= p.batch * p.heads * p.num_tokens) return false;
        row = item % p.num_tokens;
    } else {
        item = blockIdx.x / splits;  // one block per (b, h, listed row, segment)
        if (segment != nullptr) *segment = blockIdx.x % splits;
        rank = warp;
        row = list[item % list_len];
        item = item / list_len * p.num_tokens + row;
    }
    const int64_t bh = item / p.num_tokens;
    h = bh % p.heads;
    b = bh / p.heads;
    return true;
}

template <typename T, int VEC, int WARPS>
__global__ void __launch_bounds__(kWarp * (WARPS == 1 ? kWarpsPerBlock : WARPS))
forward_fast_kernel(const sa_attention_params p, bool aligned) {
    using A = typename Accum<T>::type;
    constexpr int kDim = VEC * kWarp;
    // the warps of a long row share its staged rows
    constexpr int kBlockWarps = WARPS == 1 ? kWarpsPerBlock : 1;
    __shared__ A q_shared[kBlockWarps][kDim];
    __shared__ A merge[WARPS == 1 ? 1 : WARPS][kDim + 4];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    int64_t b, h, i, segment = 0;
    int rank;
    const bool split = WARPS > 1 && p.split_partials != nullptr;
    const int64_t splits = split ? p.long_row_splits : 1;
    if (!locate<WARPS>(p, p.long_rows, p.num_long_rows, b, h, i, rank, splits, &segment)) return;
    const int64_t begin = p.row_ptr[i], end = p.row_ptr[i + 1], dim = p.head_dim;
    if (WARPS == 1 && end - begin > p.long_threshold) return;  // the long-row launch owns it
    // a split row: this block takes one segment of its keys
    const int64_t part = (end - begin + splits - 1) / splits;
    const int64_t lo = begin + segment * part < end ? begin + segment * part : end;
    const int64_t hi = lo + part < end ? lo + part : end;
    const int64_t item = (b * p.heads + h) * p.num_tokens + i;
    const A scale = A(p.scale);
    const uint32_t threshold = sa_dropout_threshold(p.dropout_p);
    const A keep_scale = p.dropout_p > 0 ? A(1.0 / (1.0 - p.dropout_p)) : A(1);
    const bool want_stats = p.row_stats != nullptr;

    A acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; e++) acc[e] = A(0);
    A run_max = -CUDART_INF_F, run_sum = 0, run_sq = 0, run_shifted = 0;
    bool saw_nan = false;  // a NaN score makes the row NaN, as in PyTorch
    if (head_runs(p, h)) {
        A *q = q_shared[WARPS == 1 ? warp : 0];
        stage_row(q, row_of<T>(p.q, p.q_stride, b, h, i), lane, dim);
        const uint32_t query_key = sa_dropout_query_key(sa_dropout_row_key(p.dropout_seed, b, h), i);
        for (int64_t base = lo + (int64_t)rank * kWarp; base < hi; base += (int64_t)kWarp * WARPS) {
            const int64_t pos = base + lane;
            const bool valid = pos < hi;
            const int32_t j = valid ? p.col_idx[pos] : 0;
            const bool allowed = valid && key_allowed(p, b, j);
            A s = -CUDART_INF_F;
            if (allowed)
                s = scale * dot_shared(row_of<T>(p.k, p.k_stride, b, h, j), q, dim, aligned) +
                    bias_at<T>(p, h, i, j);
            saw_nan |= __any_sync(0xffffffffu, !(s < CUDART_INF_F));  // NaN or +inf
            const A chunk_max = warp_max(s);
            if (chunk_max == -CUDART_INF_F) continue;
            const A new_max = chunk_max > run_max ? chunk_max : run_max;
            const A rescale = run_sum > 0 ? exp_acc(run_max - new_max) : A(0);
            const A ex = allowed ? exp_acc(s - new_max) : A(0);
            if (want_stats) {
                // disallowed lanes hold s = -inf: keep 0 * inf out of the sums
                const A chunk_sq = warp_sum(ex * ex);
                const A chunk_shift = warp_sum(allowed ? ex * (s - new_max) : A(0));
                run_shifted = run_sum > 0 ? rescale * (run_shifted + run_sum * (run_max - new_max)) + chunk_shift
                                          : chunk_shift;
                run_sq = run_sq * rescale * rescale + chunk_sq;
            }
            run_sum = run_sum * rescale + warp_sum(ex);
            run_max = new_max;
#pragma unroll
            for (int e = 0; e < VEC; e++) acc[e] *= rescale;
            A weight = ex * keep_scale;
            if (threshold > 0 && allowed && !sa_dropout_keep(query_key, j, threshold)) weight = 0;
            const int count = hi - base < kWarp ? int(hi - base) : kWarp;
#pragma unroll 4
            for (int c = 0; c < count; c++) {
                const A wc = __shfl_sync(0xffffffffu, weight, c);
                const int32_t jc = __shfl_sync(0xffffffffu, j, c);
                const T *v = row_of<T>(p.v, p.v_stride, b, h, jc);
#pragma unroll
                for (int e = 0; e < VEC; e++) {
                    const int64_t d = e * kWarp + lane;
                    if (d < dim) acc[e] += wc * to_acc(v[d]);
                }
            }
        }
    }
    if (WARPS > 1) {
        // merge the warps' partial softmax states against the common maximum
        if (lane == 0) {
            merge[warp][kDim] = run_max;
            merge[warp][kDim + 1] = run_sum;
            merge[warp][kDim + 3] = saw_nan ? A(1) : A(0);
        }
        __syncthreads();
        for (int w = 0; w < WARPS; w++) saw_nan |= merge[w][kDim + 3] != A(0);
        A global_max = -CUDART_INF_F;
        for (int w = 0; w < WARPS; w++)
            if (merge[w][kDim + 1] > 0 && merge[w][kDim] > global_max) global_max = merge[w][kDim];
        const A factor = run_sum > 0 ? exp_acc(run_max - global_max) : A(0);
        __syncthreads();
#pragma unroll
        for (int e = 0; e < VEC; e++) merge[warp][e * kWarp + lane] = acc[e] * factor;
        if (lane == 0) {
            merge[warp][kDim] = run_sum * factor;
            merge[warp][kDim + 1] = run_sq * factor * factor;
            merge[warp][kDim + 2] = run_sum > 0 ? factor * (run_shifted + run_sum * (run_max - global_max)) : A(0);
        }
        __syncthreads();
        if (warp != 0) return;
        run_max = global_max;
        run_sum = run_sq = run_shifted = 0;
#pragma unroll
        for (int e = 0; e < VEC; e++) acc[e] = 0;
        for (int w = 0; w < WARPS; w++) {
            run_sum += merge[w][kDim];
            run_sq += merge[w][kDim + 1];
            run_shifted += merge[w][kDim + 2];
#pragma unroll
            for (int e = 0; e < VEC; e++) acc[e] += merge[w][e * kWarp + lane];
        }
        if (split) {
            // this segment's softmax state; merge_segments_kernel finishes the row
            A *record = static_cast<A *>(p.split_partials) + (int64_t)blockIdx.x * (dim + 5);
            if (lane == 0) {
                record[0] = run_max;
                record[1] = run_sum;
                record[2] = run_sq;
                record[3] = run_shifted;
                record[4] = saw_nan ? A(1) : A(0);
            }
#pragma unroll
            for (int e = 0; e < VEC; e++) {
                const int64_t d = e * kWarp + lane;
                if (d < dim) record[5 + d] = acc[e];
            }
            return;
        }
    }
    T *out = static_cast<T *>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
    if (saw_nan) run_sum = run_max = run_sq = run_shifted = A(NAN);
    const bool live = run_sum > 0 || saw_nan;
    const A inv = live ? A(1) / run_sum : A(0);
#pragma unroll
    for (int e = 0; e < VEC; e++) {
        const int64_t d = e * kWarp + lane;
        if (d < dim) out[d] = from_acc<T>(acc[e] * inv);
    }
    if (lane == 0) {
        static_cast<A *>(p.lse)[item] = live ? run_max + log_acc(run_sum) : -CUDART_INF_F;
        if (want_stats) {
            A *stats = static_cast<A *>(p.row_stats) + 2 * item;
            stats[0] = live ? run_sq * inv * inv : A(0);
            stats[1] = live ? log_acc(run_sum) - run_shifted * inv : A(0);
        }
    }
}

// One block per split long row: combines its segments' softmax states
// (written by forward_fast_kernel) against their common maximum into out, lse
// and stats. The segments are spread over the threads, so the cost does not
// grow with a serial walk of the segments (it did: 14 us for 32 segments of
// one row on an H200, 0.5 of a shorter segment's saving).
constexpr int kMergeThreads = 128;
constexpr int kMergeChunk = kMergeThreads;  // segment weights staged at a time

template <typename A> __device__ A block_reduce(A x, bool take_max, A *scratch) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    x = take_max ? warp_max(x) : warp_sum(x);
    __syncthreads();  // scratch may still be read from the last reduction
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    A total = scratch[0];
    for (int w = 1; w < kMergeThreads / kWarp; w++)
        total = take_max ? (scratch[w] > total ? scratch[w] : total) : total + scratch[w];
    return total;
}

template <typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_segments_kernel(const sa_attention_params p) {
    using A = typename Accum<T>::type;
    __shared__ A scratch[kMergeThreads / kWarp];
    __shared__ A weights[kMergeChunk];
    __shared__ bool counted[kMergeChunk];  // segments with a positive sum, as in the sums above
    const int tid = threadIdx.x;
    const int64_t listed = blockIdx.x, splits = p.long_row_splits, dim = p.head_dim, stride = dim + 5;
    const int64_t i = p.long_rows[listed % p.num_long_rows], bh = listed / p.num_long_rows;
    const int64_t h = bh % p.heads, b = bh / p.heads, item = bh * p.num_tokens + i;
    const A *records = static_cast<const A *>(p.split_partials) + listed * splits * stride;
    A top = -CUDART_INF_F, nan_flag = 0;
    for (int64_t s = tid; s < splits; s += kMergeThreads) {
        const A *record = records + s * stride;
        if (record[4] != A(0)) nan_flag = 1;
        if (record[1] > 0 && record[0] > top) top = record[0];
    }
    top = block_reduce(top, true, scratch);
    const bool saw_nan = block_reduce(nan_flag, true, scratch) != A(0);
    A sum = 0, sq = 0, shifted = 0;
    for (int64_t s = tid; s < splits; s += kMergeThreads) {
        const A *record = records + s * stride;
        if (!(record[1] > 0)) continue;
        const A factor = exp_acc(record[0] - top);
        sum += record[1] * factor;
        sq += record[2] * factor * factor;
        shifted += factor * (record[3] + record[1] * (record[0] - top));
    }
    sum = block_reduce(sum, false, scratch);
    sq = block_reduce(sq, false, scratch);
    shifted = block_reduce(shifted, false, scratch);
    if (saw_nan) sum = top = sq = shifted = A(NAN);
    const bool live = sum > 0 || saw_nan;
    const A inv = live ? A(1) / sum : A(0);
    // the value rows: segment weights a chunk at a time, a thread per dim
    A value[256 / kMergeThreads] = {};
    for (int64_t first = 0; first < splits; first += kMergeChunk) {
        const int64_t count = splits - first < kMergeChunk ? splits - first : kMergeChunk;
        __syncthreads();
        if (tid < count) {
            const A *record = records + (first + tid) * stride;
            counted[tid] = record[1] > 0;
            weights[tid] = counted[tid] ? exp_acc(record[0] - top) : A(0);
        }
        __syncthreads();
#pragma unroll
        for (int e = 0; e < 256 / kMergeThreads; e++) {
            const int64_t d = tid + e * kMergeThreads;
            if (d >= dim) continue;
            const A *column = records + first * stride + 5 + d;
#pragma unroll 8
            for (int64_t s = 0; s < count; s++)
                if (counted[s]) value[e] += column[s * stride] * weights[s];
        }
    }
    T *out = static_cast<T *>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
#pragma unroll
    for (int e = 0; e < 256 / kMergeThreads; e++) {
        const int64_t d = tid + e * kMergeThreads;
        if (d < dim) out[d] = from_acc<T>(saw_nan ? A(NAN) : value[e] * inv);
    }
    if (tid == 0) {
        static_cast<A *>(p.lse)[item] = live ? top + log_acc(sum) : -CUDART_INF_F;
        if (p.row_stats != nullptr) {
            A *stats = static_cast<A *>(p.row_stats) + 2 * item;
            stats[0] = live ? sq * inv * inv : A(0);
            stats[1] = live ? log_acc(sum) - shifted * inv : A(0);
        }
    }
}

template <typename T, int VEC, int WARPS>
__global__ void __launch_bounds__(kWarp * (WARPS == 1 ? kWarpsPerBlock : WARPS))
grad_query_fast_kernel(const sa_attention_params p, bool aligned) {
    using A = typename Accum<T>::type;
    constexpr int kDim = VEC * kWarp;
    // the warps of a long row share its staged rows
    constexpr int kBlockWarps = WARPS == 1 ? kWarpsPerBlock : 1;
    __shared__ A q_shared[kBlockWarps][kDim];
    __shared__ A go_shared[kBlockWarps][kDim];
    __shared__ A merge[WARPS == 1 ? 1 : WARPS][kDim];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    int64_t b, h, i;
    int rank;
    if (!locate<WARPS>(p, p.long_rows, p.num_long_rows, b, h, i, rank)) return;
    const int64_t begin = p.row_ptr[i], end = p.row_ptr[i + 1], dim = p.head_dim;
    if (WARPS == 1 && end - begin > p.long_threshold) return;
    const int64_t bh = b * p.heads + h, item = bh * p.num_tokens + i;
    const A scale = A(p.scale);
    const uint32_t threshold = sa_dropout_threshold(p.dropout_p);
    const A keep_scale = p.dropout_p > 0 ? A(1.0 / (1.0 - p.dropout_p)) : A(1);
    const A lse = static_cast<const A *>(p.lse)[item];
    A *grad_scores = p.grad_scores ? static_cast<A *>(p.grad_scores) + bh * p.nnz : nullptr;
    const bool live = head_runs(p, h) && lse != -CUDART_INF_F;
    A acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; e++) acc[e] = A(0);
    A *q = q_shared[WARPS == 1 ? warp : 0], *go = go_shared[WARPS == 1 ? warp : 0];
    A delta = 0;
    uint32_t query_key = 0;
    if (live) {
        stage_row(q, row_of<T>(p.q, p.q_stride, b, h, i), lane, dim);
        stage_row(go, row_of<T>(p.grad_out, p.grad_out_stride, b, h, i), lane, dim);
        delta = static_cast<const A *>(p.delta)[item];
        query_key = sa_dropout_query_key(sa_dropout_row_key(p.dropout_seed, b, h), i);
    }
    for (int64_t base = begin + (int64_t)rank * kWarp; base < end; base += (int64_t)kWarp * WARPS) {
        const int64_t pos = base + lane;
        const bool valid = pos < end;
        const int32_t j = valid ? p.col_idx[pos] : 0;
        A ds = 0;
        if (live && valid && key_allowed(p, b, j)) {
            const A qk = dot_shared(row_of<T>(p.k, p.k_stride, b, h, j), q, dim, aligned);
            const A gv = dot_shared(row_of<T>(p.v, p.v_stride, b, h, j), go, dim, aligned);
            const A prob = exp_acc(scale * qk + bias_at<T>(p, h, i, j) - lse);
            A kept = keep_scale;
            if (threshold > 0 && !sa_dropout_keep(query_key, j, threshold)) kept = 0;
            ds = prob * (kept * gv - delta);
        }
        if (grad_scores && valid) grad_scores[pos] = ds;
        if (!live) continue;
        const int count = end - base < kWarp ? int(end - base) : kWarp;
#pragma unroll 4
        for (int c = 0; c < count; c++) {
            const A dsc = __shfl_sync(0xffffffffu, ds, c);
            const int32_t jc = __shfl_sync(0xffffffffu, j, c);
            const T *k = row_of<T>(p.k, p.k_stride, b, h, jc);
#pragma unroll
            for (int e = 0; e < VEC; e++) {
                const int64_t d = e * kWarp + lane;
                if (d < dim) acc[e] += dsc * to_acc(k[d]);
            }
        }
    }
    if (WARPS > 1) {
#pragma unroll
        for (int e = 0; e < VEC; e++) merge[warp][e * kWarp + lane] = acc[e];
        __syncthreads();
        if (warp != 0) return;
#pragma unroll
        for (int e = 0; e < VEC; e++) {
            acc[e] = 0;
            for (int w = 0; w < WARPS; w++) acc[e] += merge[w][e * kWarp + lane];
        }
    }
    T *grad_q = static_cast<T *>(p.grad_q) + item * dim;
#pragma unroll
    for (int e = 0; e < VEC; e++) {
        const int64_t d = e * kWarp + lane;
        if (d < dim) grad_q[d] = from_acc<T>(acc[e] * scale);
    }
}

template <typename T, int VEC, int WARPS>
__global__ void __launch_bounds__(kWarp * (WARPS == 1 ? kWarpsPerBlock : WARPS))
grad_key_value_fast_kernel(const sa_attention_params p, bool aligned) {
    using A = typename Accum<T>::type;
    constexpr int kDim = VEC * kWarp;
    // the warps of a long row share its staged rows
    constexpr int kBlockWarps = WARPS == 1 ? kWarpsPerBlock : 1;
    __shared__ A k_shared[kBlockWarps][kDim];
    __shared__ A v_shared[kBlockWarps][kDim];
    __shared__ A merge[WARPS == 1 ? 1 : WARPS][2][kDim];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    int64_t b, h, j;
    int rank;
    if (!locate<WARPS>(p, p.long_cols, p.num_long_cols, b, h, j, rank)) return;
    const int64_t begin = p.col_ptr[j], end = p.col_ptr[j + 1], dim = p.head_dim;
    if (WARPS == 1 && end - begin > p.long_threshold) return;
    const int64_t bh = b * p.heads + h, item = bh * p.num_tokens + j;
    const A scale = A(p.scale);
    const uint32_t threshold = sa_dropout_threshold(p.dropout_p);
    const A keep_scale = p.dropout_p > 0 ? A(1.0 / (1.0 - p.dropout_p)) : A(1);
    const bool live = head_runs(p, h) && key_allowed(p, b, j);
    A acc_k[VEC], acc_v[VEC];
#pragma unroll
    for (int e = 0; e < VEC; e++) acc_k[e] = acc_v[e] = A(0);
    if (live) {
        A *k = k_shared[WARPS == 1 ? warp : 0], *v = v_shared[WARPS == 1 ? warp : 0];
        stage_row(k, row_of<T>(p.k, p.k_stride, b, h, j), lane, dim);
        stage_row(v, row_of<T>(p.v, p.v_stride, b, h, j), lane, dim);
        const uint32_t row_key = sa_dropout_row_key(p.dropout_seed, b, h);
        const A *lse_row = static_cast<const A *>(p.lse) + bh * p.num_tokens;
        const A *delta_row = static_cast<const A *>(p.delta) + bh * p.num_tokens;
        for (int64_t base = begin + (int64_t)rank * kWarp; base < end; base += (int64_t)kWarp * WARPS) {
            const int64_t pos = base + lane;
            const bool valid = pos < end;
            const int32_t i = valid ? p.row_idx[pos] : 0;
            A ds = 0, dropped_prob = 0;
            const A lse = valid ? lse_row[i] : A(0);
            if (valid && lse != -CUDART_INF_F) {
                const A qk = dot_shared(row_of<T>(p.q, p.q_stride, b, h, i), k, dim, aligned);
                const A gv = dot_shared(row_of<T>(p.grad_out, p.grad_out_stride, b, h, i), v, dim, aligned);
                const A prob = exp_acc(scale * qk + bias_at<T>(p, h, i, j) - lse);
                A kept = keep_scale;
                if (threshold > 0 && !sa_dropout_keep(sa_dropout_query_key(row_key, i), j, threshold))
                    kept = 0;
                ds = prob * (kept * gv - delta_row[i]);
                dropped_prob = prob * kept;
            }
            const int count = end - base < kWarp ? int(end - base) : kWarp;
#pragma unroll 2
            for (int c = 0; c < count; c++) {
                const A dsc = __shfl_sync(0xffffffffu, ds, c);
                const A pc = __shfl_sync(0xffffffffu, dropped_prob, c);
                const int32_t ic = __shfl_sync(0xffffffffu, i, c);
                const T *q = row_of<T>(p.q, p.q_stride, b, h, ic);
                const T *go = row_of<T>(p.grad_out, p.grad_out_stride, b, h, ic);
#pragma unroll
                for (int e = 0; e < VEC; e++) {
                    const int64_t d = e * kWarp + lane;
                    if (d < dim) {
                        acc_k[e] += dsc * to_acc(q[d]);
                        acc_v[e] += pc * to_acc(go[d]);
                    }
                }
            }
        }
    }
    if (WARPS > 1) {
#pragma unroll
        for (int e = 0; e < VEC; e++) {
            merge[warp][0][e * kWarp + lane] = acc_k[e];
            merge[warp][1][e * kWarp + lane] = acc_v[e];
        }
        __syncthreads();
        if (warp != 0) return;
#pragma unroll
        for (int e = 0; e < VEC; e++) {
            acc_k[e] = acc_v[e] = 0;
            for (int w = 0; w < WARPS; w++) {
                acc_k[e] += merge[w][0][e * kWarp + lane];
                acc_v[e] += merge[w][1][e * kWarp + lane];
            }
        }
    }
    T *grad_k = static_cast<T *>(p.grad_k) + item * dim;
    T *grad_v = static_cast<T *>(p.grad_v) + item * dim;
#pragma unroll
    for (int e = 0; e < VEC; e++) {
        const int64_t d = e * kWarp + lane;
        if (d < dim) {
            grad_k[d] = from_acc<T>(acc_k[e] * scale);
            grad_v[d] = from_acc<T>(acc_v[e]);
        }
    }
}

// ---- launchers -------------------------------------------------------------

int report(cudaError_t status, const char *what, char *err, size_t len) {
    if (status == cudaSuccess) return SA_OK;
    snprintf(err, len, "CUDA error in %s: %s (%s)", what, cudaGetErrorString(status),
             cudaGetErrorName(status));
    return SA_ERR_DEVICE;
}

// Makes the tensors' device current for the call and restores the caller's.
struct DeviceGuard {
    int previous = -1;
    cudaError_t status = cudaSuccess;
    explicit DeviceGuard(int device) {
        status = cudaGetDevice(&previous);
        if (status == cudaSuccess && previous != device) status = cudaSetDevice(device);
    }
    ~DeviceGuard() {
        if (previous >= 0) cudaSetDevice(previous);
    }
};

enum class Pass { Forward, Delta, GradQuery, GradKeyValue };

// 16-byte loads need every row start, and the head dim, on 16-byte boundaries.
template <typename T>
bool rows_aligned(const sa_attention_params &p, Pass pass) {
    const int64_t per = 16 / sizeof(T);
    if (p.head_dim % per) return false;
    const void *ptrs[4] = {p.q, p.k, p.v, p.grad_out};
    const int64_t *strides[4] = {p.q_stride, p.k_stride, p.v_stride, p.grad_out_stride};
    const int count = pass == Pass::Forward ? 3 : 4;
    for (int t = 0; t < count; t++) {
        if (reinterpret_cast<uintptr_t>(ptrs[t]) % 16) return false;
        for (int d = 0; d < 3; d++)
            if (strides[t][d] % per) return false;
    }
    return true;
}

template <typename T, int VEC, int WARPS>
void launch_fast(Pass pass, const sa_attention_params &p, dim3 grid, bool aligned) {
    cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
    const dim3 block(kWarp * (WARPS == 1 ? kWarpsPerBlock : WARPS));
    switch (pass) {
    case Pass::Forward: forward_fast_kernel<T, VEC, WARPS><<<grid, block, 0, stream>>>(p, aligned); break;
    case Pass::GradQuery: grad_query_fast_kernel<T, VEC, WARPS><<<grid, block, 0, stream>>>(p, aligned); break;
    case Pass::GradKeyValue:
        grad_key_value_fast_kernel<T, VEC, WARPS><<<grid, block, 0, stream>>>(p, aligned);
        break;
    case Pass::Delta: break;
    }
}

template <typename T, int VEC>
cudaError_t launch_pass(Pass pass, const sa_attention_params &p) {
    const int64_t rows = p.batch * p.heads * p.num_tokens;
    if (rows == 0) return cudaSuccess;
    const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const dim3 grid((unsigned)blocks), block(kWarp * kWarpsPerBlock);
    cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
    if (!p.reference_kernel && pass != Pass::Delta) {
        const bool aligned = rows_aligned<T>(p, pass);
        if (!(pass == Pass::Forward && p.long_rows_only)) {
            launch_fast<T, VEC, 1>(pass, p, grid, aligned);
            cudaError_t status = cudaGetLastError();
            if (status != cudaSuccess) return status;
        }
        const int64_t listed = pass == Pass::GradKeyValue ? p.num_long_cols : p.num_long_rows;
        const bool split = pass == Pass::Forward && p.split_partials != nullptr;
        if (listed > 0) {
            const int64_t long_blocks = p.batch * p.heads * listed * (split ? p.long_row_splits : 1);
            if (long_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
            launch_fast<T, VEC, kLongWarps>(pass, p, dim3((unsigned)long_blocks), aligned);
            if (split) {
                cudaError_t status = cudaGetLastError();
                if (status != cudaSuccess) return status;
                merge_segments_kernel<T><<<(unsigned)(p.batch * p.heads * listed), kMergeThreads, 0, stream>>>(p);
            }
        }
        return cudaGetLastError();
    }
    switch (pass) {
    case Pass::Forward: forward_kernel<T, VEC><<<grid, block, 0, stream>>>(p); break;
    case Pass::Delta: delta_kernel<T, VEC><<<grid, block, 0, stream>>>(p); break;
    case Pass::GradQuery: grad_query_kernel<T, VEC><<<grid, block, 0, stream>>>(p); break;
    case Pass::GradKeyValue: grad_key_value_kernel<T, VEC><<<grid, block, 0, stream>>>(p); break;
    }
    return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_dim(Pass pass, const sa_attention_params &p) {
    if (p.head_dim <= 32) return launch_pass<T, 1>(pass, p);
    if (p.head_dim <= 64) return launch_pass<T, 2>(pass, p);
    if (p.head_dim <= 128) return launch_pass<T, 4>(pass, p);
    return launch_pass<T, 8>(pass, p);
}

cudaError_t dispatch(Pass pass, const sa_attention_params &p) {
    switch (p.dtype) {
    case SA_F32: return dispatch_dim<float>(pass, p);
    case SA_F64: return dispatch_dim<double>(pass, p);
    case SA_F16: return dispatch_dim<__half>(pass, p);
    case SA_BF16: return dispatch_dim<__nv_bfloat16>(pass, p);
    }
    return cudaErrorInvalidValue;
}

int check_params(const sa_attention_params *p, char *err, size_t len) {
    if (p->head_dim > 256) {
        snprintf(err, len, "query: head dimension %lld exceeds the CUDA kernels' limit of 256",
                 (long long)p->head_dim);
        return SA_ERR_UNSUPPORTED;
    }
    return SA_OK;
}

const char *pass_name(Pass pass) {
    switch (pass) {
    case Pass::Forward: return "the forward kernel";
    case Pass::Delta: return "the delta kernel";
    case Pass::GradQuery: return "the dQ kernel";
    case Pass::GradKeyValue: return "the dK/dV kernel";
    }
    return "a kernel";
}

}  // namespace

namespace sa_kernels {
// Asked once per device and kept: each pass of a planned call needs it, and it
// cannot change while the process runs.
cudaError_t device_major(int device, int *major) {
    constexpr int kKnownDevices = 64;
    static std::atomic<int> known[kKnownDevices];  // 0: not asked yet
    if (device >= 0 && device < kKnownDevices) {
        const int cached = known[device].load(std::memory_order_relaxed);
        if (cached > 0) {
            *major = cached;
            return cudaSuccess;
        }
    }
    cudaError_t status = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
    if (status == cudaSuccess && *major > 0 && device >= 0 && device < kKnownDevices)
        known[device].store(*major, std::memory_order_relaxed);
    return status;
}
}  // namespace sa_kernels

// The tensor-core kernel's own limits, checked before it is launched.
static int check_tiled(const sa_attention_params *p, char *err, size_t len) {
    if (p->dtype != SA_F16 && p->dtype != SA_BF16) {
        snprintf(err, len, "query: the tensor-core kernel (tile plans) takes float16 or bfloat16");
        return SA_ERR_UNSUPPORTED;
    }
    if (p->head_dim > 128) {
        snprintf(err, len, "query: head dimension %lld exceeds the tensor-core kernel's limit of 128",
                 (long long)p->head_dim);
        return SA_ERR_UNSUPPORTED;
    }
    int major = 0;
    int status = report(sa_kernels::device_major(p->device_id, &major), "cudaDeviceGetAttribute", err, len);
    if (status != SA_OK) return status;
    if (major < 8) {
        snprintf(err, len, "query: the tensor-core kernel needs compute capability 8.0 or newer, "
                 "device %d has %d.x", p->device_id, major);
        return SA_ERR_UNSUPPORTED;
    }
    return SA_OK;
}

static int forward_planned(const sa_attention_params *p, char *err, size_t len);

extern "C" int sa_cuda_forward(const sa_attention_params *p, char *err, size_t len) {
    int status = check_params(p, err, len);
    if (status != SA_OK) return status;
    DeviceGuard guard(p->device_id);
    if (guard.status != cudaSuccess) return report(guard.status, "cudaSetDevice", err, len);
    if (p->plan_base != nullptr) return forward_planned(p, err, len);
    if (p->tile_queries != nullptr) {
        status = check_tiled(p, err, len);
        if (status != SA_OK) return status;
        return report(forward_tiled(*p), "the tensor-core forward kernel", err, len);
    }
    return report(dispatch(Pass::Forward, *p), pass_name(Pass::Forward), err, len);
}

namespace {

// One second stream per device, with the two events that fork it from and
// join it to the caller's stream; created on first use and kept. The lock is
// held from fork to join, so that calls from several host threads cannot
// record over each other's events.
constexpr int kMaxSideDevices = 64;
struct SideStream {
    cudaStream_t stream = nullptr;
    cudaEvent_t fork = nullptr, join = nullptr;
};
std::mutex side_lock;
SideStream side_streams[kMaxSideDevices];
std::atomic<long long> beside_forwards{0};

int side_stream_for(int device, SideStream **out, char *err, size_t len) {
    if (device < 0 || device >= kMaxSideDevices) {
        snprintf(err, len, "query: long rows on a second stream support devices 0 to %d, not %d",
                 kMaxSideDevices - 1, device);
        return SA_ERR_UNSUPPORTED;
    }
    SideStream &side = side_streams[device];
    if (side.stream == nullptr) {
        SideStream made;
        int status = report(cudaStreamCreateWithFlags(&made.stream, cudaStreamNonBlocking),
                            "cudaStreamCreateWithFlags", err, len);
        if (status == SA_OK)
            status = report(cudaEventCreateWithFlags(&made.fork, cudaEventDisableTiming),
                            "cudaEventCreateWithFlags", err, len);
        if (status == SA_OK)
            status = report(cudaEventCreateWithFlags(&made.join, cudaEventDisableTiming),
                            "cudaEventCreateWithFlags", err, len);
        if (status != SA_OK) {
            if (made.join) cudaEventDestroy(made.join);
            if (made.fork) cudaEventDestroy(made.fork);
            if (made.stream) cudaStreamDestroy(made.stream);
            return status;
        }
        side = made;
    }
    *out = &side;
    return SA_OK;
}

// The caller's stream waits for everything queued on the second stream.
int join_side(SideStream *side, cudaStream_t main_stream, char *err, size_t len) {
    int status = report(cudaEventRecord(side->join, side->stream), "cudaEventRecord", err, len);
    if (status != SA_OK) return status;
    return report(cudaStreamWaitEvent(main_stream, side->join, 0), "cudaStreamWaitEvent", err, len);
}

}  // namespace

// A forward over p's whole plan: the passes in order on p->stream, and the
// long rows after them or beside them (see plan_base in attention.h).
static int forward_planned(const sa_attention_params *p, char *err, size_t len) {
    const int64_t(*fields)[6] = reinterpret_cast<const int64_t(*)[6]>(p->plan_fields);
    sa_attention_params rows = *p;
    rows.plan_base = nullptr;
    rows.tile_queries = nullptr;
    rows.merge_previous = 0;
    rows.long_rows_only = 1;
    const bool beside = p->long_rows_beside && p->num_long_rows > 0;
    const cudaStream_t main_stream = static_cast<cudaStream_t>(p->stream);
    std::unique_lock<std::mutex> hold(side_lock, std::defer_lock);
    SideStream *side = nullptr;
    int status = SA_OK;
    if (beside) {
        hold.lock();
        status = side_stream_for(p->device_id, &side, err, len);
        if (status == SA_OK)
            status = report(cudaEventRecord(side->fork, main_stream), "cudaEventRecord", err, len);
        if (status == SA_OK)
            status = report(cudaStreamWaitEvent(side->stream, side->fork, 0), "cudaStreamWaitEvent", err, len);
        if (status != SA_OK) return status;  // nothing queued on the second stream yet
        rows.stream = side->stream;
        status = sa_cuda_forward(&rows, err, len);
    }
    for (int64_t i = 0; i < p->plan_num_passes && status == SA_OK; i++) {
        sa_attention_params pass = *p;
        pass.plan_base = nullptr;
        sa_select_pass(&pass, fields[i], p->plan_base, i);
        status = sa_cuda_forward(&pass, err, len);
    }
    if (beside) {
        // join even after a failure, so that a capture does not end with the stream still forked
        char join_err[256] = "";
        const int joined = join_side(side, main_stream, join_err, sizeof(join_err));
        if (status == SA_OK && joined != SA_OK) {
            snprintf(err, len, "%s", join_err);
            status = joined;
        }
        if (status == SA_OK) beside_forwards.fetch_add(1, std::memory_order_relaxed);
        return status;
    }
    if (status == SA_OK && p->num_long_rows > 0) status = sa_cuda_forward(&rows, err, len);
    return status;
}

extern "C" long long sa_cuda_beside_forwards(void) { return beside_forwards.load(); }

extern "C" int sa_cuda_tiled_grad_query_applies(const sa_attention_params *p) {
    return p->plan_base != nullptr && !p->reference_kernel && sa_kernels::lean_backward_applies(*p);
}

namespace {
std::atomic<long long> tiled_grad_query_passes{0}, tiled_grad_key_value_passes{0};

// dQ (or dK and dV) over a whole plan on tensor cores: the gradients zeroed,
// then each pass adds its tiles' rows. Sets *ran; launches nothing where the
// lean kernel's conditions do not hold, or, for dK and dV, where the layout is
// not symmetric: its plan is then not the plan of its transpose. The caller's
// plan holds every pair of the layout (it leaves no row out).
int grad_planned(const sa_attention_params *p, Pass pass, bool *ran, char *err, size_t len) {
    *ran = false;
    if (!sa_cuda_tiled_grad_query_applies(p)) return SA_OK;
    // a symmetric layout's transpose comes as the same arrays (see Layout.torch_tensors)
    const bool symmetric = p->col_ptr == p->row_ptr && p->row_idx == p->col_idx;
    if (pass == Pass::GradKeyValue && !symmetric) return SA_OK;
    const int64_t(*fields)[6] = reinterpret_cast<const int64_t(*)[6]>(p->plan_fields);
    const size_t bytes = (size_t)(p->batch * p->heads * p->num_tokens * p->head_dim) * 2;  // 16-bit types
    cudaStream_t stream = static_cast<cudaStream_t>(p->stream);
    void *zeroed[2] = {pass == Pass::GradQuery ? p->grad_q : p->grad_k, p->grad_v};
    int status = SA_OK;
    for (int t = 0; t < (pass == Pass::GradQuery ? 1 : 2) && status == SA_OK; t++)
        status = report(cudaMemsetAsync(zeroed[t], 0, bytes, stream), "cudaMemsetAsync", err, len);
    // plan-order score gradients: the slots of pairs that the kernel does not
    // write (masked keys, pruned heads, warps without pairs) must read 0
    const bool plan_scores = pass == Pass::GradQuery && p->grad_scores != nullptr;
    if (plan_scores && status == SA_OK)
        status = report(cudaMemsetAsync(p->grad_scores, 0,
                                        (size_t)(p->batch * p->heads * p->plan_scores_stride) * sizeof(float), stream),
                        "cudaMemsetAsync", err, len);
    int64_t scores_offset = 0;
    for (int64_t i = 0; i < p->plan_num_passes && status == SA_OK; i++) {
        sa_attention_params one = *p;
        one.plan_base = nullptr;
        sa_select_pass(&one, fields[i], p->plan_base, i);
        one.plan_scores_offset = scores_offset;
        scores_offset += one.num_chunks * 64 * 64;
        if (pass == Pass::GradQuery) {
            status = report(sa_kernels::grad_query_tiled_lean(one), "the tensor-core dQ kernel", err, len);
            if (status == SA_OK) tiled_grad_query_passes.fetch_add(1, std::memory_order_relaxed);
        } else {
            status = report(sa_kernels::grad_key_value_tiled_lean(one), "the tensor-core dK/dV kernel", err, len);
            if (status == SA_OK) tiled_grad_key_value_passes.fetch_add(1, std::memory_order_relaxed);
        }
    }
    *ran = status == SA_OK;
    return status;
}
}  // namespace

extern "C" long long sa_cuda_tiled_grad_query_passes(void) { return tiled_grad_query_passes.load(); }
extern "C" long long sa_cuda_tiled_grad_key_value_passes(void) { return tiled_grad_key_value_passes.load(); }

extern "C" int sa_cuda_backward(const sa_attention_params *p, char *err, size_t len) {
    int status = check_params(p, err, len);
    if (status != SA_OK) return status;
    DeviceGuard guard(p->device_id);
    if (guard.status != cudaSuccess) return report(guard.status, "cudaSetDevice", err, len);
    for (Pass pass : {Pass::Delta, Pass::GradQuery, Pass::GradKeyValue}) {
        if (pass != Pass::Delta && p->plan_base != nullptr) {
            bool tiled = false;
            status = grad_planned(p, pass, &tiled, err, len);
            if (status != SA_OK) return status;
            if (tiled) continue;
        }
        status = report(dispatch(pass, *p), pass_name(pass), err, len);
        if (status != SA_OK) return status;
    }
    return SA_OK;
}

extern "C" int sa_cuda_bias_grad(const sa_bias_grad_params *p, char *err, size_t len) {
    DeviceGuard guard(p->device_id);
    if (guard.status != cudaSuccess) return report(guard.status, "cudaSetDevice", err, len);
    const int64_t blocks = p->heads * p->num_buckets;
    if (blocks == 0) return SA_OK;
    if (blocks > 0x7fffffff) {
        snprintf(err, len, "rel_pos_bias: %lld table entries exceed one launch", (long long)blocks);
        return SA_ERR_UNSUPPORTED;
    }
    cudaStream_t stream = static_cast<cudaStream_t>(p->stream);
    if (p->dtype == SA_F64)
        bias_grad_kernel<double><<<(unsigned)blocks, 128, 0, stream>>>(*p);
    else
        bias_grad_kernel<float><<<(unsigned)blocks, 128, 0, stream>>>(*p);
    return report(cudaGetLastError(), "the bias-gradient kernel", err, len);
}

extern "C" int sa_cuda_device_count(char *err, size_t len) {
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
        report(status, "cudaGetDeviceCount", err, len);
        return -1;
    }
    return count;
}
