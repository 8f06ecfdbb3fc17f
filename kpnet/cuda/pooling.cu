// Corner pooling (CornerNet §3.4, REFERENCE §1.3) and full-line max (center pooling, REFERENCE §1.5).
// A launch views a contiguous (N, C, H, W) tensor as `n_planes` planes of `lines` scan lines of
// `length` elements: line l of plane q starts at q·lines·length + l·line_stride and its elements are
// `step` apart. H-scans (top/bottom) have one plane per (n, c), lines = W, line_stride = 1, step = W;
// W-scans (left/right) have one plane, lines = N·C·H, line_stride = W, step = 1. `reverse` scans from
// the high end (top, left).
// Each thread owns `lanes` adjacent lines, chosen by the launch layer (kpnet/cuda/launch.py): on the
// GPU lanes = 1, so adjacent threads walk adjacent columns and loads coalesce; the CPU emulator gives
// a thread a whole plane's columns (a contiguous inner loop over a row that g++ vectorizes) or a
// block of rows (forward: each row by log-step doubling in the thread's scratch; backward: four at a
// time, independent accumulation chains). Either way a thread's outputs are its own.
// Tie/NaN/gradient rules: kpnet/ops/pooling.py. Gradients accumulate in double in scan order; with
// lanes > 1 the per-line running sums and argmax positions live in `acc`/`arg` (one slot per line).
#include "kpnet_types.cuh"

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

// One line scanned with the running max in a register (a GPU thread owns one line).
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

// Adjacent columns, rows outer: the previous output row is the running max, so no per-line state.
template <typename T>
__device__ __forceinline__ void running_max_rows(const T* __restrict__ x, T* __restrict__ out, kp_index p,
                                                 kp_index count, kp_index length, kp_index step) {
    for (kp_index i = 0; i < count; ++i) out[p + i] = x[p + i];
    for (kp_index t = 1; t < length; ++t) {
        const T* __restrict__ prev = out + p;
        p += step;
        const T* __restrict__ row = x + p;
        T* __restrict__ dst = out + p;
        for (kp_index i = 0; i < count; ++i) {
            T v = row[i], best = prev[i];
            dst[i] = kp_takes_max_select(kp_widen(v), kp_widen(best)) ? v : best;
        }
    }
}

// The tie/NaN rule as a choice between two candidates, `earlier` and `later` in scan order. It is
// associative (the latest of the maximal elements wins however the line is split), so a running max
// may be computed by log-step doubling and still give the sequential scan's bits.
template <typename T>
__device__ __forceinline__ T kp_pick(T earlier, T later) {
    return kp_takes_max_select(kp_widen(later), kp_widen(earlier)) ? later : earlier;
}

// One log-step pass over a line held in scan direction DIR: dst[i] = pick(src[i - DIR·s], src[i]). src is
// padded with -inf (the identity of pick) for `s` elements before its first element in scan order.
template <int DIR, typename T>
__device__ __forceinline__ void logstep_pass(const T* __restrict__ src, T* __restrict__ dst, kp_index length,
                                             kp_index s) {
    for (kp_index i = 0; i < length; ++i) dst[i] = kp_pick(src[i - DIR * s], src[i]);
}

// A contiguous line's running max in ⌈log₂ length⌉ vectorizable passes (CPU threads that own rows of a
// W-scan; a sequential scan there is one long compare-and-select chain). `a` and `b` are the thread's two
// scratch lines, each with `length` elements of -inf on both sides; the last pass writes `out`.
template <int DIR, typename T>
__device__ __forceinline__ void running_max_logstep(const T* __restrict__ x, T* __restrict__ out,
                                                    T* __restrict__ a, T* __restrict__ b, kp_index length) {
    if (length == 1) {
        out[0] = x[0];
        return;
    }
    for (kp_index i = 0; i < length; ++i) a[i] = x[i];
    kp_index s = 1;
    for (; 2 * s < length; s *= 2) {
        logstep_pass<DIR, T>(a, b, length, s);
        T* t = a;
        a = b;
        b = t;
    }
    logstep_pass<DIR, T>(a, out, length, s);
}

