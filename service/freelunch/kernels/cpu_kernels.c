/* Float32 CPU kernels for x86-64 with AVX2 and FMA: the few-row linear layer and paged attention
 * for few queries (decoding, draft-tree verification). Loaded by cpu_kernels.py with ctypes.
 *
 * fl_linear: y[M, N] = x[M, K] @ W^T (+ bias). Built for the few rows of decoding and of
 * verifying a draft tree (M = 1..16), where the weights stream from memory once per step: W is
 * packed once into panels of 8 output columns, [ceil(N / 8)][K][8] (zero-padded), so one panel
 * is one sequential stream, and a tile computes two panels for up to 6 rows with its 12
 * accumulators in registers (of AVX2's 16). Each broadcast input feeds 2 FMAs and each weight
 * vector up to 6, so a step of 1 to 6 rows costs about one pass over the weights, and many rows
 * run near the FMA units' rate (a 12-row, one-panel tile loads 13 vectors for its 12 FMAs).
 * Rows are taken in blocks of ROW_BLOCK; threads split a block's pairs of panels (OpenMP).
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

/* Rows in blocks of ROW_BLOCK; a block's panels split over the threads; each panel's rows in tiles
 * of at most TILE rows, each computed by the statement given (m0, mr, j, ncols and b in scope). */
#define FOR_TILES(M, N, TILE, ...)                                                                 \
    _Pragma("omp parallel num_threads(threads)") for (int64_t r0 = 0; r0 < (M); r0 += ROW_BLOCK) { \
        int64_t r1 = r0 + ROW_BLOCK < (M) ? r0 + ROW_BLOCK : (M);                                  \
        _Pragma("omp for schedule(static)") for (int64_t j = 0; j < ((N) + PANEL - 1) / PANEL; j++) { \
            int ncols = (N) - j * PANEL < PANEL ? (int)((N) - j * PANEL) : PANEL;                  \
            const float* b = bias ? bias + j * PANEL : 0;                                          \
            for (int64_t m0 = r0; m0 < r1; m0 += (TILE)) {                                         \
                int mr = r1 - m0 < (TILE) ? (int)(r1 - m0) : (TILE);                               \
                __VA_ARGS__;                                                                       \
            }                                                                                      \
        }                                                                                          \
    }

/* Two panels (16 output columns) by up to 6 rows: each broadcast row value feeds 2 FMAs, so the
 * loads (2 weight vectors + 6 broadcasts a k) no longer outnumber the FMAs (12), which the 12 x 8
 * tile's 1 + 12 loads for 12 FMAs do: the tile for many rows. Same k order, one FMA at a time, as
 * the other tiles: the same bits. */
#define PAIR_ROWS 6
#define ACC2(m) __m256 a##m = _mm256_setzero_ps(), b##m = _mm256_setzero_ps();
#define FMA2(m)                                                  \
    {                                                            \
        __m256 xv = _mm256_broadcast_ss(x + (m) * K + k);        \
        a##m = _mm256_fmadd_ps(xv, w0, a##m);                    \
        b##m = _mm256_fmadd_ps(xv, w1, b##m);                    \
    }
