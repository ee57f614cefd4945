/* ---- paged attention for few queries ------------------------------------------------------------
 * out[b, i, h] = softmax_j(scale * q[b, i, h] . K[j]) @ V over the keys j < L of row b that the mask
 * lets query i see, where K[j] = k_cache[kv_index[b, j], h / (H / Hkv)] (grouped-query heads).
 * One task per (row, query, head): gather the visible scores, exponentiate 8 at a time, then sum
 * the values. SDPA's CPU kernel spends most of its time on set-up at these sizes, and the keys are
 * read straight from the cache (no gathered copy). */

#include "common.h"

/* q . k for 8 keys at once (D a multiple of 8): 8 running sums, then one transposing reduction. */
static inline __m256 dot8(const float* q, const float* k_cache, const int64_t* slot, int64_t D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    const float *k0 = k_cache + slot[0], *k1 = k_cache + slot[1], *k2 = k_cache + slot[2], *k3 = k_cache + slot[3];
    const float *k4 = k_cache + slot[4], *k5 = k_cache + slot[5], *k6 = k_cache + slot[6], *k7 = k_cache + slot[7];
    for (int64_t d = 0; d < D; d += 8) {
        __m256 x = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + d), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k1 + d), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k2 + d), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k3 + d), a3);
        a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k4 + d), a4);
        a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k5 + d), a5);
        a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k6 + d), a6);
        a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k7 + d), a7);
    }
    __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

static inline float dot(const float* a, const float* b, int64_t D) {
    __m256 s = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s);
    float t[8];
    _mm256_storeu_ps(t, s);
    float r = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
    for (; d < D; d++) r += a[d] * b[d];
    return r;
}

void fl_paged_attention(const float* q, int64_t B, int64_t n, int64_t H, int64_t D, const float* k_cache,
                        const float* v_cache, int64_t Hkv, const int64_t* kv_index, int64_t L,
                        const uint8_t* mask, float scale, float* out, int threads) {
    int64_t group = H / Hkv, tasks = B * n * H;
#pragma omp parallel num_threads(threads)
    {
        float* score = malloc(sizeof(float) * (L + 8));
        int64_t* slot = malloc(sizeof(int64_t) * (L + 8));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t h = t % H, bi = t / H, b = bi / n;  /* bi = b * n + i */
            const float* qv = q + t * D;
            const int64_t* index = kv_index + b * L;
            const uint8_t* visible = mask ? mask + bi * L : 0;
            int64_t off = h / group * D, count = 0;
            float top = -INFINITY;
            for (int64_t j = 0; j < L; j++)
                if (!visible || visible[j]) slot[count++] = index[j] * Hkv * D + off;
            int64_t c = 0;
            if (D % 8 == 0) {
                __m256 top8 = _mm256_set1_ps(-INFINITY), sc = _mm256_set1_ps(scale);
                for (; c + 8 <= count; c += 8) {
                    __m256 s8 = _mm256_mul_ps(dot8(qv, k_cache, slot + c, D), sc);
                    _mm256_storeu_ps(score + c, s8);
                    top8 = _mm256_max_ps(top8, s8);
                }
                float t8[8];
                _mm256_storeu_ps(t8, top8);
                for (int k = 0; k < 8; k++) top = t8[k] > top ? t8[k] : top;
            }
            for (; c < count; c++) {
                score[c] = dot(qv, k_cache + slot[c], D) * scale;
                if (score[c] > top) top = score[c];
            }
            __m256 sum8 = _mm256_setzero_ps();
            for (c = 0; c + 8 <= count; c += 8) {
                __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(score + c), _mm256_set1_ps(top)));
                _mm256_storeu_ps(score + c, p);
                sum8 = _mm256_add_ps(sum8, p);
            }
            float sum = 0.0f;
            for (; c < count; c++) sum += (score[c] = expf(score[c] - top));
            float t8[8];
            _mm256_storeu_ps(t8, sum8);
            for (int k = 0; k < 8; k++) sum += t8[k];
            float* o = out + t * D;
            int64_t d = 0;
            for (; d + 32 <= D; d += 32) {  /* 32 dims at a time stay in registers across the keys */
                __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
                for (c = 0; c < count; c++) {
                    const float* v = v_cache + slot[c] + d;
                    __m256 p = _mm256_broadcast_ss(score + c);
                    o0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v), o0);
                    o1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8), o1);
                    o2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 16), o2);
                    o3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 24), o3);
                }
                _mm256_storeu_ps(o + d, o0);
                _mm256_storeu_ps(o + d + 8, o1);
                _mm256_storeu_ps(o + d + 16, o2);
                _mm256_storeu_ps(o + d + 24, o3);
            }
            for (; d < D; d++) {
                float acc = 0.0f;
                for (c = 0; c < count; c++) acc += score[c] * v_cache[slot[c] + d];
                o[d] = acc;
            }
            float inv = count ? 1.0f / sum : 0.0f;
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
        }
        free(slot);
        free(score);
    }
}
