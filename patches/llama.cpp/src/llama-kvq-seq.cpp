// kvq: sequences (llama.cpp's seq_id): their rows, the llama_memory_* hooks that reach them, and the
// contexts whose stock KV tensors get no memory (llama_kvq_init_from_model).
#include "llama-kvq-impl.h"

#include "llama-context.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>

//
// memory registry: llama_memory_seq_* calls carry the memory, not the context
//

static std::mutex g_kvq_registry_mutex;
static std::unordered_map<const llama_memory_i *, llama_kvq_state *> g_kvq_registry;

void kvq_register(const llama_memory_i * mem, llama_kvq_state * s) {
    std::lock_guard<std::mutex> lock(g_kvq_registry_mutex);
    g_kvq_registry[mem] = s;
}

llama_kvq_state * kvq_of_memory(const llama_memory_i * mem) {
    if (!mem) return nullptr;
    std::lock_guard<std::mutex> lock(g_kvq_registry_mutex);
    auto it = g_kvq_registry.find(mem);
    return it == g_kvq_registry.end() ? nullptr : it->second;
}

llama_kvq_state::~llama_kvq_state() {
    if (!memory) return;
    std::lock_guard<std::mutex> lock(g_kvq_registry_mutex);
    auto it = g_kvq_registry.find(memory);
    if (it != g_kvq_registry.end() && it->second == this) g_kvq_registry.erase(it);
}

//
// contexts whose stock KV tensors get no memory
//

static thread_local bool g_kvq_creating = false; // llama_kvq_init_from_model is creating a context

bool llama_kvq_stock_kv_unused() {
    return g_kvq_creating;
}

llama_context * llama_kvq_init_from_model(llama_model * model, llama_context_params cparams, const llama_kvq_params * params) {
    if (!model || !params) {
        kvq_fail("null model or kvq params");
        return nullptr;
    }
    cparams.type_k = GGML_TYPE_Q2_0;
    cparams.type_v = GGML_TYPE_Q2_0;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    if (cparams.n_seq_max > 1) cparams.kv_unified = true; // one stream: seq_cp moves no stock tensor data
    g_kvq_creating = true;
    llama_context * ctx = llama_init_from_model(model, cparams);
    g_kvq_creating = false;
    if (!ctx) {
        kvq_fail("llama.cpp could not create the context");
        return nullptr;
    }
    if (llama_kvq_enable(ctx, params) != 0) {
        const std::string err = llama_kvq_last_error();
        llama_free(ctx); // its attention would read the unallocated stock tensors
        kvq_fail(err);
        return nullptr;
    }
    return ctx;
}

//
// sequences
//

bool kvq_refunds(const llama_kvq_state & s, const kvq_seq & S, int32_t p0, int32_t p1) {
    return p0 > 0 || s.seqs.size() > 1 || (p1 >= 0 && p1 <= S.max_pos);
}

kvq_seq & kvq_seq_use(llama_kvq_state & s, int32_t seq) {
    kvq_seq & S = s.seqs[seq];
    if (!S.used()) {
        S.layers.assign(s.n_layer, s.proto);
        S.tok_at.assign(s.n_ctx, -1);
    }
    return S;
}

void kvq_seq_forget_token(kvq_seq & S, int32_t pos) {
    if (pos >= 0 && pos < (int32_t) S.tok_at.size() && S.tok_at[pos] >= 0) {
        auto it = S.tok_count.find(S.tok_at[pos]);
        if (it != S.tok_count.end() && --it->second == 0) S.tok_count.erase(it);
        S.tok_at[pos] = -1;
        S.n_tok_seen--;
    }
}

// The last position S holds (-1: none); every layer holds the same positions, so the first layer's tell.
static int32_t kvq_seq_last_pos(const kvq_seq & S) {
    int32_t m = -1;
    for (const kvq_pool & P : S.layers[0].pools) {
        for (int32_t pos : P.pos) m = std::max(m, pos);
    }
    return m;
}