#define STORE2(m)                                                                      \
    store_row(a##m, y + (m) * N, bias, nc0);                                           \
    if (nc1 > 0) store_row(b##m, y + (m) * N + PANEL, bias ? bias + PANEL : 0, nc1);
/* A tile of NAME##MR over panels of T, each k's 8 weights made float32 by LOAD(panel, k). */
#define PAIR(NAME, T, LOAD, MR)                                                                    \
    static void NAME##MR(const float* x, int64_t K, const T* p0, const T* p1, float* y, int64_t N, \
                         const float* bias, int nc0, int nc1) {                                    \
        R##MR(ACC2)                                                                                \
        for (int64_t k = 0; k < K; k++) {                                                          \
            __m256 w0 = LOAD(p0, k), w1 = LOAD(p1, k);                                             \
            if ((k & 1) == 0) {                                                                    \
                _mm_prefetch((const char*)(p0 + k * PANEL + PREFETCH_FLOATS), _MM_HINT_T0);        \
                _mm_prefetch((const char*)(p1 + k * PANEL + PREFETCH_FLOATS), _MM_HINT_T0);        \
            }                                                                                      \
            R##MR(FMA2)                                                                            \
        }                                                                                          \
        R##MR(STORE2)                                                                              \
    }
#define LOAD_F32(p, k) _mm256_loadu_ps((p) + (k) * PANEL)
/* bfloat16 is the top half of a float32: widening is a shift, exact. */
#define LOAD_BF16(p, k) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((p) + (k) * PANEL))), 16))
#define PAIRS_OF(NAME, T, LOAD)                                                                             \
    PAIR(NAME, T, LOAD, 1) PAIR(NAME, T, LOAD, 2) PAIR(NAME, T, LOAD, 3) PAIR(NAME, T, LOAD, 4)             \
    PAIR(NAME, T, LOAD, 5) PAIR(NAME, T, LOAD, 6)                                                           \
    static void (*const NAME##s[PAIR_ROWS + 1])(const float*, int64_t, const T*, const T*, float*, int64_t, \
                                                const float*, int, int) = {0,       NAME##1, NAME##2, NAME##3, \
                                                                           NAME##4, NAME##5, NAME##6};
PAIRS_OF(pair, float, LOAD_F32)
PAIRS_OF(bpair, uint16_t, LOAD_BF16)

/* Columns of panel j (8 but the last) and of its pair j + 1 (0 past the end). */
#define PAIR_COLS(N, j)                                                             \
    int nc0 = (N) - (j) * PANEL < PANEL ? (int)((N) - (j) * PANEL) : PANEL;         \
    int64_t rest1 = (N) - ((j) + 1) * PANEL;                                        \
    int nc1 = rest1 <= 0 ? 0 : rest1 < PANEL ? (int)rest1 : PANEL;

/* Rows in blocks of ROW_BLOCK; a block's pairs of panels split over the threads; the rows shared
 * evenly among tiles of at most PAIR_ROWS (8 = 4 + 4, not 6 + 2), run by TILES (pairs: float32
 * panels; bpairs: bfloat16). SELECT points p0 and p1 at panels j and j + 1 (p1 = p0 past the end),
 * using w (SCRATCH floats a thread) if it widens them from a packed form. */
#define FOR_PAIRS(M, N, SCRATCH, T, TILES, SELECT)                                                          \
    _Pragma("omp parallel num_threads(threads)") {                                                  \
        float* w = (SCRATCH) > 0 ? malloc(sizeof(float) * (SCRATCH)) : 0;                           \
        int64_t panels = ((N) + PANEL - 1) / PANEL;                                                 \
        for (int64_t r0 = 0; r0 < (M); r0 += ROW_BLOCK) {                                           \
            int64_t r1 = r0 + ROW_BLOCK < (M) ? r0 + ROW_BLOCK : (M);                               \
            int64_t tiles = (r1 - r0 + PAIR_ROWS - 1) / PAIR_ROWS;                                  \
            _Pragma("omp for schedule(static)") for (int64_t jj = 0; jj < (panels + 1) / 2; jj++) { \
                int64_t j = 2 * jj;                                                                 \
                PAIR_COLS(N, j)                                                                     \
                const T *p0, *p1;                                                                   \
                SELECT;                                                                             \
                const float* b = bias ? bias + j * PANEL : 0;                                       \
                for (int64_t t = 0, m0 = r0; t < tiles; t++) {                                      \
                    int mr = (int)((r1 - m0) / (tiles - t));                                        \
                    TILES[mr](x + m0 * K, K, p0, p1, y + m0 * (N) + j * PANEL, (N), b, nc0, nc1);   \
                    m0 += mr;                                                                       \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        free(w);                                                                                    \
    }

void fl_linear(const float* x, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias,
               float* y, int threads) {
    FOR_PAIRS(M, N, 0, float, pairs, p0 = packed + j * K * PANEL; p1 = nc1 ? p0 + K * PANEL : p0)
}

/* fl_linear with the panels stored as bfloat16 (weights that are exactly bfloat16 values, as a
 * bfloat16 checkpoint's are in float32): half the bytes, the same products, the same bits. */
void fl_linear_bf16(const float* x, int64_t M, int64_t K, const uint16_t* packed, int64_t N, const float* bias,
                    float* y, int threads) {
    FOR_PAIRS(M, N, 0, uint16_t, bpairs, p0 = packed + j * K * PANEL; p1 = nc1 ? p0 + K * PANEL : p0)
}

/* ---- weight-only quantised linears (models/quantization.py) ---------------------------------------
 * The same panels and row tiles as fl_linear, with weights stored small and widened to float32 in
 * registers: decoding reads 1/4 (int8) or 1/8 (int4) of the bytes per step.
 * fl_linear_q8: y = sum_g scale[n,g] (x_g . q_g[n]) (+ bias) over groups of G inputs (G = K: one scale per
 *   output channel; GGUF's Q8_0: 32, Q6_K: 16); q int8, panels [ceil(N/8)][K][8]; scale per panel [K/G][8].
 * fl_linear_q4: groups of QG inputs, y = sum_g d[n,g] (x_g . q_g[n]) + m[n,g] sum(x_g) (+ bias); q in [0, 15],
 *   panels [ceil(N/8)][K][4 bytes] (column c: bits 4c..4c+3 of the little-endian word); d and m per
 *   panel [K/QG][2][8]. Each group's dot product is summed in k order, then folded in. */
#define QG 32
#define TILE_ROWS_Q4 6
#define SCALE(m) a##m = _mm256_mul_ps(a##m, sc);
#define GFOLD(m) a##m = _mm256_fmadd_ps(d, g##m, _mm256_fmadd_ps(mn, _mm256_broadcast_ss(xs + (m) * groups + gi), a##m));

/* Two sums per row and group (even and odd k) for the tiles of 2-3 rows: with one, each row's FMAs
 * wait on the one before (4 cycles), and two rows cost 1.5x one (576x1536, 2 AVX2 cores). */
#define GACC2(m) __m256 g##m = _mm256_setzero_ps(), h##m = g##m;
#define GFMA_EVEN(m) g##m = _mm256_fmadd_ps(_mm256_broadcast_ss(x + (m) * K + k), w0, g##m);
#define GFMA_ODD(m) h##m = _mm256_fmadd_ps(_mm256_broadcast_ss(x + (m) * K + k + 1), w1, h##m);
#define GJOIN(m) g##m = _mm256_add_ps(g##m, h##m);
static inline __m256 widen8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

#define TILE_Q8(MR)                                                                               \
    static void q8tile##MR(const float* x, int64_t K, int64_t G, const int8_t* p, const float* s, \
                           float* y, int64_t N, const float* bias, int ncols) {                   \
        (void)G; /* one scale per output channel */                                               \
        R##MR(ACC)                                                                                \
        for (int64_t k = 0; k < K; k++) {                                                         \
            __m256 w = widen8(p + k * PANEL);                                                     \
            if ((k & 7) == 0) _mm_prefetch((const char*)(p + k * PANEL + 4 * PREFETCH_FLOATS), _MM_HINT_T0); \
            R##MR(FMA)                                                                            \
        }                                                                                         \
        __m256 sc = _mm256_loadu_ps(s);                                                           \
        R##MR(SCALE)                                                                              \
        R##MR(STORE)                                                                              \
    }
TILE_Q8(2) TILE_Q8(3) TILE_Q8(4) TILE_Q8(5) TILE_Q8(6) TILE_Q8(7) TILE_Q8(8) TILE_Q8(9) TILE_Q8(10) TILE_Q8(11) TILE_Q8(12)

/* One row (decoding one sequence): four accumulators over k mod 4, so that the FMAs do not wait on
 * each other's latency (a single chain of dependent FMAs, not memory, bounds one row otherwise).
 * K is a multiple of 4 (cpu_kernels.py checks). */
static void q8row(const float* x, int64_t K, int64_t G, const int8_t* p, const float* s, float* y, int64_t N,
                  const float* bias, int ncols) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < K; g0 += G) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = g0; k < g0 + G; k += 4) {
            if ((k & 7) == 0) _mm_prefetch((const char*)(p + k * PANEL + 4 * PREFETCH_FLOATS), _MM_HINT_T0);
            a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), widen8(p + k * PANEL), a0);
            a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), widen8(p + (k + 1) * PANEL), a1);
            a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 2), widen8(p + (k + 2) * PANEL), a2);
            a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 3), widen8(p + (k + 3) * PANEL), a3);
        }
        __m256 g = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        a = _mm256_fmadd_ps(_mm256_loadu_ps(s + g0 / G * PANEL), g, a);  /* G = K: the one scale times the sum */
    }
    store_row(a, y, bias, ncols);
}

