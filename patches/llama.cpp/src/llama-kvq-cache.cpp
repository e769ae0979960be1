// kvq: the per-context state (enable, params, stats), the pools' rows and the memory budget.
#include "llama-kvq-impl.h"

#include "llama-context.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

//
// errors
//

static thread_local std::string g_kvq_error;

int32_t kvq_fail(const std::string & msg) {
    g_kvq_error = msg;
    return -1;
}

const char * llama_kvq_last_error(void) {
    return g_kvq_error.c_str();
}

void llama_kvq_clear_error(void) {
    g_kvq_error.clear();
}

const char * const KVQ_FEATURE_NAMES[LLAMA_KVQ_N_FEATURES] = {
    "token_freq", "quality", "attn_var", "attn_entropy", "layer_frac", "position_frac", "k_absmax", "v_absmax",
    "attn_recv",
};

//
// llama_kvq_state
//

llama_kvq_params llama_kvq_default_params(void) {
    llama_kvq_params p;
    p.policy = LLAMA_KVQ_POLICY_STATIC;
    p.static_bits = 16;
    p.window = 0;
    p.budget_bits = 0.0f;
    p.budget_bytes = 0;
    p.per_layer = 0;
    p.trace = 0;
    p.rotate = 1;
    p.rule_sink = 4;
    p.rule_heavy = 2.0f;
    p.rule_base_bits = 4;
    p.attn_ref = 0;
    p.record_q = 0;
    p.price_step = 0.02f;
    p.k_center = 1;
    p.qar_mu = 0.5f;
    p.window_bits = 16;
    p.v_unbias = 1;
    p.controller_path = nullptr;
    return p;
}

int32_t llama_kvq_params_from_spec(const char * spec, llama_kvq_params * out) {
    if (!spec || !out) return kvq_fail("null kvq spec or params");
    const std::string str(spec);
    const size_t at = str.find('@');
    const std::string name = str.substr(0, at);
    llama_kvq_params p = llama_kvq_default_params();
    p.window = -1;
    static const struct { const char * name; int bits; } statics[] = {
        { "f16", 16 }, { "q8", 8 }, { "q4", 4 }, { "k4v2", 3 }, { "q2", 2 },
    };
    bool known = false;
    for (const auto & st : statics) {
        if (name == st.name) {
            p.policy = LLAMA_KVQ_POLICY_STATIC;
            p.static_bits = st.bits;
            p.k_center = 0;
            p.v_unbias = 0;
            known = true;
        }
    }
    if (name == "rule" || name == "adaptive") {
        p.policy = name == "rule" ? LLAMA_KVQ_POLICY_RULE : LLAMA_KVQ_POLICY_LEARNED;
        p.window_bits = 8;
        known = true;
    }
    if (!known) {
        return kvq_fail("unknown kvq policy '" + str + "' (choose one of f16, q8, q4, k4v2, q2, rule, adaptive; "
                        "rule and adaptive take @BITS, e.g. adaptive@3)");
    }
    if (at != std::string::npos) {
        if (p.policy == LLAMA_KVQ_POLICY_STATIC) {
            return kvq_fail("kvq policy '" + str + "': a static pool has a fixed size; @BITS applies to rule and adaptive");
        }
        const std::string bits = str.substr(at + 1);
        char * end = nullptr;
        const double b = strtod(bits.c_str(), &end);
        if (bits.empty() || !end || *end != '\0' || !std::isfinite(b) || b < 2.0 || b > 16.0) {
            return kvq_fail("kvq policy '" + str + "': @BITS takes a budget between 2 and 16 bits per element, e.g. " +
                            name + "@3");
        }
        p.budget_bits = (float) b;
        if (p.policy == LLAMA_KVQ_POLICY_RULE && b < 4.0) p.rule_base_bits = 2; // below 4 bits the rule's base is 2-bit
    }
    *out = p;
    return 0;
}

llama_kvq_state * kvq_of(const llama_context * ctx) {
    return ctx ? ctx->kvq.get() : nullptr;
}

int32_t llama_kvq_enabled(const llama_context * ctx) {
    return kvq_of(ctx) != nullptr;
}

