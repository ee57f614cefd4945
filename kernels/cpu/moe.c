/* ---- a sparse Mixture-of-Experts feed-forward --------------------------------------------------
 * models/moe.py's SparseMoeBlock (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the router's softmax in
 * float32, each token's top-k experts (the larger probability first, of equal ones the lower expert),
 * renormalised where the model says so, or per token one expert of router rank r >= 1 with weight 1
 * (SCMoE's weak rows) or a token's own top-k; the experts run grouped by expert in ascending order,
 * each over its tokens in ascending order, out[t] += y * w; then Qwen2-MoE's shared expert,
 * out + sigmoid(gate) * shared. The per-layer path calls this too, so both paths agree to the bit. */
#include "common.h"

/* x [T, K] -> out [T, K]; rank, top_k [T] per-token routing (NULL: the router's own top-k). */
void fl_moe_forward(const fl_moe* m, const float* x, int64_t T, int64_t K, const int64_t* rank, const int64_t* top_k,
                    float* out, int threads) {
    int64_t E = m->E, I = m->I;
    float* probs = malloc(sizeof(float) * T * E);
    int64_t* chosen = malloc(sizeof(int64_t) * T * E); /* each token's experts, best first */
    float* weight = malloc(sizeof(float) * T * E);
    int64_t* used = malloc(sizeof(int64_t) * T);       /* how many of them */
    fl_matrix_apply(&m->gate, x, T, K, probs, threads);
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
        fl_matrix_apply(m->gate_up + e, xg, count, K, gu, threads);
        fl_silu_mul(gu, count, I, act);
        fl_matrix_apply(m->down + e, act, count, I, y, threads);
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
        fl_matrix_apply(&m->shared_gate_up, x, T, K, sgu, threads);
        fl_silu_mul(sgu, T, S, sact);
        fl_matrix_apply(&m->shared_down, sact, T, S, y, threads);
        fl_matrix_apply(&m->shared_gate, x, T, K, g, threads);
        for (int64_t t = 0; t < T; t++) {
            float s = 1.0f / (1.0f + expf(-g[t]));
            for (int64_t i = 0; i < K; i++) out[t * K + i] += s * y[t * K + i];
        }
        free(sgu), free(sact), free(g);
    }
    free(y);
}