/* Several rows with several scale groups: a group's sums beside the running totals (2 x 6 registers). */
#define GFOLD8(m) a##m = _mm256_fmadd_ps(sc, g##m, a##m);
#define TILE_Q8G(MR)                                                                              \
    static void q8gtile##MR(const float* x, int64_t K, int64_t G, const int8_t* p, const float* s, \
                            float* y, int64_t N, const float* bias, int ncols) {                  \
        R##MR(ACC)                                                                                \
        for (int64_t k0 = 0; k0 < K; k0 += G) {                                                   \
            R##MR(GACC2)                                                                          \
            for (int64_t k = k0; k < k0 + G; k += 2) {                                            \
                __m256 w0 = widen8(p + k * PANEL), w1 = widen8(p + (k + 1) * PANEL);              \
                if ((k & 7) == 0) _mm_prefetch((const char*)(p + k * PANEL + 4 * PREFETCH_FLOATS), _MM_HINT_T0); \
                R##MR(GFMA_EVEN)                                                                  \
                R##MR(GFMA_ODD)                                                                   \
            }                                                                                     \
            R##MR(GJOIN)                                                                          \
            __m256 sc = _mm256_loadu_ps(s + k0 / G * PANEL);                                      \
            R##MR(GFOLD8)                                                                         \
        }                                                                                         \
        R##MR(STORE)                                                                              \
    }
