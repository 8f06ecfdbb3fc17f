// Types and helpers shared by every kpnet kernel. Compiles under nvcc, NVRTC (no standard headers,
// no INFINITY) and, through kpnet_shim.h, g++. Kernels use one thread per independent output, no
// shared memory, no __syncthreads and no warp intrinsics (ARCHITECTURE.md), so the emulator, which
// runs the threads one after another, computes exactly what the GPU computes.
#pragma once

typedef long long kp_index;

// 16-bit floats travel as their raw bits; kernels only ever widen them (exactly) to float.
struct kp_f16 { unsigned short bits; };
struct kp_bf16 { unsigned short bits; };

__device__ __forceinline__ float kp_bits_to_float(unsigned int b) { return __int_as_float((int)b); }

// -inf of each storage type (NVRTC has no INFINITY).
__device__ __forceinline__ float kp_lowest_f32() { return __int_as_float((int)0xff800000u); }
__device__ __forceinline__ double kp_lowest_f64() { return __longlong_as_double((long long)0xfff0000000000000ull); }
__device__ __forceinline__ kp_f16 kp_lowest_f16() { return kp_f16{0xfc00u}; }
__device__ __forceinline__ kp_bf16 kp_lowest_bf16() { return kp_bf16{0xff80u}; }

__device__ __forceinline__ float kp_widen(float v) { return v; }
__device__ __forceinline__ double kp_widen(double v) { return v; }
__device__ __forceinline__ float kp_widen(kp_bf16 v) { return kp_bits_to_float(((unsigned int)v.bits) << 16); }
__device__ __forceinline__ float kp_widen(kp_f16 v) {
    unsigned int sign = ((unsigned int)v.bits & 0x8000u) << 16;
    unsigned int exponent = ((unsigned int)v.bits >> 10) & 0x1fu;
    unsigned int mantissa = (unsigned int)v.bits & 0x3ffu;
    if (exponent == 0x1fu) return kp_bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent != 0u) return kp_bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    if (mantissa == 0u) return kp_bits_to_float(sign);
    unsigned int shift = 0u;  // subnormal half: normalise into a float
    while ((mantissa & 0x400u) == 0u) { mantissa <<= 1; ++shift; }
    return kp_bits_to_float(sign | ((113u - shift) << 23) | ((mantissa & 0x3ffu) << 13));
}

// The running-max update of the tie and NaN rules (kpnet/ops/pooling.py): move to v when v is NaN
// or v >= best; `v >= best` is false once best is NaN, so the latest NaN wins and stays.
// Written as a rarely-taken branch (a new maximum is rare along a line) so CPUs predict it instead
// of chaining a compare-and-select through every element.
__device__ __forceinline__ bool kp_takes_max(float v, float best) { return __builtin_expect(v >= best || v != v, 0); }
__device__ __forceinline__ bool kp_takes_max(double v, double best) { return __builtin_expect(v >= best || v != v, 0); }
// The same rule without a branch, for loops over adjacent lines that the CPU compiler vectorizes.
__device__ __forceinline__ bool kp_takes_max_select(float v, float best) { return (v >= best) | (v != v); }
__device__ __forceinline__ bool kp_takes_max_select(double v, double best) { return (v >= best) | (v != v); }