int32_t llama_kvq_enable(llama_context * ctx, const llama_kvq_params * params) {
    if (!ctx || !params) return kvq_fail("null context or params");
    if (ctx->kvq) return kvq_fail("kvq is already enabled on this context");
    const llama_model & model = ctx->get_model();
    const auto & hp = model.hparams;
    const llama_kvq_params & p = *params;
    if (llama_model_has_encoder(&model) || hp.n_layer() == 0) return kvq_fail("kvq supports decoder-only models");
    const uint32_t n_seq_max = ctx->get_cparams().n_seq_max;
    if (n_seq_max < 1) return kvq_fail("kvq needs n_seq_max >= 1");
    if (n_seq_max > 1 && !ctx->get_cparams().kv_unified) {
        return kvq_fail("kvq with several sequences needs a unified KV cache (kv_unified; llama_kvq_init_from_model sets it)");
    }
    const int n_head = hp.n_head(0), n_head_kv = hp.n_head_kv(0), hd = hp.n_embd_head_k(0);
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        if ((int) hp.n_head(il) != n_head || (int) hp.n_head_kv(il) != n_head_kv || (int) hp.n_embd_head_k(il) != hd ||
            hp.n_embd_head_v(il) != hp.n_embd_head_k(il) || hp.is_swa(il)) {
            return kvq_fail("kvq needs uniform layers without sliding-window attention");
        }
    }
    if (n_head_kv <= 0 || n_head % n_head_kv != 0) return kvq_fail("n_head must be a multiple of n_head_kv");
    if (hd <= 0 || hd % 64 != 0) {
        // kvq2 blocks (the 2- and 3-bit pools, the floor every budget demotes to) hold 64 values of one head
        return kvq_fail("kvq needs head_dim % 64 == 0; the model's head_dim is " + std::to_string(hd));
    }
    if (p.window < -1) return kvq_fail("window must be >= 0 (or -1: the policy's default)");
    if (p.window_bits != 16 && p.window_bits != 8) return kvq_fail("window bits must be 16 or 8");
    // the controller in use: a controller file when given, else the one embedded in the model
    std::shared_ptr<const llama_kvq_controller> controller = model.kvq_controller;
    std::string origin = "the model's kvq controller";
    if (p.controller_path) {
        controller = kvq_read_controller_file(p.controller_path);
        if (!controller) return -1;
        origin = std::string("controller file ") + p.controller_path;
    }
    switch (p.policy) {
        case LLAMA_KVQ_POLICY_STATIC:
            if (kvq_stored_pool_of_bits(p.static_bits) < 0) return kvq_fail("static bits must be 16, 8, 4, 3 or 2");
            break;
        case LLAMA_KVQ_POLICY_RULE:
            if (kvq_stored_pool_of_bits(p.rule_base_bits) < 0) return kvq_fail("rule base bits must be 16, 8, 4, 3 or 2");
            break;
        case LLAMA_KVQ_POLICY_LEARNED: {
            if (p.controller_path) break; // read and validated above
            const int32_t r = llama_kvq_model_controller(&model);
            if (r == 0) {
                return kvq_fail("the model has no kvq controller (kvq.controller.* metadata); embed one with `kvq embed` "
                                "or pass a controller file (controller_path)");
            }
            if (r < 0) return -1;
            break;
        }
        case LLAMA_KVQ_POLICY_ASSIGN:
            if (kvq_stored_pool_of_bits(p.static_bits) < 0) return kvq_fail("default bits must be 16, 8, 4, 3 or 2");
            break;
        default:
            return kvq_fail("unknown kvq policy " + std::to_string(p.policy));
    }

    auto s = std::make_shared<llama_kvq_state>();
    s->p = p;
    if (p.window < 0) { // the policy's default for one sequence's share of the context
        const int64_t n_ctx_seq = (int64_t) ctx->n_ctx() / n_seq_max;
        s->p.window = p.policy == LLAMA_KVQ_POLICY_STATIC ? 0
                    : p.window_bits == 8 ? (int32_t) std::min<int64_t>(128, std::max<int64_t>(32, n_ctx_seq / 16)) : 32;
    }
    s->p.controller_path = nullptr; // not kept: the caller owns the string
    s->model = &model;
    s->controller = controller;
    s->ctrl = p.policy == LLAMA_KVQ_POLICY_LEARNED ? controller.get() : nullptr;
    if (s->ctrl && s->ctrl->per_layer) s->p.per_layer = 1; // decide as the controller was trained
    s->n_layer = hp.n_layer();
    s->n_head = n_head;
    s->n_head_kv = n_head_kv;
    s->hd = hd;
    s->n_embd_kv = n_head_kv * hd;
    s->n_ctx = ctx->n_ctx();
    s->rotate = p.rotate != 0; // in whole 64-value chunks per head (head_dim % 64 == 0)
    s->need_feat = p.policy == LLAMA_KVQ_POLICY_RULE || p.policy == LLAMA_KVQ_POLICY_LEARNED || p.trace || p.qar_mu > 0.0f;
    s->direct = p.policy == LLAMA_KVQ_POLICY_STATIC && s->p.window == 0;
    // KVQ_ATTN_REF=1 / KVQ_ATTN_ISA=scalar|avx2|avx512|neon override the kernel choice (benchmarks,
    // fallback tests); an ISA the CPU or the shape does not support falls back to the best one
    const char * env_ref = getenv("KVQ_ATTN_REF");
    const char * env_isa = getenv("KVQ_ATTN_ISA");
    s->attn_ref = p.attn_ref != 0 || (env_ref && atoi(env_ref) != 0);
    s->isa = kvq_isa_best(hd, n_head / n_head_kv);
    for (kvq_isa isa : { KVQ_ISA_SCALAR, KVQ_ISA_AVX2, KVQ_ISA_AVX512, KVQ_ISA_NEON }) {
        if (env_isa && strcmp(env_isa, kvq_isa_name(isa)) == 0 && kvq_isa_supported(isa, hd, n_head / n_head_kv)) s->isa = isa;
    }
    if (p.record_q) {
        s->qrec.resize(s->n_layer);
        s->qrec_pos.resize(s->n_layer);
    }
    for (int q = 0; q < LLAMA_KVQ_N_POOLS; ++q) {
        kvq_pool & P = s->proto.pools[q];
        P.tk = kvq_pool_type(q, false);
        P.tv = kvq_pool_type(q, true);
        if (q == LLAMA_KVQ_WINDOW && p.window_bits == 8) P.tk = P.tv = GGML_TYPE_Q8_0;
        P.rotated = s->rotate && (q >= LLAMA_KVQ_Q8 || P.tk != GGML_TYPE_F16);
        P.row_k = ggml_row_size(P.tk, s->n_embd_kv);
        P.row_v = ggml_row_size(P.tv, s->n_embd_kv);
        P.head_k = ggml_row_size(P.tk, hd);
        P.head_v = ggml_row_size(P.tv, hd);
        if (q == LLAMA_KVQ_DROP) P.row_k = P.row_v = P.head_k = P.head_v = 0;
        s->c_row[q] = (int64_t) (P.row_k + P.row_v);
    }
    s->seqs.resize(n_seq_max);
    // every sequence may hold a window; together they never hold more rows than the context
    s->w_total = std::min<int64_t>((int64_t) s->p.window * n_seq_max, s->n_ctx);
    // budget: the smaller of the caps; it must leave room for the windows at their precision and
    // every other token at the lowest precision, so a full pool can always demote.
    int64_t budget = 0;
    if (p.budget_bits > 0.0f) {
        budget = (int64_t) std::floor((double) p.budget_bits / 8.0 * 2.0 * s->n_embd_kv * s->n_layer * s->n_ctx);
    }
    if (p.budget_bytes > 0 && (budget == 0 || p.budget_bytes < budget)) {
        budget = p.budget_bytes;
    }
    if (budget > 0) {
        const int64_t W = s->w_total;
        const int64_t need = (s->n_ctx - W) * s->n_layer * s->c_row[s->min_pool] + W * s->n_layer * s->c_row[LLAMA_KVQ_WINDOW];
        if (budget < need) {
            char buf[256];
            snprintf(buf, sizeof(buf), "budget too small: %.2f bits/elem needed at least for window %lld at context %lld%s",
                     8.0 * need / (2.0 * s->n_embd_kv * s->n_layer * s->n_ctx), (long long) s->p.window, (long long) s->n_ctx,
                     n_seq_max > 1 ? (" with " + std::to_string(n_seq_max) + " sequences").c_str() : "");
            return kvq_fail(buf);
        }
    }
    s->budget = budget;
    if (p.k_center && controller && controller->present && controller->error.empty() && !controller->k_center.empty()) {
        if (!kvq_controller_fits(*controller, origin, s->n_layer, s->n_embd_kv)) return -1;
        s->k_mu = controller->k_center;
    }
    s->op_args.resize(s->n_layer);
    for (int il = 0; il < s->n_layer; ++il) s->op_args[il] = kvq_attn_args{ s.get(), il, 1.0f / std::sqrt((float) hd) };
    // rows leaving the window: buffers for one row of each layer at a time
    const kvq_pool & low = s->proto.pools[s->min_pool];
    s->exit_rows.resize(s->direct ? 0 : s->n_layer);
    for (kvq_exit_row & R : s->exit_rows) {
        for (std::vector<float> * b : { &R.k, &R.v, &R.kr, &R.vr, &R.u, &R.back }) b->resize(s->n_embd_kv);
        R.k_min.resize(low.row_k);
        R.v_min.resize(low.row_v);
    }

    s->lctx = ctx;
    s->memory = ctx->get_memory();
    if (s->memory) kvq_register(s->memory, s.get());
    ctx->set_kvq(s); // the graph reads the state through cparams.kvq
    return 0;
}