TILE_Q8G(2) TILE_Q8G(3) TILE_Q8G(4) TILE_Q8G(5) TILE_Q8G(6)

/* The per-channel tiles (G = K) keep up to 12 rows' sums; grouped scales, up to 6. */
typedef void (*q8tile_fn)(const float*, int64_t, int64_t, const int8_t*, const float*, float*, int64_t, const float*, int);
static const q8tile_fn Q8TILES[TILE_ROWS + 1] = {0, q8row, q8tile2, q8tile3, q8tile4, q8tile5, q8tile6,
                                                 q8tile7, q8tile8, q8tile9, q8tile10, q8tile11, q8tile12};
static const q8tile_fn Q8GTILES[TILE_ROWS_Q4 + 1] = {0, q8row, q8gtile2, q8gtile3, q8gtile4, q8gtile5, q8gtile6};

/* Many rows (a batch of decoding sequences, a prompt): each thread widens a panel to float32 once
 * into its own scratch and runs fl_linear's 12-row tiles over it, so the unpacking is paid once a
 * panel instead of once a 6-row tile, and the FMAs run as in float32. WIDEN fills w[K][8] from
 * panel j. For int4 and grouped int8 from 8 rows (one 576x3072 layer, 2 AVX2 cores: 16 rows
 * 1053 -> 927 us int4, 1070 -> 904 grouped int8; float32 757); per-channel int8's 12-row tiles
 * widen as cheaply as this (764 us) and keep them. */
#define WIDEN_ROWS 8
/* FOR_PAIRS's SELECT for packed panels: WIDEN fills `out` [K][8] from panel i. */
#define WIDEN_PAIR(WIDEN)                                       \
    {                                                           \
        for (int64_t i = j; i < j + (nc1 ? 2 : 1); i++) {       \
            float* out = w + (i - j) * K * PANEL;               \
            WIDEN;                                              \
        }                                                       \
        p0 = w;                                                 \
        p1 = nc1 ? w + K * PANEL : w;                           \
    }
static void widen_q8(const int8_t* p, const float* s, int64_t K, int64_t G, float* w) {
    for (int64_t k0 = 0; k0 < K; k0 += G) {
        __m256 sc = _mm256_loadu_ps(s + k0 / G * PANEL);
        for (int64_t k = k0; k < k0 + G; k++) _mm256_storeu_ps(w + k * PANEL, _mm256_mul_ps(sc, widen8(p + k * PANEL)));
    }
}

void fl_linear_q8(const float* x, int64_t M, int64_t K, const int8_t* packed, const float* scale, int64_t G, int64_t N,
                  const float* bias, float* y, int threads) {
    int64_t groups = K / G;
    if (M >= WIDEN_ROWS && G < K) {
        FOR_PAIRS(M, N, 2 * K * PANEL, float, pairs, WIDEN_PAIR(widen_q8(packed + i * K * PANEL, scale + i * groups * PANEL, K, G, out)))
        return;
    }
    const q8tile_fn* tiles = G == K ? Q8TILES : Q8GTILES;
    FOR_TILES(M, N, G == K ? TILE_ROWS : TILE_ROWS_Q4,
              tiles[mr](x + m0 * K, K, G, packed + j * K * PANEL, scale + j * groups * PANEL, y + m0 * N + j * PANEL, N, b, ncols))
}

