/* Integer-activation linears (`--activations int8`): y[M, N] = x[M, K] W^T (+ bias), with each row of x
 * quantised to int8 in blocks of 32 and the products summed in integer units, as llama.cpp computes
 * GGUF models on CPUs. Compiled once per instruction set (cpu_kernels.py: -DVARIANT=...), each object
 * exporting fl_linear_i8_<variant>; linear.c calls the one CPUID chose.
 *
 * Numerics (service/freelunch/kernels/linear_int8_ref.py: the same computation in PyTorch):
 * - a row's block b of 32 inputs: d = max|x| / 127, q = round(x / d) (x * (1 / d), half to even) in
 *   [-127, 127], and s = d * sum(q) (for weights with an offset m);
 * - weights w = dw q_w (+ m) in groups of G = 16 or 32 inputs (q_w: int8, int4 or 5-bit unsigned);
 * - each output: acc = 0; for each weight group g in order: acc = fma(float(isum_g), d_b * dw_g, acc),
 *   isum_g the exact integer dot product over the group; after a 32-input block with an offset,
 *   acc = fma(m_b, s_b, acc); then acc + bias.
 * Integer sums are exact in any order and the float steps are the same in every variant, so a row's
 * result is the same bits whatever the variant, the thread count, or the other rows of the call: that
 * keeps draft verification (many rows) equal to plain decoding (one row).
 *
 * Weights (cpu_kernels.py's pack_int8_activations): panels of 8 output columns, each 8 inputs (an
 * "octet") stored as 8 columns x 8 bytes (kinds 4, 6: 64 bytes), or for int4 (kind 5) as 32 bytes whose
 * low nibbles are the first 32 of those 64 bytes (columns 0-3) and high nibbles the last 32 (4-7). A
 * row's 8 inputs broadcast to every 64-bit lane then meet each column's 8 weights: each 32-bit lane
 * sums 4 products, two lanes a column, so one octet is one multiply-add instruction a row (VNNI). */
#include "common.h"

#define BLOCK 32
#define ROW_BLOCK 64
#define PREFETCH_BYTES 1024

#if defined(VARIANT_AVX512VNNI) || defined(VARIANT_AVX512)
#define WIDE 1 /* one 512-bit register holds an octet of a panel */
#define RMAX 8
typedef __m512i vec;
#define ZERO _mm512_setzero_si512()
#else
#define WIDE 0 /* two 256-bit registers: columns 0-3 and 4-7 */
#define RMAX 4
typedef __m256i vec;
#define ZERO _mm256_setzero_si256()
#endif
#if defined(VARIANT_AVX512VNNI) || defined(VARIANT_AVXVNNI)
#define VNNI 1
#else
#define VNNI 0
#endif

#if defined(VARIANT_AVX512VNNI)
#define NAME(f) f##_avx512vnni
#elif defined(VARIANT_AVX512)
#define NAME(f) f##_avx512
#elif defined(VARIANT_AVXVNNI)
#define NAME(f) f##_avxvnni
#else
#define NAME(f) f##_avx2
#endif

/* ---- activations: one row at a time, blocks of 32 (AVX2 in every variant: the same bits) ---------- */
static void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* s, int flip) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / BLOCK; b++) {
        const float* xb = x + b * BLOCK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
               v3 = _mm256_loadu_ps(xb + 24);
        __m256 top = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        float t[8];
        _mm256_storeu_ps(t, top);
        float amax = t[0];
        for (int i = 1; i < 8; i++) amax = t[i] > amax ? t[i] : amax;
        float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        __m256 iv = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, iv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, iv));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, iv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, iv));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        int32_t st[8];
        _mm256_storeu_si256((__m256i*)st, sum);
        int32_t total = st[0] + st[1] + st[2] + st[3] + st[4] + st[5] + st[6] + st[7];
        /* packs interleave 128-bit halves: [0-3 8-11 4-7 12-15] words, then bytes; one permute restores order */
        __m256i w01 = _mm256_packs_epi32(i0, i1), w23 = _mm256_packs_epi32(i2, i3);
        __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        if (flip) bytes = _mm256_xor_si256(bytes, _mm256_set1_epi8((char)0x80)); /* q + 128 as unsigned */
        _mm256_storeu_si256((__m256i*)(q + b * BLOCK), bytes);
        d[b] = db;
        s[b] = db * (float)total;
    }
}

