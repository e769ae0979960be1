// kvq: reference attention (two passes per query token and KV head over every pool), the
// kernel the fused one is tested against (params.attn_ref, llama_kvq_attend_kernel).
#include "llama-kvq-impl.h"

#include <algorithm>
#include <cmath>
#include <cstring>

//
// reference attention
//

// Attention of one query token (position qpos) for the query heads of KV head g, over layer L
// of the token's sequence.
// q: [n_head * hd] for this token; out: same layout. Accumulates window features when
// `feat_row` >= 0 (the query's own window row) and thread slot `ith`.
void kvq_attend_group(const llama_kvq_state & s, kvq_layer & L, const float * q, int32_t qpos, int g, float scale,
                      float * out, std::vector<float> & buf, int ith, int64_t feat_row) {
    const int hd = s.hd;
    const int G = s.n_head / s.n_head_kv;
    size_t total = 0;
    for (int p = 0; p < LLAMA_KVQ_N_STORED; ++p) total += L.pools[p].n();
    // q in each pool's dot format: f16 rows use ggml's f16 dot with q rounded to f16 (as stock
    // llama.cpp does); quantized rows use the type's SIMD vec_dot against rotated q quantized to
    // its vec_dot_type (as stock flash attention does).
    // scratch (floats): scores [G][total], q_rot [G][hd], row [hd], acc/acc_rot [G][hd],
    // q in dot format [pools][G][hd] (at most f32 size), running max [G]
    const size_t need = G * total + 3 * G * hd + hd + (size_t) LLAMA_KVQ_N_POOLS * G * hd + 16 + G;
    if (buf.size() < need) buf.resize(need);
    float * sc = buf.data();
    float * qr = sc + G * total;
    float * row = qr + G * hd;
    float * acc = row + hd;          // plain space
    float * accr = acc + G * hd;     // rotated space
    float * qd = accr + G * hd;
    float * mx = qd + (size_t) LLAMA_KVQ_N_POOLS * G * hd + 16;
    auto qdot = [&](int p, int j) { return (void *) (qd + ((size_t) p * G + j) * hd); };
    for (int j = 0; j < G; ++j) {
        const float * qj = q + (g * G + j) * hd;
        memcpy(qr + j * hd, qj, hd * sizeof(float));
        if (s.rotate) kvq_hadamard(qr + j * hd, hd);
    }
    for (int p = 0; p < LLAMA_KVQ_N_STORED; ++p) {
        const kvq_pool & P = L.pools[p];
        if (P.n() == 0) continue;
        const ggml_type vt = ggml_get_type_traits_cpu(P.tk)->vec_dot_type;
        for (int j = 0; j < G; ++j) {
            const float * src = P.rotated ? qr + j * hd : q + (g * G + j) * hd;
            if (vt == GGML_TYPE_F32) {
                memcpy(qdot(p, j), src, hd * sizeof(float));
            } else if (vt == GGML_TYPE_F16) {
                ggml_fp32_to_fp16_row(src, (ggml_fp16_t *) qdot(p, j), hd);
            } else {
                ggml_get_type_traits_cpu(vt)->from_float(src, qdot(p, j), hd);
            }
        }
    }
    // pass 1: scores
    size_t off = 0;
    for (int j = 0; j < G; ++j) mx[j] = -INFINITY;
    for (int p = 0; p < LLAMA_KVQ_N_STORED; ++p) {
        const kvq_pool & P = L.pools[p];
        const ggml_vec_dot_t dot = ggml_get_type_traits_cpu(P.tk)->vec_dot;
        for (size_t r = 0; r < P.n(); ++r) {
            if (P.pos[r] > qpos) {
                for (int j = 0; j < G; ++j) sc[j * total + off + r] = -INFINITY;
                continue;
            }
            const uint8_t * krow = P.k.data() + r * P.row_k + (size_t) g * P.head_k;
            for (int j = 0; j < G; ++j) {
                float d;
                dot(hd, &d, 0, krow, 0, qdot(p, j), 0, 1);
                d *= scale;
                sc[j * total + off + r] = d;
                mx[j] = std::max(mx[j], d);
            }
        }
        off += P.n();
    }
    // softmax
    for (int j = 0; j < G; ++j) {
        float sm = 0.0f;
        float * sj = sc + j * total;
        for (size_t r = 0; r < total; ++r) {
            const float e = sj[r] == -INFINITY ? 0.0f : expf(sj[r] - mx[j]);
            sj[r] = e;
            sm += e;
        }
        const float inv = sm > 0 ? 1.0f / sm : 0.0f;
        for (size_t r = 0; r < total; ++r) sj[r] *= inv;
    }
    // pass 2: values
    std::fill(acc, acc + 2 * G * hd, 0.0f);
    off = 0;
    for (int p = 0; p < LLAMA_KVQ_N_STORED; ++p) {
        const kvq_pool & P = L.pools[p];
        float * a = P.rotated ? accr : acc;
        const bool half = P.tv == GGML_TYPE_F16; // weights meet f16 values at f16, as stock does
        for (size_t r = 0; r < P.n(); ++r) {
            if (P.pos[r] > qpos) continue;
            kvq_decode_head(P.tv, P.head_v, P.v.data() + r * P.row_v, g, hd, row);
            for (int j = 0; j < G; ++j) {
                const float w0 = sc[j * total + off + r];
                const float w = half ? ggml_fp16_to_fp32(ggml_fp32_to_fp16(w0)) : w0;
                float * aj = a + j * hd;
                for (int t = 0; t < hd; ++t) aj[t] += w * row[t];
            }
        }
        off += P.n();
    }
    for (int j = 0; j < G; ++j) {
        if (s.rotate) kvq_hadamard(accr + j * hd, hd);
        float * o = out + (g * G + j) * hd;
        for (int t = 0; t < hd; ++t) o[t] = acc[j * hd + t] + accr[j * hd + t];
    }
    // window features: attention received by window rows, own-row entropy
    if (feat_row >= 0 && ith >= 0) {
        const kvq_pool & W = L.pools[LLAMA_KVQ_WINDOW]; // pool 0: offsets start at 0
        const float rel = (float) (qpos + 1);
        auto & recv = L.recv_t[ith];
        auto & nq = L.nq_t[ith];
        for (int j = 0; j < G; ++j) {
            const int h = g * G + j;
            const float * sj = sc + j * total;
            for (size_t r = 0; r < W.n(); ++r) {
                if (W.pos[r] >= qpos) continue; // attention from *later* queries only
                recv[r * s.n_head + h] += sj[r] * rel;
                nq[r * s.n_head + h] += 1;
            }
            if (!L.qacc_t.empty()) {
                // the weights are probabilities already: scores log p, max 0, 1 / sum 1
                for (size_t r = 0; r < W.n(); ++r) {
                    if (W.pos[r] >= qpos) continue;
                    const float w = sj[r] * sj[r];
                    if (!(w > 1e-12f)) continue;
                    float * a = L.qacc_t[ith].data() + r * s.n_embd_kv + g * hd;
                    const float * qh = q + h * hd;
                    for (int e = 0; e < hd; ++e) a[e] += w * qh[e];
                }
            }
            double e = 0.0;
            for (size_t r = 0; r < total; ++r) {
                if (sj[r] > 0.0f) e -= sj[r] * std::log(sj[r]);
            }
            L.ent[feat_row * s.n_head + h] = qpos > 0 ? (float) (e / std::log((double) qpos + 1.0)) : 0.0f;
        }
    }
}