static inline __m256 nibbles8(const uint8_t* p, __m256i shifts, __m256i low) {
    uint32_t word;
    memcpy(&word, p, 4);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts), low));
}
#define TILE_Q4(MR)                                                                               \
    static void q4tile##MR(const float* x, int64_t K, const uint8_t* p, const float* dm,          \
                           const float* xs, float* y, int64_t N, const float* bias, int ncols) {  \
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);                    \
        const __m256i low = _mm256_set1_epi32(15);                                                \
        int64_t groups = K / QG;                                                                  \
        R##MR(ACC)                                                                                \
        for (int64_t gi = 0; gi < groups; gi++) {                                                 \
            R##MR(GACC2)                                                                          \
            for (int64_t k = gi * QG; k < (gi + 1) * QG; k += 2) {                                \
                __m256 w0 = nibbles8(p + k * 4, shifts, low), w1 = nibbles8(p + (k + 1) * 4, shifts, low); \
                R##MR(GFMA_EVEN)                                                                  \
                R##MR(GFMA_ODD)                                                                   \
            }                                                                                     \
            R##MR(GJOIN)                                                                          \
            _mm_prefetch((const char*)(p + (gi + 8) * QG * 4), _MM_HINT_T0);                      \
            __m256 d = _mm256_loadu_ps(dm + gi * 16), mn = _mm256_loadu_ps(dm + gi * 16 + 8);     \
            R##MR(GFOLD)                                                                          \
        }                                                                                         \
        R##MR(STORE)                                                                              \
    }
TILE_Q4(2) TILE_Q4(3) TILE_Q4(4) TILE_Q4(5) TILE_Q4(6)

static void q4row(const float* x, int64_t K, const uint8_t* p, const float* dm, const float* xs, float* y, int64_t N,
                  const float* bias, int ncols) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), low = _mm256_set1_epi32(15);
    __m256 a = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < K / QG; gi++) {
        __m256 g0 = _mm256_setzero_ps(), g1 = g0, g2 = g0, g3 = g0;
        _mm_prefetch((const char*)(p + (gi + 8) * QG * 4), _MM_HINT_T0);
        for (int64_t k = gi * QG; k < (gi + 1) * QG; k += 4) {
            g0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), nibbles8(p + k * 4, shifts, low), g0);
            g1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), nibbles8(p + (k + 1) * 4, shifts, low), g1);
            g2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 2), nibbles8(p + (k + 2) * 4, shifts, low), g2);
            g3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 3), nibbles8(p + (k + 3) * 4, shifts, low), g3);
        }
        __m256 g = _mm256_add_ps(_mm256_add_ps(g0, g1), _mm256_add_ps(g2, g3));
        __m256 d = _mm256_loadu_ps(dm + gi * 16), mn = _mm256_loadu_ps(dm + gi * 16 + 8);
        a = _mm256_fmadd_ps(d, g, _mm256_fmadd_ps(mn, _mm256_broadcast_ss(xs + gi), a));
    }
    store_row(a, y, bias, ncols);
}

typedef void (*q4tile_fn)(const float*, int64_t, const uint8_t*, const float*, const float*, float*, int64_t,
                          const float*, int);
static const q4tile_fn Q4TILES[TILE_ROWS_Q4 + 1] = {0, q4row, q4tile2, q4tile3, q4tile4, q4tile5, q4tile6};

static void widen_q4(const uint8_t* p, const float* dm, int64_t K, float* w) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), low = _mm256_set1_epi32(15);
    for (int64_t gi = 0; gi < K / QG; gi++) {
        __m256 d = _mm256_loadu_ps(dm + gi * 16), mn = _mm256_loadu_ps(dm + gi * 16 + 8);
        for (int64_t k = gi * QG; k < (gi + 1) * QG; k++)
            _mm256_storeu_ps(w + k * PANEL, _mm256_fmadd_ps(d, nibbles8(p + k * 4, shifts, low), mn));
    }
}

void fl_linear_q4(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* dm, int64_t N,
                  const float* bias, float* y, int threads) {
    int64_t groups = K / QG;
    if (M >= WIDEN_ROWS) {
        FOR_PAIRS(M, N, 2 * K * PANEL, float, pairs, WIDEN_PAIR(widen_q4(packed + i * K * 4, dm + i * groups * 16, K, out)))
        return;
    }
    float* xs = malloc(sizeof(float) * (M * groups + 1)); /* each row's sum over each group */
    for (int64_t r = 0; r < M; r++)
        for (int64_t g = 0; g < groups; g++) {
            float t = 0.0f;
            for (int64_t k = g * QG; k < (g + 1) * QG; k++) t += x[r * K + k];
            xs[r * groups + g] = t;
        }
    FOR_TILES(M, N, TILE_ROWS_Q4,
              Q4TILES[mr](x + m0 * K, K, packed + j * K * 4, dm + j * groups * 16, xs + m0 * groups, y + m0 * N + j * PANEL, N,
                          b, ncols))
    free(xs);
}

