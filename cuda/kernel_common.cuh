// Device helpers shared by the CUDA kernels of cuda/*.cu: accumulation types,
// conversions, and the per-pair rules (bias, key mask, pruned heads) that every
// kernel must apply the same way as csrc/attention_cpu_body.h.
#ifndef SA_KERNEL_COMMON_CUH
#define SA_KERNEL_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include "attention.h"

namespace sa_kernels {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

template <typename T> struct Accum { using type = float; };
template <> struct Accum<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <typename T> __device__ __forceinline__ T from_acc(double x);
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return __logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename A> __device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

// Element (b, h, i, d) of a row tensor; d is the lane's slot.
template <typename T>
__device__ __forceinline__ const T *row_of(const void *base, const int64_t *stride, int64_t b,
                                           int64_t h, int64_t i) {
    return static_cast<const T *>(base) + b * stride[0] + h * stride[1] + i * stride[2];
}

// Loads the lane's VEC elements of a row (zeros past head_dim).
template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_row(const T *row, int lane, int64_t dim, A (&x)[VEC]) {
#pragma unroll
    for (int e = 0; e < VEC; e++) {
        int64_t d = e * kWarp + lane;
        x[e] = d < dim ? to_acc(row[d]) : A(0);
    }
}

template <typename T>
__device__ __forceinline__ typename Accum<T>::type bias_at(const sa_attention_params &p, int64_t h,
                                                          int64_t i, int64_t j) {
    using A = typename Accum<T>::type;
    if (p.bias_table == nullptr) return A(0);
    int64_t m = p.max_relative, side = 2 * m + 1;
    int64_t dy = i / p.width - j / p.width, dx = i % p.width - j % p.width;
    dy = dy < -m ? -m : (dy > m ? m : dy);
    dx = dx < -m ? -m : (dx > m ? m : dx);
    return to_acc(static_cast<const T *>(p.bias_table)[(h * side + dy + m) * side + dx + m]);
}

__device__ __forceinline__ bool key_allowed(const sa_attention_params &p, int64_t b, int64_t j) {
    return p.key_mask == nullptr || p.key_mask[b * p.key_mask_stride[0] + j * p.key_mask_stride[1]] != 0;
}

__device__ __forceinline__ bool head_runs(const sa_attention_params &p, int64_t h) {
    return p.head_active == nullptr || p.head_active[h] != 0;
}

// The compute capability major of a device (cuda/attention_cuda.cu), cached.
cudaError_t device_major(int device, int *major);

// The tensor-core forward over one tile-plan pass (cuda/attention_tiled.cu).
// Returns cudaErrorInvalidValue for dtypes or head dims it does not cover.
cudaError_t forward_tiled(const sa_attention_params &p);
// The lean variant (cuda/attention_tiled_lean.cu) and whether it covers p.
bool lean_tiled_applies(const sa_attention_params &p);
cudaError_t forward_tiled_lean(const sa_attention_params &p);
// dQ of one plan pass on tensor cores, added to grad_q (zeroed beforehand);
// for the calls lean_backward_applies accepts (it covers dK / dV too)
bool lean_backward_applies(const sa_attention_params &p);
cudaError_t grad_query_tiled_lean(const sa_attention_params &p);
// dK and dV of one plan pass of a symmetric layout, added to grad_k and grad_v
// (zeroed beforehand); the same conditions as the tiled dQ
cudaError_t grad_key_value_tiled_lean(const sa_attention_params &p);

}  // namespace sa_kernels

#endif  // SA_KERNEL_COMMON_CUH
