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

static void kvq_forget_token(llama_kvq_state & s, int32_t pos) {
    if (pos >= 0 && pos < (int32_t) s.tok_at.size() && s.tok_at[pos] >= 0) {
        auto it = s.tok_count.find(s.tok_at[pos]);
        if (it != s.tok_count.end() && --it->second == 0) s.tok_count.erase(it);
        s.tok_at[pos] = -1;
        s.n_tok_seen--;
    }
}

// LEARNED with a budget: the price per effective bit (0 otherwise). The target is the bits per
// decided row that put the whole cache (the window included) at budget_bits when the context
// is full, as the cap counts; the price follows the overspend of the decided rows against it.
static double kvq_eff_bits(const llama_kvq_state & s, int q) {
    return 8.0 * (double) s.c_row[q] / (2.0 * s.n_embd_kv);
}

static double kvq_target_bits(const llama_kvq_state & s) {
    const int64_t w = std::min<int64_t>(s.p.window, s.n_ctx - 1);
    const double t_dec = ((double) s.p.budget_bits * s.n_ctx - kvq_eff_bits(s, LLAMA_KVQ_WINDOW) * w) / (double) (s.n_ctx - w);
    return std::min(std::max(t_dec, kvq_eff_bits(s, s.min_pool)), kvq_eff_bits(s, LLAMA_KVQ_F16));
}

