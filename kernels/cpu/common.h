/* What the CPU kernels share: the descriptors that the one-call decoder and the MoE block read, the
 * float helpers several files use, and the functions one file calls in another. Every file here is
 * compiled for AVX2 + FMA (cpu_kernels.py builds them); linear_int8.c once more per instruction set. */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PANEL 8 /* output columns per packed panel */

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


static inline float hsum8(__m256 v) {
    float t[8];
    _mm256_storeu_ps(t, v);
    return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
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

/* The element types the kernels read as float32: a KV cache's (cpu_kernels.py's KV_DTYPES: float32,
 * or 16 bits widened as they are read, rounded to nearest-even as they are written by fl_kv_store,
 * exactly as torch's .to() rounds), and a matrix's float16 scales or bfloat16 panels. */
enum { FL_KV_F32 = 0, FL_KV_F16 = 1, FL_KV_BF16 = 2 };

/* 8 values of one of those element types from element `off` as float32 (exact for every type): a
 * cache's keys and values, a matrix's float16 scales, bfloat16 weight panels. `kind` is a constant
 * where this is inlined, so each specialisation keeps one load. */
static inline __m256 load8(const void* p, int64_t off, int kind) {
    if (kind == FL_KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + off)));
    if (kind == FL_KV_BF16) /* bfloat16 is the top half of a float32: widening is a shift */
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + off))), 16));
    return _mm256_loadu_ps((const float*)p + off);
}

/* A linear layer's weights, in one of the forms the matmul kernels read (cpu_kernels.py's FlMatrix). */
typedef struct {
    /* float activations: 0 float32 panels (fl_linear), 1 int8 (fl_linear_q8), 2 int4 (fl_linear_q4),
     * 3 bfloat16 panels; int8 activations (linear_int8.c): 4 int8 weights, 5 int4, 6 uint8 (5-bit) */
    int64_t kind;
    const void* packed;
    const float* scales;  /* q8: per panel [K/G][8]; q4: d and m per panel [K/32][2][8]; 4-6: d per panel [K/G][8] */
    int64_t group;        /* q8, 4-6: inputs a scale covers */
    int64_t out;          /* output features */
    const float* bias;    /* or NULL */
    const float* mins;    /* 5, 6: m per panel [K/32][8] (w = d q + m) */
    const int32_t* wsum;  /* 4: 128 x each group's weight sum per panel [K/G][8] (the unsigned offset of VNNI) */
    int64_t half;         /* 4-6: scales and mins stored as float16 (where they are float16 values, as GGUF's) */
} fl_matrix;

typedef struct {
    const float* input_norm;
    const float* post_norm;
    fl_matrix qkv, o, gate_up, down;
    fl_qk qk;
    void* k_cache; /* [slots, Hkv, D] of kv_dtype */
    void* v_cache;
    const struct fl_moe* moe; /* a sparse MoE feed-forward (fl_moe_forward), or NULL: gate_up and down */
    int64_t kv_dtype;         /* the cache's element type: FL_KV_F32, FL_KV_F16 or FL_KV_BF16 */
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


typedef struct fl_moe {
    fl_matrix gate;             /* router: hidden -> E */
    int64_t E, top_k, normalize;
    const fl_matrix* gate_up;   /* [E] */
    const fl_matrix* down;      /* [E] */
    int64_t I;                  /* an expert's intermediate size */
    fl_matrix shared_gate_up, shared_down, shared_gate;
    int64_t shared_I;           /* 0: no shared expert */
} fl_moe;

void fl_linear(const float* x, int64_t M, int64_t K, const float* packed, int64_t N, const float* bias, float* y,
               int threads);
void fl_linear_bf16(const float* x, int64_t M, int64_t K, const uint16_t* packed, int64_t N, const float* bias,
                    float* y, int threads);
void fl_linear_q8(const float* x, int64_t M, int64_t K, const int8_t* packed, const float* scale, int64_t G, int64_t N,
                  const float* bias, float* y, int threads);
void fl_linear_q4(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* dm, int64_t N,
                  const float* bias, float* y, int threads);
void fl_matrix_apply(const fl_matrix* w, const float* x, int64_t M, int64_t K, float* y, int threads);
void fl_paged_attention(const float* q, int64_t B, int64_t n, int64_t H, int64_t D, const void* k_cache,
                        const void* v_cache, int64_t kv_dtype, int64_t Hkv, const int64_t* kv_index, int64_t L,
                        const uint8_t* mask, float scale, float* out, int threads);
void fl_kv_store(void* cache, int64_t kv_dtype, const float* x, int64_t count);
void fl_rms_norm(const float* x, const float* delta, const float* weight, float eps, int64_t M, int64_t K, float* sum,
                 float* out);
void fl_silu_mul(const float* gu, int64_t M, int64_t I, float* out);
void fl_qk_prepare(float* qkv, int64_t T, int64_t H, int64_t Hkv, int64_t D, const fl_qk* qk, const float* cos,
                   const float* sin);
void fl_moe_forward(const fl_moe* m, const float* x, int64_t T, int64_t K, const int64_t* rank, const int64_t* top_k,
                    float* out, int threads);
