// kvq: the ggml custom ops (store, reference attention, fused partial and merge) and the
// build_attn hook that puts them in the graph.
#include "llama-kvq-impl.h"

#include <algorithm>
#include <cmath>
#include <cstring>

//
// custom ops
//

// custom op 1 (single task): store the ubatch's K/V rows (src0 = k_cur, src1 = v_cur).
static void kvq_op_store(ggml_tensor * dst, int ith, int nth, void * userdata) {
    GGML_UNUSED(nth);
    if (ith != 0) return;
    auto * a = (kvq_attn_args *) userdata;
    llama_kvq_state & s = *a->s;
    const ggml_tensor * k = dst->src[0];
    const ggml_tensor * v = dst->src[1];
    const int n_tok = (int) s.ub_pos.size();
    GGML_ASSERT(k->type == GGML_TYPE_F32 && v->type == GGML_TYPE_F32);
    GGML_ASSERT(k->ne[0] * k->ne[1] == s.n_embd_kv && k->ne[2] == n_tok);
    std::vector<float> kr(s.n_embd_kv), vr(s.n_embd_kv), tmp(s.n_embd_kv);
    // in sequence order, so that each sequence's window rows of the ubatch follow its queries' order
    for (int o = 0; o < n_tok; ++o) {
        const int i = s.ub_order[o];
        kvq_layer & L = s.seqs[s.ub_seq[i]].layers[a->il];
        // rows may be strided views: gather head by head
        for (int g = 0; g < s.n_head_kv; ++g) {
            memcpy(kr.data() + g * s.hd, (const char *) k->data + i * k->nb[2] + g * k->nb[1], s.hd * sizeof(float));
            memcpy(vr.data() + g * s.hd, (const char *) v->data + i * v->nb[2] + g * v->nb[1], s.hd * sizeof(float));
        }
        if (!s.k_mu.empty()) {
            const float * mu = s.k_mu.data() + (size_t) a->il * s.n_embd_kv;
            for (int e = 0; e < s.n_embd_kv; ++e) kr[e] -= mu[e];
        }
        int q = LLAMA_KVQ_WINDOW;
        if (s.direct) {
            q = kvq_fit_pool(s, kvq_pool_of_bits(s.p.static_bits), -1, 1);
        }
        kvq_append(s, L.pools[q], kr.data(), vr.data(), s.ub_pos[i], tmp.data());
        s.held += s.c_row[q];
        s.rows_held++;
        if (q == LLAMA_KVQ_WINDOW) s.win_rows++;
    }
}

// record_q: append the ubatch's query rows (q [hd, n_head, n_tok], plain post-RoPE) to layer il's record.
static void kvq_record_q(llama_kvq_state & s, int il, const ggml_tensor * q) {
    if (!s.p.record_q) return;
    const int n_tok = (int) s.ub_pos.size();
    auto & R = s.qrec[il];
    const size_t row = (size_t) s.n_head * s.hd, base = R.size();
    R.resize(base + n_tok * row);
    for (int i = 0; i < n_tok; ++i) {
        for (int h = 0; h < s.n_head; ++h) {
            memcpy(R.data() + base + i * row + h * s.hd, (const char *) q->data + i * q->nb[2] + h * q->nb[1], s.hd * sizeof(float));
        }
        s.qrec_pos[il].push_back(s.ub_pos[i]);
    }
}

// custom op 2 (multi-threaded): attention for every (query token, KV head) pair.
// src0 = q [hd, n_head, n_tok], src1 = the store op (ordering only), rest: kept inputs.
static void kvq_op_attn(ggml_tensor * dst, int ith, int nth, void * userdata) {
    auto * a = (kvq_attn_args *) userdata;
    llama_kvq_state & s = *a->s;
    const double t0 = ith == 0 ? kvq_now_ms() : 0.0;
    const ggml_tensor * q = dst->src[0];
    const int n_tok = (int) s.ub_pos.size();
    const int nitems = n_tok * s.n_head_kv;
    if (ith == 0) kvq_record_q(s, a->il, q);
    std::vector<float> qrow(s.n_head * s.hd);
    std::vector<float> & buf = s.scratch[ith < (int) s.scratch.size() ? ith : 0];
    const bool feat = s.need_feat && !s.direct;
    for (int it = ith; it < nitems; it += nth) {
        const int i = it / s.n_head_kv, g = it % s.n_head_kv;
        const int G = s.n_head / s.n_head_kv;
        for (int j = 0; j < G; ++j) {
            const int h = g * G + j;
            memcpy(qrow.data() + h * s.hd, (const char *) q->data + i * q->nb[2] + h * q->nb[1], s.hd * sizeof(float));
        }
        float * out = (float *) ((char *) dst->data + i * dst->nb[1]);
        kvq_seq & S = s.seqs[s.ub_seq[i]];
        kvq_attend_group(s, S.layers[a->il], qrow.data(), s.ub_pos[i], g, a->scale, out, buf, feat ? ith : -1,
                         feat ? (int64_t) (S.ub_base + s.ub_rank[i]) : -1);
    }
    if (ith == 0) s.t_attn_ms += kvq_now_ms() - t0;
}

