// The lean tensor-core forward over a tile plan: float16 and bfloat16, head
// dim up to 64 in multiples of 8, 16-byte aligned rows, and none of bias,
// dropout or statistics (those calls take the general kernel of
// cuda/attention_tiled.cu). It computes the same thing with fewer
// instructions per chunk, which is what bounds these small tiles:
//
// - the tile's query rows arrive by cp.async together with the first chunk,
//   and all fragments come from shared memory through ldmatrix (the value
//   fragments transposed), instead of one 16-bit load per element;
// - a chunk's 64 mask words and a bit word of its usable keys are staged with
//   its rows, so a pair's test is one bit of a register, without branches;
// - scores are scaled into base 2 once, so each probability is one ex2;
// - a warp whose 16 queries have no pair in a chunk skips its products
//   (a window's tile touches about half its chunks per warp);
// - the output goes through shared memory and leaves in 16-byte stores.
// Four blocks fit an SM (three for the general kernel), so more tiles are in
// flight to cover the gathers' latency.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <atomic>
#include <cstdint>

#include "attention.h"
#include "dropout_hash.h"
#include "kernel_common.cuh"
#include "tensor_core.cuh"

namespace sa_kernels {
namespace {

constexpr int kTile = 64;   // queries per tile and keys per chunk (the plan's unit)
constexpr int kThreads = 4 * kWarp;  // four warps of 16 query rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int DPAD> struct LeanShape {
    static constexpr int kStride = DPAD + 8;      // T per staged row: rows 16 bytes apart in banks
    static constexpr int kVectors = DPAD / 8;     // 16-byte pieces per row
    static constexpr int kPieces = kTile * kVectors / kThreads;
    static constexpr int kOutStride = DPAD + 8;   // floats per staged output row
};

// Issues the copies of one chunk: key and value rows (zeros for padding ids
// and past head_dim), the 64 mask words, and the usable-key bits.
template <typename T, int DPAD>
__device__ __forceinline__ void stage_chunk(const sa_attention_params &p, int64_t chunk, int64_t b,
                                            int64_t h, T *keys, T *values, uint64_t *masks,
                                            uint32_t *usable) {
    using S = LeanShape<DPAD>;
    const int tid = threadIdx.x;
    const int64_t n = p.num_tokens, dim = p.head_dim;
    const int32_t *ids = p.chunk_keys + chunk * kTile;
    if (tid < kTile) {  // warps 0 and 1, one key per lane
        const int32_t j = ids[tid];
        const bool ok = j >= 0 && j < n && key_allowed(p, b, j);
        const uint32_t word = __ballot_sync(0xffffffffu, ok);
        if (tid % kWarp == 0) usable[tid / kWarp] = word;
        copy8_async(&masks[tid], p.chunk_masks + chunk * kTile + tid, 8);
    }
#pragma unroll
    for (int k = 0; k < S::kPieces; k++) {
        const int piece = tid + k * kThreads;
        const int r = piece / S::kVectors, col = (piece % S::kVectors) * 8;
        const int32_t j = ids[r];
        const bool inside = j >= 0 && j < n && col < dim;
        const T *key = inside ? row_of<T>(p.k, p.k_stride, b, h, j) + col : static_cast<const T *>(p.k);
        const T *value = inside ? row_of<T>(p.v, p.v_stride, b, h, j) + col : static_cast<const T *>(p.v);
        copy16_async(&keys[r * S::kStride + col], key, inside ? 16 : 0);
        copy16_async(&values[r * S::kStride + col], value, inside ? 16 : 0);
    }
}

template <typename T, int DPAD, int MIN_BLOCKS>
__global__ void __launch_bounds__(kThreads, MIN_BLOCKS) forward_lean_kernel(const sa_attention_params p) {
    using S = LeanShape<DPAD>;
    constexpr int kDimSteps = DPAD / 16;   // k-steps of Q x K^T
    constexpr int kOutGroups = DPAD / 8;   // n-tiles of the output
    constexpr int kKeyGroups = kTile / 8;  // n-tiles of the scores
    constexpr int kKeySteps = kTile / 16;  // k-steps of P x V
    __shared__ __align__(16) T key_stages[2][kTile * S::kStride];
    __shared__ __align__(16) T value_stages[2][kTile * S::kStride];
    __shared__ __align__(16) T query_rows[kTile * S::kStride];
    __shared__ __align__(16) uint64_t mask_stages[2][kTile];
    __shared__ uint32_t usable_stages[2][2];
    __shared__ float row_new_weight[kTile], row_old_weight[kTile];
    __shared__ int32_t row_ids[kTile];  // token of each slot, -1 where nothing is written
    __shared__ uint8_t row_merges[kTile];
    static_assert(kDimSteps % 2 == 0 && kOutGroups % 2 == 0, "fragments are loaded in pairs");
    static_assert(sizeof(key_stages) >= sizeof(float) * kTile * S::kOutStride,
                  "the output is staged in the key buffers");

    const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
    const int group = lane / 4, pair = lane % 4;
    const int64_t n = p.num_tokens, dim = p.head_dim, tile = blockIdx.x;
    let_next_pass_start();  // a later pass only reads this one's rows after waiting for it
    int64_t chunk_begin, chunk_end;
    tile_chunk_range(p.tile_chunk_ptr, tile, p.num_chunks, chunk_begin, chunk_end);
    if (p.merge_previous && chunk_begin == chunk_end) {
        // nothing to add to the earlier pass; waiting keeps this pass from
        // ending before it, which a pass after this one relies on
        wait_for_previous_pass();
        return;
    }

    const int32_t *tile_ids = p.tile_queries + tile * kTile;
    int slot[2], query[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        slot[r] = warp * 16 + group + 8 * r;
        const int32_t id = tile_ids[slot[r]];
        query[r] = (id >= 0 && id < n) ? id : -1;
    }
    const float scale_log2 = float(p.scale) * kLog2e;

    for (int64_t bh = blockIdx.y; bh < p.batch * p.heads; bh += gridDim.y) {
        const int64_t b = bh / p.heads, h = bh % p.heads;
        const bool runs = head_runs(p, h);
        if (p.merge_previous && !runs) continue;
        const bool work = runs && chunk_begin < chunk_end;
        if (work) {
#pragma unroll
            for (int k = 0; k < S::kPieces; k++) {
                const int piece = tid + k * kThreads;
                const int r = piece / S::kVectors, col = (piece % S::kVectors) * 8;
                const int32_t i = tile_ids[r];
                const bool inside = i >= 0 && i < n && col < dim;
                const T *row = inside ? row_of<T>(p.q, p.q_stride, b, h, i) + col : static_cast<const T *>(p.q);
                copy16_async(&query_rows[r * S::kStride + col], row, inside ? 16 : 0);
            }
            stage_chunk<T, DPAD>(p, chunk_begin, b, h, key_stages[0], value_stages[0], mask_stages[0],
                                 usable_stages[0]);
        }
        commit_copies();
        wait_copies<0>();
        __syncthreads();

        // A fragments of this warp's 16 query rows; matrices 0..3 are rows
        // 0-7 / 8-15 at columns 0-7, then the same at columns 8-15
        uint32_t q_frag[kDimSteps][4];
#pragma unroll
        for (int step = 0; step < kDimSteps; step++) {
            const int row = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
            const int col = step * 16 + (lane / 16) * 8;
            load_matrices_x4<false>(q_frag[step], &query_rows[row * S::kStride + col]);
        }

        float out_acc[kOutGroups][4];
#pragma unroll
        for (int g = 0; g < kOutGroups; g++)
#pragma unroll
            for (int e = 0; e < 4; e++) out_acc[g][e] = 0.f;
        // running max in base-2 units of the scaled scores, and the sum of 2^(s - max)
        float run_max[2] = {-CUDART_INF_F, -CUDART_INF_F}, run_sum[2] = {0.f, 0.f};

        int stage = 0;
        for (int64_t chunk = work ? chunk_begin : chunk_end; chunk < chunk_end; chunk++) {
            if (chunk + 1 < chunk_end)
                stage_chunk<T, DPAD>(p, chunk + 1, b, h, key_stages[stage ^ 1], value_stages[stage ^ 1],
                                     mask_stages[stage ^ 1], usable_stages[stage ^ 1]);
            commit_copies();
            wait_copies<1>();  // this chunk has landed; the next one may still fly
            __syncthreads();
            const T *key_rows = key_stages[stage], *value_rows = value_stages[stage];
            const uint64_t usable = (uint64_t)usable_stages[stage][0] | ((uint64_t)usable_stages[stage][1] << 32);
            // bit kg * 8 + e of pair_bits[r]: row r attends the column kg * 8 + 2 * pair + e
            uint64_t pair_bits[2];
#pragma unroll
            for (int r = 0; r < 2; r++)
                pair_bits[r] = query[r] >= 0 ? (mask_stages[stage][slot[r]] & usable) >> (2 * pair) : 0ull;
            const bool warp_has_pairs =
                __any_sync(0xffffffffu, ((pair_bits[0] | pair_bits[1]) & 0x0303030303030303ull) != 0);

            if (warp_has_pairs) {
                float score[kKeyGroups][4];
#pragma unroll
                for (int kg = 0; kg < kKeyGroups; kg++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) score[kg][e] = 0.f;
#pragma unroll
                    for (int step = 0; step < kDimSteps; step += 2) {
                        // matrices: keys kg*8 .. +7 at columns step*16 + 0, +8, +16, +24
                        uint32_t kf[4];
                        const int row = kg * 8 + lane % 8;
                        const int col = step * 16 + (lane / 8) * 8;
                        load_matrices_x4<false>(kf, &key_rows[row * S::kStride + col]);
                        mma_16x8x16<T>(score[kg], q_frag[step], kf[0], kf[1]);
                        mma_16x8x16<T>(score[kg], q_frag[step + 1], kf[2], kf[3]);
                    }
                }

                float chunk_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
                for (int kg = 0; kg < kKeyGroups; kg++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int r = e / 2;
                        const bool allowed = (pair_bits[r] >> (kg * 8 + e % 2)) & 1ull;
                        const float s = allowed ? score[kg][e] * scale_log2 : -CUDART_INF_F;
                        score[kg][e] = s;
                        chunk_max[r] = fmaxf(chunk_max[r], s);
                    }
                }
                float shift[2], rescale[2];
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const float new_max = fmaxf(run_max[r], quad_max(chunk_max[r]));
                    // a row with no pair so far keeps max -inf; shift by 0 so no inf - inf appears
                    shift[r] = new_max == -CUDART_INF_F ? 0.f : new_max;
                    rescale[r] = exp2f(run_max[r] - shift[r]);
                    run_sum[r] *= rescale[r];
                    run_max[r] = new_max;
                }
rescale_rows(out_acc, rescale);
                uint32_t p_frag[kKeySteps][4];
#pragma unroll
                for (int kg = 0; kg < kKeyGroups; kg++) {
                    float weight[4];
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        weight[e] = exp2f(score[kg][e] - shift[e / 2]);  // 0 where s = -inf
                        run_sum[e / 2] += weight[e];
                    }
                    // the accumulator layout of key group kg is the A layout of half a k-step
                    p_frag[kg / 2][(kg % 2) * 2 + 0] = pack_floats<T>(weight[0], weight[1]);
                    p_frag[kg / 2][(kg % 2) * 2 + 1] = pack_floats<T>(weight[2], weight[3]);
                }
#pragma unroll
                for (int g = 0; g < kOutGroups; g += 2) {
#pragma unroll
                    for (int step = 0; step < kKeySteps; step++) {
                        // transposed matrices: keys step*16 + 0-7, 8-15 at columns g*8, then (g+1)*8
                        uint32_t vf[4];
                        const int row = step * 16 + ((lane / 8) % 2) * 8 + lane % 8;
                        const int col = (g + lane / 16) * 8;
                        load_matrices_x4<true>(vf, &value_rows[row * S::kStride + col]);
                        mma_16x8x16<T>(out_acc[g], p_frag[step], vf[0], vf[1]);
                        mma_16x8x16<T>(out_acc[g + 1], p_frag[step], vf[2], vf[3]);
                    }
                }
            }
            __syncthreads();  // all warps are done with this stage before it is refilled
            stage ^= 1;
        }

        // the earlier pass's output rows this block merges into, loaded beside
        // the lse below rather than after it (one memory latency, not two)
        uint4 previous[S::kPieces];
        if (p.merge_previous) wait_for_previous_pass();