int32_t llama_kvq_set_assignment(llama_context * ctx, const int32_t * bits, int64_t n) {
    llama_kvq_state * s = kvq_of(ctx);
    if (!s) return kvq_fail("kvq is not enabled");
    if (n < 0 || (n > 0 && !bits)) return kvq_fail("assignment needs n >= 0 and n values");
    for (int64_t i = 0; i < n; ++i) {
        if (kvq_pool_of_bits(bits[i]) < 0) return kvq_fail("assignment bits must be 16, 8, 4, 3, 2 or 0");
    }
    s->assign.assign(bits, bits + n);
    return 0;
}

int32_t llama_kvq_set_k_center(llama_context * ctx, const float * k_mu, int64_t n) {
    llama_kvq_state * s = kvq_of(ctx);
    if (!s) return kvq_fail("kvq is not enabled");
    if (s->rows_held > 0) return kvq_fail("K centering must be set before any row is stored");
    if (n != 0 && (!k_mu || n != (int64_t) s->n_layer * s->n_embd_kv)) {
        return kvq_fail("K centering needs n_layer x n_embd_kv = " + std::to_string((int64_t) s->n_layer * s->n_embd_kv) + " values");
    }
    for (int64_t i = 0; i < n; ++i) {
        if (!std::isfinite(k_mu[i])) return kvq_fail("K centering has non-finite values");
    }
    s->k_mu.assign(k_mu, k_mu + n);
    return 0;
}