static float kvq_price(const llama_kvq_state & s) {
    if (s.p.policy != LLAMA_KVQ_POLICY_LEARNED || s.p.budget_bits <= 0.0f) return 0.0f;
    return (float) (s.p.price_step * (8.0 * (double) s.paid_bytes / (2.0 * s.n_embd_kv) - (double) s.paid_rows * kvq_target_bits(s)));
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
    if (ub.n_pos > 1 || (ub.embd != nullptr && ub.token == nullptr)) {
        LLAMA_LOG_ERROR("%s: kvq supports token input with 1-D positions\n", __func__);
        return false;
    }
    int32_t pmin = INT32_MAX;
    s->ub_pos.resize(ub.n_tokens);
    s->ub_tok.resize(ub.n_tokens);
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        if (ub.n_seq_id[i] != 1 || ub.seq_id[i][0] != 0) {
            LLAMA_LOG_ERROR("%s: kvq supports a single sequence (seq_id 0)\n", __func__);
            return false;
        }
        if (ub.pos[i] < 0 || ub.pos[i] >= s->n_ctx) {
            LLAMA_LOG_ERROR("%s: position %d outside the context\n", __func__, ub.pos[i]);
            return false;
        }
        s->ub_pos[i] = ub.pos[i];
        s->ub_tok[i] = ub.token ? ub.token[i] : -1;
        pmin = std::min(pmin, ub.pos[i]);
    }
    // Positions >= the ubatch's first one were removed from the memory (seq_rm / clear):
    // drop what we hold for them. Rows rolled back behind a kept prefix (as when several
    // continuations of one prompt are scored in turn) refund what they paid into the price, so
    // the price steers the rows the cache keeps; a clear (pmin 0) keeps the price learned so far.
    if (pmin <= s->max_pos) {
        for (auto & L : s->layers) {
            for (int q = 0; q < LLAMA_KVQ_N_POOLS; ++q) {
                kvq_pool & P = L.pools[q];
                for (size_t i = P.n(); i-- > 0;) {
                    if (P.pos[i] >= pmin) {
                        if (pmin > 0 && q != LLAMA_KVQ_WINDOW) {
                            s->paid_bytes -= s->c_row[q];
                            s->paid_rows--;
                        }
                        s->held -= s->c_row[q];
                        s->rows_held--;
                        if (q == LLAMA_KVQ_WINDOW) s->win_rows--;
                        if (q == LLAMA_KVQ_WINDOW) {
                            kvq_window_remove(L, i, s->n_head, s->n_embd_kv);
                        } else {
                            kvq_remove(P, i);
                        }
                    }
                }
            }
        }
        for (int32_t p = pmin; p <= s->max_pos; ++p) kvq_forget_token(*s, p);
        s->max_pos = pmin - 1;
    }
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        kvq_forget_token(*s, s->ub_pos[i]);
        s->tok_at[s->ub_pos[i]] = s->ub_tok[i];
        s->tok_count[s->ub_tok[i]]++;
        s->n_tok_seen++;
        s->max_pos = std::max(s->max_pos, s->ub_pos[i]);
    }
    s->ub_base = s->layers[0].pools[LLAMA_KVQ_WINDOW].n();
    s->n_threads_max = std::max<int>({1, (int) ctx.n_threads(), (int) ctx.n_threads_batch()});
    if ((int) s->scratch.size() < s->n_threads_max) s->scratch.resize(s->n_threads_max);
    if (s->need_feat && !s->direct) {
        for (auto & L : s->layers) {
            const size_t rows = s->ub_base + ub.n_tokens;
            if ((int) L.recv_t.size() < s->n_threads_max) {
                L.recv_t.resize(s->n_threads_max, std::vector<float>(s->ub_base * s->n_head, 0.0f));
                L.nq_t.resize(s->n_threads_max, std::vector<int32_t>(s->ub_base * s->n_head, 0));
            }
            for (auto & r : L.recv_t) r.resize(rows * s->n_head, 0.0f);
            for (auto & r : L.nq_t) r.resize(rows * s->n_head, 0);
            L.ent.resize(rows * s->n_head, 0.0f);
            if (s->p.qar_mu > 0.0f) {
                if ((int) L.qacc_t.size() < s->n_threads_max) {
                    L.qacc_t.resize(s->n_threads_max, std::vector<float>(s->ub_base * s->n_embd_kv, 0.0f));
                }
                for (auto & r : L.qacc_t) r.resize(rows * s->n_embd_kv, 0.0f);
            }
        }
        if (!s->attn_ref) {
            s->wsc_n = (int64_t) s->ub_base + ub.n_tokens;
            const size_t need = (size_t) ub.n_tokens * s->n_head * s->wsc_n;
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
static void kvq_exit_prepare(const llama_kvq_state & s, int il, size_t i, bool trial, kvq_exit_row & R) {
    const kvq_pool & W = s.layers[il].pools[LLAMA_KVQ_WINDOW];
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
    const kvq_layer & LL = s.layers[il];
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
    const kvq_pool & Q = s.layers[il].pools[s.min_pool];
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
    const kvq_pool & Q = s.layers[0].pools[s.min_pool];
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
static float kvq_received(const llama_kvq_state & s, int il, size_t i) {
    const kvq_layer & L = s.layers[il];
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
static void kvq_features(const llama_kvq_state & s, int il, size_t i, const kvq_exit_row & R, float * f) {
    const kvq_layer & L = s.layers[il];
    const int32_t pos = L.pools[LLAMA_KVQ_WINDOW].pos[i];
    const llama_token tok = s.tok_at[pos];
    auto it = s.tok_count.find(tok);
    f[F_FREQ] = s.n_tok_seen > 0 && it != s.tok_count.end() ? (float) it->second / (float) s.n_tok_seen : 0.0f;
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
    f[F_RECV] = std::log1p(kvq_received(s, il, i));
}

// Policy decision in bits for a token (features f, averaged over layers when per token). Rows are
// decided in position order, then layer order: the order the controller's running feature
// statistics (norm_prior > 0) take them in.
static int kvq_decide(llama_kvq_state & s, int32_t pos, int il, const float * f, float received) {
    switch (s.p.policy) {
        case LLAMA_KVQ_POLICY_STATIC:
            return s.p.static_bits;
        case LLAMA_KVQ_POLICY_RULE:
            if (pos < s.p.rule_sink) return 16;
            if (received >= s.p.rule_heavy) return 8;
            return s.p.rule_base_bits;
        case LLAMA_KVQ_POLICY_LEARNED:
            return s.ctrl->decide(f, kvq_price(s), &s.norm);
        case LLAMA_KVQ_POLICY_ASSIGN: {
            const int64_t idx = s.p.per_layer ? (int64_t) pos * s.n_layer + (il < 0 ? 0 : il) : pos;
            return idx < (int64_t) s.assign.size() ? s.assign[idx] : s.p.static_bits;
        }
    }
    return 16;
}

void llama_kvq_after_ubatch(llama_context & ctx, const llama_ubatch & ub) {
    GGML_UNUSED(ub);
    llama_kvq_state * s = ctx.kvq.get();
    if (!s || s->direct) return;
    const double t0 = kvq_now_ms();
    const int32_t cutoff = s->max_pos - s->p.window; // positions <= cutoff leave the window
    kvq_pool & W0 = s->layers[0].pools[LLAMA_KVQ_WINDOW];
    // window rows leaving, in position order (rows are in the same order in every layer)
    std::vector<std::pair<int32_t, size_t>> leaving;
    for (size_t i = 0; i < W0.n(); ++i) {
        if (W0.pos[i] <= cutoff) leaving.push_back({ W0.pos[i], i });
    }
    if (leaving.empty()) {
        s->t_policy_ms += kvq_now_ms() - t0;
        return;
    }
    std::sort(leaving.begin(), leaving.end());
    // the rule policy reads received attention only; the full feature vector (with the trial
    // encoding at the lowest precision) is for the controller and the trace
    const bool full_feat = s->p.trace || s->p.policy == LLAMA_KVQ_POLICY_LEARNED;
    auto pay = [&](int q, int rows) {
        s->paid_bytes += rows * s->c_row[q];
        s->paid_rows += rows;
    };
    std::vector<int> target(s->n_layer);
    float f[LLAMA_KVQ_N_FEATURES] = {}, facc[LLAMA_KVQ_N_FEATURES] = {};
    kvq_batch_cap bc;
    if (s->p.policy == LLAMA_KVQ_POLICY_LEARNED && s->p.budget_bits > 0.0f && s->p.window == 0) {
        const int64_t rows = (int64_t) leaving.size() * s->n_layer;
        bc.on = true;
        bc.left = rows;
        bc.cap = (kvq_target_bits(*s) + KVQ_BATCH_SLACK) * (double) rows;
    }
    for (const auto & lr : leaving) {
        const int32_t pos = lr.first;
        const size_t i = lr.second;
        for (int il = 0; il < s->n_layer; ++il) kvq_exit_prepare(*s, il, i, full_feat, s->exit_rows[il]);
        if (s->p.per_layer) {
            for (int il = 0; il < s->n_layer; ++il) {
                if (full_feat) kvq_features(*s, il, i, s->exit_rows[il], f);
                const float recv = s->need_feat ? kvq_received(*s, il, i) : 1.0f;
                const int bits = bc.fit(*s, kvq_decide(*s, pos, il, f, recv), 1);
                const int q = kvq_fit_pool(*s, kvq_pool_of_bits(bits), LLAMA_KVQ_WINDOW, 1);
                target[il] = q;
                pay(q, 1);
                bc.pay(*s, q, 1);
                s->held += s->c_row[q] - s->c_row[LLAMA_KVQ_WINDOW];
                s->win_rows--;
                if (s->p.trace) {
                    kvq_trace_rec rec{ pos, il, s->tok_at[pos], KVQ_BITS[q], {} };
                    memcpy(rec.feat, f, sizeof(f));
                    s->trace.push_back(rec);
                }
            }
        } else {
            float recv = 1.0f;
            if (s->need_feat) {
                std::fill(facc, facc + LLAMA_KVQ_N_FEATURES, 0.0f);
                recv = 0.0f;
                for (int il = 0; il < s->n_layer; ++il) {
                    recv += kvq_received(*s, il, i);
                    if (!full_feat) continue;
                    kvq_features(*s, il, i, s->exit_rows[il], f);
                    for (int j = 0; j < LLAMA_KVQ_N_FEATURES; ++j) facc[j] += f[j];
                }
                for (int j = 0; j < LLAMA_KVQ_N_FEATURES; ++j) facc[j] /= s->n_layer;
                recv /= s->n_layer;
            }
            const int bits = bc.fit(*s, kvq_decide(*s, pos, -1, facc, recv), s->n_layer);
            const int q = kvq_fit_pool(*s, kvq_pool_of_bits(bits), LLAMA_KVQ_WINDOW, s->n_layer);
            std::fill(target.begin(), target.end(), q);
            pay(q, s->n_layer);
            bc.pay(*s, q, s->n_layer);
            s->held += s->n_layer * (s->c_row[q] - s->c_row[LLAMA_KVQ_WINDOW]);
            s->win_rows -= s->n_layer;
            if (s->p.trace) {
                kvq_trace_rec rec{ pos, -1, s->tok_at[pos], KVQ_BITS[q], {} };
                memcpy(rec.feat, facc, sizeof(facc));
                s->trace.push_back(rec);
            }
        }
        // held already counts the rows in their new pools; the window copies go below
        for (int il = 0; il < s->n_layer; ++il) {
            kvq_exit_append(*s, s->layers[il].pools[target[il]], s->exit_rows[il], pos);
        }
    }
    std::vector<size_t> rows_desc;
    for (auto & lr : leaving) rows_desc.push_back(lr.second);
    std::sort(rows_desc.rbegin(), rows_desc.rend());
    for (int il = 0; il < s->n_layer; ++il) {
        for (size_t i : rows_desc) {
            kvq_window_remove(s->layers[il], i, s->n_head, s->n_embd_kv);
        }
    }
    s->t_policy_ms += kvq_now_ms() - t0;
}