#pragma unroll
        for (int k = 0; k < S::kPieces; k++) {
            const int piece = tid + k * kThreads;
            const int r = piece / S::kVectors, col = (piece % S::kVectors) * 8;
            const int32_t i = tile_ids[r];
            previous[k] = make_uint4(0, 0, 0, 0);
            if (p.merge_previous && i >= 0 && i < n && col < dim)
                    previous[k] = *reinterpret_cast<const uint4 *>(
                        static_cast<const T *>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] +
                        i * p.out_stride[2] + col);
        }

        // per row: the weights of this pass's and the earlier pass's output, and the lse
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const float sum = quad_sum(run_sum[r]);
            if (pair != 0) continue;
            const bool nan = sum != sum;  // a NaN score reaches the sum, and makes the row NaN
            const bool live = sum > 0 || nan;
            int32_t write_id = query[r];
            float new_weight = live ? 1.f / sum : 0.f, old_weight = 0.f;
            bool merges = false;
            if (query[r] >= 0 && p.merge_previous && !live) write_id = -1;  // the earlier pass stands
            if (write_id >= 0) {
                float *lse = static_cast<float *>(p.lse) + bh * n + query[r];
                const float pass_lse = nan ? NAN : (live ? run_max[r] * kLn2 + __logf(sum) : -CUDART_INF_F);
                float total_lse = pass_lse;
                if (p.merge_previous) total_lse = merge_lse(*lse, pass_lse, old_weight, new_weight);
                merges = old_weight != 0.f || total_lse != total_lse;
                *lse = total_lse;
            }
            row_ids[slot[r]] = write_id;
            row_new_weight[slot[r]] = new_weight;
            row_old_weight[slot[r]] = old_weight;
            row_merges[slot[r]] = merges;
        }
        // the unnormalised rows, in floats, over the key buffers (the last
        // chunk's barrier has passed, or no chunk ran)
        float *staged = reinterpret_cast<float *>(&key_stages[0][0]);
