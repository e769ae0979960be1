// kvq: the cache in llama.cpp's state API (llama_state_* session files, llama_state_seq_* for
// llama-server's slot save/restore). llama_kv_cache::state_write writes its cells (positions and
// sequences) as usual and then, for a kvq context, this block in place of its unused K/V tensors;
// state_read reads it back in their place. A restore is byte-exact: pools, window rows and their
// feature accumulators, token statistics, the price's totals and the controller's running
// statistics come back as they were, so decoding goes on exactly as it would have.
//
// Block (host byte order):
//
//   u32 LLAMA_KVQ_STATE_MAGIC    where a stock cache writes v_trans (0/1): each side refuses the other's
//   u32 version
//   str cache                    "adaptive@3.00 window 64 q8_0 ...": shown when the reader's differs
//   u64 config                   FNV-1a of every parameter that shapes rows or decisions, model shape included
//   u32 n_seq
//   n_seq x sequence:
//     i32 seq_id, i32 max_pos, i64 paid_bytes, i64 paid_rows
//     vec<i32> tok_at            token per position 0..max_pos (-1 unknown)
//     f64 norm.n, vec<f64> norm.mean, vec<f64> norm.m2
//     n_layer x N_POOLS x pool:  vec<i32> pos, K bytes (n x row_k), V bytes (n x row_v)
//     n_layer x window features: vec<f32> ent, then per thread slot vec<f32> recv, vec<i32> nq, vec<f32> qacc
//   u64 FNV-1a of the block from `version` on          (a corrupted block is refused)
//
// vec<T> is u64 n then n values. Sizes are checked against the reader's context before anything
// is allocated, and the block is parsed whole before it replaces the sequence's rows.
#include "llama-kvq-impl.h"

#include "llama-impl.h"
#include "llama-io.h"
#include "llama-model.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

static const uint32_t KVQ_STATE_VERSION = 1;

//
// hashing readers and writers
//

static const uint64_t KVQ_FNV_OFFSET = 1469598103934665603ull, KVQ_FNV_PRIME = 1099511628211ull;

static uint64_t kvq_fnv(uint64_t h, const void * p, size_t n) {
    const uint8_t * b = (const uint8_t *) p;
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * KVQ_FNV_PRIME;
    return h;
}

struct kvq_state_writer {
    llama_io_write_i & io;
    uint64_t h = KVQ_FNV_OFFSET;

    void put(const void * p, size_t n) {
        h = kvq_fnv(h, p, n);
        io.write(p, n);
    }
    template <typename T> void val(const T & v) { put(&v, sizeof(v)); }
    template <typename T> void vec(const std::vector<T> & v) {
        val<uint64_t>(v.size());
        put(v.data(), v.size() * sizeof(T));
    }
};

struct kvq_state_reader {
    llama_io_read_i & io;
    uint64_t h = KVQ_FNV_OFFSET;

    void get(void * p, size_t n) {
        io.read(p, n); // throws at the end of the data
        h = kvq_fnv(h, p, n);
    }
    template <typename T> T val() {
        T v;
        get(&v, sizeof(v));
        return v;
    }
    // at most max values: a corrupted count fails before it allocates
    template <typename T> void vec(std::vector<T> & v, uint64_t max, const char * what) {
        const uint64_t n = val<uint64_t>();
        if (n > max) throw std::runtime_error(std::string("kvq state: ") + what + " holds more entries than this context can");
        v.resize(n);
        get(v.data(), n * sizeof(T));
    }
};

//
// the cache a state belongs to
//

// What the reader must match: the model's shape and every parameter that shapes rows or decisions.
static uint64_t kvq_config_hash(const llama_kvq_state & s) {
    uint64_t h = KVQ_FNV_OFFSET;
    auto add = [&](const auto & v) { h = kvq_fnv(h, &v, sizeof(v)); };
    auto add_vec = [&](const auto & v) {
        add((uint64_t) v.size());
        if (!v.empty()) h = kvq_fnv(h, v.data(), v.size() * sizeof(v[0]));
    };
    const llama_kvq_params & p = s.p;
    add(s.n_layer); add(s.n_head); add(s.n_head_kv); add(s.hd);
    add(s.model->hparams.n_ctx_train); add((uint64_t) llama_model_n_params(s.model));
    add(p.policy); add(p.static_bits); add(p.window); add(p.window_bits); add(s.budget);
    add(p.per_layer); add(p.rotate); add(p.rule_sink); add(p.rule_heavy); add(p.rule_base_bits);
    add(p.price_step); add(p.qar_mu); add(p.v_unbias);
    add_vec(s.k_mu);
    if (s.ctrl) {
        const llama_kvq_controller & c = *s.ctrl;
        add_vec(c.feat_idx); add_vec(c.bits); add_vec(c.w1); add_vec(c.b1); add_vec(c.w2); add_vec(c.b2);
        add_vec(c.mean); add_vec(c.std_); add_vec(c.damage_floor);
        add(c.log_damage); add(c.per_layer); add(c.norm_prior);
    }
    return h;
}