/* ---- paged attention for few queries ------------------------------------------------------------
 * out[b, i, h] = softmax_j(scale * q[b, i, h] . K[j]) @ V over the keys j < L of row b that the mask
 * lets query i see, where K[j] = k_cache[kv_index[b, j], h / (H / Hkv)] (grouped-query heads).
 * One task per (row, query, head): gather the visible scores, exponentiate 8 at a time, then sum
 * the values. SDPA's CPU kernel spends most of its time on set-up at these sizes, and the keys are
 * read straight from the cache (no gathered copy). */

/* e^x for 8 floats (Cephes' single-precision polynomial, as in avx_mathfun); x <= 88 (no overflow). */
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

/* ---- the elementwise steps between a decoder layer's matmuls ---------------------------------------
 * A decode step runs them once per layer on a few rows, where PyTorch's per-op set-up (~5-30 us
 * an op, several ops a step) costs more than the arithmetic; each is one call here. */

static inline float hsum8(__m256 v) {
    float t[8];
    _mm256_storeu_ps(t, v);
    return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
}

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

/* ---- q and k before attention --------------------------------------------------------------------
 * What a layer does to its q/k/v projection rows [T, (H + 2 Hkv) D] before attention, in place, in
 * models/llama.py's order: q/k norms over the whole projection (OLMo2, OLMoE), clipping (OLMoE), q/k
 * norms per head (Qwen3), then RoPE on the q and k heads. The per-layer path and the one-call decoder
 * both call this, so they agree to the bit. */
typedef struct {
    const float* q_norm; /* [H D] (projection) or [D] (per head) RMSNorm weights, or NULL */
    const float* k_norm;
    int64_t norm;        /* 0: none, 1: per head, 2: over the projection */
    float eps;
    float clip;          /* clamp to [-clip, clip] when clipped */
    int64_t clipped;
} fl_qk;

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

/* ---- a whole dense decoder stack in one call ------------------------------------------------------
 * The layers of a Llama-family decoder (models/llama.py's DecoderLayer with a dense MLP) for a step
 * of any attention groups over the cache (decode rows, prompt chunks, draft trees): the same kernels in
 * the same order as the per-layer Python path, so the result is bit-identical, without the ~0.3 ms of
 * PyTorch dispatch, ctypes and allocation that a layer's dozen calls cost between them (a third of a
 * decode step of the default model on 2 AVX2 cores). */
typedef struct {
    int64_t kind; /* 0: float32 panels (fl_linear), 1: int8 (fl_linear_q8), 2: int4 (fl_linear_q4), 3: bfloat16 panels */
    const void* packed;
    const float* scales; /* q8: per panel [K/G][8]; q4: d and m per panel */
    int64_t group;       /* q8: inputs a scale covers */
    int64_t out;         /* output features */
    const float* bias;   /* or NULL */
} fl_matrix;

typedef struct {
    const float* input_norm;
    const float* post_norm;
    fl_matrix qkv, o, gate_up, down;
    fl_qk qk;
    float* k_cache; /* [slots, Hkv, D] */
    float* v_cache;
    const struct fl_moe* moe; /* a sparse MoE feed-forward (fl_moe_forward), or NULL: gate_up and down */
} fl_layer;

/* B rows of n queries each that attend as fl_paged_attention over kv_index [B, Lk] (mask [B, n, Lk] or
 * NULL); their tokens are rows q_index [B n] of the step (NULL: rows 0 .. B n - 1, in order). */
typedef struct {
    const int64_t* q_index;
    int64_t B, n;
    const int64_t* kv_index;
    int64_t Lk;
    const uint8_t* mask;
} fl_group;

static void matrix_apply(const fl_matrix* w, const float* x, int64_t M, int64_t K, float* y, int threads) {
    if (w->kind == 0)
        fl_linear(x, M, K, (const float*)w->packed, w->out, w->bias, y, threads);
    else if (w->kind == 3)
        fl_linear_bf16(x, M, K, (const uint16_t*)w->packed, w->out, w->bias, y, threads);
    else if (w->kind == 1)
        fl_linear_q8(x, M, K, (const int8_t*)w->packed, w->scales, w->group, w->out, w->bias, y, threads);
    else
        fl_linear_q4(x, M, K, (const uint8_t*)w->packed, w->scales, w->out, w->bias, y, threads);
}

