// The emulator's multi-line CPU threads (kpnet/cuda/launch.py gives a CPU thread many scan lines; a GPU
// thread owns one): the lines are processed L at a time as the lanes of 64-byte vectors (GCC/Clang vector
// extensions, lowered to AVX-512, AVX2, NEON or scalar code by the host compiler). Lane r of step p holds
// position p of line r. Lines of adjacent columns load a step directly; for lines that are rows, the backward
// loads an L×L tile of row pieces and transposes it in registers, while the forward scans each row piece inside
// its vector (forward_rows). Compiled only by the emulator (kpnet_shim.h defines
// KPNET_EMULATOR): vectors here are one thread's registers, never shared between threads.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kp_cpu {

// Vectors for a key type K (the type comparisons run in): L lanes of K and their mask, and the same L lanes
// as H vectors of 8 doubles (gradient sums; arithmetic and selects on wider generic vectors compile to
// scalar code, so only the conversion itself runs on all 16 lanes at once) with their masks.
typedef double vd8 __attribute__((vector_size(64)));
typedef long long md8 __attribute__((vector_size(64)));
typedef unsigned long long ud8 __attribute__((vector_size(64)));

template <typename K>
struct lanes;

template <>
struct lanes<float> {
    static constexpr int L = 16, H = 2;
    static constexpr unsigned int NOT_MAXIMUM = 0x7f800001u;  // a signaling NaN (see grad)
    typedef float vk __attribute__((vector_size(64)));
    typedef int mk __attribute__((vector_size(64)));
    typedef unsigned int uk __attribute__((vector_size(64)));
    typedef float half __attribute__((vector_size(32)));
    typedef double all_double __attribute__((vector_size(128)));  // converted whole, then split
    static void to_doubles(vk v, vd8* d) {
        all_double wide = __builtin_convertvector(v, all_double);
        std::memcpy(d, &wide, sizeof wide);
    }
    static md8 to_double_mask(mk m, int h) {  // each 64-bit lane: its 32-bit mask twice
        return (md8)(h ? __builtin_shufflevector(m, m, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15)
                       : __builtin_shufflevector(m, m, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
    }
    static vk from_double(const vd8* d) {
        half lo = __builtin_convertvector(d[0], half), hi = __builtin_convertvector(d[1], half);
        return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    }
};

template <>
struct lanes<double> {
    static constexpr int L = 8, H = 1;
    static constexpr unsigned long long NOT_MAXIMUM = 0x7ff0000000000001ull;
    typedef double vk __attribute__((vector_size(64)));
    typedef long long mk __attribute__((vector_size(64)));
    typedef unsigned long long uk __attribute__((vector_size(64)));
    static void to_doubles(vk v, vd8* d) { d[0] = v; }
    static md8 to_double_mask(mk m, int) { return (md8)m; }
    static vk from_double(const vd8* d) { return d[0]; }
};

// Storage type T -> key type, and exact conversions of L contiguous elements between the two. 16-bit
// floats widen bit-exactly (as kp_widen) and narrow back to the same bits, NaN payloads included, so a
// forward output can be stored from its key.
template <typename T>
struct storage;

template <>
struct storage<float> {
    typedef float key;
    typedef lanes<float>::vk vk;
    static vk load(const float* p) { vk v; std::memcpy(&v, p, sizeof v); return v; }
    static void store(float* p, vk v) { std::memcpy(p, &v, sizeof v); }
};

template <>
struct storage<double> {
    typedef double key;
    typedef lanes<double>::vk vk;
    static vk load(const double* p) { vk v; std::memcpy(&v, p, sizeof v); return v; }
    static void store(double* p, vk v) { std::memcpy(p, &v, sizeof v); }
};

typedef unsigned short u16x16 __attribute__((vector_size(32)));

template <>
struct storage<kp_bf16> {
    typedef float key;
    typedef lanes<float>::vk vk;
    typedef lanes<float>::uk uk;
    static vk load(const kp_bf16* p) {
        u16x16 raw;
        std::memcpy(&raw, p, sizeof raw);
        return (vk)(__builtin_convertvector(raw, uk) << 16);
    }
    static void store(kp_bf16* p, vk v) {
        u16x16 raw = __builtin_convertvector((uk)v >> 16, u16x16);
        std::memcpy(p, &raw, sizeof raw);
    }
};

template <>
struct storage<kp_f16> {
    typedef float key;
    typedef lanes<float>::vk vk;
    typedef lanes<float>::uk uk;
    static vk load(const kp_f16* p) {
        u16x16 raw16;
        std::memcpy(&raw16, p, sizeof raw16);
        uk raw = __builtin_convertvector(raw16, uk);
        uk sign = (raw & 0x8000u) << 16, exponent = (raw >> 10) & 0x1fu, mantissa = raw & 0x3ffu;
        uk normal = sign | ((exponent + 112u) << 23) | (mantissa << 13);
        uk special = sign | 0x7f800000u | (mantissa << 13);
        // zero and subnormal halves are mantissa · 2^-24 exactly
        uk small = sign | (uk)(__builtin_convertvector(mantissa, vk) * 0x1p-24f);
        return (vk)(exponent == 0x1fu ? special : exponent == 0u ? small : normal);
    }
    static void store(kp_f16* p, vk v) {
        uk bits = (uk)v;
        uk sign = (bits >> 16) & 0x8000u, exponent = (bits >> 23) & 0xffu, mantissa = bits & 0x7fffffu;
        uk special = sign | 0x7c00u | (mantissa >> 13);
        uk normal = sign | ((exponent - 112u) << 10) | (mantissa >> 13);
        vk magnitude = (vk)(bits & 0x7fffffffu);
        uk small = sign | __builtin_convertvector(magnitude * 0x1p24f, uk);
        uk raw = exponent == 0xffu ? special : exponent >= 113u ? normal : small;
        u16x16 raw16 = __builtin_convertvector(raw, u16x16);
        std::memcpy(p, &raw16, sizeof raw16);
    }
};

template <typename T>
using key_lanes = lanes<typename storage<T>::key>;

// n (< L) contiguous elements as a vector, the other lanes `fill`.
template <typename T>
inline typename key_lanes<T>::vk load_part(const T* p, int n, typename key_lanes<T>::vk fill) {
    constexpr int L = key_lanes<T>::L;
    T buf[L] = {};
    std::memcpy(buf, p, n * sizeof(T));
    typename key_lanes<T>::vk v = storage<T>::load(buf);
    for (int i = n; i < L; ++i) v[i] = fill[i];
    return v;
}

template <typename T>
inline void store_part(T* p, typename key_lanes<T>::vk v, int n) {
    T buf[key_lanes<T>::L];
    storage<T>::store(buf, v);
    std::memcpy(p, buf, n * sizeof(T));
}

// Whether a call whose tensors total `bytes` streams its output past the caches: when they exceed the host's
// last-level cache, the output cannot stay cached for its consumer anyway, and a streamed (non-temporal) store
// writes a line without reading it first. (benchmarks/ops.py at (2,256,128,128) float32 on Zen 4 with a 32 MiB
// L3, against copy_ into an existing tensor: forward 1.9-2.6× -> 0.8-1.0×, forward+backward 4.7-7.5× -> 3.1-4.3×.
// Below the cache size the output stays cached for its consumer, as copy_'s does.)
inline bool streams(kp_index bytes) {
    return kp_host_cache_bytes > 0 && bytes > kp_host_cache_bytes;
}

// A whole vector of output at p: streamed when `stream` for float and double at a 64-byte-aligned address on
// x86, else stored normally. A call that streams ends with stream_fence().
template <typename T, typename V>
inline void store_vector(T* p, V v, bool stream) {
#if defined(__x86_64__)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        static_assert(sizeof(V) == 64, "a float or double vector is one cache line");
        if (stream && ((std::uintptr_t)p & 63) == 0) {
#if defined(__AVX512F__)
            __m512i line;
            std::memcpy(&line, &v, sizeof line);
            _mm512_stream_si512((__m512i*)p, line);
#elif defined(__AVX__)
            __m256i line[2];
            std::memcpy(line, &v, sizeof line);
            for (int i = 0; i < 2; ++i) _mm256_stream_si256((__m256i*)p + i, line[i]);
#else
            __m128i line[4];
            std::memcpy(line, &v, sizeof line);
            for (int i = 0; i < 4; ++i) _mm_stream_si128((__m128i*)p + i, line[i]);
#endif
            return;
        }
    }
#endif
    storage<T>::store(p, v);
}

// Orders a call's streamed stores before whatever reads its output next.
inline void stream_fence() {
#if defined(__x86_64__)
    _mm_sfence();
#endif
}

// An L×L transpose in registers, shaped like the classic AVX-512 one: interleave element pairs, then pairs of
// pairs, within 128-bit blocks (in-lane shuffles, cheap everywhere), then exchange 128-bit blocks across the
// vector. (Exchanging bit S of the indices in every stage instead needs two-source permutes: 35-40% slower
// on Zen 4, measured when the forward used these tiles too.) `pick` takes lanes of a ++ b.
template <typename V, int... I>
inline V pick(V a, V b, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(a, b, I...);
}

template <int... I>
using seq = std::integer_sequence<int, I...>;

template <int L, typename V>
inline void transpose(V* t) {
    if constexpr (L == 16) {
        // pairs of rows interleaved, then pairs of pairs; each half of the tile is then four 4×4 blocks
        for (int i = 0; i < 16; i += 2) {
            V a = t[i], b = t[i + 1];
            t[i] = pick(a, b, seq<0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29>{});
            t[i + 1] = pick(a, b, seq<2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31>{});
        }
        for (int g = 0; g < 16; g += 4) {
            V a = t[g], b = t[g + 1], c = t[g + 2], d = t[g + 3];
            t[g] = pick(a, c, seq<0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29>{});
            t[g + 1] = pick(a, c, seq<2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31>{});
            t[g + 2] = pick(b, d, seq<0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29>{});
            t[g + 3] = pick(b, d, seq<2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31>{});
        }
        for (int d = 4; d <= 8; d *= 2)  // 128-bit blocks: even ones of a and b, then odd ones
            for (int i = 0; i < 16; ++i) {
                if (i & d) continue;
                V a = t[i], b = t[i + d];
                t[i] = pick(a, b, seq<0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27>{});
                t[i + d] = pick(a, b, seq<4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31>{});
            }
    } else {
        for (int i = 0; i < 8; i += 2) {
            V a = t[i], b = t[i + 1];
            t[i] = pick(a, b, seq<0, 8, 2, 10, 4, 12, 6, 14>{});
            t[i + 1] = pick(a, b, seq<1, 9, 3, 11, 5, 13, 7, 15>{});
        }
        for (int d = 2; d <= 4; d *= 2)
            for (int i = 0; i < 8; ++i) {
                if (i & d) continue;
                V a = t[i], b = t[i + d];
                t[i] = pick(a, b, seq<0, 1, 4, 5, 8, 9, 12, 13>{});
                t[i + d] = pick(a, b, seq<2, 3, 6, 7, 10, 11, 14, 15>{});
            }
    }
}

// Rows of a W-scan backward: `lines` (<= L) rows starting `line_stride` apart, positions contiguous. tile[j]
// holds position p0 + j of every row (np <= L positions); loads and stores transpose the L×L tile in
// registers. A tile touches one cache line per row, a pattern the hardware prefetchers miss, so each load and
// store prefetches the next L rows: the rows of a contiguous tensor are adjacent (line_stride = length), so
// those form one region, and the tile `ahead`-th in address order (whatever the scan direction) prefetches its
// `ahead`-th L·L elements, in address order (2× faster at 32 MiB on Zen 4 than prefetching the same tile
// position of the next rows), to L2: the backward's three streams of 16 rows and the next ones' overflow a
// 32 KiB L1 (prefetched into L1 they evict each other: 1.3-2.3× slower at 8 and 32 MiB on Zen 4, depending on
// how the tensors' addresses align).
template <typename T>
inline void prefetch_next_rows(const T* base, kp_index line_stride, kp_index ahead, int write) {
    constexpr int L = key_lanes<T>::L, PER_LINE = 64 / (int)sizeof(T);
    const T* next = base + L * line_stride + ahead * L * L;
    for (int e = 0; e < L * L; e += PER_LINE) {
        if (write) __builtin_prefetch(next + e, 1, 1);
        else __builtin_prefetch(next + e, 0, 1);
    }
}

template <typename T, typename V>
inline void load_rows(const T* base, kp_index line_stride, int lines, kp_index p0, int np, V fill, V* tile,
                      kp_index ahead) {
    constexpr int L = key_lanes<T>::L;
    prefetch_next_rows(base, line_stride, ahead, 0);
    if (lines == L && np == L) {  // a whole tile, unrolled so that it stays in registers
        const T* row = base + p0;  // one pointer stepped along: sixteen row pointers would not stay in registers
#pragma GCC unroll 16
        for (int r = 0; r < L; ++r, row += line_stride) tile[r] = storage<T>::load(row);
    } else {
        for (int r = 0; r < L; ++r) {
            const T* row = base + r * line_stride + p0;
            tile[r] = r >= lines ? fill : np == L ? storage<T>::load(row) : load_part(row, np, fill);
        }
    }
    transpose<L>(tile);
}

template <typename T, typename V>
inline void store_rows(T* base, kp_index line_stride, int lines, kp_index p0, int np, V* tile, kp_index ahead,
                       bool stream) {
    constexpr int L = key_lanes<T>::L;
    transpose<L>(tile);
    if (!stream) prefetch_next_rows(base, line_stride, ahead, 1);
    if (lines == L && np == L) {
        T* row = base + p0;
#pragma GCC unroll 16
        for (int r = 0; r < L; ++r, row += line_stride) store_vector(row, tile[r], stream);
        return;
    }
    for (int r = 0; r < lines; ++r) {
        T* row = base + r * line_stride + p0;
        if (np == L) store_vector(row, tile[r], stream);
        else store_part(row, tile[r], np);
    }
}

// One position of n (<= L) adjacent columns.
template <typename T, typename V>
inline V load_lanes(const T* p, int n, V fill) {
    return n == key_lanes<T>::L ? storage<T>::load(p) : load_part(p, n, fill);
}

template <typename T, typename V>
inline void store_lanes(T* p, V v, int n, bool stream) {
    if (n == key_lanes<T>::L) store_vector(p, v, stream);
    else store_part(p, v, n);
}

// The tie/NaN rule of kp_takes_max_select, L lanes at once.
template <typename V>
inline auto takes_max(V v, V best) {
    return (v >= best) | (v != v);
}

// Positions of a line visited tile by tile in scan order: tile k covers [k·L, min(k·L + L, length)).
struct tiles {
    kp_index length;
    int L;
    bool reverse;
    kp_index count() const { return (length + L - 1) / L; }
    kp_index start(kp_index i) const { return (reverse ? count() - 1 - i : i) * L; }
    int size(kp_index p0) const { return length - p0 < L ? (int)(length - p0) : L; }
};

// Positions of an H-scan are rows of the plane, each a separate short stream for the hardware prefetchers,
// which fall behind (most of all scanning upwards). While a plane is scanned, the column loops prefetch the
// next plane in memory (the next one of the thread, or the first of the next thread), one row per step in
// address order whatever the scan direction, to L2 and below: a plane ahead is 64 KiB at 128×128 float32,
// and the rows of the plane being scanned are in cache when reached. (Against prefetching the row 8 positions
// on in scan order, on Zen 4 at 32 MiB tensors: the backward 15-20% faster, the forward the same within noise.)
template <typename T>
inline void prefetch_row(const T* row, kp_index count, int write) {
    for (kp_index b = 0; b < count; b += 64 / (kp_index)sizeof(T)) {
        if (write) __builtin_prefetch(row + b, 1, 1);
        else __builtin_prefetch(row + b, 0, 1);
    }
}

// Per-thread scratch that outlives a call (the emulator runs a launch's threads one after another).
template <typename V>
inline V* scratch(std::vector<V>& buffer, kp_index n) {
    if ((kp_index)buffer.size() < n) buffer.resize(n);
    return buffer.data();
}

// The gradient of L lanes as G. Pass 1 of the backward records per lane either the total of the run that
// a new maximum closes (rounded to G once) or NOT_MAXIMUM, a signaling NaN of G: no rounded sum is one
// (arithmetic and conversion only make quiet NaNs). Pass 2 turns the records back into gradients.
template <typename K, typename G>
struct grad;

// G is the key type: float (rounded once from the float64 sums) or double.
template <typename K>
struct grad<K, K> {
    typedef lanes<K> ln;
    typedef typename ln::vk gv;
    static gv close(typename ln::mk takes, const vd8* sum) {
        return takes ? ln::from_double(sum) : (gv)(typename ln::uk{} + ln::NOT_MAXIMUM);
    }
    static gv hand_back(gv closed, gv& total) {
        typename ln::mk starts = (typename ln::mk)((typename ln::uk)closed != ln::NOT_MAXIMUM);
        gv value = starts ? total : gv{};
        total = starts ? closed : total;
        return value;
    }
    static void store(K* p, gv v, int n, bool stream) { store_lanes(p, v, n, stream); }
    static void store_tile(K* base, kp_index line_stride, int lines, kp_index p0, int np, gv* tile, kp_index ahead,
                           bool stream) {
        store_rows(base, line_stride, lines, p0, np, tile, ahead, stream);
    }
};

// 16-bit storage: float keys, float64 gradients (the launch layer rounds them); tiles stored per element.
template <>
struct grad<float, double> {
    typedef lanes<float> ln;
    typedef grad<double, double> eight;  // each half of the 16 lanes
    struct gv { vd8 h[2]; };
    static gv close(ln::mk takes, const vd8* sum) {
        gv r;
        for (int h = 0; h < 2; ++h) r.h[h] = eight::close((lanes<double>::mk)ln::to_double_mask(takes, h), sum + h);
        return r;
    }
    static gv hand_back(const gv& closed, gv& total) {
        gv value;
        for (int h = 0; h < 2; ++h) value.h[h] = eight::hand_back(closed.h[h], total.h[h]);
        return value;
    }
    static void store(double* p, const gv& v, int n, bool stream) {
        if (n < ln::L) {
            std::memcpy(p, v.h, n * sizeof(double));
            return;
        }
        for (int h = 0; h < 2; ++h) store_vector(p + 8 * h, v.h[h], stream);
    }
    static void store_tile(double* base, kp_index line_stride, int lines, kp_index p0, int np, gv* tile, kp_index,
                           bool) {
        for (int j = 0; j < np; ++j)
            for (int r = 0; r < lines; ++r) base[r * line_stride + p0 + j] = tile[j].h[r / 8][r % 8];
    }
};

// Running max forward (kpnet/ops/pooling.py rules) of `count` adjacent columns whose positions are `step`
// apart: row by row in scan order, every column vector's maximum moves; the plane next_plane elements on is
// prefetched. (The row and column loops here and in
// backward_columns are written out: shared as lambdas, they measured 20-30% slower with g++ 12.)
template <typename T>
inline void forward_plane(const T* x, T* out, kp_index count, kp_index length, kp_index step, bool reverse,
                          typename key_lanes<T>::vk lowest, kp_index next_plane, bool stream) {
    typedef typename key_lanes<T>::vk vk;
    constexpr int L = key_lanes<T>::L;
    static thread_local std::vector<vk> best_buffer;
    const int nv = (int)((count + L - 1) / L);
    vk* best = scratch(best_buffer, nv);
    for (int c = 0; c < nv; ++c) best[c] = lowest;
    for (kp_index i = 0; i < length; ++i) {
        kp_index p = (reverse ? length - 1 - i : i) * step;
        prefetch_row(x + next_plane + i * step, count, 0);
        if (!stream) prefetch_row(out + next_plane + i * step, count, 1);
        for (int c = 0; c < nv; ++c) {
            int n = count - c * L < L ? (int)(count - c * L) : L;
            vk v = load_lanes(x + p + c * L, n, lowest);
            best[c] = takes_max(v, best[c]) ? v : best[c];
            store_lanes(out + p + c * L, best[c], n, stream);
        }
    }
}

// forward_plane over `planes` planes, plane_size elements apart.
template <typename T>
inline void forward_columns(const T* x, T* out, kp_index planes, kp_index plane_size, kp_index count,
                            kp_index length, kp_index step, bool reverse, typename key_lanes<T>::vk lowest,
                            bool stream) {
    for (kp_index q = 0; q < planes; ++q)
        forward_plane(x + q * plane_size, out + q * plane_size, count, length, step, reverse, lowest, plane_size,
                      stream);
}

// Pass 1 of the backward for one lane vector (kpnet/ops/pooling.py gradient rule), in scan order: move the
// lanes' maximum, record what a new maximum closes (grad<K, G>), restart its lane's float64 sum.
template <typename T, typename G>
struct backward_lanes {
    typedef key_lanes<T> ln;
    typedef typename ln::vk vk;
    typedef typename ln::mk mk;
    typedef grad<typename storage<T>::key, G> gr;
    typedef typename gr::gv gv;
    static constexpr int H = ln::H;