template <typename T>
__device__ __forceinline__ void running_max_forward(const T* __restrict__ x, T* __restrict__ out,
                                                    T* __restrict__ scratch, T lowest, kp_index n_planes,
                                                    kp_index lines, kp_index length, kp_index line_stride,
                                                    kp_index step, kp_index lanes, int reverse) {
    kp_index first, count, start;
    if (!kp_thread_lines(n_planes, lines, length, line_stride, lanes, &first, &count, &start)) return;
    if (line_stride == 1 && count > 1) {
        if (reverse) {
            start += (length - 1) * step;
            step = -step;
        }
        running_max_rows<T>(x, out, start, count, length, step);
    } else if (count > 1 && step == 1) {
        // This thread's scratch: two lines of `length`, each between `length` elements of -inf.
        T* __restrict__ pad = scratch + ((kp_index)blockIdx.x * blockDim.x + threadIdx.x) * 6 * length;
        for (kp_index i = 0; i < 6 * length; ++i) pad[i] = lowest;
        for (kp_index i = 0; i < count; ++i) {
            kp_index p = start + i * line_stride;
            if (reverse) running_max_logstep<-1, T>(x + p, out + p, pad + length, pad + 4 * length, length);
            else running_max_logstep<1, T>(x + p, out + p, pad + length, pad + 4 * length, length);
        }
    } else {
        if (reverse) {
            start += (length - 1) * step;
            step = -step;
        }
        for (kp_index i = 0; i < count; ++i) running_max_line<T>(x, out, start + i * line_stride, length, step);
    }
}

