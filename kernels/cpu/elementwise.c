/* ---- the elementwise steps between a decoder layer's matmuls ---------------------------------------
 * A decode step runs them once per layer on a few rows, where PyTorch's per-op set-up (~5-30 us
 * an op, several ops a step) costs more than the arithmetic; each is one call here. */

#include "common.h"


/* RMSNorm, after a residual add when `delta` is given: sum = x (+ delta) into `sum` (may be x),
 * out = sum / sqrt(mean(sum^2) + eps) * weight. Rows of K floats. */
void fl_rms_norm(const float* x, const float* delta, const float* weight, float eps, int64_t M, int64_t K, float* sum,
                 float* out) {
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        float* s = sum + m * K;
        __m256 sq = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 v = _mm256_loadu_ps(xr + k);
            if (delta) v = _mm256_add_ps(v, _mm256_loadu_ps(delta + m * K + k));
            _mm256_storeu_ps(s + k, v);
            sq = _mm256_fmadd_ps(v, v, sq);
        }
        float ss = hsum8(sq);
        for (; k < K; k++) {
            float v = xr[k] + (delta ? delta[m * K + k] : 0.0f);
            s[k] = v;
            ss += v * v;
        }
        float inv = 1.0f / sqrtf(ss / (float)K + eps);
        __m256 iv = _mm256_set1_ps(inv);
        for (k = 0; k + 8 <= K; k += 8)
            _mm256_storeu_ps(out + m * K + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(s + k), iv), _mm256_loadu_ps(weight + k)));
        for (; k < K; k++) out[m * K + k] = s[k] * inv * weight[k];
    }
}

/* Rotary embedding in place on the first `heads` heads of each of T rows (a row: `stride` floats,
 * a head: D, D even): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the halves, cos and sin
 * [T, D] (transformers' rotate_half convention). */
void fl_rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t stride, const float* cos, const float* sin) {
    int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < heads; h++) {
            float* x1 = x + t * stride + h * D;
            float* x2 = x1 + half;
            int64_t i = 0;
            for (; i + 8 <= half; i += 8) {
                __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
                _mm256_storeu_ps(x1 + i, _mm256_sub_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + i)), _mm256_mul_ps(b, _mm256_loadu_ps(s + i))));
                _mm256_storeu_ps(x2 + i, _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + half + i)),
                                                       _mm256_mul_ps(a, _mm256_loadu_ps(s + half + i))));
            }
            for (; i < half; i++) {
                float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[half + i] + a * s[half + i];
            }
        }
    }
}

/* SwiGLU's gate: out[m, i] = silu(gu[m, i]) * gu[m, I + i], gu rows [gate | up] of 2 I floats. */
void fl_silu_mul(const float* gu, int64_t M, int64_t I, float* out) {
    const __m256 one = _mm256_set1_ps(1.0f), top = _mm256_set1_ps(88.0f);
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu + m * 2 * I, *u = g + I;
        float* o = out + m * I;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            __m256 x = _mm256_loadu_ps(g + i);
            __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), x), top)); /* e^-x */
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
        }
        for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* ---- the k largest values of each row ------------------------------------------------------------
 * values, indices [M, k]: row m's k largest entries, largest first; of equal values the lower index
 * first (as a stable sort would give them). One pass: 8 entries at a time are compared with the
 * k-th largest so far, and only those above it are inserted (few, after the first hundreds), so a
 * row of the default vocabulary (49,152) takes ~15 us against torch.topk's ~65. Entries must not
 * be NaN; k <= N. */
/* Insert (val, j) into v/ix, which hold `filled` entries in order (at most k kept). */
static inline void topk_insert(float* v, int64_t* ix, int64_t* filled, int64_t k, float val, int64_t j) {
    int64_t at = *filled < k ? *filled : k - 1;
    while (at > 0 && v[at - 1] < val) { /* strictly less: an equal earlier entry stays ahead */
        v[at] = v[at - 1];
        ix[at] = ix[at - 1];
        at--;
    }
    if (*filled < k) (*filled)++;
    v[at] = val;
    ix[at] = j;
}

void fl_topk(const float* x, int64_t M, int64_t N, int64_t k, float* values, int64_t* indices) {
    for (int64_t m = 0; m < M; m++) {
        const float* row = x + m * N;
        float* v = values + m * k;
        int64_t* ix = indices + m * k;
        int64_t filled = 0, j = 0;
        for (; j < N && filled < k; j++) topk_insert(v, ix, &filled, k, row[j], j);
        for (; j + 8 <= N; j += 8) {
            if (!_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + j), _mm256_set1_ps(v[k - 1]), _CMP_GT_OQ))) continue;
            for (int64_t b = j; b < j + 8; b++)
                if (row[b] > v[k - 1]) topk_insert(v, ix, &filled, k, row[b], b);
        }
        for (; j < N; j++)
            if (row[j] > v[k - 1]) topk_insert(v, ix, &filled, k, row[j], j);
    }
}


void fl_qk_prepare(float* qkv, int64_t T, int64_t H, int64_t Hkv, int64_t D, const fl_qk* qk, const float* cos,
                   const float* sin) {
    int64_t width = (H + 2 * Hkv) * D, qd = H * D, kv = Hkv * D;
    for (int64_t t = 0; t < T; t++) {
        float* row = qkv + t * width;
        if (qk->norm == 2) {
            fl_rms_norm(row, 0, qk->q_norm, qk->eps, 1, qd, row, row);
            fl_rms_norm(row + qd, 0, qk->k_norm, qk->eps, 1, kv, row + qd, row + qd);
        }
        if (qk->clipped) {
            float hi = qk->clip, lo = -qk->clip;
            for (int64_t i = 0; i < width; i++) row[i] = row[i] < lo ? lo : (row[i] > hi ? hi : row[i]);
        }
        if (qk->norm == 1) {
            fl_rms_norm(row, 0, qk->q_norm, qk->eps, H, D, row, row);
            fl_rms_norm(row + qd, 0, qk->k_norm, qk->eps, Hkv, D, row + qd, row + qd);
        }
    }
    fl_rope(qkv, T, H + Hkv, D, width, cos, sin);
}