    static void scan(vk x, vk g, vk& best, vd8* sum, gv& closed) {
        mk takes = (mk)takes_max(x, best);
        best = takes ? x : best;
        closed = gr::close(takes, sum);
        vd8 gd[H];
        ln::to_doubles(g, gd);
        for (int h = 0; h < H; ++h)  // 0.0 + g at a restart, as the reference (+0.0 is all bits clear)
            sum[h] = (vd8)((ud8)sum[h] & ~(ud8)ln::to_double_mask(takes, h)) + gd[h];
    }
};

// Running max backward of `planes` planes (plane_size elements apart), each of `count` adjacent columns whose
// positions are `step` apart. Per plane, pass 1 runs in scan order over the rows and pass 2 against it, each
// gradient total handed to the maximum that starts its run; pass 1 of plane q runs row by row together with
// pass 2 of plane q - 1, so one plane's gradients stream out while the next plane's inputs stream in (22%
// faster at 32 MiB tensors than one plane after the other).
template <typename T, typename G>
inline void backward_columns(const T* x, const T* grad_out, G* grad_in, kp_index planes, kp_index plane_size,
                             kp_index count, kp_index length, kp_index step, bool reverse,
                             typename key_lanes<T>::vk lowest, bool stream) {
    typedef backward_lanes<T, G> bl;
    typedef typename bl::vk vk;
    typedef typename bl::gv gv;
    constexpr int L = key_lanes<T>::L, H = bl::H;
    static thread_local std::vector<vk> best_buffer;
    static thread_local std::vector<vd8> sum_buffer;
    static thread_local std::vector<gv> record_buffer;
    const int nv = (int)((count + L - 1) / L);
    const kp_index records = (length + 1) * nv;  // a plane's records by (scan index, vector), then its totals
    vk* best = scratch(best_buffer, nv);
    vd8* sum = scratch(sum_buffer, nv * H);
    gv* record = scratch(record_buffer, 2 * records);
    for (kp_index q = 0; q <= planes; ++q) {
        const bool scans = q < planes, hands_back = q > 0;
        const T* xq = x + q * plane_size;
        const T* gq = grad_out + q * plane_size;
        G* out = hands_back ? grad_in + (q - 1) * plane_size : grad_in;
        gv* closed = record + (q & 1) * records;            // plane q, pass 1
        gv* closed_before = record + ((q + 1) & 1) * records;  // plane q - 1, pass 2
        gv* total = closed_before + length * nv;            // the total of the run holding the current position
        for (int c = 0; scans && c < nv; ++c) best[c] = lowest;
        for (int c = 0; scans && c < nv * H; ++c) sum[c] = vd8{};
        for (kp_index i = 0; i < length; ++i) {
            // the next step's planes, a row at a time: inputs of plane q + 1, gradients of plane q
            prefetch_row(xq + plane_size + i * step, count, 0);
            prefetch_row(gq + plane_size + i * step, count, 0);
            if (!stream) prefetch_row(grad_in + q * plane_size + i * step, count, 1);
            if (scans) {
                kp_index p = (reverse ? length - 1 - i : i) * step;
                for (int c = 0; c < nv; ++c) {
                    int n = count - c * L < L ? (int)(count - c * L) : L;
                    bl::scan(load_lanes(xq + p + c * L, n, lowest), load_lanes(gq + p + c * L, n, vk{}), best[c],
                             sum + c * H, closed[i * nv + c]);
                }
            }
            if (hands_back) {
                kp_index j = length - 1 - i, p = (reverse ? i : j) * step;
                for (int c = 0; c < nv; ++c) {
                    int n = count - c * L < L ? (int)(count - c * L) : L;
                    bl::gr::store(out + p + c * L, bl::gr::hand_back(closed_before[j * nv + c], total[c]), n, stream);
                }
            }
        }
        for (int c = 0; scans && c < nv; ++c) closed[length * nv + c] = bl::gr::close(~typename bl::mk{}, sum + c * H);
    }
}

// Steps of a tile in scan order: f(j) for j = 0 .. np - 1, or downwards with REVERSE; whole tiles (np = L,
// a constant once inlined) are unrolled, so the tile's vectors stay in registers (with a runtime tile size
// they went through the stack: the backward 1.5× slower with its data in L1, on Zen 4).
template <bool REVERSE, int L, typename F>
__attribute__((always_inline)) inline void tile_steps(int np, F&& f) {
    if (np == L) {
#pragma GCC unroll 16
        for (int jj = 0; jj < L; ++jj) f(REVERSE ? L - 1 - jj : jj);
    } else {
        for (int jj = 0; jj < np; ++jj) f(REVERSE ? np - 1 - jj : jj);
    }
}

// Lane i of the result is lane i - S of v (scanning up, i >= S) or lane i + S (scanning down, i + S < L), the
// other lanes `fill`.
template <bool DOWN, int S, int L, int... I>
constexpr auto shifted_lanes(std::integer_sequence<int, I...>) {
    if constexpr (DOWN) return std::integer_sequence<int, (I + S < L ? I + S : L)...>{};
    else return std::integer_sequence<int, (I >= S ? L + I - S : 0)...>{};
}

template <int LANE, int... I>
constexpr auto one_lane(std::integer_sequence<int, I...>) {
    return std::integer_sequence<int, (I * 0 + LANE)...>{};
}

template <bool DOWN, int S, typename V>
inline V shift_lanes(V v, V fill) {
    constexpr int L = sizeof(V) / sizeof(v[0]);
    constexpr auto lanes = shifted_lanes<DOWN, S, L>(std::make_integer_sequence<int, L>{});
    if constexpr (DOWN) return pick(v, fill, lanes);
    else return pick(fill, v, lanes);
}

// The running max of NaN-free keys: the later one unless the earlier is larger (among equal maxima the later
// wins, -0.0 and +0.0 included: the tie rule), one vmaxps. The rule is associative, so log-step doubling
// inside a vector gives what a scan gives.
template <typename V>
inline V later_max(V earlier, V later) {
    return earlier > later ? earlier : later;
}

// One L-position piece (np of them real, the rest `lowest`: a whole piece when WHOLE) of R rows at p0: the
// running max inside the vector by log-step doubling, then against the row so far (carry); prefetches the
// piece-th cache line of the next R rows.
template <bool REVERSE, bool WHOLE, int R, typename T, typename V, typename M>
__attribute__((always_inline)) inline void forward_piece(const T* x, T* out, kp_index line_stride, kp_index p0,
                                                         int np, kp_index piece, V lowest, V* carry, M& nan,
                                                         bool stream) {
    constexpr int L = key_lanes<T>::L, PER_LINE = 64 / (int)sizeof(T);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        kp_index e = R * line_stride + (piece * R + r) * PER_LINE;
        __builtin_prefetch(x + e, 0, 3);
        if (!stream) __builtin_prefetch(out + e, 1, 3);
        const T* row = x + r * line_stride + p0;
        V v = WHOLE ? storage<T>::load(row) : load_part(row, np, lowest);
        nan |= (M)(v != v);
        v = later_max(shift_lanes<REVERSE, 1>(v, lowest), v);  // shifts in increasing order: lane i then
        v = later_max(shift_lanes<REVERSE, 2>(v, lowest), v);  // holds its 2, 4, 8, 16 latest positions, the
        v = later_max(shift_lanes<REVERSE, 4>(v, lowest), v);  // earlier half always the shifted one
        if constexpr (L == 16) v = later_max(shift_lanes<REVERSE, 8>(v, lowest), v);
        v = later_max(carry[r], v);
        if (WHOLE) store_vector(out + r * line_stride + p0, v, stream);
        else store_part(out + r * line_stride + p0, v, np);
        carry[r] = pick(v, v, one_lane<REVERSE ? 0 : L - 1>(std::make_integer_sequence<int, L>{}));
    }
}