void kvq_seq_remove(llama_kvq_state & s, kvq_seq & S, int32_t p0, int32_t p1, bool refund) {
    if (!S.used()) return;
    if (p0 < 0) p0 = 0;
    if (p1 < 0) p1 = INT32_MAX;
    if (p0 >= p1 || p0 > S.max_pos) return;
    for (auto & L : S.layers) {
        for (int q = 0; q < LLAMA_KVQ_N_POOLS; ++q) {
            kvq_pool & P = L.pools[q];
            for (size_t i = P.n(); i-- > 0;) {
                if (P.pos[i] < p0 || P.pos[i] >= p1) continue;
                if (refund && q != LLAMA_KVQ_WINDOW) {
                    S.paid_bytes -= s.c_row[q];
                    S.paid_rows--;
                }
                s.held -= s.c_row[q];
                s.rows_held--;
                if (q == LLAMA_KVQ_WINDOW) {
                    s.win_rows--;
                    kvq_window_remove(L, i, s.n_head, s.n_embd_kv);
                } else {
                    kvq_remove(P, i);
                }
            }
        }
    }
    for (int32_t p = p0; p <= S.max_pos && p < p1; ++p) kvq_seq_forget_token(S, p);
    S.max_pos = kvq_seq_last_pos(S);
    if (S.max_pos < 0 && refund) S.norm = kvq_feature_norm(); // emptied: its statistics start over, as its price
}

// Copy the rows of positions [p0, p1) of sequence src to dst (its window rows with their feature
// accumulators). Copies are held like any row: the budget and the price count them.
static void kvq_seq_copy(llama_kvq_state & s, int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    kvq_seq & A = s.seqs[src];
    if (!A.used() || src == dst) return;
    kvq_seq & B = kvq_seq_use(s, dst);
    if (B.max_pos < 0) B.norm = A.norm; // a fresh copy carries the statistics its rows were decided with
    if (p0 < 0) p0 = 0;
    if (p1 < 0) p1 = INT32_MAX;
    auto copy_acc = [](auto & to, const auto & from, size_t w, size_t i_to, size_t i_from) {
        if (from.size() < (i_from + 1) * w) return;
        to.resize((i_to + 1) * w, 0);
        std::copy_n(from.begin() + i_from * w, w, to.begin() + i_to * w);
    };
    for (int il = 0; il < s.n_layer; ++il) {
        const kvq_layer & LA = A.layers[il];
        kvq_layer & LB = B.layers[il];
        for (int q = 0; q < LLAMA_KVQ_N_POOLS; ++q) {
            const kvq_pool & PA = LA.pools[q];
            kvq_pool & PB = LB.pools[q];
            for (size_t i = 0; i < PA.n(); ++i) {
                if (PA.pos[i] < p0 || PA.pos[i] >= p1) continue;
                const size_t j = PB.n();
                if (q == LLAMA_KVQ_WINDOW) { // accumulators first: they stay aligned with the rows
                    if (LB.recv_t.size() < LA.recv_t.size()) LB.recv_t.resize(LA.recv_t.size());
                    if (LB.nq_t.size() < LA.nq_t.size()) LB.nq_t.resize(LA.nq_t.size());
                    if (LB.qacc_t.size() < LA.qacc_t.size()) LB.qacc_t.resize(LA.qacc_t.size());
                    for (size_t t = 0; t < LA.recv_t.size(); ++t) copy_acc(LB.recv_t[t], LA.recv_t[t], s.n_head, j, i);
                    for (size_t t = 0; t < LA.nq_t.size(); ++t) copy_acc(LB.nq_t[t], LA.nq_t[t], s.n_head, j, i);
                    for (size_t t = 0; t < LA.qacc_t.size(); ++t) copy_acc(LB.qacc_t[t], LA.qacc_t[t], s.n_embd_kv, j, i);
                    copy_acc(LB.ent, LA.ent, s.n_head, j, i);
                }
                PB.k.insert(PB.k.end(), PA.k.begin() + i * PA.row_k, PA.k.begin() + (i + 1) * PA.row_k);
                PB.v.insert(PB.v.end(), PA.v.begin() + i * PA.row_v, PA.v.begin() + (i + 1) * PA.row_v);
                PB.pos.push_back(PA.pos[i]);
                s.held += s.c_row[q];
                s.rows_held++;
                if (q == LLAMA_KVQ_WINDOW) {
                    s.win_rows++;
                } else {
                    B.paid_bytes += s.c_row[q];
                    B.paid_rows++;
                }
            }
        }
    }
    for (int32_t p = p0; p <= A.max_pos && p < p1; ++p) {
        if (A.tok_at[p] < 0) continue;
        kvq_seq_forget_token(B, p);
        B.tok_at[p] = A.tok_at[p];
        B.tok_count[A.tok_at[p]]++;
        B.n_tok_seen++;
        B.max_pos = std::max(B.max_pos, p);
    }
}

//
// position shifts (seq_add, seq_div: llama.cpp's context shift)
//

// K rows are stored after RoPE, and RoPE rotations compose (R(p + d) = R(d) R(p)): a row moved by d
// positions is decoded, rotated by RoPE at position d and re-encoded in its own pool, as llama.cpp's
// K-shift does for a quantized cache (dequantize, RoPE, quantize back). V rows do not change.