/* ---- a sparse Mixture-of-Experts feed-forward --------------------------------------------------
 * models/moe.py's SparseMoeBlock (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the router's softmax in
 * float32, each token's top-k experts (the larger probability first, of equal ones the lower expert),
 * renormalised where the model says so, or per token one expert of router rank r >= 1 with weight 1
 * (SCMoE's weak rows) or a token's own top-k; the experts run grouped by expert in ascending order,
 * each over its tokens in ascending order, out[t] += y * w; then Qwen2-MoE's shared expert,
 * out + sigmoid(gate) * shared. The per-layer path calls this too, so both paths agree to the bit. */
typedef struct fl_moe {
    fl_matrix gate;             /* router: hidden -> E */
    int64_t E, top_k, normalize;
    const fl_matrix* gate_up;   /* [E] */
    const fl_matrix* down;      /* [E] */
    int64_t I;                  /* an expert's intermediate size */
    fl_matrix shared_gate_up, shared_down, shared_gate;
    int64_t shared_I;           /* 0: no shared expert */
} fl_moe;

/* x [T, K] -> out [T, K]; rank, top_k [T] per-token routing (NULL: the router's own top-k). */
void fl_moe_forward(const fl_moe* m, const float* x, int64_t T, int64_t K, const int64_t* rank, const int64_t* top_k,
                    float* out, int threads) {
    int64_t E = m->E, I = m->I;
    float* probs = malloc(sizeof(float) * T * E);
    int64_t* chosen = malloc(sizeof(int64_t) * T * E); /* each token's experts, best first */
    float* weight = malloc(sizeof(float) * T * E);
    int64_t* used = malloc(sizeof(int64_t) * T);       /* how many of them */
    matrix_apply(&m->gate, x, T, K, probs, threads);
    for (int64_t t = 0; t < T; t++) {
        float* p = probs + t * E;
        float top = p[0], sum = 0.0f;
        for (int64_t e = 1; e < E; e++) top = p[e] > top ? p[e] : top;
        for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(p[e] - top));
        for (int64_t e = 0; e < E; e++) p[e] /= sum;
        int64_t* c = chosen + t * E;
        float* w = weight + t * E;
        for (int64_t e = 0; e < E; e++) { /* experts by probability, insertion: stable for ties */
            int64_t at = e;
            while (at > 0 && p[c[at - 1]] < p[e]) {
                c[at] = c[at - 1];
                at--;
            }
            c[at] = e;
        }
        int64_t r = rank ? rank[t] : 0;
        if (r > 0) { /* the router's r-th expert alone, weight 1 */
            c[0] = c[r - 1];
            w[0] = 1.0f;
            used[t] = 1;
            continue;
        }
        int64_t k = top_k && top_k[t] > 0 ? top_k[t] : m->top_k;
        float total = 0.0f;
        for (int64_t j = 0; j < k; j++) total += (w[j] = p[c[j]]);
        if (m->normalize)
            for (int64_t j = 0; j < k; j++) w[j] /= total;
        used[t] = k;
    }
    float *xg = malloc(sizeof(float) * T * K), *gu = malloc(sizeof(float) * T * 2 * I), *act = malloc(sizeof(float) * T * I),
          *y = malloc(sizeof(float) * T * K);
    float* wg = malloc(sizeof(float) * T);
    int64_t* rows = malloc(sizeof(int64_t) * T);
    memset(out, 0, sizeof(float) * T * K);
    for (int64_t e = 0; e < E; e++) {
        int64_t count = 0;
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < used[t]; j++)
                if (chosen[t * E + j] == e) {
                    rows[count] = t;
                    wg[count++] = weight[t * E + j];
                }
        if (!count) continue;
        for (int64_t r = 0; r < count; r++) memcpy(xg + r * K, x + rows[r] * K, sizeof(float) * K);
        matrix_apply(m->gate_up + e, xg, count, K, gu, threads);
        fl_silu_mul(gu, count, I, act);
        matrix_apply(m->down + e, act, count, I, y, threads);
        for (int64_t r = 0; r < count; r++) {
            float* o = out + rows[r] * K;
            const float* yr = y + r * K;
            for (int64_t i = 0; i < K; i++) o[i] += yr[i] * wg[r];
        }
    }
    free(xg), free(gu), free(act), free(wg), free(rows), free(probs), free(chosen), free(weight), free(used);
    if (m->shared_I) {
        int64_t S = m->shared_I;
        float *sgu = malloc(sizeof(float) * T * 2 * S), *sact = malloc(sizeof(float) * T * S), *g = malloc(sizeof(float) * T);
        matrix_apply(&m->shared_gate_up, x, T, K, sgu, threads);
        fl_silu_mul(sgu, T, S, sact);
        matrix_apply(&m->shared_down, sact, T, S, y, threads);
        matrix_apply(&m->shared_gate, x, T, K, g, threads);
        for (int64_t t = 0; t < T; t++) {
            float s = 1.0f / (1.0f + expf(-g[t]));
            for (int64_t i = 0; i < K; i++) out[t * K + i] += s * y[t * K + i];
        }
        free(sgu), free(sact), free(g);
    }
    free(y);
}