// Running max forward of R rows (positions contiguous) without transposes, piece by piece in scan order
// (forward_piece). The R rows interleave (their carries are independent chains); the loads prefetch the next
// R rows (one region of a contiguous tensor) into L1 in address order, a cache line per piece and row. Returns
// whether a row holds a NaN, which later_max does not order. (Against 16×16 tiles transposed in registers, on
// Zen 4, float32: 1.5-1.6× faster with the data in L2 and at 8 MiB tensors, 1.1-1.6× at 32 MiB.)
template <bool REVERSE, int R, typename T>
inline bool forward_prefix_rows(const T* x, T* out, kp_index length, kp_index line_stride,
                                typename key_lanes<T>::vk lowest, bool stream) {
    typedef typename key_lanes<T>::vk vk;
    typedef typename key_lanes<T>::mk mk;
    constexpr int L = key_lanes<T>::L;
    const kp_index whole = length / L;  // (walking `tiles` with a branch per piece measured 10-50% slower)
    const int rest = (int)(length - whole * L);
    vk carry[R];
    mk nan = mk{};
    for (int r = 0; r < R; ++r) carry[r] = lowest;
    if (REVERSE && rest)  // the ragged high end comes first
        forward_piece<REVERSE, false, R>(x, out, line_stride, whole * L, rest, 0, lowest, carry, nan, stream);
    for (kp_index k = 0; k < whole; ++k)
        forward_piece<REVERSE, true, R>(x, out, line_stride, (REVERSE ? whole - 1 - k : k) * L, L,
                                        k + (REVERSE && rest), lowest, carry, nan, stream);
    if (!REVERSE && rest)
        forward_piece<REVERSE, false, R>(x, out, line_stride, whole * L, rest, whole, lowest, carry, nan, stream);
    for (int i = 0; i < L; ++i)
        if (nan[i]) return true;
    return false;
}

