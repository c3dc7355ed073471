// Tensor-core forward over a tile plan (sparse_attention/_tiles.py), float16
// and bfloat16, head dim up to 128.
//
// A block of four warps takes one tile of up to 64 queries for one (batch,
// head). For every chunk of 64 keys of the tile's key union it gathers the key
// and value rows into shared memory, computes the 64 x 64 scores with
// mma.m16n8k16 (each warp owns 16 query rows), drops the pairs the chunk's bit
// masks leave out, and folds the rest into a streaming softmax held in the
// accumulator fragments, then multiplies the probabilities (rounded to the input
// type, as in FlashAttention) by the value rows, again on tensor cores.
//
// A pass with merge_previous adds its pairs to the out / lse that an earlier
// pass wrote for the same queries, combining the two through their log-sum-exp.
//
// This is the general kernel: bias, dropout, statistics, any head dim to 128
// and unaligned rows. Calls without those take the lean kernel of
// cuda/attention_tiled_lean.cu. Fragment layouts: cuda/tensor_core.cuh.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "attention.h"
#include "dropout_hash.h"
#include "kernel_common.cuh"
#include "tensor_core.cuh"

namespace sa_kernels {
namespace {

constexpr int kTile = 64;       // queries per tile and keys per chunk (the plan's unit)
constexpr int kTileWarps = 4;   // 16 query rows each
constexpr int kKeyGroups = kTile / 8;   // n-tiles of the score fragment
constexpr int kKeySteps = kTile / 16;   // k-steps of the P x V product

// Copies 8 elements of a row (zeros past head_dim, or for a missing row).
template <typename T>
__device__ __forceinline__ void copy8(T *dst, const T *row, int col, int64_t dim, bool aligned) {
    if (row != nullptr && aligned && col + 8 <= dim) {
        *reinterpret_cast<uint4 *>(dst) = __ldg(reinterpret_cast<const uint4 *>(row + col));
        return;
    }
#pragma unroll
    for (int e = 0; e < 8; e++) dst[e] = (row != nullptr && col + e < dim) ? row[col + e] : zero_of<T>();
}

constexpr int kThreads = kWarp * kTileWarps;

// Stages one chunk's key and value rows (and the keys' ids and usability) in
// shared memory. With async_copies every 16-byte copy of the chunk is in flight
// at once (cp.async, needs aligned rows); otherwise each goes through registers.
template <typename T, int DPAD>
__device__ __forceinline__ void stage_chunk(const sa_attention_params &p, int64_t chunk, int64_t b,
                                            int64_t h, T *keys, T *values, int32_t *ids,
                                            uint8_t *usable, bool aligned, bool async_copies) {
    constexpr int kStride = DPAD + 8, kVectors = DPAD / 8;
    constexpr int kPieces = kTile * kVectors / kThreads;
    const int tid = threadIdx.x;
    const int64_t n = p.num_tokens, dim = p.head_dim;
    const int32_t *chunk_ids = p.chunk_keys + chunk * kTile;
    if (tid < kTile) {
        const int32_t j = chunk_ids[tid];
        const bool valid = j >= 0 && j < n;
        ids[tid] = valid ? j : -1;
        usable[tid] = valid && key_allowed(p, b, j);
    }
#pragma unroll
    for (int k = 0; k < kPieces; k++) {
        const int piece = tid + k * kThreads;
        const int r = piece / kVectors, col = (piece % kVectors) * 8;
        const int32_t j = chunk_ids[r];
        const bool valid = j >= 0 && j < n;
        const T *key_row = valid ? row_of<T>(p.k, p.k_stride, b, h, j) : nullptr;
        const T *value_row = valid ? row_of<T>(p.v, p.v_stride, b, h, j) : nullptr;
        if (async_copies) {
            // aligned rows have dim % 8 == 0, so a piece is wholly inside or outside
            const bool inside = valid && col < dim;
            copy16_async(&keys[r * kStride + col], inside ? key_row + col : p.k, inside ? 16 : 0);
            copy16_async(&values[r * kStride + col], inside ? value_row + col : p.v, inside ? 16 : 0);
        } else {
            copy8(&keys[r * kStride + col], key_row, col, dim, aligned);
            copy8(&values[r * kStride + col], value_row, col, dim, aligned);
        }
    }
}

// STAGES = 2: the next chunk's copies fly while this chunk is computed.
template <typename T, int DPAD, int STAGES>
__global__ void __launch_bounds__(kWarp * kTileWarps, DPAD <= 64 ? 3 : 2)
forward_tiled_kernel(const sa_attention_params p, bool aligned, bool async_copies) {
    constexpr int kStride = DPAD + 8;        // elements per staged row; the pad spreads banks
    constexpr int kDimSteps = DPAD / 16;     // k-steps of Q x K^T
    constexpr int kOutGroups = DPAD / 8;     // n-tiles of the output fragment
    __shared__ __align__(16) T key_stages[STAGES][kTile * kStride];
    __shared__ __align__(16) T value_stages[STAGES][kTile * kStride];
    __shared__ int32_t id_stages[STAGES][kTile];
    __shared__ uint8_t usable_stages[STAGES][kTile];

    const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
    const int group = lane / 4, pair = lane % 4;
    const int64_t n = p.num_tokens, dim = p.head_dim, tile = blockIdx.x;
    int64_t chunk_begin, chunk_end;
    tile_chunk_range(p.tile_chunk_ptr, tile, p.num_chunks, chunk_begin, chunk_end);
    if (p.merge_previous && chunk_begin == chunk_end) return;  // nothing to add to the earlier pass

    // this thread's two query rows of the tile: slot[r] in the tile, query[r] on the grid
    int slot[2], query[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        slot[r] = warp * 16 + group + 8 * r;
        const int32_t id = p.tile_queries[tile * kTile + slot[r]];
        query[r] = (id >= 0 && id < n) ? id : -1;
    }
    const float scale = float(p.scale);
    const uint32_t threshold = sa_dropout_threshold(p.dropout_p);
    const float keep_scale = p.dropout_p > 0 ? float(1.0 / (1.0 - p.dropout_p)) : 1.f;
    const bool want_stats = p.row_stats != nullptr;
    const int64_t side = 2 * p.max_relative + 1;

    for (int64_t bh = blockIdx.y; bh < p.batch * p.heads; bh += gridDim.y) {
        const int64_t b = bh / p.heads, h = bh % p.heads;
        const bool runs = head_runs(p, h);
        if (p.merge_previous && !runs) continue;

        uint32_t q_frag[kDimSteps][4];
        uint32_t query_key[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const T *row = query[r] >= 0 ? row_of<T>(p.q, p.q_stride, b, h, query[r]) : nullptr;
            query_key[r] = query[r] >= 0
                ? sa_dropout_query_key(sa_dropout_row_key(p.dropout_seed, b, h), query[r]) : 0u;
#pragma unroll
            for (int step = 0; step < kDimSteps; step++) {
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    const int col = step * 16 + half * 8 + 2 * pair;
                    const T lo = (row && col < dim) ? row[col] : zero_of<T>();
                    const T hi = (row && col + 1 < dim) ? row[col + 1] : zero_of<T>();
                    q_frag[step][half * 2 + r] = pack_pair(lo, hi);
                }
            }
        }

        float out_acc[kOutGroups][4];
#pragma unroll
        for (int g = 0; g < kOutGroups; g++)
#pragma unroll
            for (int e = 0; e < 4; e++) out_acc[g][e] = 0.f;
        float run_max[2] = {-CUDART_INF_F, -CUDART_INF_F}, run_sum[2] = {0.f, 0.f};
        float run_sq[2] = {0.f, 0.f}, run_shifted[2] = {0.f, 0.f};
        bool saw_nan[2] = {false, false};

        int stage = 0;
        if (STAGES == 2 && runs && chunk_begin < chunk_end) {
            stage_chunk<T, DPAD>(p, chunk_begin, b, h, key_stages[0], value_stages[0], id_stages[0],
                                 usable_stages[0], aligned, async_copies);
            commit_copies();
        }
        for (int64_t chunk = runs ? chunk_begin : chunk_end; chunk < chunk_end; chunk++) {
            if (STAGES == 1) {
                __syncthreads();  // the previous chunk's rows are consumed
                stage_chunk<T, DPAD>(p, chunk, b, h, key_stages[0], value_stages[0], id_stages[0],
                                     usable_stages[0], aligned, async_copies);
                commit_copies();
                wait_copies<0>();
            } else {
                if (chunk + 1 < chunk_end)
                    stage_chunk<T, DPAD>(p, chunk + 1, b, h, key_stages[stage ^ 1], value_stages[stage ^ 1],
                                         id_stages[stage ^ 1], usable_stages[stage ^ 1], aligned,
                                         async_copies);
                commit_copies();
                wait_copies<1>();  // this chunk's copies have landed; the next one's may fly
            }
            __syncthreads();
            const T *key_rows = key_stages[stage], *value_rows = value_stages[stage];
            const int32_t *key_ids = id_stages[stage];
            const uint8_t *key_usable = usable_stages[stage];

            float score[kKeyGroups][4];
#pragma unroll
            for (int kg = 0; kg < kKeyGroups; kg++) {
#pragma unroll
                for (int e = 0; e < 4; e++) score[kg][e] = 0.f;
                const T *key_row = &key_rows[(kg * 8 + group) * kStride + 2 * pair];
#pragma unroll
                for (int step = 0; step < kDimSteps; step++) {
                    const uint32_t b0 = *reinterpret_cast<const uint32_t *>(key_row + step * 16);
                    const uint32_t b1 = *reinterpret_cast<const uint32_t *>(key_row + step * 16 + 8);
                    mma_16x8x16<T>(score[kg], q_frag[step], b0, b1);
                }
            }

            uint64_t mask[2];
#pragma unroll
            for (int r = 0; r < 2; r++)
                mask[r] = query[r] >= 0 ? p.chunk_masks[chunk * kTile + slot[r]] : 0ull;
            float chunk_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
            for (int kg = 0; kg < kKeyGroups; kg++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = e / 2, col = kg * 8 + 2 * pair + (e % 2);
                    const bool allowed = ((mask[r] >> col) & 1ull) && key_usable[col];
                    float s = -CUDART_INF_F;
                    if (allowed) {
                        s = scale * score[kg][e];
                        if (p.bias_table != nullptr) {
                            const int64_t i = query[r], j = key_ids[col], m = p.max_relative;
                            int64_t dy = i / p.width - j / p.width, dx = i % p.width - j % p.width;
                            dy = dy < -m ? -m : (dy > m ? m : dy);
                            dx = dx < -m ? -m : (dx > m ? m : dx);
                            s += to_acc(static_cast<const T *>(p.bias_table)[(h * side + dy + m) * side + dx + m]);
                        }
                        saw_nan[r] |= !(s < CUDART_INF_F);  // NaN or +inf: exp(inf - inf)
                    }
                    score[kg][e] = s;
                    chunk_max[r] = fmaxf(chunk_max[r], s);
                }
            }

            float shift[2], rescale[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const float new_max = fmaxf(run_max[r], quad_max(chunk_max[r]));
                // an all-masked row so far keeps max -inf; shift by 0 so no inf - inf appears
                shift[r] = new_max == -CUDART_INF_F ? 0.f : new_max;
                rescale[r] = __expf(run_max[r] - shift[r]);
                if (want_stats) {
                    run_shifted[r] = run_sum[r] > 0
                        ? rescale[r] * (run_shifted[r] + run_sum[r] * (run_max[r] - shift[r])) : 0.f;
                    run_sq[r] *= rescale[r] * rescale[r];
                }
                run_sum[r] *= rescale[r];
                run_max[r] = new_max;
            }
rescale_rows(out_acc, rescale);

            // probabilities, in place of the scores; dropout only thins the P x V product
            uint32_t p_frag[kKeySteps][4];
#pragma unroll
            for (int kg = 0; kg < kKeyGroups; kg++) {
                float weight[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = e / 2, col = kg * 8 + 2 * pair + (e % 2);
                    const float s = score[kg][e];
                    const float ex = __expf(s - shift[r]);  // 0 for masked pairs (s = -inf)
                    run_sum[r] += ex;
                    if (want_stats && s != -CUDART_INF_F) {
                        run_sq[r] += ex * ex;
                        run_shifted[r] += ex * (s - shift[r]);
                    }
                    weight[e] = ex * keep_scale;
                    if (threshold > 0 && s != -CUDART_INF_F &&
                        !sa_dropout_keep(query_key[r], key_ids[col], threshold))
                        weight[e] = 0.f;
                }
                // the accumulator layout of key group kg is the A layout of half a k-step
                p_frag[kg / 2][(kg % 2) * 2 + 0] = pack_floats<T>(weight[0], weight[1]);
                p_frag[kg / 2][(kg % 2) * 2 + 1] = pack_floats<T>(weight[2], weight[3]);
            }

#pragma unroll
            for (int g = 0; g < kOutGroups; g++) {
#pragma unroll
                for (int step = 0; step < kKeySteps; step++) {
                    const T *value = &value_rows[(step * 16 + 2 * pair) * kStride + g * 8 + group];
                    const uint32_t b0 = pack_pair(value[0], value[kStride]);
                    const uint32_t b1 = pack_pair(value[8 * kStride], value[9 * kStride]);
                    mma_16x8x16<T>(out_acc[g], p_frag[step], b0, b1);
                }
            }
            if (STAGES == 2) {
                __syncthreads();  // all warps are done with this stage before it is refilled
                stage ^= 1;
            }
        }