// R lines scanned together with their state in registers: R independent float64 sums in flight.
template <int R, typename T, typename G>
__device__ __forceinline__ void running_max_backward_lines(const T* __restrict__ x, const T* __restrict__ grad_out,
                                                           G* __restrict__ grad_in, kp_index start,
                                                           kp_index line_stride, kp_index length, kp_index step) {
    decltype(kp_widen(x[0])) best[R];
    double sum[R];
    kp_index best_at[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        kp_index q = start + r * line_stride;
        best[r] = kp_widen(x[q]);
        best_at[r] = q;
        sum[r] = 0.0 + (double)kp_widen(grad_out[q]);  // as the reference's zeros + g: -0.0 becomes +0.0
    }
    for (kp_index t = 1; t < length; ++t) {
        start += step;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            kp_index q = start + r * line_stride;
            auto v = kp_widen(x[q]);
            if (kp_takes_max(v, best[r])) {
                grad_in[best_at[r]] = (G)sum[r];
                best[r] = v;
                best_at[r] = q;
                sum[r] = 0.0;
            } else {
                grad_in[q] = (G)0.0;
            }
            sum[r] += (double)kp_widen(grad_out[q]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) grad_in[best_at[r]] = (G)sum[r];
}

// Adjacent columns, rows outer, each column's (best, sum, argmax) in its slot of best/acc/arg. Per row,
// one branch-free (vectorized) loop moves every column's best and marks, one byte per column in `hit`,
// which columns take a new maximum; the marks are then read eight at a time, and only a marked column
// hands its finished sum to its argmax. A last branch-free loop adds the row's gradients and zeroes it.
template <typename T, typename G>
__device__ __forceinline__ void running_max_backward_rows(const T* __restrict__ x, const T* __restrict__ grad_out,
                                                          G* __restrict__ grad_in, T* __restrict__ best,
                                                          double* __restrict__ acc, kp_index* __restrict__ arg,
                                                          unsigned long long* __restrict__ hit_words,
                                                          kp_index start, kp_index count, kp_index length,
                                                          kp_index step) {
    unsigned char* __restrict__ hit = (unsigned char*)hit_words;
    kp_index words = (count + 7) / 8;
    for (kp_index w = 0; w < words; ++w) hit_words[w] = 0ull;
    for (kp_index i = 0; i < count; ++i) {
        best[i] = x[start + i];
        arg[i] = start + i;
        acc[i] = 0.0;
    }
    kp_index p = start;
    for (kp_index t = 0; t < length; ++t, p += step) {
        const T* __restrict__ row = x + p;
        const T* __restrict__ g = grad_out + p;
        G* __restrict__ dst = grad_in + p;
        if (t > 0) {
            for (kp_index i = 0; i < count; ++i) {
                T v = row[i], b = best[i];
                bool takes = kp_takes_max_select(kp_widen(v), kp_widen(b));
                hit[i] = (unsigned char)takes;
                best[i] = takes ? v : b;
            }
            for (kp_index w = 0; w < words; ++w) {
                if (hit_words[w] == 0ull) continue;
                kp_index end = w * 8 + 8 < count ? w * 8 + 8 : count;
                for (kp_index i = w * 8; i < end; ++i) {
                    if (hit[i]) {
                        grad_in[arg[i]] = (G)acc[i];
                        arg[i] = p + i;
                        acc[i] = 0.0;
                    }
                }
            }
        }
        for (kp_index i = 0; i < count; ++i) {
            acc[i] += (double)kp_widen(g[i]);
            dst[i] = (G)0.0;
        }
    }
    for (kp_index i = 0; i < count; ++i) grad_in[arg[i]] = (G)acc[i];
}

template <typename T, typename G>
__device__ __forceinline__ void running_max_backward(const T* __restrict__ x, const T* __restrict__ grad_out,
                                                     G* __restrict__ grad_in, T* __restrict__ best,
                                                     double* __restrict__ acc, kp_index* __restrict__ arg,
                                                     unsigned long long* __restrict__ hit, kp_index n_planes,
                                                     kp_index lines, kp_index length, kp_index line_stride,
                                                     kp_index step, kp_index lanes, int reverse) {
    kp_index first, count, start;
    if (!kp_thread_lines(n_planes, lines, length, line_stride, lanes, &first, &count, &start)) return;
    if (reverse) {
        start += (length - 1) * step;
        step = -step;
    }
    if (line_stride == 1 && count > 1) {
        kp_index thread = (kp_index)blockIdx.x * blockDim.x + threadIdx.x;
        running_max_backward_rows<T, G>(x, grad_out, grad_in, best + first, acc + first, arg + first,
                                        hit + thread * ((lanes + 7) / 8), start, count, length, step);
        return;
    }
    kp_index i = 0;
    for (; i + 4 <= count; i += 4)
        running_max_backward_lines<4, T, G>(x, grad_out, grad_in, start + i * line_stride, line_stride, length, step);
    for (; i < count; ++i)
        running_max_backward_lines<1, T, G>(x, grad_out, grad_in, start + i * line_stride, line_stride, length, step);
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
#define KP_LINES kp_index n_planes, kp_index lines, kp_index length, kp_index line_stride, kp_index step, kp_index lanes
#define KP_LINE_ARGS n_planes, lines, length, line_stride, step, lanes
#define KP_POOLING_KERNELS(T, G, SUFFIX)                                                                         \
    extern "C" __global__ void corner_pool_forward_##SUFFIX(const T* x, T* out, T* scratch, KP_LINES,            \
                                                            int reverse) {                                       \
        running_max_forward<T>(x, out, scratch, kp_lowest_##SUFFIX(), KP_LINE_ARGS, reverse);                    \
    }                                                                                                            \
    extern "C" __global__ void corner_pool_backward_##SUFFIX(const T* x, const T* grad_out, G* grad_in, T* best, \
                                                             double* acc, kp_index* arg, unsigned long long* hit, \
                                                             KP_LINES, int reverse) {                            \
        running_max_backward<T, G>(x, grad_out, grad_in, best, acc, arg, hit, KP_LINE_ARGS, reverse);            \
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