#pragma unroll
        for (int g = 0; g < kOutGroups; g++)
#pragma unroll
            for (int r = 0; r < 2; r++)
                *reinterpret_cast<float2 *>(&staged[slot[r] * S::kOutStride + g * 8 + 2 * pair]) =
                    make_float2(out_acc[g][2 * r], out_acc[g][2 * r + 1]);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < S::kPieces; k++) {
            const int piece = tid + k * kThreads;
            const int r = piece / S::kVectors, col = (piece % S::kVectors) * 8;
            const int32_t i = row_ids[r];
            if (i < 0 || col >= dim) continue;
            T *out = static_cast<T *>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] +
                     i * p.out_stride[2] + col;
            const float4 lo = *reinterpret_cast<const float4 *>(&staged[r * S::kOutStride + col]);
            const float4 hi = *reinterpret_cast<const float4 *>(&staged[r * S::kOutStride + col + 4]);
            float value[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
            const float new_weight = row_new_weight[r], old_weight = row_old_weight[r];
            const T *old = reinterpret_cast<const T *>(&previous[k]);
            uint32_t packed[4];
#pragma unroll
            for (int e = 0; e < 8; e += 2) {
                float x0 = value[e] * new_weight, x1 = value[e + 1] * new_weight;
                if (row_merges[r]) {
                    x0 += to_acc(old[e]) * old_weight;
                    x1 += to_acc(old[e + 1]) * old_weight;
                }
                packed[e / 2] = pack_floats<T>(x0, x1);
            }
            *reinterpret_cast<uint4 *>(out) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
        __syncthreads();  // the staged rows are read before the next item restages
    }
    if (p.merge_previous) wait_for_previous_pass();  // also where every item was a pruned head
}

// ---- backward helpers ------------------------------------------------------


// This thread's two accumulator rows of a tile: their slots, and their tokens
// (-1 for padding).
__device__ __forceinline__ void thread_rows(const int32_t *tile_ids, int64_t n, int (&slot)[2], int (&token)[2]) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        slot[r] = warp * 16 + lane / 4 + 8 * r;
        const int32_t id = tile_ids[slot[r]];
        token[r] = (id >= 0 && id < n) ? id : -1;
    }
}

// Issues the copies of two row sets of the 64 tokens ids (rows of tensors a
// and b of head (b, h), e.g. Q and dO), zeros for padding ids and past head_dim.
template <typename T, int DPAD>
__device__ __forceinline__ void stage_row_pair(const sa_attention_params &p, const int32_t *ids, int64_t b,
                                               int64_t h, const void *a, const int64_t *a_stride, T *a_rows,
                                               const void *c, const int64_t *c_stride, T *c_rows) {
    using S = LeanShape<DPAD>;
    const int64_t n = p.num_tokens, dim = p.head_dim;
#pragma unroll
    for (int k = 0; k < S::kPieces; k++) {
        const int piece = threadIdx.x + k * kThreads;
        const int r = piece / S::kVectors, col = (piece % S::kVectors) * 8;
        const int32_t i = ids[r];
        const bool inside = i >= 0 && i < n && col < dim;
        const T *from_a = inside ? row_of<T>(a, a_stride, b, h, i) + col : static_cast<const T *>(a);
        const T *from_c = inside ? row_of<T>(c, c_stride, b, h, i) + col : static_cast<const T *>(c);
        copy16_async(&a_rows[r * S::kStride + col], from_a, inside ? 16 : 0);
        copy16_async(&c_rows[r * S::kStride + col], from_c, inside ? 16 : 0);
    }
}

// The A fragments of this warp's 16 rows of two staged row sets, over all of d.
template <typename T, int DPAD>
__device__ __forceinline__ void load_row_fragments(const T *a_rows, const T *c_rows,
                                                   uint32_t (&a_frag)[DPAD / 16][4],
                                                   uint32_t (&c_frag)[DPAD / 16][4]) {
    using S = LeanShape<DPAD>;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
    for (int step = 0; step < DPAD / 16; step++) {
        const int row = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        const int col = step * 16 + (lane / 16) * 8;
        load_matrices_x4<false>(a_frag[step], &a_rows[row * S::kStride + col]);
        load_matrices_x4<false>(c_frag[step], &c_rows[row * S::kStride + col]);
    }
}

