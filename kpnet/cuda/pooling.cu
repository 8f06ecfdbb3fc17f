// Corner pooling (CornerNet §3.4, REFERENCE §1.3) and full-line max (center pooling, REFERENCE §1.5).
// A launch views a contiguous (N, C, H, W) tensor as `n_planes` planes of `lines` scan lines of
// `length` elements: line l of plane q starts at q·lines·length + l·line_stride and its elements are
// `step` apart. H-scans (top/bottom) have one plane per (n, c), lines = W, line_stride = 1, step = W;
// W-scans (left/right) have one plane, lines = N·C·H, line_stride = W, step = 1. `reverse` scans from
// the high end (top, left).
// Each thread owns `lanes` adjacent lines, chosen by the launch layer (kpnet/cuda/launch.py): on the
// GPU lanes = 1, so adjacent threads walk adjacent columns and loads coalesce, and a thread keeps its
// line's state in registers. The CPU emulator gives a thread many lines (a plane's columns, or a block
// of rows) and runs them as the lanes of vectors (kpnet_cpu_lanes.h, compiled only there). Either way a
// thread's outputs are its own.
// Tie/NaN/gradient rules: kpnet/ops/pooling.py. Gradients accumulate in double in scan order.
#include "kpnet_types.cuh"
#ifdef KPNET_EMULATOR
#include "kpnet_cpu_lanes.h"
#endif

// A launch's line layout as parameters and as arguments.
#define KP_LINES kp_index n_planes, kp_index lines, kp_index length, kp_index line_stride, kp_index step, kp_index lanes
#define KP_LINE_ARGS n_planes, lines, length, line_stride, step, lanes

// The lines this thread owns: global index of the first, how many, and the offset of the first's start.
__device__ __forceinline__ bool kp_thread_lines(kp_index n_planes, kp_index lines, kp_index length,
                                                kp_index line_stride, kp_index lanes, kp_index* first,
                                                kp_index* count, kp_index* start) {
    kp_index t = (kp_index)blockIdx.x * blockDim.x + threadIdx.x;
    kp_index per_plane = (lines + lanes - 1) / lanes;
    if (t >= n_planes * per_plane) return false;
    kp_index plane = t / per_plane;
    kp_index l0 = (t - plane * per_plane) * lanes;
    *first = plane * lines + l0;
    *count = lines - l0 < lanes ? lines - l0 : lanes;
    *start = plane * lines * length + l0 * line_stride;
    return true;
}

// One line scanned with the running max in a register.
template <typename T>
__device__ __forceinline__ void running_max_line(const T* __restrict__ x, T* __restrict__ out, kp_index p,
                                                 kp_index length, kp_index step) {
    T best = x[p];
    out[p] = best;
    for (kp_index t = 1; t < length; ++t) {
        p += step;
        T v = x[p];
        if (kp_takes_max(kp_widen(v), kp_widen(best))) best = v;
        out[p] = best;
    }
}

// One line's backward with its state in registers: the float64 sum of the current maximum's run goes to
// that maximum when the next one is found (or the line ends); every other input gets zero.
template <typename T, typename G>
__device__ __forceinline__ void running_max_backward_line(const T* __restrict__ x, const T* __restrict__ grad_out,
                                                          G* __restrict__ grad_in, kp_index p, kp_index length,
                                                          kp_index step) {
    auto best = kp_widen(x[p]);
    kp_index best_at = p;
    double sum = 0.0 + (double)kp_widen(grad_out[p]);  // as the reference's zeros + g: -0.0 becomes +0.0
    for (kp_index t = 1; t < length; ++t) {
        p += step;
        auto v = kp_widen(x[p]);
        if (kp_takes_max(v, best)) {
            grad_in[best_at] = (G)sum;
            best = v;
            best_at = p;
            sum = 0.0;
        } else {
            grad_in[p] = (G)0.0;
        }
        sum += (double)kp_widen(grad_out[p]);
    }
    grad_in[best_at] = (G)sum;
}