        // the four lanes of a quad hold parts of the same two rows
#pragma unroll
        for (int r = 0; r < 2; r++) {
            run_sum[r] = quad_sum(run_sum[r]);
            if (want_stats) {
                run_sq[r] = quad_sum(run_sq[r]);
                run_shifted[r] = quad_sum(run_shifted[r]);
            }
            saw_nan[r] = quad_sum(saw_nan[r] ? 1.f : 0.f) > 0.f;
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            if (query[r] < 0) continue;
            const int64_t item = bh * n + query[r];
            float sum = run_sum[r], top = run_max[r];
            if (saw_nan[r]) sum = top = NAN;  // a NaN score makes the row NaN, as in PyTorch
            const bool live = sum > 0 || saw_nan[r];
            if (p.merge_previous && !live) continue;  // the earlier pass's result stands
            float *lse = static_cast<float *>(p.lse) + item;
            const float pass_lse = live ? top + __logf(sum) : -CUDART_INF_F;
            float new_weight = live ? 1.f / sum : 0.f, old_weight = 0.f, total_lse = pass_lse;
            if (p.merge_previous) total_lse = merge_lse(*lse, pass_lse, old_weight, new_weight);
            T *out = static_cast<T *>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] +
                     query[r] * p.out_stride[2];
#pragma unroll
            for (int g = 0; g < kOutGroups; g++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int col = g * 8 + 2 * pair + e;
                    if (col >= dim) continue;
                    float value = out_acc[g][2 * r + e] * new_weight;
                    if (old_weight != 0.f || total_lse != total_lse) value += to_acc(out[col]) * old_weight;
                    out[col] = from_acc<T>(value);
                }
            }
            if (pair == 0) {
                *lse = total_lse;
                if (want_stats) {
                    float *stats = static_cast<float *>(p.row_stats) + 2 * item;
                    const float inv = live ? 1.f / sum : 0.f;
                    float square = live ? run_sq[r] * inv * inv : 0.f;
                    float entropy = live ? __logf(sum) - run_shifted[r] * inv : 0.f;
                    if (p.merge_previous) merge_stats(stats, old_weight, new_weight * sum, total_lse, square, entropy);
                    stats[0] = square;
                    stats[1] = entropy;
                }
            }
        }
    }
}