// How a message names the cache, as --kvq does: "adaptive@3.00 with a 32-row q8_0 window, 30 layers x 3 KV heads x 64".
static std::string kvq_config_name(const llama_kvq_state & s) {
    static const char * names[] = { "static", "rule", "adaptive", "assign" };
    const llama_kvq_params & p = s.p;
    std::string name = p.policy >= 0 && p.policy < 4 ? names[p.policy] : "unknown";
    if (p.policy == LLAMA_KVQ_POLICY_STATIC) {
        const int q = kvq_stored_pool_of_bits(p.static_bits);
        name = q == LLAMA_KVQ_K4V2 ? "k4v2" : q == LLAMA_KVQ_F16 ? "f16" : "q" + std::to_string(p.static_bits);
    }
    char buf[160];
    if (s.budget > 0) {
        snprintf(buf, sizeof(buf), "@%.2f", 8.0 * s.budget / (2.0 * s.n_embd_kv * s.n_layer * s.n_ctx));
        name += buf;
    }
    if (p.window > 0) {
        snprintf(buf, sizeof(buf), " with a %d-row %s window", p.window, p.window_bits == 8 ? "q8_0" : "f16");
        name += buf;
    }
    snprintf(buf, sizeof(buf), ", %d layers x %d KV heads x %d", s.n_layer, s.n_head_kv, s.hd);
    return name + buf;
}

//
// write
//

static void kvq_write_seq(const llama_kvq_state & s, kvq_state_writer & w, int32_t id) {
    const kvq_seq & S = s.seqs[id];
    w.val(id);
    w.val(S.max_pos);
    w.val(S.paid_bytes);
    w.val(S.paid_rows);
    w.vec(std::vector<llama_token>(S.tok_at.begin(), S.tok_at.begin() + (S.max_pos + 1)));
    w.val(S.norm.n);
    w.vec(S.norm.mean);
    w.vec(S.norm.m2);
    for (const kvq_layer & L : S.layers) {
        for (const kvq_pool & P : L.pools) {
            w.vec(P.pos);
            w.put(P.k.data(), P.n() * P.row_k);
            w.put(P.v.data(), P.n() * P.row_v);
        }
        w.vec(L.ent);
        w.val<uint32_t>((uint32_t) L.recv_t.size());
        for (size_t t = 0; t < L.recv_t.size(); ++t) {
            w.vec(L.recv_t[t]);
            w.vec(t < L.nq_t.size() ? L.nq_t[t] : std::vector<int32_t>());
            w.vec(t < L.qacc_t.size() ? L.qacc_t[t] : std::vector<float>());
        }
    }
}

bool llama_kvq_state_write(const llama_memory_i * mem, llama_io_write_i & io, llama_seq_id seq) {
    const llama_kvq_state * s = kvq_of_memory(mem);
    if (!s) return false;
    const uint32_t magic = LLAMA_KVQ_STATE_MAGIC;
    io.write(&magic, sizeof(magic));
    kvq_state_writer w{ io };
    w.val(KVQ_STATE_VERSION);
    const std::string name = kvq_config_name(*s);
    w.val<uint32_t>((uint32_t) name.size());
    w.put(name.data(), name.size());
    w.val(kvq_config_hash(*s));
    std::vector<int32_t> ids;
    for (int32_t i = 0; i < (int32_t) s->seqs.size(); ++i) {
        if ((seq < 0 || seq == i) && s->seqs[i].used() && s->seqs[i].max_pos >= 0) ids.push_back(i);
    }
    w.val<uint32_t>((uint32_t) ids.size());
    for (int32_t id : ids) kvq_write_seq(*s, w, id);
    const uint64_t h = w.h;
    io.write(&h, sizeof(h));
    return true;
}

//
// read
//