/* ---- one octet of weights, one row: 8 inputs into the running integer sums ----------------------- */
static inline vec bcast8(const int8_t* p) {
    int64_t v;
    memcpy(&v, p, 8);
#if WIDE
    return _mm512_set1_epi64(v);
#else
    return _mm256_set1_epi64x(v);
#endif
}

#if WIDE
/* unsigned weights u (int4, 5-bit) times signed inputs x */
static inline vec dot_unsigned(vec acc, vec u, vec x) {
#if VNNI
    return _mm512_dpbusd_epi32(acc, u, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), _mm512_set1_epi16(1)));
#endif
}
#else
static inline vec dot_unsigned(vec acc, vec u, vec x) {
#if VNNI
    return _mm256_dpbusd_avx_epi32(acc, u, x);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
#endif
}
#endif

/* Each column's 8 lanes' worth (two 32-bit lanes a column) -> 8 int32, columns in order. */
#if WIDE
static inline __m256i columns(vec acc, vec unused) {
    (void)unused;
    return _mm512_cvtepi64_epi32(_mm512_add_epi32(acc, _mm512_srli_epi64(acc, 32)));
}
#else
static inline __m256i columns(vec lo, vec hi) {
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo, hi), 0xD8);
}
#endif

/* 8 scales of a panel, float32 or float16 (widened exactly) as the matrix stores them. */
static inline __m256 scales8(const void* base, int64_t at, int half) { return load8(base, at, half ? FL_KV_F16 : FL_KV_F32); }

/* ---- a tile: R rows by one panel ------------------------------------------------------------------
 * kind 4 (int8 weights): AVX2 / AVX-512BW multiply |w| by x with w's sign (vpmaddubsw takes one
 * unsigned operand; |w| <= 128 and |x| <= 127 keep its 16-bit pair sums from saturating); VNNI takes
 * x + 128 (unsigned) times w and subtracts 128 x the group's weight sum. Kinds 5 and 6 (unsigned
 * weights) multiply them by x directly. */
typedef struct {
    const int8_t* xq; /* [M][K] (kind 4 on VNNI: q + 128) */
    const float *xd, *xs;
    int64_t K, N;
} rows_t;

/* Stores R rows' sums of `cols` columns (at most 16: acc[r] lanes) from column j * 8, with the bias. */
static inline void store_rows(int R, const float* acc, int64_t stride, const rows_t* a, const fl_matrix* w, int64_t j,
                              int64_t m0, float* y, int cols) {
    const float* bias = w->bias ? w->bias + j * PANEL : 0;
    for (int r = 0; r < R; r++) {
        float* out = y + (m0 + r) * a->N + j * PANEL;
        for (int c = 0; c < cols; c++) out[c] = bias ? acc[r * stride + c] + bias[c] : acc[r * stride + c];
    }
}

