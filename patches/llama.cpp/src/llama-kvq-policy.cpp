// kvq: the ubatch hooks and the policy: window exits, features, decisions, the price.
#include "llama-kvq-impl.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-impl.h"

#include <algorithm>
#include <cmath>
#include <cstring>

//
// ubatch hooks
//

// LEARNED with a budget: the price per effective bit (0 otherwise). The target is the bits per
// decided row that put the whole cache (the window included) at budget_bits when the context
// is full, as the cap counts; the price follows the overspend of the decided rows against it.
static double kvq_eff_bits(const llama_kvq_state & s, int q) {
    return 8.0 * (double) s.c_row[q] / (2.0 * s.n_embd_kv);
}

static double kvq_target_bits(const llama_kvq_state & s) {
    const int64_t w = std::min<int64_t>(s.w_total, s.n_ctx - 1);
    const double t_dec = ((double) s.p.budget_bits * s.n_ctx - kvq_eff_bits(s, LLAMA_KVQ_WINDOW) * w) / (double) (s.n_ctx - w);
    return std::min(std::max(t_dec, kvq_eff_bits(s, s.min_pool)), kvq_eff_bits(s, LLAMA_KVQ_F16));
}

static float kvq_price(const llama_kvq_state & s, const kvq_seq & S) {
    if (s.p.policy != LLAMA_KVQ_POLICY_LEARNED || s.p.budget_bits <= 0.0f) return 0.0f;
    return (float) (s.p.price_step * (8.0 * (double) S.paid_bytes / (2.0 * s.n_embd_kv) - (double) S.paid_rows * kvq_target_bits(s)));
}

// LEARNED with a budget and W = 0 (multiple choice, scoring): every row of a prompt is decided in
// the ubatch that brought it, so the rows one ubatch decides must hold the budget on their own,
// or a short item would end above it while the price learns. A row keeps its choice while the
// ubatch's rows not yet decided can still fit at the lowest precision; otherwise it is lowered
// one class at a time. The ubatch then ends at most KVQ_BATCH_SLACK bits above the target.
// (With a window, decisions spread over many ubatches and the price alone steers them.)
static const double KVQ_BATCH_SLACK = 0.05;

struct kvq_batch_cap {
    bool on = false;
    double cap = 0.0, spent = 0.0; // bits x rows the ubatch may spend, has spent
    int64_t left = 0;              // rows of the ubatch not yet decided

    int fit(const llama_kvq_state & s, int bits, int rows) {
        if (!on) return bits;
        const double low = kvq_eff_bits(s, s.min_pool);
        left -= rows;
        while (bits > KVQ_BITS[s.min_pool] && kvq_pool_of_bits(bits) >= 0 &&
               spent + rows * kvq_eff_bits(s, kvq_pool_of_bits(bits)) + left * low > cap) {
            bits = bits > 8 ? 8 : bits > 4 ? 4 : KVQ_BITS[s.min_pool];
        }
        return bits;
    }
    void pay(const llama_kvq_state & s, int q, int rows) {
        if (on) spent += rows * kvq_eff_bits(s, q);
    }
};