// Stages this warp's accumulator rows (floats) at the rows of slot[].
template <int DPAD>
__device__ __forceinline__ void stage_accumulators(const float (&acc)[DPAD / 8][4], const int (&slot)[2],
                                                   float *staged) {
    using S = LeanShape<DPAD>;
    const int pair = threadIdx.x % 4;
#pragma unroll
    for (int g = 0; g < DPAD / 8; g++)
#pragma unroll
        for (int r = 0; r < 2; r++)
            *reinterpret_cast<float2 *>(&staged[slot[r] * S::kOutStride + g * 8 + 2 * pair]) =
                make_float2(acc[g][2 * r], acc[g][2 * r + 1]);
}

// grad[token] += factor x the staged row of each of the 64 ids, 16 bytes at a
// time (grad: contiguous batch x heads x tokens x head_dim, of item bh).
template <typename T, int DPAD>
__device__ __forceinline__ void add_staged_rows(const sa_attention_params &p, const int32_t *ids, int64_t bh,
                                                const float *staged, float factor, void *grad) {
    using S = LeanShape<DPAD>;
    const int64_t n = p.num_tokens, dim = p.head_dim;
#pragma unroll
    for (int k = 0; k < S::kPieces; k++) {
        const int piece = threadIdx.x + k * kThreads;
        const int r = piece / S::kVectors, col = (piece % S::kVectors) * 8;
        const int32_t i = ids[r];
        if (i < 0 || i >= n || col >= dim) continue;
        T *row = static_cast<T *>(grad) + (bh * n + i) * dim + col;
        const uint4 before = *reinterpret_cast<const uint4 *>(row);
        const T *old = reinterpret_cast<const T *>(&before);
        const float *add = staged + r * S::kOutStride + col;
        uint32_t packed[4];
#pragma unroll
        for (int e = 0; e < 8; e += 2)
            packed[e / 2] = pack_floats<T>(to_acc(old[e]) + add[e] * factor, to_acc(old[e + 1]) + add[e + 1] * factor);
        *reinterpret_cast<uint4 *>(row) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
}

// What the backward kernels add to a call without bias or dropout (their
// EXTRAS instances): a pair's bias in base-2 units, and its dropout factor.
struct PairExtras {
    const void *table;     // this head's (2M+1) x (2M+1) bias, NULL for none
    int32_t width, max_relative;
    uint32_t threshold;    // dropout: a pair is kept when its draw is >= this (0: no dropout)
    uint32_t row_key;      // dropout key of (seed, b, h)
    float keep_scale;

    __device__ __forceinline__ PairExtras(const sa_attention_params &p, int64_t b, int64_t h) {
        const int64_t side = 2 * p.max_relative + 1;
        table = p.bias_table;
        if (table != nullptr) table = static_cast<const char *>(table) + h * side * side * 2;  // 16-bit types
        width = int32_t(p.width);
        max_relative = int32_t(p.max_relative);
        threshold = sa_dropout_threshold(p.dropout_p);
        row_key = sa_dropout_row_key(p.dropout_seed, b, h);
        keep_scale = p.dropout_p > 0 ? float(1.0 / (1.0 - p.dropout_p)) : 1.f;
    }

    // the bias of query token i and key token j, times log2(e); 0 without a table
    template <typename T> __device__ __forceinline__ float bias2(int32_t i, int32_t j) const {
        if (table == nullptr) return 0.f;
        const int32_t yi = i / width, yj = j / width, m = max_relative;
        int32_t dy = yi - yj, dx = (i - yi * width) - (j - yj * width);
        dy = dy < -m ? -m : (dy > m ? m : dy);
        dx = dx < -m ? -m : (dx > m ? m : dx);
        return to_acc(static_cast<const T *>(table)[(dy + m) * (2 * m + 1) + dx + m]) * kLog2e;
    }

    __device__ __forceinline__ uint32_t query_key(int32_t i) const { return sa_dropout_query_key(row_key, i); }

    // the factor a kept pair's weight takes in the forward (keep_scale), or 0
    __device__ __forceinline__ float kept(uint32_t query_key, int32_t j) const {
        return threshold > 0 && !sa_dropout_keep(query_key, j, threshold) ? 0.f : keep_scale;
    }
};

// dQ of one pass of a tile plan on tensor cores, for the calls the lean
// forward takes (no bias, dropout or statistics). Per tile and chunk, as in
// the forward: S = Q K^T; P = exp(S - lse) on the pairs of the layout (0
// elsewhere); dP = dO V^T; dS = P (dP - delta); dQ += dS K, with K loaded
// transposed as V is in the forward's P x V. The tile's rows of dQ are added
// to grad_q (zeroed before the first pass), so passes accumulate and a row in
// no tile stays 0. No running maximum: lse is the forward's, final.
// EXTRAS adds the relative position bias to the scores, the forward's
// dropout factor to dP (dS = P (kept dP - delta)), and, with grad_scores,
// writes each pair's dS in plan order for the bias gradient.
template <typename T, int DPAD, bool EXTRAS>
__global__ void __launch_bounds__(kThreads, 2) grad_query_lean_kernel(const sa_attention_params p) {
    using S = LeanShape<DPAD>;
    constexpr int kDimSteps = DPAD / 16;
    constexpr int kOutGroups = DPAD / 8;
    constexpr int kKeyGroups = kTile / 8;
    constexpr int kKeySteps = kTile / 16;
    __shared__ __align__(16) T key_stages[2][kTile * S::kStride];
    __shared__ __align__(16) T value_stages[2][kTile * S::kStride];
    __shared__ __align__(16) uint64_t mask_stages[2][kTile];
    __shared__ uint32_t usable_stages[2][2];
    static_assert(kDimSteps % 2 == 0 && kOutGroups % 2 == 0, "fragments are loaded in pairs");
    static_assert(sizeof(key_stages) >= sizeof(float) * kTile * S::kOutStride,
                  "dQ is staged in the key buffers");
    // the tile's query and output-gradient rows pass through the second stage
    // (their fragments stay in registers), so that the kernel fits 48 KB
    T *const query_rows = key_stages[1], *const grad_out_rows = value_stages[1];

    const int lane = threadIdx.x % kWarp, pair = lane % 4;
    const int64_t n = p.num_tokens, tile = blockIdx.x;
    int64_t chunk_begin, chunk_end;
    tile_chunk_range(p.tile_chunk_ptr, tile, p.num_chunks, chunk_begin, chunk_end);
    if (chunk_begin == chunk_end) return;  // adds nothing

    const int32_t *tile_ids = p.tile_queries + tile * kTile;
    int slot[2], query[2];
    thread_rows(tile_ids, n, slot, query);
    const float scale_log2 = float(p.scale) * kLog2e;

    for (int64_t bh = blockIdx.y; bh < p.batch * p.heads; bh += gridDim.y) {
        const int64_t b = bh / p.heads, h = bh % p.heads;
        if (!head_runs(p, h)) continue;  // a pruned head's dQ stays 0
        const PairExtras extras(p, b, h);
        uint32_t query_key[2] = {0u, 0u};
        float *scores = nullptr;  // this (b, h)'s plan-order dS, this pass's slots
        if (EXTRAS) {
#pragma unroll
            for (int r = 0; r < 2; r++) query_key[r] = extras.query_key(query[r] >= 0 ? query[r] : 0);
            if (p.grad_scores != nullptr)
                scores = static_cast<float *>(p.grad_scores) + bh * p.plan_scores_stride + p.plan_scores_offset;
        }
        // the tile's query and output-gradient rows come with the first chunk
        stage_row_pair<T, DPAD>(p, tile_ids, b, h, p.q, p.q_stride, query_rows, p.grad_out, p.grad_out_stride,
                                grad_out_rows);
        stage_chunk<T, DPAD>(p, chunk_begin, b, h, key_stages[0], value_stages[0], mask_stages[0],
                             usable_stages[0]);
        commit_copies();
        // per row: lse in base-2 units, and delta = rowsum(dO * O)
        float row_lse2[2], row_delta[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int64_t item = bh * n + (query[r] >= 0 ? query[r] : 0);
            row_lse2[r] = query[r] >= 0 ? static_cast<const float *>(p.lse)[item] * kLog2e : 0.f;
            row_delta[r] = query[r] >= 0 ? static_cast<const float *>(p.delta)[item] : 0.f;
        }
        wait_copies<0>();
        __syncthreads();

        uint32_t q_frag[kDimSteps][4], go_frag[kDimSteps][4];
        load_row_fragments<T, DPAD>(query_rows, grad_out_rows, q_frag, go_frag);
        __syncthreads();  // the second chunk is staged over them next

        float dq_acc[kOutGroups][4];
#pragma unroll
        for (int g = 0; g < kOutGroups; g++)
#pragma unroll
            for (int e = 0; e < 4; e++) dq_acc[g][e] = 0.f;

        int stage = 0;
        for (int64_t chunk = chunk_begin; chunk < chunk_end; chunk++) {
            if (chunk + 1 < chunk_end)
                stage_chunk<T, DPAD>(p, chunk + 1, b, h, key_stages[stage ^ 1], value_stages[stage ^ 1],
                                     mask_stages[stage ^ 1], usable_stages[stage ^ 1]);
            commit_copies();
            wait_copies<1>();
            __syncthreads();
            const T *key_rows = key_stages[stage], *value_rows = value_stages[stage];
            const uint64_t usable = (uint64_t)usable_stages[stage][0] | ((uint64_t)usable_stages[stage][1] << 32);
            uint64_t pair_bits[2];
#pragma unroll
            for (int r = 0; r < 2; r++)
                pair_bits[r] = query[r] >= 0 ? (mask_stages[stage][slot[r]] & usable) >> (2 * pair) : 0ull;
            const bool warp_has_pairs =
                __any_sync(0xffffffffu, ((pair_bits[0] | pair_bits[1]) & 0x0303030303030303ull) != 0);

            if (warp_has_pairs) {
                uint32_t ds_frag[kKeySteps][4];
#pragma unroll
                for (int kg = 0; kg < kKeyGroups; kg++) {
                    // scores and dO . v of keys kg*8 .. +7
                    float score[4] = {0.f, 0.f, 0.f, 0.f}, grad_prob[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                    for (int step = 0; step < kDimSteps; step += 2) {
                        uint32_t kf[4], vf[4];
                        const int row = kg * 8 + lane % 8;
                        const int col = step * 16 + (lane / 8) * 8;
                        load_matrices_x4<false>(kf, &key_rows[row * S::kStride + col]);
                        load_matrices_x4<false>(vf, &value_rows[row * S::kStride + col]);
                        mma_16x8x16<T>(score, q_frag[step], kf[0], kf[1]);
                        mma_16x8x16<T>(score, q_frag[step + 1], kf[2], kf[3]);
                        mma_16x8x16<T>(grad_prob, go_frag[step], vf[0], vf[1]);
                        mma_16x8x16<T>(grad_prob, go_frag[step + 1], vf[2], vf[3]);
                    }
                    float grad_score[4];
                    int32_t key[2] = {0, 0};  // the two columns' tokens, shared by both rows
                    if (EXTRAS)
#pragma unroll
                        for (int c = 0; c < 2; c++) key[c] = p.chunk_keys[chunk * kTile + kg * 8 + 2 * pair + c];
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int r = e / 2, column = kg * 8 + 2 * pair + e % 2;
                        const bool allowed = (pair_bits[r] >> (kg * 8 + e % 2)) & 1ull;
                        float logit = score[e] * scale_log2 - row_lse2[r], kept = 1.f;
                        if (EXTRAS && allowed) {
                            logit += extras.bias2<T>(query[r], key[e % 2]);
                            kept = extras.kept(query_key[r], key[e % 2]);
                        }
                        // an allowed pair's row has a finite lse (or NaN, which passes on)
                        const float prob = allowed ? exp2f(logit) : 0.f;
                        grad_score[e] = allowed ? prob * (kept * grad_prob[e] - row_delta[r]) : 0.f;
                        if (EXTRAS && scores != nullptr && allowed)
                            scores[chunk * (kTile * kTile) + slot[r] * kTile + column] = grad_score[e];
                    }
                    ds_frag[kg / 2][(kg % 2) * 2 + 0] = pack_floats<T>(grad_score[0], grad_score[1]);
                    ds_frag[kg / 2][(kg % 2) * 2 + 1] = pack_floats<T>(grad_score[2], grad_score[3]);
                }
#pragma unroll
                for (int g = 0; g < kOutGroups; g += 2) {
#pragma unroll
                    for (int step = 0; step < kKeySteps; step++) {
                        // keys as the k dimension: key rows loaded transposed, as V in the forward
                        uint32_t kf[4];
                        const int row = step * 16 + ((lane / 8) % 2) * 8 + lane % 8;
                        const int col = (g + lane / 16) * 8;
                        load_matrices_x4<true>(kf, &key_rows[row * S::kStride + col]);
                        mma_16x8x16<T>(dq_acc[g], ds_frag[step], kf[0], kf[1]);
                        mma_16x8x16<T>(dq_acc[g + 1], ds_frag[step], kf[2], kf[3]);
                    }
                }
            }
            __syncthreads();  // all warps are done with this stage before it is refilled
            stage ^= 1;
        }

        // dQ rows in floats over the key buffers, then added to grad_q
        float *staged = reinterpret_cast<float *>(&key_stages[0][0]);
        stage_accumulators<DPAD>(dq_acc, slot, staged);
        __syncthreads();
        add_staged_rows<T, DPAD>(p, tile_ids, bh, staged, float(p.scale), p.grad_q);
        __syncthreads();  // the staged rows are read before the next item restages
    }
}

// Issues the copies of one chunk of queries for dK / dV: their query and
// output-gradient rows (zeros for padding ids and past head_dim), the tile's
// 64 mask words, and the queries' lse and delta.
template <typename T, int DPAD>
__device__ __forceinline__ void stage_query_chunk(const sa_attention_params &p, int64_t chunk, int64_t b,
                                                  int64_t h, T *queries, T *grad_outs, uint64_t *masks,
                                                  float *lse, float *delta) {
    const int tid = threadIdx.x;
    const int64_t n = p.num_tokens, bh = b * p.heads + h;
    const int32_t *ids = p.chunk_keys + chunk * kTile;
    if (tid < kTile) {
        const int32_t i = ids[tid];
        const bool ok = i >= 0 && i < n;
        const float *from_lse = static_cast<const float *>(p.lse) + (ok ? bh * n + i : 0);
        const float *from_delta = static_cast<const float *>(p.delta) + (ok ? bh * n + i : 0);
        copy4_async(&lse[tid], from_lse, ok ? 4 : 0);
        copy4_async(&delta[tid], from_delta, ok ? 4 : 0);
        copy8_async(&masks[tid], p.chunk_masks + chunk * kTile + tid, 8);
    }
    stage_row_pair<T, DPAD>(p, ids, b, h, p.q, p.q_stride, queries, p.grad_out, p.grad_out_stride, grad_outs);
}

// dK and dV of one pass of a tile plan on tensor cores, for a symmetric layout
// (its plan is also the plan of its transpose: a tile's 64 tokens are taken as
// keys, its chunks' tokens as the queries that attend them, the same mask
// bits). Per tile and chunk: S^T = K Q^T and dP^T = V dO^T by mma; P^T =
// exp(S^T - lse) on the pairs whose key is usable; dV += P^T dO; dS^T = P^T
// (dP^T - delta); dK += dS^T Q, with Q and dO loaded transposed. grad_k and
// grad_v are zeroed beforehand and each pass adds its tiles' rows. EXTRAS
// adds the bias to the scores and the dropout factor to P^T (dV) and dP^T.
template <typename T, int DPAD, bool EXTRAS>
__global__ void __launch_bounds__(kThreads, 2) grad_key_value_lean_kernel(const sa_attention_params p) {
    using S = LeanShape<DPAD>;
    constexpr int kDimSteps = DPAD / 16;
    constexpr int kOutGroups = DPAD / 8;
    constexpr int kQueryGroups = kTile / 8;
    constexpr int kQuerySteps = kTile / 16;
    __shared__ __align__(16) T query_stages[2][kTile * S::kStride];
    __shared__ __align__(16) T grad_out_stages[2][kTile * S::kStride];
    __shared__ __align__(16) uint64_t mask_stages[2][kTile];
    __shared__ __align__(16) float lse_stages[2][kTile];
    __shared__ __align__(16) float delta_stages[2][kTile];
    static_assert(kDimSteps % 2 == 0 && kOutGroups % 2 == 0, "fragments are loaded in pairs");
    static_assert(sizeof(query_stages) >= sizeof(float) * kTile * S::kOutStride,
                  "dK and dV are staged in the query and gradient buffers");
    // the tile's key and value rows pass through the second stage (their
    // fragments stay in registers)
    T *const key_rows = query_stages[1], *const value_rows = grad_out_stages[1];

    const int lane = threadIdx.x % kWarp, pair = lane % 4;
    const int64_t n = p.num_tokens, tile = blockIdx.x;
    int64_t chunk_begin, chunk_end;
    tile_chunk_range(p.tile_chunk_ptr, tile, p.num_chunks, chunk_begin, chunk_end);
    if (chunk_begin == chunk_end) return;  // adds nothing

    const int32_t *tile_ids = p.tile_queries + tile * kTile;
    int slot[2], key[2];
    thread_rows(tile_ids, n, slot, key);
    const float scale_log2 = float(p.scale) * kLog2e;

    for (int64_t bh = blockIdx.y; bh < p.batch * p.heads; bh += gridDim.y) {
        const int64_t b = bh / p.heads, h = bh % p.heads;
        if (!head_runs(p, h)) continue;  // a pruned head's dK and dV stay 0
        const PairExtras extras(p, b, h);
        stage_row_pair<T, DPAD>(p, tile_ids, b, h, p.k, p.k_stride, key_rows, p.v, p.v_stride, value_rows);
        stage_query_chunk<T, DPAD>(p, chunk_begin, b, h, query_stages[0], grad_out_stages[0], mask_stages[0],
                                   lse_stages[0], delta_stages[0]);
        commit_copies();
        // a masked key has no pair: its rows of dK and dV stay 0
        bool key_ok[2];
#pragma unroll
        for (int r = 0; r < 2; r++) key_ok[r] = key[r] >= 0 && key_allowed(p, b, key[r]);
        wait_copies<0>();
        __syncthreads();

        uint32_t k_frag[kDimSteps][4], v_frag[kDimSteps][4];
        load_row_fragments<T, DPAD>(key_rows, value_rows, k_frag, v_frag);
        __syncthreads();  // the second chunk is staged over them next

        float dk_acc[kOutGroups][4], dv_acc[kOutGroups][4];
#pragma unroll
        for (int g = 0; g < kOutGroups; g++)
#pragma unroll
            for (int e = 0; e < 4; e++) dk_acc[g][e] = dv_acc[g][e] = 0.f;

        int stage = 0;
        for (int64_t chunk = chunk_begin; chunk < chunk_end; chunk++) {
            if (chunk + 1 < chunk_end)
                stage_query_chunk<T, DPAD>(p, chunk + 1, b, h, query_stages[stage ^ 1], grad_out_stages[stage ^ 1],
                                           mask_stages[stage ^ 1], lse_stages[stage ^ 1], delta_stages[stage ^ 1]);
            commit_copies();
            wait_copies<1>();
            __syncthreads();
            const T *query_rows = query_stages[stage], *grad_out_rows = grad_out_stages[stage];
            const float *lse = lse_stages[stage], *delta = delta_stages[stage];
            uint64_t pair_bits[2];
#pragma unroll
            for (int r = 0; r < 2; r++) pair_bits[r] = key_ok[r] ? mask_stages[stage][slot[r]] >> (2 * pair) : 0ull;
            const bool warp_has_pairs =
                __any_sync(0xffffffffu, ((pair_bits[0] | pair_bits[1]) & 0x0303030303030303ull) != 0);

            if (warp_has_pairs) {
                uint32_t p_frag[kQuerySteps][4], ds_frag[kQuerySteps][4];
#pragma unroll
                for (int qg = 0; qg < kQueryGroups; qg++) {
                    float score[4] = {0.f, 0.f, 0.f, 0.f}, grad_prob[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                    for (int step = 0; step < kDimSteps; step += 2) {
                        uint32_t qf[4], gf[4];
                        const int row = qg * 8 + lane % 8;
                        const int col = step * 16 + (lane / 8) * 8;
                        load_matrices_x4<false>(qf, &query_rows[row * S::kStride + col]);
                        load_matrices_x4<false>(gf, &grad_out_rows[row * S::kStride + col]);
                        mma_16x8x16<T>(score, k_frag[step], qf[0], qf[1]);
                        mma_16x8x16<T>(score, k_frag[step + 1], qf[2], qf[3]);
                        mma_16x8x16<T>(grad_prob, v_frag[step], gf[0], gf[1]);
                        mma_16x8x16<T>(grad_prob, v_frag[step + 1], gf[2], gf[3]);
                    }
                    float prob[4], grad_score[4];
                    uint32_t query_key[2] = {0u, 0u};
                    int32_t query[2] = {0, 0};
                    if (EXTRAS) {
#pragma unroll
                        for (int c = 0; c < 2; c++) {
                            const int32_t i = p.chunk_keys[chunk * kTile + qg * 8 + 2 * pair + c];
                            query[c] = i >= 0 ? i : 0;
                            if (extras.threshold > 0) query_key[c] = extras.query_key(query[c]);
                        }
                    }
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int r = e / 2, column = qg * 8 + 2 * pair + e % 2;
                        const bool allowed = (pair_bits[r] >> (qg * 8 + e % 2)) & 1ull;
                        float logit = score[e] * scale_log2 - lse[column] * kLog2e, kept = 1.f;
                        if (EXTRAS && allowed) {
                            logit += extras.bias2<T>(query[e % 2], key[r]);
                            kept = extras.kept(query_key[e % 2], key[r]);
                        }
                        // the query of an allowed pair attends this key, so its lse is finite (or NaN)
                        const float weight = allowed ? exp2f(logit) : 0.f;
                        grad_score[e] = allowed ? weight * (kept * grad_prob[e] - delta[column]) : 0.f;
                        prob[e] = weight * kept;  // as the forward weighed V
                    }
                    p_frag[qg / 2][(qg % 2) * 2 + 0] = pack_floats<T>(prob[0], prob[1]);
                    p_frag[qg / 2][(qg % 2) * 2 + 1] = pack_floats<T>(prob[2], prob[3]);
                    ds_frag[qg / 2][(qg % 2) * 2 + 0] = pack_floats<T>(grad_score[0], grad_score[1]);
                    ds_frag[qg / 2][(qg % 2) * 2 + 1] = pack_floats<T>(grad_score[2], grad_score[3]);
                }
#pragma unroll
                for (int g = 0; g < kOutGroups; g += 2) {
#pragma unroll
                    for (int step = 0; step < kQuerySteps; step++) {
                        // queries as the k dimension: their rows loaded transposed
                        uint32_t gf[4], qf[4];
                        const int row = step * 16 + ((lane / 8) % 2) * 8 + lane % 8;
                        const int col = (g + lane / 16) * 8;
                        load_matrices_x4<true>(gf, &grad_out_rows[row * S::kStride + col]);
                        load_matrices_x4<true>(qf, &query_rows[row * S::kStride + col]);
                        mma_16x8x16<T>(dv_acc[g], p_frag[step], gf[0], gf[1]);
                        mma_16x8x16<T>(dv_acc[g + 1], p_frag[step], gf[2], gf[3]);
                        mma_16x8x16<T>(dk_acc[g], ds_frag[step], qf[0], qf[1]);
                        mma_16x8x16<T>(dk_acc[g + 1], ds_frag[step], qf[2], qf[3]);
                    }
                }
            }
            __syncthreads();  // all warps are done with this stage before it is refilled
            stage ^= 1;
        }

        // dK over the query stages and dV over the gradient stages, in floats,
        // then added to grad_k and grad_v
        float *staged_k = reinterpret_cast<float *>(&query_stages[0][0]);
        float *staged_v = reinterpret_cast<float *>(&grad_out_stages[0][0]);
        stage_accumulators<DPAD>(dk_acc, slot, staged_k);
        stage_accumulators<DPAD>(dv_acc, slot, staged_v);
        __syncthreads();
        add_staged_rows<T, DPAD>(p, tile_ids, bh, staged_k, float(p.scale), p.grad_k);
        add_staged_rows<T, DPAD>(p, tile_ids, bh, staged_v, 1.f, p.grad_v);
        __syncthreads();  // the staged rows are read before the next item restages
    }
}

template <typename T> bool row_aligned16(const void *base, const int64_t *stride) {
    constexpr int64_t per = 16 / sizeof(T);
    if (reinterpret_cast<uintptr_t>(base) % 16) return false;
    for (int d = 0; d < 3; d++)
        if (stride[d] % per) return false;
    return true;
}

// The shapes and alignment the lean kernels need, forward and backward.
template <typename T> bool lean_rows_fit(const sa_attention_params &p) {
    return p.head_dim <= 64 && p.head_dim % 8 == 0 && row_aligned16<T>(p.q, p.q_stride) &&
           row_aligned16<T>(p.k, p.k_stride) && row_aligned16<T>(p.v, p.v_stride) &&
           row_aligned16<T>(p.out, p.out_stride);
}

template <typename T> bool lean_fits(const sa_attention_params &p) {
    return lean_rows_fit<T>(p) && p.bias_table == nullptr && !(p.dropout_p > 0) && p.row_stats == nullptr;
}

// Whether a backward call needs the EXTRAS kernels.
bool backward_extras(const sa_attention_params &p) {
    return p.bias_table != nullptr || p.dropout_p > 0 || p.grad_scores != nullptr;
}

std::atomic<long long> overlapped_passes{0};

template <typename T> cudaError_t launch_lean(const sa_attention_params &p) {
    const int64_t items = p.batch * p.heads;
    if (p.num_tiles == 0 || items == 0) return cudaSuccess;
    if (p.num_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const dim3 grid((unsigned)p.num_tiles, (unsigned)(items < 65535 ? items : 65535));
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = dim3(kThreads);
    config.stream = static_cast<cudaStream_t>(p.stream);
    cudaLaunchAttribute overlap[1];
    if (p.merge_previous && p.overlap_passes) {
        // this pass may start while the one before it drains (it waits for
        // that pass's rows before merging into them); compute capability 9.0
        int major = 0;
        cudaError_t status = device_major(p.device_id, &major);
        if (status != cudaSuccess) return status;
        if (major >= 9) {
            overlapped_passes.fetch_add(1, std::memory_order_relaxed);
            overlap[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
            overlap[0].val.programmaticStreamSerializationAllowed = 1;
            config.attrs = overlap;
            config.numAttrs = 1;
        }
    }
    if (p.head_dim <= 32) return cudaLaunchKernelEx(&config, forward_lean_kernel<T, 32, 5>, p);
    return cudaLaunchKernelEx(&config, forward_lean_kernel<T, 64, 4>, p);
}

using BackwardKernel = void (*)(const sa_attention_params);

// One backward pass over the plan's tiles and all (batch, head) items, on the
// instance for the head dim (up to 32 or 64) and for calls with or without a
// bias, dropout or plan-order scores.
cudaError_t launch_backward(const sa_attention_params &p, BackwardKernel narrow, BackwardKernel narrow_extras,
                            BackwardKernel wide, BackwardKernel wide_extras) {
    const int64_t items = p.batch * p.heads;
    if (p.num_tiles == 0 || items == 0) return cudaSuccess;
    if (p.num_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const dim3 grid((unsigned)p.num_tiles, (unsigned)(items < 65535 ? items : 65535));
    const bool extras = backward_extras(p);
    const BackwardKernel kernel = p.head_dim <= 32 ? (extras ? narrow_extras : narrow) : (extras ? wide_extras : wide);
    kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(p.stream)>>>(p);
    return cudaGetLastError();
}

template <typename T> cudaError_t launch_grad_query_lean(const sa_attention_params &p) {
    return launch_backward(p, grad_query_lean_kernel<T, 32, false>, grad_query_lean_kernel<T, 32, true>,
                           grad_query_lean_kernel<T, 64, false>, grad_query_lean_kernel<T, 64, true>);
}

template <typename T> cudaError_t launch_grad_key_value_lean(const sa_attention_params &p) {
    return launch_backward(p, grad_key_value_lean_kernel<T, 32, false>, grad_key_value_lean_kernel<T, 32, true>,
                           grad_key_value_lean_kernel<T, 64, false>, grad_key_value_lean_kernel<T, 64, true>);
}

}  // namespace

cudaError_t grad_key_value_tiled_lean(const sa_attention_params &p) {
    switch (p.dtype) {
    case SA_F16: return launch_grad_key_value_lean<__half>(p);
    case SA_BF16: return launch_grad_key_value_lean<__nv_bfloat16>(p);
    default: return cudaErrorInvalidValue;
    }
}

bool lean_backward_applies(const sa_attention_params &p) {
    const bool rows = p.dtype == SA_F16 ? row_aligned16<__half>(p.grad_out, p.grad_out_stride)
                                        : row_aligned16<__nv_bfloat16>(p.grad_out, p.grad_out_stride);
    // the gradients' rows are contiguous: 16-byte pieces need their bases aligned
    const bool bases = (reinterpret_cast<uintptr_t>(p.grad_q) | reinterpret_cast<uintptr_t>(p.grad_k) |
                        reinterpret_cast<uintptr_t>(p.grad_v)) % 16 == 0;
    bool shapes = false;
    switch (p.dtype) {
    case SA_F16: shapes = lean_rows_fit<__half>(p); break;
    case SA_BF16: shapes = lean_rows_fit<__nv_bfloat16>(p); break;
    default: return false;
    }
    // a bias or dropout only with the extras switched on; CSR-order score
    // gradients (grad_scores without plan_scores_stride) only from the row kernels
    const bool extras_ok = p.tiled_backward_extras || (p.bias_table == nullptr && !(p.dropout_p > 0));
    const bool scores_ok = p.grad_scores == nullptr || (p.tiled_backward_extras && p.plan_scores_stride > 0);
    return shapes && rows && bases && extras_ok && scores_ok;
}

cudaError_t grad_query_tiled_lean(const sa_attention_params &p) {
    switch (p.dtype) {
    case SA_F16: return launch_grad_query_lean<__half>(p);
    case SA_BF16: return launch_grad_query_lean<__nv_bfloat16>(p);
    default: return cudaErrorInvalidValue;
    }
}

bool lean_tiled_applies(const sa_attention_params &p) {
    switch (p.dtype) {
    case SA_F16: return lean_fits<__half>(p);
    case SA_BF16: return lean_fits<__nv_bfloat16>(p);
    default: return false;
    }
}

cudaError_t forward_tiled_lean(const sa_attention_params &p) {
    switch (p.dtype) {
    case SA_F16: return launch_lean<__half>(p);
    case SA_BF16: return launch_lean<__nv_bfloat16>(p);
    default: return cudaErrorInvalidValue;
    }
}

}  // namespace sa_kernels

extern "C" long long sa_cuda_overlapped_passes(void) { return sa_kernels::overlapped_passes.load(); }