static inline __attribute__((always_inline)) void tile(int R, const rows_t* a, const fl_matrix* w, int64_t j, int64_t m0,
                                                        float* y) {
    const int64_t K = a->K, G = w->group, octets = K / 8, groups = K / G;
    const int kind = (int)w->kind;
    const uint8_t* p = (const uint8_t*)w->packed + j * octets * (kind == 5 ? 32 : 64);
    const int half = (int)w->half;
    const int64_t dw = j * groups * PANEL, mw = j * (K / BLOCK) * PANEL; /* this panel's scales and mins */
    const int32_t* ws = w->wsum ? w->wsum + j * groups * PANEL : 0;
    __m256 acc[RMAX];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        vec lo[RMAX], hi[RMAX];
        for (int r = 0; r < R; r++) lo[r] = hi[r] = ZERO;
        for (int64_t o = g * G / 8; o < (g + 1) * G / 8; o++) {
            vec w0, w1;
            if (kind == 5) {
                __m256i v = _mm256_loadu_si256((const __m256i*)(p + o * 32));
                __m256i nib = _mm256_set1_epi8(15), l = _mm256_and_si256(v, nib), h = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
#if WIDE
                w0 = _mm512_inserti64x4(_mm512_castsi256_si512(l), h, 1);
                w1 = w0;
#else
                w0 = l, w1 = h;
#endif
            } else {
#if WIDE
                w0 = w1 = _mm512_loadu_si512((const void*)(p + o * 64));
#else
                w0 = _mm256_loadu_si256((const __m256i*)(p + o * 64));
                w1 = _mm256_loadu_si256((const __m256i*)(p + o * 64 + 32));
#endif
            }
            _mm_prefetch((const char*)(p + o * (kind == 5 ? 32 : 64) + PREFETCH_BYTES), _MM_HINT_T0);
            if (kind != 4 || VNNI) { /* unsigned weights, or VNNI's unsigned inputs */
                for (int r = 0; r < R; r++) {
                    vec x = bcast8(a->xq + (m0 + r) * K + o * 8);
#if VNNI && WIDE
                    lo[r] = kind == 4 ? _mm512_dpbusd_epi32(lo[r], x, w0) : dot_unsigned(lo[r], w0, x);
#elif VNNI
                    lo[r] = kind == 4 ? _mm256_dpbusd_avx_epi32(lo[r], x, w0) : dot_unsigned(lo[r], w0, x);
                    hi[r] = kind == 4 ? _mm256_dpbusd_avx_epi32(hi[r], x, w1) : dot_unsigned(hi[r], w1, x);
#else
                    lo[r] = dot_unsigned(lo[r], w0, x);
                    if (!WIDE) hi[r] = dot_unsigned(hi[r], w1, x);
#endif
                }
            } else { /* signed weights, AVX2 / AVX-512BW: |w| times x with w's sign */
#if WIDE
                __mmask64 neg = _mm512_movepi8_mask(w0);
                vec u0 = _mm512_abs_epi8(w0);
                for (int r = 0; r < R; r++) {
                    vec x = bcast8(a->xq + (m0 + r) * K + o * 8);
                    lo[r] = dot_unsigned(lo[r], u0, _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x));
                }
#else
                vec u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
                for (int r = 0; r < R; r++) {
                    vec x = bcast8(a->xq + (m0 + r) * K + o * 8);
                    lo[r] = dot_unsigned(lo[r], u0, _mm256_sign_epi8(x, w0));
                    hi[r] = dot_unsigned(hi[r], u1, _mm256_sign_epi8(x, w1));
                }
#endif
            }
        }
        int64_t b = g * G / BLOCK;
        __m256 dg = scales8(w->scales, dw + g * PANEL, half);
        __m256i off = ws && VNNI ? _mm256_loadu_si256((const __m256i*)(ws + g * PANEL)) : _mm256_setzero_si256();
        int block_end = ((g + 1) * G) % BLOCK == 0;
        for (int r = 0; r < R; r++) {
            __m256i isum = _mm256_sub_epi32(columns(lo[r], hi[r]), off);
            __m256 sc = _mm256_mul_ps(_mm256_set1_ps(a->xd[(m0 + r) * (K / BLOCK) + b]), dg);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, acc[r]);
            if (w->mins && block_end)
                acc[r] = _mm256_fmadd_ps(scales8(w->mins, mw + b * PANEL, half), _mm256_set1_ps(a->xs[(m0 + r) * (K / BLOCK) + b]), acc[r]);
        }
    }
    float out[RMAX * PANEL];
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + r * PANEL, acc[r]);
    int64_t cols = a->N - j * PANEL;
    store_rows(R, out, PANEL, a, w, j, m0, y, cols < PANEL ? (int)cols : PANEL);
}

#if WIDE
/* Two panels (16 columns) by R rows, 512-bit: each group's float steps run on 16 columns at once, half
 * the instructions of two one-panel tiles (those steps, not the integer dot products, dominate a
 * group: 4 multiply-adds a row against ~9 reducing, converting, scaling and accumulating). The same
 * float operations in the same order per output: the same bits. */
