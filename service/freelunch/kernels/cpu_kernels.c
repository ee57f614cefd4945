/* Float32 CPU kernels for x86-64 with AVX2 and FMA: the few-row linear layer and paged attention
 * for few queries (decoding, draft-tree verification). Loaded by cpu_kernels.py with ctypes.
 *
 * fl_linear: y[M, N] = x[M, K] @ W^T (+ bias). Built for the few rows of decoding and of
 * verifying a draft tree (M = 1..16), where the weights stream from memory once per step: W is
 * packed once into panels of 8 output columns, [ceil(N / 8)][K][8] (zero-padded), so one panel
 * is one sequential stream, and a tile keeps up to 12 rows' accumulators in registers (12 of
 * AVX2's 16). Each weight vector loaded then feeds up to 12 FMAs, so a step of 1 to 12 rows
 * costs about one pass over the weights.
 * Rows are taken in blocks of ROW_BLOCK; threads split a block's panels (OpenMP).
 * Each output is summed in k order, one FMA at a time.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PANEL 8
#define TILE_ROWS 12
#define ROW_BLOCK 48
/* Software prefetch 2 KiB ahead in the panel, a cache line every other k: the hardware
 * prefetcher alone leaves the FMAs waiting on memory (measured 18.7 -> 15.9 ms for the matmuls
 * of a SmolLM2 forward at 1 row, 22.5 -> 17.7 ms at 9 rows, on 2 AVX2 cores). */
#define PREFETCH_FLOATS 512

#define ACC(m) __m256 a##m = _mm256_setzero_ps();
#define FMA(m) a##m = _mm256_fmadd_ps(_mm256_broadcast_ss(x + (m) * K + k), w, a##m);
#define STORE(m) store_row(a##m, y + (m) * N, bias, ncols);
#define R1(F) F(0)
#define R2(F) R1(F) F(1)
#define R3(F) R2(F) F(2)
#define R4(F) R3(F) F(3)
#define R5(F) R4(F) F(4)
#define R6(F) R5(F) F(5)
#define R7(F) R6(F) F(6)
#define R8(F) R7(F) F(7)
#define R9(F) R8(F) F(8)
#define R10(F) R9(F) F(9)
#define R11(F) R10(F) F(10)
#define R12(F) R11(F) F(11)

static inline void store_row(__m256 acc, float* y, const float* bias, int ncols) {
    if (ncols == PANEL) {
        if (bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(bias));
        _mm256_storeu_ps(y, acc);
        return;
    }
    float t[PANEL];
    _mm256_storeu_ps(t, acc);
    for (int c = 0; c < ncols; c++) y[c] = t[c] + (bias ? bias[c] : 0.0f);
}

/* Named accumulators (not an array) so that the compiler keeps them all in registers. */
#define TILE(MR)                                                                                  \
    static void tile##MR(const float* x, int64_t K, const float* p, float* y, int64_t N,          \
                         const float* bias, int ncols) {                                          \
        R##MR(ACC)                                                                                \
        for (int64_t k = 0; k < K; k++) {                                                         \
            __m256 w = _mm256_loadu_ps(p + k * PANEL);                                            \
            if ((k & 1) == 0) _mm_prefetch((const char*)(p + k * PANEL + PREFETCH_FLOATS), _MM_HINT_T0); \
            R##MR(FMA)                                                                            \
        }                                                                                         \
        R##MR(STORE)                                                                              \
    }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)

typedef void (*tile_fn)(const float*, int64_t, const float*, float*, int64_t, const float*, int);
static const tile_fn TILES[TILE_ROWS + 1] = {0,     tile1, tile2, tile3, tile4,  tile5, tile6,
                                             tile7, tile8, tile9, tile10, tile11, tile12};

void fl_linear(const float* x, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias,
               float* y, int threads) {
    int64_t panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel num_threads(threads)
    for (int64_t r0 = 0; r0 < M; r0 += ROW_BLOCK) {
        int64_t r1 = r0 + ROW_BLOCK < M ? r0 + ROW_BLOCK : M;
#pragma omp for schedule(static)
        for (int64_t j = 0; j < panels; j++) {
            int ncols = N - j * PANEL < PANEL ? (int)(N - j * PANEL) : PANEL;
            const float* b = bias ? bias + j * PANEL : 0;
            for (int64_t m0 = r0; m0 < r1; m0 += TILE_ROWS) {
                int mr = r1 - m0 < TILE_ROWS ? (int)(r1 - m0) : TILE_ROWS;
                TILES[mr](x + m0 * K, K, packed + j * K * PANEL, y + m0 * N + j * PANEL, N, b, ncols);
            }
        }
    }
}

/* ---- paged attention for few queries ------------------------------------------------------------
 * out[b, i, h] = softmax_j(scale * q[b, i, h] . K[j]) @ V over the keys j < L of row b that the mask
 * lets query i see, where K[j] = k_cache[kv_index[b, j], h / (H / Hkv)] (grouped-query heads).
 * One task per (row, query, head): gather the visible scores, exponentiate 8 at a time, then sum
 * the values. SDPA's CPU kernel spends most of its time on set-up at these sizes, and the keys are
 * read straight from the cache (no gathered copy). */

/* e^x for 8 floats (Cephes' single-precision polynomial, as in avx_mathfun); x <= 0 here. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

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