bool llama_kvq_before_ubatch(llama_context & ctx, const llama_ubatch & ub) {
    llama_kvq_state * s = ctx.kvq.get();
    if (!s) return true;
    if (s->shifted) {
        LLAMA_LOG_ERROR("%s: kvq: a position shift (seq_add/seq_div) could not re-apply RoPE to the cache (the model's "
                        "RoPE factors are not in host memory); clear the memory to go on\n", __func__);
        return false;
    }
    if (ub.n_pos > 1 || (ub.embd != nullptr && ub.token == nullptr)) {
        LLAMA_LOG_ERROR("%s: kvq supports token input with 1-D positions\n", __func__);
        return false;
    }
    const uint32_t n = ub.n_tokens;
    const int32_t n_seq = (int32_t) s->seqs.size();
    s->ub_pos.resize(n);
    s->ub_tok.resize(n);
    s->ub_seq.resize(n);
    s->ub_rank.resize(n);
    s->ub_order.resize(n);
    s->ub_qpos.resize(n);
    for (uint32_t i = 0; i < n; ++i) {
        if (ub.n_seq_id[i] != 1) {
            LLAMA_LOG_ERROR("%s: kvq: a token in several sequences at once is not supported (copy a shared prefix "
                            "with seq_cp instead)\n", __func__);
            return false;
        }
        if (ub.seq_id[i][0] < 0 || ub.seq_id[i][0] >= n_seq) {
            LLAMA_LOG_ERROR("%s: kvq: sequence %d outside n_seq_max %d\n", __func__, ub.seq_id[i][0], n_seq);
            return false;
        }
        if (ub.pos[i] < 0 || ub.pos[i] >= s->n_ctx) {
            LLAMA_LOG_ERROR("%s: position %d outside the context\n", __func__, ub.pos[i]);
            return false;
        }
        s->ub_pos[i] = ub.pos[i];
        s->ub_tok[i] = ub.token ? ub.token[i] : -1;
        s->ub_seq[i] = ub.seq_id[i][0];
        s->ub_order[i] = (int32_t) i;
    }
    // the tokens grouped by sequence, in ubatch order within each
    std::stable_sort(s->ub_order.begin(), s->ub_order.end(), [&](int32_t a, int32_t b) { return s->ub_seq[a] < s->ub_seq[b]; });
    s->ub_seqs.clear();
    for (uint32_t k = 0; k < n; ++k) {
        const int32_t i = s->ub_order[k], seq = s->ub_seq[i];
        if (s->ub_seqs.empty() || s->ub_seqs.back() != seq) {
            s->ub_seqs.push_back(seq);
            kvq_seq & S = kvq_seq_use(*s, seq);
            S.ub_first = (int32_t) k;
            S.ub_n = 0;
        }
        kvq_seq & S = s->seqs[seq];
        s->ub_rank[i] = S.ub_n++;
        s->ub_qpos[k] = s->ub_pos[i];
    }
    for (int32_t seq : s->ub_seqs) {
        kvq_seq & S = s->seqs[seq];
        // Positions >= the sequence's first one in the ubatch are no longer in the memory (a failed
        // ubatch rolled back, or a seq_rm this state did not see): drop what we hold for them.
        int32_t pmin = INT32_MAX;
        for (int32_t k = S.ub_first; k < S.ub_first + S.ub_n; ++k) pmin = std::min(pmin, s->ub_qpos[k]);
        if (pmin <= S.max_pos) kvq_seq_remove(*s, S, pmin, -1, kvq_refunds(*s, S, pmin, -1));
        for (int32_t k = S.ub_first; k < S.ub_first + S.ub_n; ++k) {
            const int32_t i = s->ub_order[k], pos = s->ub_pos[i];
            kvq_seq_forget_token(S, pos);
            S.tok_at[pos] = s->ub_tok[i];
            S.tok_count[s->ub_tok[i]]++;
            S.n_tok_seen++;
            S.max_pos = std::max(S.max_pos, pos);
        }
        S.ub_base = S.layers[0].pools[LLAMA_KVQ_WINDOW].n();
    }
    s->n_threads_max = std::max<int>({1, (int) ctx.n_threads(), (int) ctx.n_threads_batch()});
    if ((int) s->scratch.size() < s->n_threads_max) s->scratch.resize(s->n_threads_max);
    if (s->need_feat && !s->direct) {
        s->wsc_n = 0;
        for (int32_t seq : s->ub_seqs) {
            kvq_seq & S = s->seqs[seq];
            const size_t rows = S.ub_base + S.ub_n;
            s->wsc_n = std::max<int64_t>(s->wsc_n, (int64_t) rows);
            for (auto & L : S.layers) {
                if ((int) L.recv_t.size() < s->n_threads_max) {
                    L.recv_t.resize(s->n_threads_max, std::vector<float>(S.ub_base * s->n_head, 0.0f));
                    L.nq_t.resize(s->n_threads_max, std::vector<int32_t>(S.ub_base * s->n_head, 0));
                }
                for (auto & r : L.recv_t) r.resize(rows * s->n_head, 0.0f);
                for (auto & r : L.nq_t) r.resize(rows * s->n_head, 0);
                L.ent.resize(rows * s->n_head, 0.0f);
                if (s->p.qar_mu > 0.0f) {
                    if ((int) L.qacc_t.size() < s->n_threads_max) {
                        L.qacc_t.resize(s->n_threads_max, std::vector<float>(S.ub_base * s->n_embd_kv, 0.0f));
                    }
                    for (auto & r : L.qacc_t) r.resize(rows * s->n_embd_kv, 0.0f);
                }
            }
        }
        if (!s->attn_ref) {
            const size_t need = (size_t) n * s->n_head * s->wsc_n;
            if (s->wsc.size() < need) s->wsc.resize(need);
        }
    }
    return true;
}

