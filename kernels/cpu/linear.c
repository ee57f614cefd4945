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
#include "common.h"

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
#define LOAD_BF16(p, k) load8((p), (k) * PANEL, FL_KV_BF16) /* widened exactly */
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

/* ---- integer activations: the variant CPUID allows (linear_int8.c, one object per instruction set) -- */
typedef void (*int8_linear_fn)(const fl_matrix*, const float*, int64_t, int64_t, float*, int);
void fl_linear_i8_avx2(const fl_matrix*, const float*, int64_t, int64_t, float*, int);
void fl_linear_i8_avxvnni(const fl_matrix*, const float*, int64_t, int64_t, float*, int);
void fl_linear_i8_avx512(const fl_matrix*, const float*, int64_t, int64_t, float*, int);
void fl_linear_i8_avx512vnni(const fl_matrix*, const float*, int64_t, int64_t, float*, int);
/* in cpu_kernels.py's INT8_VARIANTS order */
static const int8_linear_fn INT8_VARIANTS[] = {fl_linear_i8_avx2, fl_linear_i8_avxvnni, fl_linear_i8_avx512,
                                               fl_linear_i8_avx512vnni};
static int8_linear_fn int8_linear = fl_linear_i8_avx2;

/* Bit i set: INT8_VARIANTS[i] runs on this CPU (CPUID, and the OS saving the registers it uses). */
int fl_int8_variants(void) {
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl");
    return avx2 | (avx2 && __builtin_cpu_supports("avxvnni")) << 1 | avx512 << 2 |
           (avx512 && __builtin_cpu_supports("avx512vnni")) << 3;
}

/* Use INT8_VARIANTS[i] from now on; 0 (and no change) where the CPU cannot run it. */
int fl_use_int8_variant(int i) {
    if (i < 0 || i > 3 || !(fl_int8_variants() >> i & 1)) return 0;
    int8_linear = INT8_VARIANTS[i];
    return 1;
}

/* The one entry every layer's matmul goes through (the one-call decoder, MoE blocks, and
 * models/quantization.py's layers), so both paths run the same kernel for a matrix. */
void fl_matrix_apply(const fl_matrix* w, const float* x, int64_t M, int64_t K, float* y, int threads) {
    if (w->kind == 0)
        fl_linear(x, M, K, (const float*)w->packed, w->out, w->bias, y, threads);
    else if (w->kind == 3)
        fl_linear_bf16(x, M, K, (const uint16_t*)w->packed, w->out, w->bias, y, threads);
    else if (w->kind == 1)
        fl_linear_q8(x, M, K, (const int8_t*)w->packed, w->scales, w->group, w->out, w->bias, y, threads);
    else if (w->kind == 2)
        fl_linear_q4(x, M, K, (const uint8_t*)w->packed, w->scales, w->out, w->bias, y, threads);
    else
        int8_linear(w, x, M, K, y, threads);
}
