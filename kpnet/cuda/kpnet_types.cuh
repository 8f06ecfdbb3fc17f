// Types and helpers shared by every kpnet kernel. Compiles under nvcc, NVRTC (no standard headers,
// no INFINITY) and, through kpnet_shim.h, g++. Kernels use one thread per independent output, no
// shared memory, no __syncthreads and no warp intrinsics (docs/architecture.md), so the emulator, which
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

// kpnet's exp and pow. The device's expf/powf and the host's libm round differently (by up to about 2 ulp), so
// the kernels use these instead: IEEE double additions, multiplications and divisions in a fixed order, which
// the GPU (NVRTC --fmad=false), the emulator (g++ -ffp-contract=off) and the PyTorch reference
// (kpnet/ops/kpmath.py, the same steps on float64 tensors) all round alike. Each returns the float nearest
// its float64 approximation, whose relative error is below 2^-40: within 1 ulp of the true value, and
// correctly rounded but for arguments within 2^-16 ulp of a rounding boundary (docs/kernels.md).
#define KP_EXP_ROUND 6755399441055744.0  // 1.5 · 2^52: adding and subtracting it rounds to an integer
#define KP_LOG2E 1.4426950408889634
#define KP_LN2 0.6931471805599453
#define KP_LN2_HI 0.6931471803691238  // ln 2 split so that n · KP_LN2_HI is exact for |n| < 2^21
#define KP_LN2_LO 1.9082149292705877e-10
#define KP_SQRT2 1.4142135623730951

__device__ __forceinline__ float kp_float_inf() { return kp_bits_to_float(0x7f800000u); }
__device__ __forceinline__ float kp_float_nan() { return kp_bits_to_float(0x7fc00000u); }

// exp(y) for y in (-110, 90): y = n ln 2 + r with |r| <= ln 2 / 2, exp(r) by its Taylor polynomial to r^10
// (truncation below 2^-42), times 2^n built from its bits.
__device__ __forceinline__ double kp_exp_core(double y) {
    double n = (y * KP_LOG2E + KP_EXP_ROUND) - KP_EXP_ROUND;
    double r = (y - n * KP_LN2_HI) - n * KP_LN2_LO;
    double p = 2.755731922398589e-07;
    p = p * r + 2.7557319223985893e-06;
    p = p * r + 2.48015873015873e-05;
    p = p * r + 0.0001984126984126984;
    p = p * r + 0.001388888888888889;
    p = p * r + 0.008333333333333333;
    p = p * r + 0.041666666666666664;
    p = p * r + 0.16666666666666666;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    return p * __longlong_as_double((long long)(n + 1023.0) << 52);
}

// exp(y) rounded to float for any double y (NaN stays NaN).
__device__ __forceinline__ float kp_exp_to_float(double y) {
    if (y != y) return kp_float_nan();
    if (!(y > -110.0)) return 0.0f;  // below half the smallest subnormal float
    if (!(y < 90.0)) return kp_float_inf();
    return (float)kp_exp_core(y);
}

__device__ __forceinline__ float kp_exp(float x) { return kp_exp_to_float((double)x); }

// ln(b) for a positive finite b: b = m · 2^k with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m-1)/(m+1),
// by its series to s^17 (|s| < 0.172: truncation below 2^-45).
__device__ __forceinline__ double kp_log_core(double b) {
    long long bits = __double_as_longlong(b);
    double k = (double)(((bits >> 52) & 0x7ff) - 1023);
    double m = __longlong_as_double((bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL);
    if (m > KP_SQRT2) {
        m = m * 0.5;
        k = k + 1.0;
    }
    double s = (m - 1.0) / (m + 1.0), z = s * s;
    double q = 0.058823529411764705;
    q = q * z + 0.06666666666666667;
    q = q * z + 0.07692307692307693;
    q = q * z + 0.09090909090909091;
    q = q * z + 0.1111111111111111;
    q = q * z + 0.14285714285714285;
    q = q * z + 0.2;
    q = q * z + 0.3333333333333333;
    q = q * z + 1.0;
    return k * KP_LN2 + (2.0 * s) * q;
}

// b^e for b >= 0 (a negative or NaN base, or a NaN exponent, gives NaN): exp(e · ln b) with both in double.
__device__ __forceinline__ float kp_pow(float b, float e) {
    if (e == 0.0f || b == 1.0f) return 1.0f;
    if (!(b >= 0.0f) || e != e) return kp_float_nan();
    if (b == 0.0f) return e > 0.0f ? 0.0f : kp_float_inf();
    if (b == kp_float_inf()) return e > 0.0f ? kp_float_inf() : 0.0f;
    return kp_exp_to_float((double)e * kp_log_core((double)b));
}