#define PAIR_RMAX 6
static inline __m512 join8(__m256 lo, __m256 hi) { /* AVX-512F only (insertf32x8 needs DQ) */
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}
static inline __attribute__((always_inline)) void tile_pair(int R, const rows_t* a, const fl_matrix* w, int64_t j,
                                                             int64_t m0, float* y) {
    const int64_t K = a->K, G = w->group, octets = K / 8, groups = K / G, blocks = K / BLOCK;
    const int kind = (int)w->kind, half = (int)w->half, step = kind == 5 ? 32 : 64;
    const uint8_t* p0 = (const uint8_t*)w->packed + j * octets * step;
    const uint8_t* p1 = p0 + octets * step;
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    __m512 acc[PAIR_RMAX];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        vec s0[PAIR_RMAX], s1[PAIR_RMAX];
        for (int r = 0; r < R; r++) s0[r] = s1[r] = ZERO;
        for (int64_t o = g * G / 8; o < (g + 1) * G / 8; o++) {
            vec w0, w1;
            if (kind == 5) {
                __m256i nib = _mm256_set1_epi8(15);
                __m256i v0 = _mm256_loadu_si256((const __m256i*)(p0 + o * 32)), v1 = _mm256_loadu_si256((const __m256i*)(p1 + o * 32));
                w0 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v0, nib)), _mm256_and_si256(_mm256_srli_epi16(v0, 4), nib), 1);
                w1 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v1, nib)), _mm256_and_si256(_mm256_srli_epi16(v1, 4), nib), 1);
            } else {
                w0 = _mm512_loadu_si512((const void*)(p0 + o * 64));
                w1 = _mm512_loadu_si512((const void*)(p1 + o * 64));
            }
            _mm_prefetch((const char*)(p0 + o * step + PREFETCH_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char*)(p1 + o * step + PREFETCH_BYTES), _MM_HINT_T0);
            if (kind != 4 || VNNI) {
                for (int r = 0; r < R; r++) {
                    vec x = bcast8(a->xq + (m0 + r) * K + o * 8);
#if VNNI
                    s0[r] = kind == 4 ? _mm512_dpbusd_epi32(s0[r], x, w0) : dot_unsigned(s0[r], w0, x);
                    s1[r] = kind == 4 ? _mm512_dpbusd_epi32(s1[r], x, w1) : dot_unsigned(s1[r], w1, x);
#else
                    s0[r] = dot_unsigned(s0[r], w0, x);
                    s1[r] = dot_unsigned(s1[r], w1, x);
#endif
                }
            } else {
                __mmask64 n0 = _mm512_movepi8_mask(w0), n1 = _mm512_movepi8_mask(w1);
                vec u0 = _mm512_abs_epi8(w0), u1 = _mm512_abs_epi8(w1);
                for (int r = 0; r < R; r++) {
                    vec x = bcast8(a->xq + (m0 + r) * K + o * 8);
                    s0[r] = dot_unsigned(s0[r], u0, _mm512_mask_sub_epi8(x, n0, _mm512_setzero_si512(), x));
                    s1[r] = dot_unsigned(s1[r], u1, _mm512_mask_sub_epi8(x, n1, _mm512_setzero_si512(), x));
                }
            }
        }
        int64_t b = g * G / BLOCK, at0 = j * groups * PANEL + g * PANEL, at1 = at0 + groups * PANEL;
        __m512 dg = join8(scales8(w->scales, at0, half), scales8(w->scales, at1, half));
        __m512i off = _mm512_setzero_si512();
        if (w->wsum && VNNI)
            off = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(w->wsum + at0))),
                                     _mm256_loadu_si256((const __m256i*)(w->wsum + at1)), 1);
        int block_end = ((g + 1) * G) % BLOCK == 0;
        __m512 mg = _mm512_setzero_ps();
        if (w->mins && block_end) {
            int64_t m0at = j * blocks * PANEL + b * PANEL;
            mg = join8(scales8(w->mins, m0at, half), scales8(w->mins, m0at + blocks * PANEL, half));
        }
        for (int r = 0; r < R; r++) {
            __m512i c0 = _mm512_add_epi32(s0[r], _mm512_srli_epi64(s0[r], 32)), c1 = _mm512_add_epi32(s1[r], _mm512_srli_epi64(s1[r], 32));
            __m512i isum = _mm512_sub_epi32(_mm512_permutex2var_epi32(c0, evens, c1), off);
            __m512 sc = _mm512_mul_ps(_mm512_set1_ps(a->xd[(m0 + r) * blocks + b]), dg);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc[r]);
            if (w->mins && block_end) acc[r] = _mm512_fmadd_ps(mg, _mm512_set1_ps(a->xs[(m0 + r) * blocks + b]), acc[r]);
        }
    }
    float out[PAIR_RMAX * 16];
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + r * 16, acc[r]);
    int64_t cols = a->N - j * PANEL;
    store_rows(R, out, 16, a, w, j, m0, y, cols < 16 ? (int)cols : 16);
}
#endif

