/* ---- a whole dense decoder stack in one call ------------------------------------------------------
 * The layers of a Llama-family decoder (models/llama.py's DecoderLayer with a dense MLP) for a step
 * of any attention groups over the cache (decode rows, prompt chunks, draft trees): the same kernels in
 * the same order as the per-layer Python path, so the result is bit-identical, without the ~0.3 ms of
 * PyTorch dispatch, ctypes and allocation that a layer's dozen calls cost between them (a third of a
 * decode step of the default model on 2 AVX2 cores). */
#include "common.h"

/* x [T, K]: the residual stream, updated in place through all L layers (the final norm is the
 * caller's). Token t is at rotary row t of cos/sin [T, D] and writes its k/v to cache slot slots[t]
 * (in the layer's kv_dtype, rounded as the per-layer path's .to() rounds);
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
        fl_matrix_apply(&ly->qkv, h, T, K, qkv, threads);
        fl_qk_prepare(qkv, T, H, Hkv, D, &ly->qk, cos, sin);
        size_t item = ly->kv_dtype == FL_KV_F32 ? sizeof(float) : sizeof(uint16_t);  /* a cache element's bytes */
        for (int64_t t = 0; t < T; t++) {
            const float* row = qkv + t * width;
            memcpy(q + t * qd, row, sizeof(float) * qd);
            fl_kv_store((char*)ly->k_cache + slots[t] * kv * item, ly->kv_dtype, row + qd, kv);
            fl_kv_store((char*)ly->v_cache + slots[t] * kv * item, ly->kv_dtype, row + qd + kv, kv);
        }
        for (int64_t g = 0; g < G; g++) {
            const fl_group* gr = groups + g;
            int64_t rows = gr->B * gr->n;
            if (!gr->q_index) {
                fl_paged_attention(q, gr->B, gr->n, H, D, ly->k_cache, ly->v_cache, ly->kv_dtype, Hkv, gr->kv_index,
                                   gr->Lk, gr->mask, scale, att, threads);
                continue;
            }
            for (int64_t r = 0; r < rows; r++) memcpy(gq + r * qd, q + gr->q_index[r] * qd, sizeof(float) * qd);
            fl_paged_attention(gq, gr->B, gr->n, H, D, ly->k_cache, ly->v_cache, ly->kv_dtype, Hkv, gr->kv_index,
                               gr->Lk, gr->mask, scale, gatt, threads);
            for (int64_t r = 0; r < rows; r++) memcpy(att + gr->q_index[r] * qd, gatt + r * qd, sizeof(float) * qd);
        }
        fl_matrix_apply(&ly->o, att, T, qd, delta, threads);
        fl_rms_norm(x, delta, ly->post_norm, eps, T, K, x, h);
        if (ly->moe) {
            fl_moe_forward(ly->moe, h, T, K, rank, top_k, delta, threads);
        } else {
            fl_matrix_apply(&ly->gate_up, h, T, K, gu, threads);
            fl_silu_mul(gu, T, I, act);
            fl_matrix_apply(&ly->down, act, T, I, delta, threads);
        }
        for (int64_t i = 0; i < T * K; i++) x[i] += delta[i];
    }
}