//
// window exits: features, decisions
//

// Decode window row i of layer il into R (rotated copies too); with `trial`, also encode it
// at the lowest precision and measure the error.
static void kvq_exit_prepare(const llama_kvq_state & s, const kvq_layer & LL, size_t i, bool trial, kvq_exit_row & R) {
    const kvq_pool & W = LL.pools[LLAMA_KVQ_WINDOW];
    const int n = s.n_embd_kv;
    if (W.tk == GGML_TYPE_F16) {
        ggml_fp16_to_fp32_row((const ggml_fp16_t *) (W.k.data() + i * W.row_k), R.k.data(), n);
        ggml_fp16_to_fp32_row((const ggml_fp16_t *) (W.v.data() + i * W.row_v), R.v.data(), n);
    } else { // q8_0 window (window_bits 8), rotated like the quantized pools
        ggml_get_type_traits(W.tk)->to_float(W.k.data() + i * W.row_k, R.k.data(), n);
        ggml_get_type_traits(W.tv)->to_float(W.v.data() + i * W.row_v, R.v.data(), n);
    }
    memcpy(R.kr.data(), R.k.data(), n * sizeof(float));
    memcpy(R.vr.data(), R.v.data(), n * sizeof(float));
    if (s.rotate) { // the rotation is its own inverse: rotated rows come back plain, plain rows rotated
        kvq_hadamard(W.rotated ? R.k.data() : R.kr.data(), n);
        kvq_hadamard(W.rotated ? R.v.data() : R.vr.data(), n);
    }
    R.has_min = false;
    R.quality = 0.0f;
    R.has_u = false;
    if (s.p.qar_mu > 0.0f && !LL.qacc_t.empty() && s.hd == 64) {
        std::fill(R.u.data(), R.u.data() + n, 0.0f);
        for (const auto & a : LL.qacc_t) {
            if (a.size() < (i + 1) * n) continue;
            for (int j = 0; j < n; ++j) R.u[j] += a[i * n + j];
        }
        if (s.rotate) kvq_hadamard(R.u.data(), n);
        R.has_u = kvq_qar_unit_heads(R.u.data(), s.n_head_kv);
    }
    if (!trial) return;
    const kvq_pool & Q = s.proto.pools[s.min_pool];
    const float * xk = Q.rotated ? R.kr.data() : R.k.data();
    const float * xv = Q.rotated ? R.vr.data() : R.v.data();
    ggml_get_type_traits_cpu(Q.tk)->from_float(xk, R.k_min.data(), n);
    ggml_get_type_traits_cpu(Q.tv)->from_float(xv, R.v_min.data(), n);
    if (s.p.v_unbias) kvq_unbias_v(Q.tv, R.v_min.data(), xv, n);
    R.has_min = true;
    // the error is the same in rotated space (the transform is orthonormal)
    float * back = R.back.data();
    double err = 0.0, norm = 0.0;
    for (int kv = 0; kv < 2; ++kv) {
        const float * x = kv ? xv : xk;
        ggml_get_type_traits(kv ? Q.tv : Q.tk)->to_float(kv ? R.v_min.data() : R.k_min.data(), back, n);
        for (int j = 0; j < n; ++j) {
            err += (double) (x[j] - back[j]) * (x[j] - back[j]);
            norm += (double) x[j] * x[j];
        }
    }
    R.quality = norm > 0 ? (float) (err / norm) : 0.0f;
}

