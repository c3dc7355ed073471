// Device helpers of the tensor-core kernels (cuda/attention_tiled*.cu): packing
// of 16-bit pairs, the mma.m16n8k16 instruction, ldmatrix, cp.async copies and
// the reductions over the four lanes that share an accumulator row.
//
// Fragment layouts are those of the PTX ISA for mma.m16n8k16 with .row.col:
// lane = 4 g + t holds rows g and g + 8 of the 16 x 8 accumulator at columns
// 2t and 2t + 1, and the matching pieces of A (rows g, g + 8; columns 2t, 2t + 1,
// 2t + 8, 2t + 9) and B (k = 2t, 2t + 1, 2t + 8, 2t + 9; column g).
#ifndef SA_TENSOR_CORE_CUH
#define SA_TENSOR_CORE_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace sa_kernels {

__device__ __forceinline__ uint16_t bits_of(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint16_t bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

template <typename T> __device__ __forceinline__ uint32_t pack_pair(T lo, T hi) {
    return (uint32_t)bits_of(lo) | ((uint32_t)bits_of(hi) << 16);
}

template <typename T> __device__ __forceinline__ uint32_t pack_floats(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack_floats<__half>(float lo, float hi) {
    return pack_pair(__float2half_rn(lo), __float2half_rn(hi));
}
template <> __device__ __forceinline__ uint32_t pack_floats<__nv_bfloat16>(float lo, float hi) {
    return pack_pair(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}

template <typename T> __device__ __forceinline__ T zero_of();
template <> __device__ __forceinline__ __half zero_of<__half>() { return __float2half_rn(0.f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() {
    return __float2bfloat16_rn(0.f);
}

// c += a * b for one 16 x 8 x 16 tile, float accumulators.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<T, __half>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#else
    __trap();  // the host never launches this kernel below compute capability 8.0
#endif
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// 16 bytes global -> shared without passing through registers; the bytes past
// src_bytes (all 16 when it is 0) are filled with zeros.
__device__ __forceinline__ void copy16_async(void *dst, const void *src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(src),
                 "r"(src_bytes));
#else
    __trap();
#endif
}

__device__ __forceinline__ void commit_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `pending` committed groups of copies are still in flight.
template <int pending> __device__ __forceinline__ void wait_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
#endif
}

// Programmatic dependent launch (compute capability 9.0): a pass launched
// with the programmatic-serialisation attribute may start once every block of
// the pass before it has signalled, and so fills the SMs that pass leaves idle
// as it drains. It must wait for that pass before it reads what that pass
// wrote. Elsewhere (older devices, ordinary launches) both are no-ops.
__device__ __forceinline__ void let_next_pass_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous_pass() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// The tile's chunks [begin, end) from its plan, clamped to the chunk count
// (the plan comes from the caller, so no entry is trusted to be in range).
__device__ __forceinline__ void tile_chunk_range(const int32_t *tile_chunk_ptr, int64_t tile,
                                                 int64_t num_chunks, int64_t &begin, int64_t &end) {
    begin = tile_chunk_ptr[tile];
    end = tile_chunk_ptr[tile + 1];
    begin = begin < 0 ? 0 : (begin > num_chunks ? num_chunks : begin);
    end = end < begin ? begin : (end > num_chunks ? num_chunks : end);
}

// Scales the two accumulator rows of a fragment array by their softmax rescales.
template <int GROUPS>
__device__ __forceinline__ void rescale_rows(float (&acc)[GROUPS][4], const float (&rescale)[2]) {
#pragma unroll
    for (int g = 0; g < GROUPS; g++) {
        acc[g][0] *= rescale[0];
        acc[g][1] *= rescale[0];
        acc[g][2] *= rescale[1];
        acc[g][3] *= rescale[1];
    }
}

// A row's log-sum-exp over an earlier pass (old_lse, whose output is normalised)
// and this one (pass_lse): returns the total, sets the earlier output's weight
// and multiplies this pass's normalisation by its share. NaN in either is NaN.
__device__ __forceinline__ float merge_lse(float old_lse, float pass_lse, float &old_weight,
                                           float &new_weight) {
    old_weight = 0.f;
    if (old_lse == -INFINITY) return pass_lse;
    const float both = fmaxf(old_lse, pass_lse);
    const float top = both == -INFINITY ? 0.f : both;
    float total = top + __logf(__expf(old_lse - top) + __expf(pass_lse - top));
    if (old_lse != old_lse || pass_lse != pass_lse) total = NAN;
    old_weight = __expf(old_lse - total);
    new_weight *= __expf(pass_lse - total);
    return total;
}

// A row's statistics (sum p^2, entropy) over the pairs of two passes, from
// each pass's own (over its pairs alone): previous (what the earlier pass
// wrote) and square / entropy (this pass's, replaced by the merged ones).
// Each pass's softmax is a share of the merged one (old_share, new_share, as
// merge_lse weighs them): sum p^2 adds the parts' sums times their shares
// squared, the entropy adds each share times (its entropy - log share).
__device__ __forceinline__ void merge_stats(const float *previous, float old_share, float new_share,
                                            float total_lse, float &square, float &entropy) {
    if (total_lse != total_lse) {
        square = entropy = NAN;
        return;
    }
    float merged_square = new_share * new_share * square;
    float merged_entropy = new_share > 0.f ? new_share * (entropy - __logf(new_share)) : 0.f;
    if (old_share > 0.f) {
        merged_square += old_share * old_share * previous[0];
        merged_entropy += old_share * (previous[1] - __logf(old_share));
    }
    square = merged_square;
    entropy = merged_entropy;
}

// Four 8 x 8 matrices of 16-bit elements from shared memory; lanes 8m .. 8m + 7
// give the row addresses of matrix m. Without transposition lane 4g + t gets
// row g, elements 2t and 2t + 1 of each matrix (an A or B fragment piece);
// transposed it gets rows 2t and 2t + 1 of column g.
template <bool TRANSPOSED>
__device__ __forceinline__ void load_matrices_x4(uint32_t (&r)[4], const void *row_address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
    if constexpr (TRANSPOSED)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
#else
    __trap();
#endif
}

// 4 bytes global -> shared (src_bytes 0: zeros), for one float.
__device__ __forceinline__ void copy4_async(void *dst, const void *src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(address), "l"(src),
                 "r"(src_bytes));
#else
    __trap();
#endif
}

// 8 bytes global -> shared (src_bytes 0: zeros), for sources only 8-byte aligned.
__device__ __forceinline__ void copy8_async(void *dst, const void *src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(address), "l"(src),
                 "r"(src_bytes));
#else
    __trap();
#endif
}

}  // namespace sa_kernels

#endif  // SA_TENSOR_CORE_CUH
