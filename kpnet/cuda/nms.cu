// Per-class soft-NMS with the optional weighted box merge (REFERENCE §4.5; semantics in
// kpnet/ops/nms.py). One thread per class: soft-NMS is sequential within a class and independent
// across classes. Boxes arrive grouped by class; class k owns rows [seg[k], seg[k+1]).
#include "kpnet_types.cuh"

extern "C" __global__ void soft_nms_f32(
    const float* boxes, float* scores, const float* tl_scores, const float* br_scores,
    const kp_index* seg, unsigned char* active, kp_index* kept, kp_index* n_kept, float* merged,
    int n_classes, int method, float sigma, float iou_threshold, float score_threshold, float one,
    float weight_exp, int merge) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_classes) return;
    kp_index lo = seg[k], hi = seg[k + 1], count = 0;
    for (kp_index j = lo; j < hi; ++j) active[j] = 1;
    for (;;) {
        kp_index i = -1;
        for (kp_index j = lo; j < hi; ++j)
            if (active[j] && (i < 0 || scores[j] > scores[i])) i = j;
        if (i < 0) break;
        kept[lo + count] = i;
        ++count;
        active[i] = 0;
        float tx1 = boxes[4 * i], ty1 = boxes[4 * i + 1], tx2 = boxes[4 * i + 2], ty2 = boxes[4 * i + 3];
        float area_i = (tx2 - tx1 + one) * (ty2 - ty1 + one);
        float mx1 = 0.0f, my1 = 0.0f, mx2 = 0.0f, my2 = 0.0f, mt = 0.0f, mb = 0.0f;
        if (merge) {
            mx1 = tx1 * tl_scores[i];
            my1 = ty1 * tl_scores[i];
            mx2 = tx2 * br_scores[i];
            my2 = ty2 * br_scores[i];
            mt = tl_scores[i];
            mb = br_scores[i];
        }
        for (kp_index j = lo; j < hi; ++j) {
            if (!active[j]) continue;
            float x1 = boxes[4 * j], y1 = boxes[4 * j + 1], x2 = boxes[4 * j + 2], y2 = boxes[4 * j + 3];
            float iw = (tx2 < x2 ? tx2 : x2) - (tx1 > x1 ? tx1 : x1) + one;
            float ih = (ty2 < y2 ? ty2 : y2) - (ty1 > y1 ? ty1 : y1) + one;
            if (!(iw > 0.0f && ih > 0.0f)) continue;
            float area_j = (x2 - x1 + one) * (y2 - y1 + one);
            float inter = iw * ih;
            float iou = inter / (area_i + area_j - inter);
            float w;
            if (method == 2) w = kp_exp(-(iou * iou) / sigma);
            else if (method == 1) w = iou > iou_threshold ? 1.0f - iou : 1.0f;
            else w = iou > iou_threshold ? 0.0f : 1.0f;
            if (merge) {
                float mw = kp_pow(1.0f - w, weight_exp);
                float tw = tl_scores[j] * mw, bw = br_scores[j] * mw;
                mx1 = mx1 + x1 * tl_scores[j] * mw;
                my1 = my1 + y1 * tl_scores[j] * mw;
                mx2 = mx2 + x2 * br_scores[j] * mw;
                my2 = my2 + y2 * br_scores[j] * mw;
                mt = mt + tw;
                mb = mb + bw;
            }
            scores[j] = w * scores[j];
            if (scores[j] < score_threshold) active[j] = 0;
        }
        if (merge) {
            merged[4 * i] = mx1 / mt;
            merged[4 * i + 1] = my1 / mt;
            merged[4 * i + 2] = mx2 / mb;
            merged[4 * i + 3] = my2 / mb;
        } else {
            merged[4 * i] = tx1;
            merged[4 * i + 1] = ty1;
            merged[4 * i + 2] = tx2;
            merged[4 * i + 3] = ty2;
        }
    }
    n_kept[k] = count;
}