// Append an exiting row to pool P, encoding it from the representation P stores.
static void kvq_exit_append(const llama_kvq_state & s, kvq_pool & P, const kvq_exit_row & R, int32_t pos) {
    const size_t n = P.n();
    if (P.row_k == 0) { // DROP: the position only
        P.pos.push_back(pos);
        return;
    }
    P.k.resize((n + 1) * P.row_k);
    P.v.resize((n + 1) * P.row_v);
    uint8_t * dk = P.k.data() + n * P.row_k;
    uint8_t * dv = P.v.data() + n * P.row_v;
    const kvq_pool & Q = s.proto.pools[s.min_pool];
    for (int side = 0; side < 2; ++side) {
        const ggml_type t = side ? P.tv : P.tk;
        uint8_t * d = side ? dv : dk;
        if (R.has_min && t == (side ? Q.tv : Q.tk) && P.rotated == Q.rotated) {
            memcpy(d, side ? R.v_min.data() : R.k_min.data(), side ? P.row_v : P.row_k); // the trial encoding
        } else if (t == GGML_TYPE_F16) {
            ggml_fp32_to_fp16_row(side ? R.v.data() : R.k.data(), (ggml_fp16_t *) d, s.n_embd_kv);
        } else {
            const float * x = P.rotated ? (side ? R.vr.data() : R.kr.data()) : (side ? R.v.data() : R.k.data());
            ggml_get_type_traits_cpu(t)->from_float(x, d, s.n_embd_kv);
            if (side && s.p.v_unbias) kvq_unbias_v(t, d, x, s.n_embd_kv);
        }
        if (side == 0 && R.has_u && (t == GGML_TYPE_KVQ2 || t == GGML_TYPE_Q4_0)) {
            kvq_qar_row(t, d, P.head_k, P.rotated ? R.kr.data() : R.k.data(), R.u.data(), s.n_head_kv, s.p.qar_mu);
        }
    }
    P.pos.push_back(pos);
}

// Mean received attention (relative to uniform) over heads, for the rule policy.
static float kvq_received(const llama_kvq_state & s, const kvq_layer & L, size_t i) {
    double r = 0.0;
    int64_t nq = 0;
    for (size_t t = 0; t < L.recv_t.size(); ++t) {
        for (int h = 0; h < s.n_head; ++h) {
            r += L.recv_t[t][i * s.n_head + h];
            nq += L.nq_t[t][i * s.n_head + h];
        }
    }
    return nq > 0 ? (float) (r / nq) : 1.0f;
}

// Features of window row i of layer il (its decoded rows in R). f: out[LLAMA_KVQ_N_FEATURES].
static void kvq_features(const llama_kvq_state & s, const kvq_seq & S, int il, size_t i, const kvq_exit_row & R, float * f) {
    const kvq_layer & L = S.layers[il];
    const int32_t pos = L.pools[LLAMA_KVQ_WINDOW].pos[i];
    const llama_token tok = S.tok_at[pos];
    auto it = S.tok_count.find(tok);
    f[F_FREQ] = S.n_tok_seen > 0 && it != S.tok_count.end() ? (float) it->second / (float) S.n_tok_seen : 0.0f;
    f[F_QUALITY] = R.quality;
    // received attention (relative to a uniform share) per head: variance across heads
    {
        double mean = 0.0, sq = 0.0;
        for (int h = 0; h < s.n_head; ++h) {
            double r = 0.0;
            int64_t nq = 0;
            for (size_t t = 0; t < L.recv_t.size(); ++t) {
                r += L.recv_t[t][i * s.n_head + h];
                nq += L.nq_t[t][i * s.n_head + h];
            }
            const double a = nq > 0 ? r / nq : 1.0;
            mean += a;
            sq += a * a;
        }
        mean /= s.n_head;
        f[F_ATTN_VAR] = (float) std::max(0.0, sq / s.n_head - mean * mean);
        double e = 0.0;
        for (int h = 0; h < s.n_head; ++h) e += L.ent[i * s.n_head + h];
        f[F_ATTN_ENT] = (float) (e / s.n_head);
    }
    f[F_LAYER] = s.n_layer > 1 ? (float) il / (float) (s.n_layer - 1) : 0.0f;
    f[F_POS] = (float) pos / (float) s.n_ctx;
    float km = 0.0f, vm = 0.0f;
    for (int j = 0; j < s.n_embd_kv; ++j) {
        km = std::max(km, std::fabs(R.k[j]));
        vm = std::max(vm, std::fabs(R.v[j]));
    }
    f[F_KMAX] = km;
    f[F_VMAX] = vm;
    f[F_RECV] = std::log1p(kvq_received(s, L, i));
}

