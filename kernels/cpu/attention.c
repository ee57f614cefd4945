/* ---- paged attention for few queries ------------------------------------------------------------
 * out[b, i, h] = softmax_j(scale * q[b, i, h] . K[j]) @ V over the keys j < L of row b that the mask
 * lets query i see, where K[j] = k_cache[kv_index[b, j], h / (H / Hkv)] (grouped-query heads).
 * One task per (row, query, head): gather the visible scores, exponentiate 8 at a time, then sum
 * the values. SDPA's CPU kernel spends most of its time on set-up at these sizes, and the keys are
 * read straight from the cache (no gathered copy). The cache holds float32, or 16-bit values
 * (float16, bfloat16) widened to float32 in registers as they are read: the arithmetic is the same
 * float32 arithmetic on the widened values. */

#include "common.h"

/* ---- the cache's element types ---- */

static inline float load1(const void* cache, int64_t off, int kind) {
    if (kind == FL_KV_F16) return _cvtsh_ss(((const uint16_t*)cache)[off]);
    if (kind == FL_KV_BF16) {
        uint32_t bits = (uint32_t)((const uint16_t*)cache)[off] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    return ((const float*)cache)[off];
}

/* float32 -> bfloat16 as torch rounds it (c10::BFloat16's round_to_nearest_even): NaN -> 0x7FC0. */
static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* Write count float32 values at `cache` (an element pointer) in the cache's type, rounded to nearest
 * even as torch's .to(float16 / bfloat16) rounds them, so that the one-call decoder's cache equals
 * the per-layer path's (which writes with index_copy_ after .to()) to the bit. */
void fl_kv_store(void* cache, int64_t kind, const float* x, int64_t count) {
    if (kind == FL_KV_F32) {
        memcpy(cache, x, sizeof(float) * count);
        return;
    }
    uint16_t* o = cache;
    int64_t i = 0;
    if (kind == FL_KV_F16) {
        for (; i + 8 <= count; i += 8)
            _mm_storeu_si128((__m128i*)(o + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < count; i++) o[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
        return;
    }
    for (; i < count; i++) o[i] = bf16_round(x[i]);
}

/* q . k for 8 keys at once (D a multiple of 8): 8 running sums, then one transposing reduction. */
static inline __m256 dot8(const float* q, const void* k_cache, const int64_t* slot, int64_t D, int kind) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t d = 0; d < D; d += 8) {
        __m256 x = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(x, load8(k_cache, slot[0] + d, kind), a0);
        a1 = _mm256_fmadd_ps(x, load8(k_cache, slot[1] + d, kind), a1);
        a2 = _mm256_fmadd_ps(x, load8(k_cache, slot[2] + d, kind), a2);
        a3 = _mm256_fmadd_ps(x, load8(k_cache, slot[3] + d, kind), a3);
        a4 = _mm256_fmadd_ps(x, load8(k_cache, slot[4] + d, kind), a4);
        a5 = _mm256_fmadd_ps(x, load8(k_cache, slot[5] + d, kind), a5);
        a6 = _mm256_fmadd_ps(x, load8(k_cache, slot[6] + d, kind), a6);
        a7 = _mm256_fmadd_ps(x, load8(k_cache, slot[7] + d, kind), a7);
    }
    __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

static inline float dot(const float* a, const void* k_cache, int64_t off, int64_t D, int kind) {
    __m256 s = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(k_cache, off + d, kind), s);
    float t[8];
    _mm256_storeu_ps(t, s);
    float r = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
    for (; d < D; d++) r += a[d] * load1(k_cache, off + d, kind);
    return r;
}

/* One (row, query, head) task: `slot` and `score` are the thread's scratch of L + 8 entries. */
static inline __attribute__((always_inline)) void attend_one(
    const float* qv, const void* k_cache, const void* v_cache, const int64_t* index, const uint8_t* visible, int64_t L,
    int64_t Hkv, int64_t D, int64_t off, float scale, float* o, int64_t* slot, float* score, int kind) {
    int64_t count = 0;
    float top = -INFINITY;
    for (int64_t j = 0; j < L; j++)
        if (!visible || visible[j]) slot[count++] = index[j] * Hkv * D + off;
    int64_t c = 0;
    if (D % 8 == 0) {
        __m256 top8 = _mm256_set1_ps(-INFINITY), sc = _mm256_set1_ps(scale);
        for (; c + 8 <= count; c += 8) {
            __m256 s8 = _mm256_mul_ps(dot8(qv, k_cache, slot + c, D, kind), sc);
            _mm256_storeu_ps(score + c, s8);
            top8 = _mm256_max_ps(top8, s8);
        }
        float t8[8];
        _mm256_storeu_ps(t8, top8);
        for (int k = 0; k < 8; k++) top = t8[k] > top ? t8[k] : top;
    }
    for (; c < count; c++) {
        score[c] = dot(qv, k_cache, slot[c], D, kind) * scale;
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
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {  /* 32 dims at a time stay in registers across the keys */
        __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        for (c = 0; c < count; c++) {
            int64_t v = slot[c] + d;
            __m256 p = _mm256_broadcast_ss(score + c);
            o0 = _mm256_fmadd_ps(p, load8(v_cache, v, kind), o0);
            o1 = _mm256_fmadd_ps(p, load8(v_cache, v + 8, kind), o1);
            o2 = _mm256_fmadd_ps(p, load8(v_cache, v + 16, kind), o2);
            o3 = _mm256_fmadd_ps(p, load8(v_cache, v + 24, kind), o3);
        }
        _mm256_storeu_ps(o + d, o0);
        _mm256_storeu_ps(o + d + 8, o1);
        _mm256_storeu_ps(o + d + 16, o2);
        _mm256_storeu_ps(o + d + 24, o3);
    }
    for (; d < D; d++) {
        float acc = 0.0f;
        for (c = 0; c < count; c++) acc += score[c] * load1(v_cache, slot[c] + d, kind);
        o[d] = acc;
    }
    float inv = count ? 1.0f / sum : 0.0f;
    for (int64_t d = 0; d < D; d++) o[d] *= inv;
}

void fl_paged_attention(const float* q, int64_t B, int64_t n, int64_t H, int64_t D, const void* k_cache,
                        const void* v_cache, int64_t kv_dtype, int64_t Hkv, const int64_t* kv_index, int64_t L,
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
            int64_t off = h / group * D;
            float* o = out + t * D;
            /* one specialisation per element type: the loads inside are the type's own */
            if (kv_dtype == FL_KV_F16)
                attend_one(qv, k_cache, v_cache, index, visible, L, Hkv, D, off, scale, o, slot, score, FL_KV_F16);
            else if (kv_dtype == FL_KV_BF16)
                attend_one(qv, k_cache, v_cache, index, visible, L, Hkv, D, off, scale, o, slot, score, FL_KV_BF16);
            else
                attend_one(qv, k_cache, v_cache, index, visible, L, Hkv, D, off, scale, o, slot, score, FL_KV_F32);
        }
        free(slot);
        free(score);
    }
}