int32_t llama_kvq_n_features(void) { return LLAMA_KVQ_N_FEATURES; }

const char * llama_kvq_feature_name(int32_t i) {
    return i >= 0 && i < LLAMA_KVQ_N_FEATURES ? KVQ_FEATURE_NAMES[i] : nullptr;
}

int32_t llama_kvq_get_stats(const llama_context * ctx, llama_kvq_stats * out) {
    const llama_kvq_state * s = kvq_of(ctx);
    if (!s) return kvq_fail("kvq is not enabled");
    if (!out) return kvq_fail("null stats");
    memset(out, 0, sizeof(*out));
    for (const auto & S : s->seqs) {
        for (const auto & L : S.layers) {
            for (int q = 0; q < LLAMA_KVQ_N_POOLS; ++q) {
                out->rows[q] += L.pools[q].n();
            }
        }
    }
    int64_t rows = 0;
    for (int q = 0; q < LLAMA_KVQ_N_POOLS; ++q) rows += out->rows[q];
    out->n_tokens = s->n_layer ? rows / s->n_layer : 0;
    out->bytes_held = s->held;
    out->bytes_budget = s->budget;
    out->n_elements = rows * 2 * s->n_embd_kv;
    out->bits_per_elem = out->n_elements ? 8.0 * (double) s->held / (double) out->n_elements : 0.0;
    out->n_budget_demotions = s->n_budget_demotions;
    out->t_policy_ms = s->t_policy_ms;
    out->t_attn_ms = s->t_attn_ms;
    return 0;
}

int64_t llama_kvq_get_trace(const llama_context * ctx, int32_t * pos, int32_t * layer, int32_t * token,
                            int32_t * bits, float * features, int64_t cap) {
    const llama_kvq_state * s = kvq_of(ctx);
    if (!s) return kvq_fail("kvq is not enabled");
    const int64_t n = std::min<int64_t>(cap, s->trace.size());
    for (int64_t i = 0; i < n; ++i) {
        const auto & r = s->trace[i];
        if (pos) pos[i] = r.pos;
        if (layer) layer[i] = r.layer;
        if (token) token[i] = r.token;
        if (bits) bits[i] = r.bits;
        if (features) memcpy(features + i * LLAMA_KVQ_N_FEATURES, r.feat, sizeof(r.feat));
    }
    return (int64_t) s->trace.size();
}

void llama_kvq_clear_trace(llama_context * ctx) {
    llama_kvq_state * s = kvq_of(ctx);
    if (!s) return;
    s->trace.clear();
    for (auto & q : s->qrec) q.clear();
    for (auto & q : s->qrec_pos) q.clear();
}