typedef void (*tile_fn)(const rows_t*, const fl_matrix*, int64_t, int64_t, float*);
#define TILE(R) \
    static void tile##R(const rows_t* a, const fl_matrix* w, int64_t j, int64_t m0, float* y) { tile(R, a, w, j, m0, y); }
TILE(1) TILE(2) TILE(3) TILE(4)
#if RMAX == 8
TILE(5) TILE(6) TILE(7) TILE(8)
static const tile_fn TILES[RMAX + 1] = {0, tile1, tile2, tile3, tile4, tile5, tile6, tile7, tile8};
#else
static const tile_fn TILES[RMAX + 1] = {0, tile1, tile2, tile3, tile4};
#endif
#if WIDE
#define PAIR(R) \
    static void pair##R(const rows_t* a, const fl_matrix* w, int64_t j, int64_t m0, float* y) { tile_pair(R, a, w, j, m0, y); }
PAIR(1) PAIR(2) PAIR(3) PAIR(4) PAIR(5) PAIR(6)
static const tile_fn PAIRS[PAIR_RMAX + 1] = {0, pair1, pair2, pair3, pair4, pair5, pair6};
#endif

/* x [M, K] float32 (K a multiple of 32) -> y [M, w->out]. Rows in blocks of ROW_BLOCK; a block's panels
 * split over the threads; its rows shared evenly among tiles of at most RMAX. */
void NAME(fl_linear_i8)(const fl_matrix* w, const float* x, int64_t M, int64_t K, float* y, int threads) {
    int64_t N = w->out, blocks = K / BLOCK, panels = (N + PANEL - 1) / PANEL;
    int8_t* xq = malloc(M * K);
    float* xd = malloc(sizeof(float) * M * blocks * 2);
    float* xs = xd + M * blocks;
    int flip = w->kind == 4 && VNNI;
    rows_t a = {xq, xd, xs, K, N};
#if WIDE
    const int width = 2, rmax = PAIR_RMAX; /* pairs of panels (a last one alone) */
#else
    const int width = 1, rmax = RMAX;
#endif
#pragma omp parallel num_threads(threads)
    {
    /* the rows quantised by the threads in turn (a row's bits do not depend on which) */
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, xq + m * K, xd + m * blocks, xs + m * blocks, flip);
    for (int64_t r0 = 0; r0 < M; r0 += ROW_BLOCK) {
        int64_t r1 = r0 + ROW_BLOCK < M ? r0 + ROW_BLOCK : M;
#pragma omp for schedule(static)
        for (int64_t jj = 0; jj < (panels + width - 1) / width; jj++) {
            int64_t j = jj * width;
            int alone = j + 1 >= panels || width == 1;
            int most = alone ? RMAX : rmax;
            int64_t tiles = (r1 - r0 + most - 1) / most;
            for (int64_t t = 0, m0 = r0; t < tiles; t++) {
                int mr = (int)((r1 - m0) / (tiles - t));
#if WIDE
                if (!alone) {
                    PAIRS[mr](&a, w, j, m0, y);
                    m0 += mr;
                    continue;
                }
#endif
                TILES[mr](&a, w, j, m0, y);
                m0 += mr;
            }
        }
    }
    }
    free(xq);
    free(xd);
}