/* x [T, K]: the residual stream, updated in place through all L layers (the final norm is the
 * caller's). Token t is at rotary row t of cos/sin [T, D] and writes its k/v to cache slot slots[t];
 * the queries attend in the G groups; rank, top_k [T]: MoE layers' per-token routing (NULL: the
 * router's own). scratch: T * (2 K + (H + 2 Hkv) D + 4 H D + 3 I) floats. */
void fl_decoder(const fl_layer* layers, int64_t L, float* x, int64_t T, int64_t K, int64_t H, int64_t Hkv, int64_t D,
                int64_t I, float eps, const float* cos, const float* sin, const int64_t* slots, const fl_group* groups,
                int64_t G, const int64_t* rank, const int64_t* top_k, float scale, float* scratch, int threads) {
    int64_t width = (H + 2 * Hkv) * D, kv = Hkv * D, qd = H * D;
    float *h = scratch, *qkv = h + T * K, *q = qkv + T * width, *att = q + T * qd, *delta = att + T * qd,
          *gu = delta + T * K, *act = gu + T * 2 * I, *gq = act + T * I, *gatt = gq + T * qd;
    for (int64_t l = 0; l < L; l++) {
        const fl_layer* ly = layers + l;
        fl_rms_norm(x, 0, ly->input_norm, eps, T, K, x, h);
        matrix_apply(&ly->qkv, h, T, K, qkv, threads);
        fl_qk_prepare(qkv, T, H, Hkv, D, &ly->qk, cos, sin);
        for (int64_t t = 0; t < T; t++) {
            const float* row = qkv + t * width;
            memcpy(q + t * qd, row, sizeof(float) * qd);
            memcpy(ly->k_cache + slots[t] * kv, row + qd, sizeof(float) * kv);
            memcpy(ly->v_cache + slots[t] * kv, row + qd + kv, sizeof(float) * kv);
        }
        for (int64_t g = 0; g < G; g++) {
            const fl_group* gr = groups + g;
            int64_t rows = gr->B * gr->n;
            if (!gr->q_index) {
                fl_paged_attention(q, gr->B, gr->n, H, D, ly->k_cache, ly->v_cache, Hkv, gr->kv_index, gr->Lk, gr->mask,
                                   scale, att, threads);
                continue;
            }
            for (int64_t r = 0; r < rows; r++) memcpy(gq + r * qd, q + gr->q_index[r] * qd, sizeof(float) * qd);
            fl_paged_attention(gq, gr->B, gr->n, H, D, ly->k_cache, ly->v_cache, Hkv, gr->kv_index, gr->Lk, gr->mask,
                               scale, gatt, threads);
            for (int64_t r = 0; r < rows; r++) memcpy(att + gr->q_index[r] * qd, gatt + r * qd, sizeof(float) * qd);
        }
        matrix_apply(&ly->o, att, T, qd, delta, threads);
        fl_rms_norm(x, delta, ly->post_norm, eps, T, K, x, h);
        if (ly->moe) {
            fl_moe_forward(ly->moe, h, T, K, rank, top_k, delta, threads);
        } else {
            matrix_apply(&ly->gate_up, h, T, K, gu, threads);
            fl_silu_mul(gu, T, I, act);
            matrix_apply(&ly->down, act, T, I, delta, threads);
        }
        for (int64_t i = 0; i < T * K; i++) x[i] += delta[i];
    }
}