// custom op 2' (fused, multi-threaded): partial states per (key chunk, token, head).
// src0 = q [hd, n_head, n_tok], src1 = the store op (ordering only), rest: kept inputs.
static void kvq_op_fused_partial(ggml_tensor * dst, int ith, int nth, void * userdata) {
    auto * a = (kvq_attn_args *) userdata;
    llama_kvq_state & s = *a->s;
    const double t0 = ith == 0 ? kvq_now_ms() : 0.0;
    const ggml_tensor * q = dst->src[0];
    GGML_ASSERT(ith < (int) s.scratch.size());
    const bool feat = s.need_feat && !s.direct;
    if (ith == 0) kvq_record_q(s, a->il, q);
    const kvq_qsrc qs{ (const char *) q->data, q->nb[1], q->nb[2] };
    const int slots = (int) dst->ne[3];
    const size_t ss = (size_t) kvq_st_size(s.hd) * s.n_head;
    int64_t work0 = 0;
    for (int32_t seq : s.ub_seqs) { // each sequence's queries over its own rows
        kvq_seq & S = s.seqs[seq];
        const kvq_layer & L = S.layers[a->il];
        const int nc = kvq_n_chunks(kvq_layer_rows(L), slots);
        const kvq_qset Q{ S.ub_n, s.ub_order.data() + S.ub_first, s.ub_qpos.data() + S.ub_first, work0 };
        float * part = (float *) dst->data + (size_t) slots * S.ub_first * ss;
        float * wsc = feat ? s.wsc.data() + (size_t) S.ub_first * s.n_head * s.wsc_n : nullptr;
        kvq_fused_partial(s, L, qs, Q, a->scale, part, nc, ith, nth, s.scratch[ith], wsc, s.wsc_n);
        work0 += (int64_t) ((S.ub_n + KVQ_QB - 1) / KVQ_QB) * nc;
    }
    if (ith == 0) s.t_attn_ms += kvq_now_ms() - t0;
}

// custom op 3 (fused, multi-threaded): merge the chunks, un-rotate, normalise; window features.
static void kvq_op_fused_merge(ggml_tensor * dst, int ith, int nth, void * userdata) {
    auto * a = (kvq_attn_args *) userdata;
    llama_kvq_state & s = *a->s;
    const double t0 = ith == 0 ? kvq_now_ms() : 0.0;
    const ggml_tensor * part = dst->src[0];
    const bool feat = s.need_feat && !s.direct;
    const ggml_tensor * q = dst->src[1];
    const kvq_qsrc qs{ (const char *) q->data, q->nb[1], q->nb[2] };
    const int slots = (int) part->ne[3];
    const size_t ss = (size_t) kvq_st_size(s.hd) * s.n_head;
    double t_feat = 0.0;
    for (int32_t seq : s.ub_seqs) {
        kvq_seq & S = s.seqs[seq];
        kvq_layer & L = S.layers[a->il];
        const int nc = kvq_n_chunks(kvq_layer_rows(L), slots);
        // work0 0: a sequence's token t, KV head g merges on thread (t n_head_kv + g) % nth whatever else shares the ubatch, so the
        // window features it adds to per-thread slots (summed at the row's decision) add up in the same
        // order as when the sequence runs alone: a request's decisions do not depend on other requests
        const kvq_qset Q{ S.ub_n, s.ub_order.data() + S.ub_first, s.ub_qpos.data() + S.ub_first, 0 };
        const float * ps = (const float *) part->data + (size_t) slots * S.ub_first * ss;
        const float * wsc = feat ? s.wsc.data() + (size_t) S.ub_first * s.n_head * s.wsc_n : nullptr;
        t_feat += kvq_fused_merge(s, L, S.ub_base, ps, nc, Q, (char *) dst->data, dst->nb[1], ith, nth, feat, wsc,
                                  s.wsc_n, qs);
    }
    if (ith == 0) {
        s.t_attn_ms += kvq_now_ms() - t0 - t_feat;
        s.t_policy_ms += t_feat;
    }
}

//
// graph
//

ggml_tensor * llama_kvq_build_attn(ggml_context * ctx0, ggml_cgraph * gf, void * state, ggml_tensor * q,
                                   ggml_tensor * k, ggml_tensor * v, ggml_tensor ** keep, int n_keep,
                                   float kq_scale, int il) {
    auto * s = (llama_kvq_state *) state;
    kvq_attn_args * a = &s->op_args[il];
    a->scale = kq_scale;

    if (k->type != GGML_TYPE_F32) k = ggml_cast(ctx0, k, GGML_TYPE_F32);
    if (v->type != GGML_TYPE_F32) v = ggml_cast(ctx0, v, GGML_TYPE_F32);
    ggml_tensor * store_args[2] = { k, v };
    ggml_tensor * stored = ggml_custom_4d(ctx0, GGML_TYPE_F32, 1, 1, 1, 1, store_args, 2, kvq_op_store, 1, a);
    ggml_build_forward_expand(gf, stored);

    ggml_tensor * attn_args[GGML_MAX_SRC];
    int n = 0;
    attn_args[n++] = q;
    attn_args[n++] = stored;
    for (int i = 0; i < n_keep && n < GGML_MAX_SRC; ++i) {
        if (keep[i]) attn_args[n++] = keep[i]; // unused inputs must stay in the graph to be allocated
    }
    const int64_t hd = q->ne[0], n_head = q->ne[1], n_tok = q->ne[2];
    if (s->attn_ref) {
        return ggml_custom_4d(ctx0, GGML_TYPE_F32, hd * n_head, n_tok, 1, 1, attn_args, n, kvq_op_attn, GGML_N_TASKS_MAX, a);
    }
    ggml_tensor * part = ggml_custom_4d(ctx0, GGML_TYPE_F32, kvq_st_size(hd), n_head, n_tok, kvq_chunk_slots(s->n_ctx),
                                        attn_args, n, kvq_op_fused_partial, GGML_N_TASKS_MAX, a);
    ggml_tensor * merge_args[2] = { part, q }; // q: query-aware rounding reads the queries
    return ggml_custom_4d(ctx0, GGML_TYPE_F32, hd * n_head, n_tok, 1, 1, merge_args, 2, kvq_op_fused_merge, GGML_N_TASKS_MAX, a);
}