int64_t llama_kvq_get_queries(const llama_context * ctx, int32_t il, float * q, int32_t * pos, int64_t cap) {
    const llama_kvq_state * s = kvq_of(ctx);
    if (!s) return kvq_fail("kvq is not enabled");
    if (!s->p.record_q) return kvq_fail("queries are recorded only with record_q = 1");
    if (il < 0 || il >= s->n_layer) return kvq_fail("layer out of range");
    const int64_t row = (int64_t) s->n_head * s->hd;
    const int64_t n = (int64_t) s->qrec_pos[il].size();
    const int64_t m = std::max<int64_t>(0, std::min(n, cap));
    if (q) memcpy(q, s->qrec[il].data(), m * row * sizeof(float));
    if (pos) memcpy(pos, s->qrec_pos[il].data(), m * sizeof(int32_t));
    return n;
}

//
// rows: store, remove
//

void kvq_append(llama_kvq_state & s, kvq_pool & P, const float * k, const float * v, int32_t pos, float * tmp) {
    const size_t n = P.n();
    P.k.resize((n + 1) * P.row_k);
    P.v.resize((n + 1) * P.row_v);
    kvq_encode(s, P, 0, k, P.k.data() + n * P.row_k, tmp);
    kvq_encode(s, P, 1, v, P.v.data() + n * P.row_v, tmp);
    P.pos.push_back(pos);
}

// Swap-remove row i of a pool (order inside a pool carries no meaning).
void kvq_remove(kvq_pool & P, size_t i) {
    const size_t last = P.n() - 1;
    if (i != last) {
        memcpy(P.k.data() + i * P.row_k, P.k.data() + last * P.row_k, P.row_k);
        memcpy(P.v.data() + i * P.row_v, P.v.data() + last * P.row_v, P.row_v);
        P.pos[i] = P.pos[last];
    }
    P.k.resize(last * P.row_k);
    P.v.resize(last * P.row_v);
    P.pos.pop_back();
}

// Remove window row i of a layer together with its feature accumulators (kept aligned).
void kvq_window_remove(kvq_layer & L, size_t i, int n_head, int n_embd_kv) {
    const size_t last = L.pools[LLAMA_KVQ_WINDOW].n() - 1;
    auto drop = [&](auto & v, size_t w) {
        if (v.size() < (last + 1) * w) return; // no accumulators (features off)
        if (i != last) std::copy_n(v.begin() + last * w, w, v.begin() + i * w);
        v.resize(last * w);
    };
    for (auto & r : L.recv_t) drop(r, n_head);
    for (auto & r : L.nq_t) drop(r, n_head);
    for (auto & r : L.qacc_t) drop(r, n_embd_kv);
    drop(L.ent, n_head);
    kvq_remove(L.pools[LLAMA_KVQ_WINDOW], i);
}

//
// budget
//

// Would this change keep room, at full context, for every undecided row at the lowest precision
// and the final window at f16? The change adds `delta` bytes, `d_rows` rows, `d_win` window rows.
// Rows leaving the window in the same ubatch are undecided until their turn: they count at the
// lowest precision, not at f16, so a long ubatch does not starve its first decisions.
bool kvq_fits(const llama_kvq_state & s, int64_t delta, int64_t d_rows, int64_t d_win) {
    if (s.budget <= 0) return true;
    const int64_t win = s.win_rows + d_win;
    const int64_t decided_bytes = s.held + delta - win * s.c_row[LLAMA_KVQ_WINDOW];
    const int64_t decided_rows = s.rows_held + d_rows - win;
    const int64_t w_final = s.w_total * s.n_layer;
    const int64_t rest = std::max<int64_t>(0, s.n_ctx * s.n_layer - decided_rows - w_final);
    return decided_bytes + rest * s.c_row[s.min_pool] + w_final * s.c_row[LLAMA_KVQ_WINDOW] <= s.budget;
}

// Lower `pool` until converting `rows` rows from class `from` (-1: new rows) fits the budget.
int kvq_fit_pool(llama_kvq_state & s, int pool, int from, int64_t rows) {
    const int64_t d_rows = from < 0 ? rows : 0;
    const int64_t d_win = from == LLAMA_KVQ_WINDOW ? -rows : 0;
    int q = pool;
    while (q < s.min_pool && !kvq_fits(s, rows * (s.c_row[q] - (from >= 0 ? s.c_row[from] : 0)), d_rows, d_win)) {
        ++q;
    }
    if (q != pool) s.n_budget_demotions++;
    return q;
}