// RoPE at position d[r] applied in place to n plain K rows x (n x n_embd_kv) of layer il, with the
// parameters llama_kv_cache::build_rope_shift uses. False if the model's RoPE factors are not in host memory.
static bool kvq_rope_rows(const llama_kvq_state & s, int il, float * x, const int32_t * d, int64_t n) {
    const llama_model & model = *s.model;
    const llama_hparams & hp = model.hparams;
    if (hp.rope_type == LLAMA_ROPE_TYPE_NONE || !hp.has_rope(il)) return true;
    const llama_cparams & cp = s.lctx->get_cparams();
    ggml_tensor * factors = model.get_rope_factors(cp, il);
    if (factors && (!factors->buffer || !ggml_backend_buffer_is_host(factors->buffer))) return false;
    const size_t data = 2 * (size_t) n * s.n_embd_kv * sizeof(float) + (size_t) n * sizeof(int32_t);
    const ggml_init_params ip = { data + 8 * ggml_tensor_overhead() + ggml_graph_overhead() + (1 << 20), nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) return false;
    ggml_tensor * t = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, s.hd, s.n_head_kv, n);
    ggml_tensor * p = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    memcpy(t->data, x, (size_t) n * s.n_embd_kv * sizeof(float));
    memcpy(p->data, d, (size_t) n * sizeof(int32_t));
    // M-RoPE caches shift with normal (NeoX-ordered) RoPE, as llama.cpp does
    const int rope_type = hp.rope_type == LLAMA_ROPE_TYPE_MROPE || hp.rope_type == LLAMA_ROPE_TYPE_IMROPE
                        ? LLAMA_ROPE_TYPE_NEOX : hp.rope_type;
    ggml_tensor * r = ggml_rope_ext(ctx, t, p, factors, hp.n_rot(il), rope_type, cp.n_ctx_orig_yarn,
                                    model.get_rope_freq_base(cp, il), model.get_rope_freq_scale(cp, il),
                                    cp.yarn_ext_factor, cp.yarn_attn_factor, cp.yarn_beta_fast, cp.yarn_beta_slow);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, r);
    const bool ok = ggml_graph_compute_with_ctx(ctx, gf, std::max(1, s.n_threads_max)) == GGML_STATUS_SUCCESS;
    if (ok) memcpy(x, r->data, (size_t) n * s.n_embd_kv * sizeof(float));
    ggml_free(ctx);
    return ok;
}

// Re-encode the K rows idx of pool P (layer il) rotated by RoPE at d[r] (same order as idx).
static bool kvq_pool_rerope(llama_kvq_state & s, int il, kvq_pool & P, const std::vector<size_t> & idx,
                            const std::vector<int32_t> & d) {
    if (idx.empty() || P.row_k == 0) return true;
    const int64_t CH = 1024; // rows per RoPE graph
    std::vector<float> x, tmp(s.n_embd_kv);
    const float * mu = s.k_mu.empty() ? nullptr : s.k_mu.data() + (size_t) il * s.n_embd_kv;
    for (size_t c0 = 0; c0 < idx.size(); c0 += CH) {
        const int64_t n = std::min<int64_t>(CH, (int64_t) (idx.size() - c0));
        x.resize((size_t) n * s.n_embd_kv);
        for (int64_t r = 0; r < n; ++r) {
            float * xr = x.data() + r * s.n_embd_kv;
            kvq_decode_row(s, P, false, P.k.data() + idx[c0 + r] * P.row_k, xr);
            if (mu) for (int e = 0; e < s.n_embd_kv; ++e) xr[e] += mu[e]; // K as RoPE made it
        }
        if (!kvq_rope_rows(s, il, x.data(), d.data() + c0, n)) return false;
        for (int64_t r = 0; r < n; ++r) {
            float * xr = x.data() + r * s.n_embd_kv;
            if (mu) for (int e = 0; e < s.n_embd_kv; ++e) xr[e] -= mu[e];
            kvq_encode(s, P, 0, xr, P.k.data() + idx[c0 + r] * P.row_k, tmp.data());
        }
    }
    return true;
}