// One sequence of the block, parsed into `S` (a fresh sequence with the reader's pool formats).
static void kvq_read_seq(const llama_kvq_state & s, kvq_state_reader & r, kvq_seq & S, int32_t & id) {
    const uint64_t n_ctx = (uint64_t) s.n_ctx, n_head = s.n_head, n_kv = s.n_embd_kv;
    id = r.val<int32_t>();
    S.max_pos = r.val<int32_t>();
    S.paid_bytes = r.val<int64_t>();
    S.paid_rows = r.val<int64_t>();
    if (S.max_pos < 0 || (uint64_t) S.max_pos >= std::max<uint64_t>(n_ctx, 1) * 64) {
        throw std::runtime_error("kvq state: a sequence position is out of range");
    }
    std::vector<llama_token> tok;
    r.vec(tok, (uint64_t) S.max_pos + 1, "the token table");
    S.tok_at.assign(std::max<size_t>(n_ctx, tok.size()), -1);
    for (size_t p = 0; p < tok.size(); ++p) {
        if (tok[p] < 0) continue;
        S.tok_at[p] = tok[p];
        S.tok_count[tok[p]]++;
        S.n_tok_seen++;
    }
    S.norm.n = r.val<double>();
    const uint64_t n_in = s.ctrl ? (uint64_t) s.ctrl->n_in : 0;
    r.vec(S.norm.mean, n_in, "the controller statistics");
    r.vec(S.norm.m2, n_in, "the controller statistics");
    if (S.norm.mean.size() != S.norm.m2.size()) throw std::runtime_error("kvq state: the controller statistics are inconsistent");
    for (kvq_layer & L : S.layers) {
        for (kvq_pool & P : L.pools) {
            r.vec(P.pos, n_ctx, "a pool");
            for (int32_t p : P.pos) {
                if (p < 0 || p > S.max_pos) throw std::runtime_error("kvq state: a row position is out of range");
            }
            P.k.resize(P.n() * P.row_k);
            P.v.resize(P.n() * P.row_v);
            r.get(P.k.data(), P.k.size());
            r.get(P.v.data(), P.v.size());
        }
        const uint64_t w_rows = L.pools[LLAMA_KVQ_WINDOW].n();
        r.vec(L.ent, w_rows * n_head, "the window features");
        const uint32_t n_t = r.val<uint32_t>();
        if (n_t > 4096) throw std::runtime_error("kvq state: too many thread slots");
        L.recv_t.resize(n_t);
        L.nq_t.resize(n_t);
        L.qacc_t.resize(n_t);
        for (uint32_t t = 0; t < n_t; ++t) {
            r.vec(L.recv_t[t], w_rows * n_head, "the window features");
            r.vec(L.nq_t[t], w_rows * n_head, "the window features");
            r.vec(L.qacc_t[t], w_rows * n_kv, "the window features");
        }
        // accumulators are aligned with the window rows (or empty)
        auto aligned = [&](size_t n, uint64_t width) {
            if (n != 0 && n != w_rows * width) throw std::runtime_error("kvq state: the window features are inconsistent");
        };
        aligned(L.ent.size(), n_head);
        for (uint32_t t = 0; t < n_t; ++t) {
            aligned(L.recv_t[t].size(), n_head);
            aligned(L.nq_t[t].size(), n_head);
            aligned(L.qacc_t[t].size(), n_kv);
        }
        // every layer holds the window's rows in the same order (rows leave it by layer 0's order)
        if (L.pools[LLAMA_KVQ_WINDOW].pos != S.layers[0].pools[LLAMA_KVQ_WINDOW].pos) {
            throw std::runtime_error("kvq state: the layers' windows differ");
        }
        bool any_qacc = false;
        for (const auto & q : L.qacc_t) any_qacc = any_qacc || !q.empty();
        if (!any_qacc) L.qacc_t.clear();
    }
}

static int64_t kvq_seq_bytes(const llama_kvq_state & s, const kvq_seq & S, int64_t * rows, int64_t * win) {
    int64_t b = 0;
    for (const kvq_layer & L : S.layers) {
        for (int q = 0; q < LLAMA_KVQ_N_POOLS; ++q) {
            b += (int64_t) L.pools[q].n() * s.c_row[q];
            *rows += (int64_t) L.pools[q].n();
            if (q == LLAMA_KVQ_WINDOW) *win += (int64_t) L.pools[q].n();
        }
    }
    return b;
}