// Policy decision in bits for a token (features f, averaged over layers when per token). Rows are
// decided in position order, then layer order: the order the controller's running feature
// statistics (norm_prior > 0) take them in.
static int kvq_decide(llama_kvq_state & s, kvq_seq & S, int32_t pos, int il, const float * f, float received) {
    switch (s.p.policy) {
        case LLAMA_KVQ_POLICY_STATIC:
            return s.p.static_bits;
        case LLAMA_KVQ_POLICY_RULE:
            if (pos < s.p.rule_sink) return 16;
            if (received >= s.p.rule_heavy) return 8;
            return s.p.rule_base_bits;
        case LLAMA_KVQ_POLICY_LEARNED:
            return s.ctrl->decide(f, kvq_price(s, S), &S.norm);
        case LLAMA_KVQ_POLICY_ASSIGN: {
            const int64_t idx = s.p.per_layer ? (int64_t) pos * s.n_layer + (il < 0 ? 0 : il) : pos;
            return idx < (int64_t) s.assign.size() ? s.assign[idx] : s.p.static_bits;
        }
    }
    return 16;
}

// Rows of sequence S older than its last W positions leave the window: features, decisions,
// re-encoding into the chosen pools.
static void kvq_seq_exits(llama_kvq_state & s, kvq_seq & S) {
    const int32_t cutoff = S.max_pos - s.p.window; // positions <= cutoff leave the window
    kvq_pool & W0 = S.layers[0].pools[LLAMA_KVQ_WINDOW];
    // window rows leaving, in position order (rows are in the same order in every layer)
    std::vector<std::pair<int32_t, size_t>> leaving;
    for (size_t i = 0; i < W0.n(); ++i) {
        if (W0.pos[i] <= cutoff) leaving.push_back({ W0.pos[i], i });
    }
    if (leaving.empty()) return;
    std::sort(leaving.begin(), leaving.end());
    // the rule policy reads received attention only; the full feature vector (with the trial
    // encoding at the lowest precision) is for the controller and the trace
    const bool full_feat = s.p.trace || s.p.policy == LLAMA_KVQ_POLICY_LEARNED;
    auto pay = [&](int q, int rows) {
        S.paid_bytes += rows * s.c_row[q];
        S.paid_rows += rows;
    };
    std::vector<int> target(s.n_layer);
    float f[LLAMA_KVQ_N_FEATURES] = {}, facc[LLAMA_KVQ_N_FEATURES] = {};
    kvq_batch_cap bc;
    if (s.p.policy == LLAMA_KVQ_POLICY_LEARNED && s.p.budget_bits > 0.0f && s.p.window == 0) {
        const int64_t rows = (int64_t) leaving.size() * s.n_layer;
        bc.on = true;
        bc.left = rows;
        bc.cap = (kvq_target_bits(s) + KVQ_BATCH_SLACK) * (double) rows;
    }
    for (const auto & lr : leaving) {
        const int32_t pos = lr.first;
        const size_t i = lr.second;
        // the per-layer work (decode, trial encoding, re-encoding) runs on the decode threads
        // (ggml's OpenMP team); the decisions stay in position and layer order
#pragma omp parallel for num_threads(s.n_threads_max) schedule(static) if (s.n_threads_max > 1)
        for (int il = 0; il < s.n_layer; ++il) kvq_exit_prepare(s, S.layers[il], i, full_feat, s.exit_rows[il]);
        if (s.p.per_layer) {
            for (int il = 0; il < s.n_layer; ++il) {
                if (full_feat) kvq_features(s, S, il, i, s.exit_rows[il], f);
                const float recv = s.need_feat ? kvq_received(s, S.layers[il], i) : 1.0f;
                const int bits = bc.fit(s, kvq_decide(s, S, pos, il, f, recv), 1);
                const int q = kvq_fit_pool(s, kvq_pool_of_bits(bits), LLAMA_KVQ_WINDOW, 1);
                target[il] = q;
                pay(q, 1);
                bc.pay(s, q, 1);
                s.held += s.c_row[q] - s.c_row[LLAMA_KVQ_WINDOW];
                s.win_rows--;
                if (s.p.trace) {
                    kvq_trace_rec rec{ pos, il, S.tok_at[pos], KVQ_BITS[q], {} };
                    memcpy(rec.feat, f, sizeof(f));
                    s.trace.push_back(rec);
                }
            }
        } else {
            float recv = 1.0f;
            if (s.need_feat) {
                std::fill(facc, facc + LLAMA_KVQ_N_FEATURES, 0.0f);
                recv = 0.0f;
                for (int il = 0; il < s.n_layer; ++il) {
                    recv += kvq_received(s, S.layers[il], i);
                    if (!full_feat) continue;
                    kvq_features(s, S, il, i, s.exit_rows[il], f);
                    for (int j = 0; j < LLAMA_KVQ_N_FEATURES; ++j) facc[j] += f[j];
                }
                for (int j = 0; j < LLAMA_KVQ_N_FEATURES; ++j) facc[j] /= s.n_layer;
                recv /= s.n_layer;
            }
            const int bits = bc.fit(s, kvq_decide(s, S, pos, -1, facc, recv), s.n_layer);
            const int q = kvq_fit_pool(s, kvq_pool_of_bits(bits), LLAMA_KVQ_WINDOW, s.n_layer);
            std::fill(target.begin(), target.end(), q);
            pay(q, s.n_layer);
            bc.pay(s, q, s.n_layer);
            s.held += s.n_layer * (s.c_row[q] - s.c_row[LLAMA_KVQ_WINDOW]);
            s.win_rows -= s.n_layer;
            if (s.p.trace) {
                kvq_trace_rec rec{ pos, -1, S.tok_at[pos], KVQ_BITS[q], {} };
                memcpy(rec.feat, facc, sizeof(facc));
                s.trace.push_back(rec);
            }
        }
        // held already counts the rows in their new pools; the window copies go below
#pragma omp parallel for num_threads(s.n_threads_max) schedule(static) if (s.n_threads_max > 1)
        for (int il = 0; il < s.n_layer; ++il) {
            kvq_exit_append(s, S.layers[il].pools[target[il]], s.exit_rows[il], pos);
        }
    }
    std::vector<size_t> rows_desc;
    for (auto & lr : leaving) rows_desc.push_back(lr.second);
    std::sort(rows_desc.rbegin(), rows_desc.rend());
#pragma omp parallel for num_threads(s.n_threads_max) schedule(static) if (s.n_threads_max > 1)
    for (int il = 0; il < s.n_layer; ++il) {
        for (size_t i : rows_desc) {
            kvq_window_remove(S.layers[il], i, s.n_head, s.n_embd_kv);
        }
    }
}

void llama_kvq_after_ubatch(llama_context & ctx, const llama_ubatch & ub) {
    GGML_UNUSED(ub);
    llama_kvq_state * s = ctx.kvq.get();
    if (!s || s->direct) return;
    const double t0 = kvq_now_ms();
    for (int32_t seq : s->ub_seqs) kvq_seq_exits(*s, s->seqs[seq]);
    s->t_policy_ms += kvq_now_ms() - t0;
}