#ifdef KPNET_EMULATOR
// A CPU thread's lines as vector lanes (kpnet_cpu_lanes.h): with lanes >= lines (H-scans) the thread owns
// lanes / lines whole planes, otherwise `lanes` adjacent columns or rows as on the GPU. Returns false where
// the per-line code serves (a single line). `stream`: outputs bypass the caches (kp_cpu::streams).
template <typename T, typename G>
bool running_max_lanes(const T* x, const T* grad_out, T* out, G* grad_in, kp_index n_planes, kp_index lines,
                       kp_index length, kp_index line_stride, kp_index step, kp_index lanes, bool reverse, T lowest,
                       bool stream) {
    auto low = typename kp_cpu::key_lanes<T>::vk{} + kp_widen(lowest);
    if (line_stride == 1 && lanes >= lines) {
        kp_index per = lanes / lines, q0 = ((kp_index)blockIdx.x * blockDim.x + threadIdx.x) * per;
        if (q0 >= n_planes) return true;
        kp_index planes = n_planes - q0 < per ? n_planes - q0 : per, plane = lines * length, at = q0 * plane;
        if (grad_out)
            kp_cpu::backward_columns(x + at, grad_out + at, grad_in + at, planes, plane, lines, length, step, reverse,
                                     low, stream);
        else
            kp_cpu::forward_columns(x + at, out + at, planes, plane, lines, length, step, reverse, low, stream);
        return true;
    }
    kp_index first, count, start;
    if (!kp_thread_lines(n_planes, lines, length, line_stride, lanes, &first, &count, &start)) return true;
    if (count < 2 || (line_stride != 1 && step != 1)) return false;
    if (line_stride == 1 && grad_out)
        kp_cpu::backward_columns(x + start, grad_out + start, grad_in + start, 1, 0, count, length, step, reverse, low,
                                 stream);
    else if (line_stride == 1)
        kp_cpu::forward_columns(x + start, out + start, 1, 0, count, length, step, reverse, low, stream);
    else if (grad_out && reverse)
        kp_cpu::backward_rows<true>(x + start, grad_out + start, grad_in + start, count, length, line_stride, low,
                                    stream);
    else if (grad_out)
        kp_cpu::backward_rows<false>(x + start, grad_out + start, grad_in + start, count, length, line_stride, low,
                                     stream);
    else if (reverse)
        kp_cpu::forward_rows<true>(x + start, out + start, count, length, line_stride, low, stream, [&](kp_index r) {
            running_max_line<T>(x, out, start + r * line_stride + length - 1, length, -1);
        });
    else
        kp_cpu::forward_rows<false>(x + start, out + start, count, length, line_stride, low, stream, [&](kp_index r) {
            running_max_line<T>(x, out, start + r * line_stride, length, 1);
        });
    return true;
}

// running_max_lanes, its outputs streamed when the launch's tensors (inputs and output) exceed the last-level
// cache, and then fenced.
template <typename T, typename G>
bool running_max_cpu(const T* x, const T* grad_out, T* out, G* grad_in, kp_index n_planes, kp_index lines,
                     kp_index length, kp_index line_stride, kp_index step, kp_index lanes, bool reverse, T lowest) {
    kp_index elements = n_planes * lines * length;
    kp_index bytes = elements * (kp_index)(grad_out ? 2 * sizeof(T) + sizeof(G) : 2 * sizeof(T));
    bool stream = kp_cpu::streams(bytes);
    bool served = running_max_lanes<T, G>(x, grad_out, out, grad_in, n_planes, lines, length, line_stride, step,
                                          lanes, reverse, lowest, stream);
    if (stream) kp_cpu::stream_fence();
    return served;
}
#endif

// Corner pooling forward (grad_out null: writes out) or backward (writes grad_in) of a thread's lines.
template <typename T, typename G>
__device__ __forceinline__ void running_max(const T* __restrict__ x, const T* __restrict__ grad_out,
                                            T* __restrict__ out, G* __restrict__ grad_in, T lowest, KP_LINES,
                                            int reverse) {
#ifdef KPNET_EMULATOR
    if (running_max_cpu<T, G>(x, grad_out, out, grad_in, KP_LINE_ARGS, reverse, lowest)) return;
#endif
    kp_index first, count, start;
    if (!kp_thread_lines(n_planes, lines, length, line_stride, lanes, &first, &count, &start)) return;
    if (reverse) {
        start += (length - 1) * step;
        step = -step;
    }
    for (kp_index i = 0; i < count; ++i) {
        if (grad_out) running_max_backward_line<T, G>(x, grad_out, grad_in, start + i * line_stride, length, step);
        else running_max_line<T>(x, out, start + i * line_stride, length, step);
    }
}