// Running max forward of `count` rows (positions contiguous), 8 rows at a time (forward_prefix_rows); a block
// of rows holding a NaN is redone row by row by redo(row), the per-line kernel code (pooling.cu), after its
// streamed stores (if any) are fenced.
template <bool REVERSE, typename T, typename F>
inline void forward_rows(const T* x, T* out, kp_index count, kp_index length, kp_index line_stride,
                         typename key_lanes<T>::vk lowest, bool stream, F&& redo) {
    constexpr int R = 8;
    for (kp_index l = 0; l < count; l += R) {
        int rows = count - l < R ? (int)(count - l) : R;
        const T* xb = x + l * line_stride;
        T* ob = out + l * line_stride;
        bool nan = false;
        if (rows == R) nan = forward_prefix_rows<REVERSE, R>(xb, ob, length, line_stride, lowest, stream);
        else  // a last block of fewer rows: one row at a time
            for (int r = 0; r < rows; ++r)
                nan |= forward_prefix_rows<REVERSE, 1>(xb + r * line_stride, ob + r * line_stride, length,
                                                       line_stride, lowest, stream);
        if (nan && stream) stream_fence();
        if (nan)
            for (int r = 0; r < rows; ++r) redo(l + r);
    }
}

// Running max backward of `count` rows (positions contiguous), L rows at a time through transposed tiles.
// (Interleaving two blocks of L rows measured slower: more rows in flight, more cache lines per tile.)
template <bool REVERSE, typename T, typename G>
inline void backward_rows(const T* x, const T* grad_out, G* grad_in, kp_index count, kp_index length,
                          kp_index line_stride, typename key_lanes<T>::vk lowest, bool stream) {
    typedef backward_lanes<T, G> bl;
    typedef typename bl::vk vk;
    typedef typename bl::gv gv;
    constexpr int L = key_lanes<T>::L, H = bl::H;
    static thread_local std::vector<gv> closed_buffer;
    gv* closed = scratch(closed_buffer, length);
    tiles order{length, L, REVERSE};
    for (kp_index l = 0; l < count; l += L) {
        int lines = count - l < L ? (int)(count - l) : L;
        kp_index offset = l * line_stride;
        vk xt[L], gt[L], best = lowest;
        vd8 sum[H] = {};
        for (kp_index k = 0; k < order.count(); ++k) {
            kp_index p0 = order.start(k);
            int np = order.size(p0);
            gv* at = closed + (REVERSE ? length - p0 - np : p0);  // records by scan index
            load_rows(x + offset, line_stride, lines, p0, np, lowest, xt, k);
            load_rows(grad_out + offset, line_stride, lines, p0, np, vk{}, gt, k);
            tile_steps<REVERSE, L>(np, [&](int j) { bl::scan(xt[j], gt[j], best, sum, at[REVERSE ? np - 1 - j : j]); });
        }
        gv total = bl::gr::close(~typename bl::mk{}, sum), value[L];  // the total of the current position's run
        for (kp_index k = order.count() - 1; k >= 0; --k) {
            kp_index p0 = order.start(k);
            int np = order.size(p0);
            gv* at = closed + (REVERSE ? length - p0 - np : p0);
            tile_steps<!REVERSE, L>(np, [&](int j) { value[j] = bl::gr::hand_back(at[REVERSE ? np - 1 - j : j], total); });
            bl::gr::store_tile(grad_in + offset, line_stride, lines, p0, np, value, order.count() - 1 - k, stream);
        }
    }
}

}  // namespace kp_cpu
