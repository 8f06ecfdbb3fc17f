// Heatmap peaks (max-pool NMS, REFERENCE §4.1 step 2) and corner-pair scoring (REFERENCE §4.1, §4.4).
// One thread per block of heatmap rows; one thread per (image, tl, br) pair. Every test is a keep
// condition, so a NaN operand rejects (kpnet/ops/decoding.py). Compiled without FMA contraction, and exp
// is kpnet's (kpnet_types.cuh), so each float operation rounds exactly as the PyTorch reference's.
#include "kpnet_types.cuh"

// Heatmap peaks fused with candidate collection. A position's score is its heat when that is >= every
// value in its kernel×kernel window (positions outside the map ignored; a NaN anywhere in the window
// fails the test), else 0 — the masked map of max-pool NMS. Each thread owns `rows` whole rows of one
// map (the launch layer picks rows = 1 on the GPU, the whole map on the CPU) and keeps the top `cap`
// of its positions, score descending, ties by smaller flat index, in its own slots of cand_score /
// cand_index (cap = min(K, rows·width), so every slot fills). The window test runs only for positions
// that could still enter the list. The global top-K is the top-K of the union of these lists, and a
// list's slots are ordered as that rule orders them, so the launch layer's stable top-K over the
// candidates in slot order is the top-K of the whole masked map.
// 32-bit position arithmetic: the launch layer only sends heatmaps with fewer than 2^31 elements.
template <typename T>
__device__ __forceinline__ void peak_candidates(const T* __restrict__ heat, T* __restrict__ cand_score,
                                                kp_index* __restrict__ cand_index, int n_maps, int height,
                                                int width, int radius, int rows, int cap) {
    kp_index t = (kp_index)blockIdx.x * blockDim.x + threadIdx.x;
    int blocks = height / rows;
    if (t >= (kp_index)n_maps * blocks) return;
    int map = (int)(t / blocks);
    int y_begin = (int)(t % blocks) * rows;
    const T* plane = heat + (kp_index)map * height * width;
    T* score_slot = cand_score + t * cap;
    kp_index* index_slot = cand_index + t * cap;
    int filled = 0;
    for (int y = y_begin; y < y_begin + rows; ++y) {
        int y0 = y - radius < 0 ? 0 : y - radius, y1 = y + radius >= height ? height - 1 : y + radius;
        for (int x = 0; x < width; ++x) {
            T v = plane[y * width + x];
            if (filled == cap && !(v > score_slot[cap - 1]) && !((T)0 > score_slot[cap - 1])) continue;
            int x0 = x - radius < 0 ? 0 : x - radius, x1 = x + radius >= width ? width - 1 : x + radius;
            bool peak = true;
            for (int yy = y0; yy <= y1 && peak; ++yy) {
                for (int xx = x0; xx <= x1; ++xx) {
                    if (!(plane[yy * width + xx] <= v)) { peak = false; break; }
                }
            }
            T s = peak ? v : (T)0;
            if (filled == cap && !(s > score_slot[cap - 1])) continue;
            // Insert after every entry scoring >= s (those have smaller indices: ties keep scan order).
            int at = filled < cap ? filled : cap - 1;
            while (at > 0 && score_slot[at - 1] < s) {
                score_slot[at] = score_slot[at - 1];
                index_slot[at] = index_slot[at - 1];
                --at;
            }
            score_slot[at] = s;
            index_slot[at] = (kp_index)map * height * width + y * width + x;
            if (filled < cap) ++filled;
        }
    }
}

extern "C" __global__ void peak_candidates_f32(const float* heat, float* cand_score, kp_index* cand_index,
                                               int n_maps, int height, int width, int radius, int rows, int cap) {
    peak_candidates<float>(heat, cand_score, cand_index, n_maps, height, width, radius, rows, cap);
}

extern "C" __global__ void peak_candidates_f64(const double* heat, double* cand_score, kp_index* cand_index,
                                               int n_maps, int height, int width, int radius, int rows, int cap) {
    peak_candidates<double>(heat, cand_score, cand_index, n_maps, height, width, radius, rows, cap);
}

// Modes: 0 = associative embedding (CornerNet), 1 = centripetal (CentripetalNet). One score per pair.
extern "C" __global__ void pair_scores_f32(
    const float* tl_s, const int* tl_c, const float* tl_x, const float* tl_y,
    const float* br_s, const int* br_c, const float* br_x, const float* br_y,
    const float* tl_e, const float* br_e,
    const float* tl_cx, const float* tl_cy, const float* br_cx, const float* br_cy,
    float* pair,
    int batch, int k_tl, int k_br, int mode, int allow_zero_size, int centripetal_weighting,
    float ae_threshold, float mu_area, float mu_small, float mu_large) {
    kp_index t = (kp_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (kp_index)batch * k_tl * k_br) return;
    int j = (int)(t % k_br);
    int i = (int)((t / k_br) % k_tl);
    int b = (int)(t / ((kp_index)k_tl * k_br));
    int a = b * k_tl + i, c = b * k_br + j;
    float x1 = tl_x[a], y1 = tl_y[a], x2 = br_x[c], y2 = br_y[c];
    float score = (tl_s[a] + br_s[c]) / 2.0f;
    bool keep = allow_zero_size ? (x2 >= x1 && y2 >= y1) : (x2 > x1 && y2 > y1);
    keep = keep && tl_c[a] == br_c[c];
    if (mode == 0) {
        float d = tl_e[a] - br_e[c];
        keep = keep && (d < 0.0f ? -d : d) <= ae_threshold;
    } else {
        float w = x2 - x1, h = y2 - y1;
        float area = w * h;
        float mu = (area < 0.0f ? -area : area) <= mu_area ? mu_small : mu_large;
        float cx = (x1 + x2) / 2.0f, cy = (y1 + y2) / 2.0f;
        float rx1 = cx - mu * w / 2.0f, rx2 = cx + mu * w / 2.0f;
        float ry1 = cy - mu * h / 2.0f, ry2 = cy + mu * h / 2.0f;
        float tcx = tl_cx[a], tcy = tl_cy[a], bcx = br_cx[c], bcy = br_cy[c];
        keep = keep && tcx > rx1 && tcx < rx2 && bcx > rx1 && bcx < rx2;
        keep = keep && tcy > ry1 && tcy < ry2 && bcy > ry1 && bcy < ry2;
        if (centripetal_weighting) {
            float dx = tcx - bcx, dy = tcy - bcy;
            dx = dx < 0.0f ? -dx : dx;
            dy = dy < 0.0f ? -dy : dy;
            score = score * kp_exp(-(dx * dy) / ((rx2 - rx1) * (ry2 - ry1)));
        }
    }
    pair[t] = keep ? score : -1.0f;
}