// Positions [p0, p1) of S move to p + delta (div <= 1) or p / div, as llama.cpp's cells do: rows
// whose new position is negative leave, the others keep their pool and window features with K
// re-encoded at the new position. False if RoPE could not be applied (the positions did not move).
bool kvq_seq_move(llama_kvq_state & s, kvq_seq & S, int32_t p0, int32_t p1, int32_t delta, int div) {
    if (!S.used()) return true;
    if (p0 < 0) p0 = 0;
    if (p1 < 0) p1 = INT32_MAX;
    if (p0 >= p1 || p0 > S.max_pos) return true;
    auto moved = [&](int32_t p) { return div > 1 ? p / div : p + delta; };
    if (div <= 1 && delta < 0 && p0 < -delta) { // these go below position 0
        const int32_t p_end = (int32_t) std::min<int64_t>(p1, -(int64_t) delta);
        kvq_seq_remove(s, S, p0, p_end, kvq_refunds(s, S, p0, p_end));
    }
    std::vector<size_t> idx;
    std::vector<int32_t> d;
    for (int il = 0; il < s.n_layer; ++il) {
        for (kvq_pool & P : S.layers[il].pools) {
            idx.clear();
            d.clear();
            for (size_t i = 0; i < P.n(); ++i) {
                if (P.pos[i] < p0 || P.pos[i] >= p1 || moved(P.pos[i]) == P.pos[i]) continue;
                idx.push_back(i);
                d.push_back(moved(P.pos[i]) - P.pos[i]);
            }
            if (!kvq_pool_rerope(s, il, P, idx, d)) return false;
            for (size_t i : idx) P.pos[i] = moved(P.pos[i]);
        }
    }
    // token statistics follow their positions
    std::vector<std::pair<int32_t, llama_token>> toks;
    for (int32_t p = p0; p <= S.max_pos && p < p1; ++p) {
        if (S.tok_at[p] >= 0) toks.push_back({ moved(p), S.tok_at[p] });
        kvq_seq_forget_token(S, p);
    }
    const int32_t m = S.max_pos = kvq_seq_last_pos(S);
    if ((int64_t) S.tok_at.size() <= m) S.tok_at.resize(m + 1, -1);
    for (const auto & pt : toks) {
        if (pt.first < 0 || pt.first > m) continue;
        kvq_seq_forget_token(S, pt.first);
        S.tok_at[pt.first] = pt.second;
        S.tok_count[pt.second]++;
        S.n_tok_seen++;
    }
    return true;
}

//
// memory hooks: llama_memory_* on a context's memory reach its kvq rows
//

bool llama_kvq_memory_enabled(const llama_memory_i * mem) {
    return kvq_of_memory(mem) != nullptr;
}

void llama_kvq_memory_seq_rm(const llama_memory_i * mem, llama_seq_id seq, llama_pos p0, llama_pos p1) {
    llama_kvq_state * s = kvq_of_memory(mem);
    if (!s) return;
    for (int32_t i = 0; i < (int32_t) s->seqs.size(); ++i) {
        if (seq < 0 || seq == i) kvq_seq_remove(*s, s->seqs[i], p0, p1, kvq_refunds(*s, s->seqs[i], p0, p1));
    }
}

void llama_kvq_memory_seq_cp(const llama_memory_i * mem, llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1) {
    llama_kvq_state * s = kvq_of_memory(mem);
    const int32_t n = s ? (int32_t) s->seqs.size() : 0;
    if (!s || src < 0 || src >= n || dst < 0 || dst >= n || src == dst) return;
    kvq_seq_copy(*s, src, dst, p0, p1);
}

void llama_kvq_memory_seq_keep(const llama_memory_i * mem, llama_seq_id seq) {
    llama_kvq_state * s = kvq_of_memory(mem);
    if (!s) return;
    for (int32_t i = 0; i < (int32_t) s->seqs.size(); ++i) {
        if (i != seq) kvq_seq_remove(*s, s->seqs[i], 0, -1, kvq_refunds(*s, s->seqs[i], 0, -1));
    }
}

void llama_kvq_memory_seq_add(const llama_memory_i * mem, llama_seq_id seq, llama_pos p0, llama_pos p1, llama_pos delta) {
    llama_kvq_state * s = kvq_of_memory(mem);
    if (!s || delta == 0 || seq < 0 || seq >= (int32_t) s->seqs.size()) return;
    if (!kvq_seq_move(*s, s->seqs[seq], p0, p1, delta, 1)) s->shifted = true;
}

void llama_kvq_memory_seq_div(const llama_memory_i * mem, llama_seq_id seq, llama_pos p0, llama_pos p1, int d) {
    llama_kvq_state * s = kvq_of_memory(mem);
    if (!s || d <= 1 || seq < 0 || seq >= (int32_t) s->seqs.size()) return;
    if (!kvq_seq_move(*s, s->seqs[seq], p0, p1, 0, d)) s->shifted = true;
}

void llama_kvq_memory_clear(const llama_memory_i * mem) {
    llama_kvq_state * s = kvq_of_memory(mem);
    if (!s) return;
    for (auto & S : s->seqs) kvq_seq_remove(*s, S, 0, -1, kvq_refunds(*s, S, 0, -1));
    s->shifted = false;
}

