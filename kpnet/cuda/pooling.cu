// Corner pooling (CornerNet §3.4, REFERENCE §1.3) and full-line max (center pooling, REFERENCE §1.5).
// One thread per scan line. A tensor (N, C, H, W) is viewed as lines of `length` elements `inner`
// apart: H-scans (top/bottom) have inner = W and adjacent threads walk adjacent columns, so loads
// coalesce; W-scans (left/right) have inner = 1. `reverse` scans from the high end (top, left).
// Tie/NaN/gradient rules: kpnet/ops/pooling.py. Gradients accumulate in double in scan order.
#include "kpnet_types.cuh"

__device__ __forceinline__ kp_index kp_line_base(kp_index line, kp_index length, kp_index inner) {
    return (line / inner) * (length * inner) + (line % inner);
}

template <typename T>
__device__ __forceinline__ void running_max_forward(const T* __restrict__ x, T* __restrict__ out,
                                                    kp_index n_lines, kp_index length, kp_index inner, int reverse) {
    kp_index line = (kp_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (line >= n_lines) return;
    kp_index step = reverse ? -inner : inner;
    kp_index p = kp_line_base(line, length, inner) + (reverse ? (length - 1) * inner : 0);
    T best = x[p];
    out[p] = best;
    for (kp_index t = 1; t < length; ++t) {
        p += step;
        T v = x[p];
        if (kp_takes_max(kp_widen(v), kp_widen(best))) best = v;
        out[p] = best;
    }
}

template <typename T, typename G>
__device__ __forceinline__ void running_max_backward(const T* __restrict__ x, const T* __restrict__ grad_out,
                                                     G* __restrict__ grad_in, kp_index n_lines, kp_index length,
                                                     kp_index inner, int reverse) {
    kp_index line = (kp_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (line >= n_lines) return;
    kp_index step = reverse ? -inner : inner;
    kp_index p = kp_line_base(line, length, inner) + (reverse ? (length - 1) * inner : 0);
    kp_index arg = p;
    double acc = 0.0;
    acc += (double)kp_widen(grad_out[p]);
    auto best = kp_widen(x[p]);
    for (kp_index t = 1; t < length; ++t) {
        p += step;
        auto v = kp_widen(x[p]);
        if (kp_takes_max(v, best)) {
            grad_in[arg] = (G)acc;
            best = v;
            arg = p;
            acc = 0.0;
        } else {
            grad_in[p] = (G)0.0;
        }
        acc += (double)kp_widen(grad_out[p]);
    }
    grad_in[arg] = (G)acc;
}

template <typename T>
__device__ __forceinline__ void line_max_forward(const T* __restrict__ x, T* __restrict__ out, kp_index n_lines,
                                                 kp_index length, kp_index inner) {
    kp_index line = (kp_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (line >= n_lines) return;
    kp_index base = kp_line_base(line, length, inner);
    T best = x[base];
    for (kp_index t = 1; t < length; ++t) {
        T v = x[base + t * inner];
        if (kp_takes_max(kp_widen(v), kp_widen(best))) best = v;
    }
    for (kp_index t = 0; t < length; ++t) out[base + t * inner] = best;
}

template <typename T, typename G>
__device__ __forceinline__ void line_max_backward(const T* __restrict__ x, const T* __restrict__ grad_out,
                                                  G* __restrict__ grad_in, kp_index n_lines, kp_index length,
                                                  kp_index inner) {
    kp_index line = (kp_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (line >= n_lines) return;
    kp_index base = kp_line_base(line, length, inner);
    kp_index arg = base;
    auto best = kp_widen(x[base]);
    double acc = 0.0;
    acc += (double)kp_widen(grad_out[base]);
    grad_in[base] = (G)0.0;
    for (kp_index t = 1; t < length; ++t) {
        kp_index p = base + t * inner;
        auto v = kp_widen(x[p]);
        if (kp_takes_max(v, best)) { best = v; arg = p; }
        acc += (double)kp_widen(grad_out[p]);
        grad_in[p] = (G)0.0;
    }
    grad_in[arg] = (G)acc;
}

// extern "C" entry points, one per storage type; 16-bit types write their gradient as double and the
// launch layer rounds it with torch, exactly as the reference does.
#define KP_POOLING_KERNELS(T, G, SUFFIX)                                                                        \
    extern "C" __global__ void corner_pool_forward_##SUFFIX(const T* x, T* out, kp_index n_lines,               \
                                                            kp_index length, kp_index inner, int reverse) {     \
        running_max_forward<T>(x, out, n_lines, length, inner, reverse);                                        \
    }                                                                                                           \
    extern "C" __global__ void corner_pool_backward_##SUFFIX(const T* x, const T* grad_out, G* grad_in,         \
                                                             kp_index n_lines, kp_index length, kp_index inner, \
                                                             int reverse) {                                     \
        running_max_backward<T, G>(x, grad_out, grad_in, n_lines, length, inner, reverse);                      \
    }                                                                                                           \
    extern "C" __global__ void line_max_forward_##SUFFIX(const T* x, T* out, kp_index n_lines, kp_index length,  \
                                                         kp_index inner) {                                      \
        line_max_forward<T>(x, out, n_lines, length, inner);                                                    \
    }                                                                                                           \
    extern "C" __global__ void line_max_backward_##SUFFIX(const T* x, const T* grad_out, G* grad_in,            \
                                                          kp_index n_lines, kp_index length, kp_index inner) {  \
        line_max_backward<T, G>(x, grad_out, grad_in, n_lines, length, inner);                                  \
    }

KP_POOLING_KERNELS(float, float, f32)
KP_POOLING_KERNELS(double, double, f64)
KP_POOLING_KERNELS(kp_f16, double, f16)
KP_POOLING_KERNELS(kp_bf16, double, bf16)