static void kvq_read_block(llama_kvq_state & s, llama_io_read_i & io, llama_seq_id seq) {
    uint32_t magic = 0;
    io.read(&magic, sizeof(magic));
    if (magic != LLAMA_KVQ_STATE_MAGIC) {
        throw std::runtime_error("the state holds a stock llama.cpp cache; this context uses the kvq cache " + kvq_config_name(s));
    }
    kvq_state_reader r{ io };
    const uint32_t version = r.val<uint32_t>();
    if (version != KVQ_STATE_VERSION) {
        throw std::runtime_error("kvq state version " + std::to_string(version) + " (this runtime reads " +
                                 std::to_string(KVQ_STATE_VERSION) + ")");
    }
    const uint32_t n_name = r.val<uint32_t>();
    if (n_name > 4096) throw std::runtime_error("kvq state: corrupted (cache name)");
    std::string name(n_name, '\0');
    r.get(name.data(), n_name);
    const uint64_t config = r.val<uint64_t>();
    if (config != kvq_config_hash(s)) {
        const std::string mine = kvq_config_name(s);
        throw std::runtime_error("the state was saved with another kvq cache or model (saved: " + name + "; this context: " +
                                 mine + (name == mine ? "; they differ in the controller or other parameters" : "") + ")");
    }
    const uint32_t n_seq = r.val<uint32_t>();
    if (n_seq > s.seqs.size() || (seq >= 0 && n_seq > 1)) throw std::runtime_error("kvq state: more sequences than this context has");
    std::vector<kvq_seq> seqs(n_seq);
    std::vector<int32_t> ids(n_seq);
    for (uint32_t i = 0; i < n_seq; ++i) {
        seqs[i].layers.assign(s.n_layer, s.proto);
        kvq_read_seq(s, r, seqs[i], ids[i]);
        if (seq >= 0) ids[i] = seq; // a sequence's state goes to the sequence it is read into
        if (ids[i] < 0 || ids[i] >= (int32_t) s.seqs.size()) throw std::runtime_error("kvq state: sequence id out of range");
    }
    const uint64_t h = r.h;
    uint64_t h_saved = 0;
    io.read(&h_saved, sizeof(h_saved));
    if (h != h_saved) throw std::runtime_error("the kvq state is corrupted (checksum mismatch)");
    // the rows replace what the target sequences hold; the budget must hold them all
    int64_t held = s.held, rows = s.rows_held, win = s.win_rows;
    for (int32_t i = 0; i < (int32_t) s.seqs.size(); ++i) {
        if (seq < 0 || seq == i) {
            int64_t r0 = 0, w0 = 0;
            held -= kvq_seq_bytes(s, s.seqs[i], &r0, &w0);
            rows -= r0;
            win -= w0;
        }
    }
    for (const kvq_seq & S : seqs) held += kvq_seq_bytes(s, S, &rows, &win);
    if (s.budget > 0 && held > s.budget) {
        throw std::runtime_error("the kvq state holds " + std::to_string(held) + " bytes, over this cache's budget of " +
                                 std::to_string(s.budget));
    }
    for (int32_t i = 0; i < (int32_t) s.seqs.size(); ++i) {
        if (seq < 0 || seq == i) s.seqs[i] = kvq_seq();
    }
    for (uint32_t i = 0; i < n_seq; ++i) s.seqs[ids[i]] = std::move(seqs[i]);
    s.held = held;
    s.rows_held = rows;
    s.win_rows = win;
}

bool llama_kvq_state_read(const llama_memory_i * mem, llama_io_read_i & io, llama_seq_id seq) {
    llama_kvq_state * s = kvq_of_memory(mem);
    if (!s) return false;
    llama_kvq_clear_error();
    try {
        kvq_read_block(*s, io, seq);
        s->shifted = false;
        return true;
    } catch (const std::exception & e) {
        kvq_fail(e.what());
        LLAMA_LOG_ERROR("%s: %s\n", __func__, e.what());
        // llama.cpp clears the cells it restored; the kvq rows of those sequences go too
        for (int32_t i = 0; i < (int32_t) s->seqs.size(); ++i) {
            if (seq < 0 || seq == i) kvq_seq_remove(*s, s->seqs[i], 0, -1, true);
        }
        return false;
    }
}

bool llama_kvq_state_foreign() {
    const char * msg = "the state holds a kvq cache; this context has none (load it into a context with the same kvq cache)";
    kvq_fail(msg);
    LLAMA_LOG_ERROR("%s\n", msg);
    return false;
}