template <typename T>
bool rows_aligned16(const sa_attention_params &p) {
    const int64_t per = 16 / sizeof(T);
    if (p.head_dim % per) return false;
    const void *ptrs[2] = {p.k, p.v};
    const int64_t *strides[2] = {p.k_stride, p.v_stride};
    for (int t = 0; t < 2; t++) {
        if (reinterpret_cast<uintptr_t>(ptrs[t]) % 16) return false;
        for (int d = 0; d < 3; d++)
            if (strides[t][d] % per) return false;
    }
    return true;
}

template <typename T>
cudaError_t launch_tiled(const sa_attention_params &p) {
    const int64_t items = p.batch * p.heads;
    if (p.num_tiles == 0 || items == 0) return cudaSuccess;
    if (p.num_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const dim3 grid((unsigned)p.num_tiles, (unsigned)(items < 65535 ? items : 65535));
    const dim3 block(kWarp * kTileWarps);
    cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
    const bool aligned = rows_aligned16<T>(p);
    // SPARSE_ATTENTION_TILED_SIMPLE=1: one stage, copies through registers (the
    // first version of this kernel, kept to compare against)
    const char *simple_env = getenv("SPARSE_ATTENTION_TILED_SIMPLE");
    const bool simple = simple_env != nullptr && simple_env[0] == '1';
    const bool async_copies = aligned && !simple;
    if (p.head_dim <= 32) {
        if (simple)
            forward_tiled_kernel<T, 32, 1><<<grid, block, 0, stream>>>(p, aligned, false);
        else
            forward_tiled_kernel<T, 32, 2><<<grid, block, 0, stream>>>(p, aligned, async_copies);
    } else if (p.head_dim <= 64) {
        if (simple)
            forward_tiled_kernel<T, 64, 1><<<grid, block, 0, stream>>>(p, aligned, false);
        else
            forward_tiled_kernel<T, 64, 2><<<grid, block, 0, stream>>>(p, aligned, async_copies);
    } else {
        // two stages of 128-wide rows would pass the 48 KB of static shared memory
        forward_tiled_kernel<T, 128, 1><<<grid, block, 0, stream>>>(p, aligned, async_copies);
    }
    return cudaGetLastError();
}

}  // namespace

namespace {
std::atomic<long long> lean_passes_launched{0};
}  // namespace

cudaError_t forward_tiled(const sa_attention_params &p) {
    if (p.head_dim > 128) return cudaErrorInvalidValue;
    // SPARSE_ATTENTION_TILED_KERNEL=general keeps calls the lean kernel covers
    // on this one (to compare the two)
    const char *choice = getenv("SPARSE_ATTENTION_TILED_KERNEL");
    const bool general_only = choice != nullptr && strcmp(choice, "general") == 0;
    const char *simple_env = getenv("SPARSE_ATTENTION_TILED_SIMPLE");
    const bool simple = simple_env != nullptr && simple_env[0] == '1';
    if (!general_only && !simple && lean_tiled_applies(p)) {
        lean_passes_launched.fetch_add(1, std::memory_order_relaxed);
        return forward_tiled_lean(p);
    }
    switch (p.dtype) {
    case SA_F16: return launch_tiled<__half>(p);
    case SA_BF16: return launch_tiled<__nv_bfloat16>(p);
    default: return cudaErrorInvalidValue;
    }
}

}  // namespace sa_kernels

extern "C" long long sa_cuda_lean_passes(void) { return sa_kernels::lean_passes_launched.load(); }