template <typename T>
__device__ __forceinline__ void line_max_forward(const T* __restrict__ x, T* __restrict__ out, kp_index n_planes,
                                                 kp_index lines, kp_index length, kp_index line_stride,
                                                 kp_index step, kp_index lanes) {
    kp_index first, count, start;
    if (!kp_thread_lines(n_planes, lines, length, line_stride, lanes, &first, &count, &start)) return;
    if (line_stride == 1 && count > 1) {  // running max of the columns into the first row, then broadcast it
        T* __restrict__ head = out + start;
        for (kp_index i = 0; i < count; ++i) head[i] = x[start + i];
        for (kp_index t = 1; t < length; ++t) {
            const T* __restrict__ row = x + start + t * step;
            for (kp_index i = 0; i < count; ++i) {
                T v = row[i], best = head[i];
                head[i] = kp_takes_max_select(kp_widen(v), kp_widen(best)) ? v : best;
            }
        }
        for (kp_index t = 1; t < length; ++t) {
            T* __restrict__ dst = out + start + t * step;
            for (kp_index i = 0; i < count; ++i) dst[i] = head[i];
        }
        return;
    }
    for (kp_index i = 0; i < count; ++i) {
        kp_index base = start + i * line_stride;
        T best = x[base];
        for (kp_index t = 1; t < length; ++t) {
            T v = x[base + t * step];
            if (kp_takes_max(kp_widen(v), kp_widen(best))) best = v;
        }
        for (kp_index t = 0; t < length; ++t) out[base + t * step] = best;
    }
}

template <typename T, typename G>
__device__ __forceinline__ void line_max_backward(const T* __restrict__ x, const T* __restrict__ grad_out,
                                                  G* __restrict__ grad_in, double* __restrict__ acc,
                                                  kp_index* __restrict__ arg, kp_index n_planes, kp_index lines,
                                                  kp_index length, kp_index line_stride, kp_index step,
                                                  kp_index lanes) {
    kp_index first, count, start;
    if (!kp_thread_lines(n_planes, lines, length, line_stride, lanes, &first, &count, &start)) return;
    if (count == 1) {
        kp_index best_at = start;
        auto best = kp_widen(x[start]);
        double sum = (double)kp_widen(grad_out[start]);
        grad_in[start] = (G)0.0;
        for (kp_index t = 1; t < length; ++t) {
            kp_index p = start + t * step;
            auto v = kp_widen(x[p]);
            if (kp_takes_max(v, best)) { best = v; best_at = p; }
            sum += (double)kp_widen(grad_out[p]);
            grad_in[p] = (G)0.0;
        }
        grad_in[best_at] = (G)sum;
        return;
    }
    double* __restrict__ a = acc + first;
    kp_index* __restrict__ m = arg + first;
    for (kp_index i = 0; i < count; ++i) {
        kp_index q = start + i * line_stride;
        m[i] = q;
        a[i] = (double)kp_widen(grad_out[q]);
        grad_in[q] = (G)0.0;
    }
    for (kp_index t = 1; t < length; ++t) {
        for (kp_index i = 0; i < count; ++i) {
            kp_index q = start + t * step + i * line_stride;
            if (kp_takes_max(kp_widen(x[q]), kp_widen(x[m[i]]))) m[i] = q;
            a[i] += (double)kp_widen(grad_out[q]);
            grad_in[q] = (G)0.0;
        }
    }
    for (kp_index i = 0; i < count; ++i) grad_in[m[i]] = (G)a[i];
}

// extern "C" entry points, one per storage type; 16-bit types write their gradient as double and the
// launch layer rounds it with torch, exactly as the reference does.
#define KP_POOLING_KERNELS(T, G, SUFFIX)                                                                         \
    extern "C" __global__ void corner_pool_forward_##SUFFIX(const T* x, T* out, KP_LINES, int reverse) {         \
        running_max<T, G>(x, nullptr, out, nullptr, kp_lowest_##SUFFIX(), KP_LINE_ARGS, reverse);                \
    }                                                                                                            \
    extern "C" __global__ void corner_pool_backward_##SUFFIX(const T* x, const T* grad_out, G* grad_in,          \
                                                             KP_LINES, int reverse) {                            \
        running_max<T, G>(x, grad_out, nullptr, grad_in, kp_lowest_##SUFFIX(), KP_LINE_ARGS, reverse);           \
    }                                                                                                            \
    extern "C" __global__ void line_max_forward_##SUFFIX(const T* x, T* out, KP_LINES) {                         \
        line_max_forward<T>(x, out, KP_LINE_ARGS);                                                               \
    }                                                                                                            \
    extern "C" __global__ void line_max_backward_##SUFFIX(const T* x, const T* grad_out, G* grad_in,             \
                                                          double* acc, kp_index* arg, KP_LINES) {                \
        line_max_backward<T, G>(x, grad_out, grad_in, acc, arg, KP_LINE_ARGS);                                   \
    }

KP_POOLING_KERNELS(float, float, f32)
KP_POOLING_KERNELS(double, double, f64)
KP_POOLING_KERNELS(kp_f16, double, f16)
KP_POOLING_KERNELS(kp_bf16, double, bf16)
