// kvq_kernel_test: the fused attention kernel (kvq_fused_partial + kvq_fused_merge, the runtime's
// own driver) against an exact double-precision reference over the dequantized rows (ggml's
// to_float of what was stored, un-rotated), for the scalar tiles and every SIMD tile set this CPU
// runs (x86: AVX2, AVX-512; aarch64: NEON), so the NEON tiles are checked under qemu-aarch64
// without an ARM machine. Built and run by scripts/kernel_test.py (tests/test_native_kernel.py).
//
// Cases: every pool on its own (f16 window, q8_0 window, f16, q8_0, q4_0, K q4_0 + V kvq2, kvq2)
// and all six in one layer; rotation on (quantized rows Hadamard-rotated, as the runtime stores
// them) and off (every row plain); GQA groups 1, 3 and 8 (2 KV heads); one query token (decode)
// and 19 (two query blocks, set order permuted against the ubatch rows); rows in shuffled position
// order with causal masks (queries at position 0, inside the rows and at the last one); 1 and 2
// threads (real threads, the runtime's ith/nth split of the work items and of the merge); 3 key
// chunks. With window rows the merge derives the window features as a graph's op does.
// Checks, per case and tile set (relative to the largest exact value):
//   outputs within 2e-5 of exact (f32 accumulation; as tests/test_kernel.py) and within 1e-5 of
//   the scalar tiles; 2 threads bit-identical to 1;
//   window scores within 2e-5 where the row is visible, -inf or never written where it is not;
//   received attention and query-aware rounding's sum of p^2 q within 2e-5, the entropy (in
//   [0, 1]) within 5e-5 absolute (M + log l - t / l in f32 cancels), query counts exact.
// The AVX-512 tiles' integer path (q4_0 and kvq2 rows, on a CPU with VNNI and VBMI) scores with
// the query rounded to int8 and weighs V with int16 weights: there the exact reference takes the
// query as the kernel rounds it (exact_query), the outputs must be within TOL_INT of it and
// within TOL_LOOSE of the unrounded one (no scalar-tile check: those score the unrounded query),
// and the features keep the tolerances above against it.
// Prints one line per tile set (and one for the integer path) and exits 1 on any mismatch.
#include "llama-kvq-impl.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

static const int HD = 64;
static const int N_HEAD_KV = 2;
static const int N_ROWS = 200;   // keys per layer: 3 key chunks, tiles cut at pool and chunk edges
static const int N_PREFILL = 19; // query tokens of the batch case: blocks of KVQ_QB = 16 and 3
static const double TOL_EXACT = 2e-5, TOL_SCALAR = 1e-5, TOL_FEAT = 2e-5, TOL_ENT = 5e-5;
// Integer path: against the reference with the kernel's rounded query (the int16 weights, steps
// of 2^-15 of a tile's largest weight, leave up to 7.1e-5 here), and against the unrounded one
// (rounding the query to int8 alone moves the exact outputs by up to 5.5e-2 here), which only a
// layout bug would exceed.
static const double TOL_INT = 1e-4, TOL_LOOSE = 1e-1;

// ~llama_kvq_state (llama-kvq-seq.cpp) leaves the memory registry, which is llama's, so the
// state is made once and never destroyed.
static llama_kvq_state & test_state() {
    static llama_kvq_state * s = new llama_kvq_state();
    return *s;
}

//
// cases
//

struct layout {
    const char * name;
    bool window_q8;                       // window rows in q8_0 (window_bits 8)
    int rows[LLAMA_KVQ_N_STORED];         // rows per pool
};

static const layout LAYOUTS[] = {
    { "window-f16", false, { N_ROWS, 0, 0, 0, 0, 0 } },
    { "window-q8",  true,  { N_ROWS, 0, 0, 0, 0, 0 } },
    { "f16",        false, { 0, N_ROWS, 0, 0, 0, 0 } },
    { "q8_0",       false, { 0, 0, N_ROWS, 0, 0, 0 } },
    { "q4_0",       false, { 0, 0, 0, N_ROWS, 0, 0 } },
    { "k4v2",       false, { 0, 0, 0, 0, N_ROWS, 0 } },
    { "kvq2",       false, { 0, 0, 0, 0, 0, N_ROWS } },
    { "mixed",      false, { 37, 29, 33, 31, 35, 35 } },
};

struct layer_data {
    kvq_layer L;
    std::vector<int32_t> pos;            // [N] in row order (pools concatenated)
    std::vector<double> k, v;            // [N][n_embd_kv], plain space, from ggml's to_float
    std::vector<int> win_row;            // row index -> window row (-1: other pool)
    std::vector<int> row_pool;           // row index -> pool
};

// Normalised Walsh-Hadamard transform of one 64-value head in double (self-inverse).
static void hadamard64(double * y) {
    for (int len = 1; len < 64; len <<= 1) {
        for (int i = 0; i < 64; i += 2 * len) {
            for (int j = i; j < i + len; ++j) {
                const double a = y[j], b = y[j + len];
                y[j] = a + b;
                y[j + len] = a - b;
            }
        }
    }
    for (int i = 0; i < 64; ++i) y[i] *= 0.125;
}

// Pools as llama_kvq_enable lays them out (llama-kvq-cache.cpp), filled with random rows encoded
// by ggml; the reference rows are ggml's to_float of what was stored, un-rotated.
static layer_data make_layer(const layout & lay, bool rotate, std::mt19937 & rng) {
    const int n_embd_kv = N_HEAD_KV * HD;
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> ud(0.25f, 2.0f);
    layer_data D;
    int N = 0;
    for (int p = 0; p < LLAMA_KVQ_N_STORED; ++p) N += lay.rows[p];
    // positions: one pool holds them in a rough order (shuffled within runs of 24 rows, so causal
    // masks cut tiles and whole tiles lie after a query); the mixed layer has its window on the
    // newest positions and the pools in no order (as demotions leave them)
    std::vector<int32_t> perm(N);
    std::iota(perm.begin(), perm.end(), 0);
    const int n_win = lay.rows[LLAMA_KVQ_WINDOW];
    if (std::count(lay.rows, lay.rows + LLAMA_KVQ_N_STORED, 0) < LLAMA_KVQ_N_STORED - 1) {
        std::shuffle(perm.begin(), perm.begin() + (N - n_win), rng);
        std::shuffle(perm.begin() + (N - n_win), perm.end(), rng);
        std::rotate(perm.begin(), perm.begin() + (N - n_win), perm.end());
    } else {
        for (int i = 0; i < N; i += 24) std::shuffle(perm.begin() + i, perm.begin() + std::min(N, i + 24), rng);
    }
    std::vector<float> x(n_embd_kv), back(n_embd_kv);
    int row = 0;
    for (int p = 0; p < LLAMA_KVQ_N_STORED; ++p) {
        kvq_pool & P = D.L.pools[p];
        P.tk = kvq_pool_type(p, false);
        P.tv = kvq_pool_type(p, true);
        if (p == LLAMA_KVQ_WINDOW && lay.window_q8) P.tk = P.tv = GGML_TYPE_Q8_0;
        P.rotated = rotate && (p >= LLAMA_KVQ_Q8 || P.tk != GGML_TYPE_F16);
        P.row_k = ggml_row_size(P.tk, n_embd_kv);
        P.row_v = ggml_row_size(P.tv, n_embd_kv);
        P.head_k = ggml_row_size(P.tk, HD);
        P.head_v = ggml_row_size(P.tv, HD);
        P.k.resize(lay.rows[p] * P.row_k);
        P.v.resize(lay.rows[p] * P.row_v);
        for (int i = 0; i < lay.rows[p]; ++i, ++row) {
            P.pos.push_back(perm[row]);
            D.pos.push_back(perm[row]);
            D.win_row.push_back(p == LLAMA_KVQ_WINDOW ? i : -1);
            D.row_pool.push_back(p);
            for (int side = 0; side < 2; ++side) {
                const ggml_type t = side ? P.tv : P.tk;
                uint8_t * dst = (side ? P.v.data() + i * P.row_v : P.k.data() + i * P.row_k);
                // a few large K rows make peaked attention
                const float amp = ud(rng) * (side == 0 && row % 17 == 3 ? 4.0f : 1.0f);
                for (float & e : x) e = amp * nd(rng);
                if (t == GGML_TYPE_F16) {
                    ggml_fp32_to_fp16_row(x.data(), (ggml_fp16_t *) dst, n_embd_kv);
                } else {
                    ggml_get_type_traits(t)->from_float_ref(x.data(), dst, n_embd_kv);
                }
                ggml_get_type_traits(t)->to_float(dst, back.data(), n_embd_kv);
                std::vector<double> & out = side ? D.v : D.k;
                const size_t o = out.size();
                out.insert(out.end(), back.begin(), back.end());
                if (P.rotated) {
                    for (int g = 0; g < N_HEAD_KV; ++g) hadamard64(out.data() + o + g * HD);
                }
            }
        }
    }
    return D;
}

struct query_set {
    const char * name;
    std::vector<int32_t> qpos;   // in set order
    std::vector<int32_t> idx;    // set token -> ubatch row
    std::vector<float> q;        // [ubatch row][n_head][HD], unscaled
};

static std::vector<query_set> make_queries(int n_head, std::mt19937 & rng) {
    std::normal_distribution<float> nd(0.0f, 2.0f);
    std::vector<query_set> out;
    {
        query_set Q{ "batch 1", { 2 * N_ROWS / 3 }, { 0 }, {} }; // sees about 2/3 of the rows
        out.push_back(Q);
    }
    {
        // batch of 19 in ascending positions (0 and the last among them), ubatch rows reversed
        query_set Q{ "batch 19", {}, {}, {} };
        std::vector<int32_t> all(N_ROWS - 2);
        std::iota(all.begin(), all.end(), 1);
        std::shuffle(all.begin(), all.end(), rng);
        Q.qpos.assign(all.begin(), all.begin() + N_PREFILL - 2);
        Q.qpos.push_back(0);
        Q.qpos.push_back(N_ROWS - 1);
        std::sort(Q.qpos.begin(), Q.qpos.end());
        for (int t = 0; t < N_PREFILL; ++t) Q.idx.push_back(N_PREFILL - 1 - t);
        out.push_back(Q);
    }
    for (query_set & Q : out) {
        Q.q.resize(Q.qpos.size() * n_head * HD);
        for (float & e : Q.q) e = nd(rng);
    }
    return out;
}

//
// exact reference
//

// The query a row's scores see. The f32 tiles use the scaled query q as it is; the AVX-512
// integer tiles (q4_0 and kvq2 rows) round it to int8 per 32 values (kvq_q8_prepare) in the
// pool's space: plain rows see dequant(round(q)), rotated rows H(dequant(round(H q))), H the
// normalised Walsh-Hadamard transform (kvq_hadamard: butterflies times 1/8, symmetric and
// self-inverse), which takes the rounded rotated query back to the plain space of D.k.
enum query_kind { Q_EXACT, Q_INT_PLAIN, Q_INT_ROTATED };

// kvq2 rows take the integer path when every codeword magnitude is an integer over 55 (as the
// AVX-512 tiles check; patch 0001 rounds the codebook so).
static bool kvq2_on_int_grid() {
    const float (*G)[4] = kvq_kvq2_grid();
    for (int m = 0; m < 16; ++m) {
        for (int i = 0; i < 4; ++i) {
            const float g = G[m << 4][i];
            const long M = std::lround(g * 55.0f);
            if (M < 0 || M > 127 || std::fabs((float) M / 55.0f - g) >= 1e-6f) return false;
        }
    }
    return true;
}

static query_kind pool_query_kind(const kvq_pool & P, bool int_path) {
    auto int_type = [](ggml_type t) { return t == GGML_TYPE_Q4_0 || (t == GGML_TYPE_KVQ2 && kvq2_on_int_grid()); };
    if (!int_path || !int_type(P.tk) || !int_type(P.tv)) return Q_EXACT;
    return P.rotated ? Q_INT_ROTATED : Q_INT_PLAIN;
}

// int8 per 32 values as kvq_q8_prepare rounds (step amax / 127, in f32), dequantized.
static void q8_round(const float * q, double * out) {
    for (int b = 0; b < HD; b += 32) {
        float amax = 0.0f;
        for (int e = 0; e < 32; ++e) amax = std::max(amax, std::fabs(q[b + e]));
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f, d = amax / 127.0f;
        for (int e = 0; e < 32; ++e) out[b + e] = (double) d * (double) std::nearbyint(q[b + e] * id);
    }
}

// The scaled query of one head in each query_kind, plain space: out[kind * HD + e].
static void exact_query(const float * q, double * out) {
    float qs[HD], qr[HD];
    for (int e = 0; e < HD; ++e) qs[e] = q[e] * 0.125f; // scale 1 / sqrt(64), exact in f32
    for (int e = 0; e < HD; ++e) out[Q_EXACT * HD + e] = qs[e];
    q8_round(qs, out + Q_INT_PLAIN * HD);
    memcpy(qr, qs, sizeof(qr));
    kvq_hadamard(qr, HD); // the kernel's own rotated query, bit for bit
    q8_round(qr, out + Q_INT_ROTATED * HD);
    hadamard64(out + Q_INT_ROTATED * HD);
}

// Attention outputs and, over the window rows, what the runtime's features read: raw scores and,
// from the merge, each query's attention entropy, the attention the rows received and its count,
// and query-aware rounding's sum of p^2 q.
struct reference {
    std::vector<double> out;   // [ubatch row][n_head][HD]
    std::vector<double> wsc;   // [set token][n_head][window row]: raw scores, NaN where masked
    std::vector<double> ent;   // [set token][n_head]
    std::vector<double> recv;  // [window row][n_head]
    std::vector<int> nq;       // [window row][n_head]
    std::vector<double> qacc;  // [window row][n_embd_kv]
};

// kinds[p]: the query pool p's scores see (null: Q_EXACT for every pool).
static reference exact(const layer_data & D, const query_set & Q, int n_head, int n_win, const query_kind * kinds) {
    const int G = n_head / N_HEAD_KV, n_embd_kv = N_HEAD_KV * HD, N = (int) D.pos.size(), n = (int) Q.qpos.size();
    reference R;
    R.out.assign((size_t) n * n_head * HD, 0.0);
    R.wsc.assign((size_t) n * n_head * n_win, NAN);
    R.ent.assign((size_t) n * n_head, 0.0);
    R.recv.assign((size_t) n_win * n_head, 0.0);
    R.nq.assign((size_t) n_win * n_head, 0);
    R.qacc.assign((size_t) n_win * n_embd_kv, 0.0);
    std::vector<double> s(N), qk(3 * HD);
    for (int t = 0; t < n; ++t) {
        const int ti = Q.idx[t], qp = Q.qpos[t];
        for (int h = 0; h < n_head; ++h) {
            const int g = h / G;
            const float * q = Q.q.data() + ((size_t) ti * n_head + h) * HD;
            exact_query(q, qk.data());
            double mx = -INFINITY;
            for (int r = 0; r < N; ++r) {
                if (D.pos[r] > qp) continue;
                const double * k = D.k.data() + (size_t) r * n_embd_kv + g * HD;
                const double * qr = qk.data() + (kinds ? kinds[D.row_pool[r]] : Q_EXACT) * HD;
                double d = 0.0;
                for (int e = 0; e < HD; ++e) d += qr[e] * k[e];
                s[r] = d;
                mx = std::max(mx, d);
                if (D.win_row[r] >= 0) R.wsc[((size_t) t * n_head + h) * n_win + D.win_row[r]] = d;
            }
            double l = 0.0;
            double * o = R.out.data() + ((size_t) ti * n_head + h) * HD;
            for (int r = 0; r < N; ++r) {
                if (D.pos[r] > qp) continue;
                const double p = std::exp(s[r] - mx);
                l += p;
                const double * v = D.v.data() + (size_t) r * n_embd_kv + g * HD;
                for (int e = 0; e < HD; ++e) o[e] += p * v[e];
            }
            for (int e = 0; e < HD; ++e) o[e] /= l;
            double H = 0.0;
            for (int r = 0; r < N; ++r) {
                if (D.pos[r] > qp) continue;
                const double p = std::exp(s[r] - mx) / l;
                if (p > 0.0) H -= p * std::log(p);
                const int w = D.win_row[r];
                if (w < 0 || D.pos[r] >= qp) continue; // features: earlier window rows
                R.recv[(size_t) w * n_head + h] += p * (qp + 1);
                R.nq[(size_t) w * n_head + h] += 1;
                for (int e = 0; e < HD; ++e) R.qacc[(size_t) w * n_embd_kv + g * HD + e] += p * p * q[e];
            }
            R.ent[(size_t) t * n_head + h] = qp > 0 ? std::max(0.0, H) / std::log(qp + 1.0) : 0.0;
        }
    }
    return R;
}

//
// the kernel through the runtime's driver
//

struct result {
    std::vector<float> out;    // [ubatch row][n_head][HD]
    std::vector<float> wsc;    // [set token][n_head][wsc_n]
    std::vector<float> ent;    // as reference, the per-thread slots of recv, nq and qacc summed
    std::vector<double> recv;
    std::vector<int> nq;
    std::vector<double> qacc;
};

// Partial states by nth threads (work items i % nth), then their merge by nth threads; with a
// window, the merge derives its features (query-aware rounding on) as a graph's op does.
static result run_fused(llama_kvq_state & s, layer_data & D, const query_set & Q, int nth) {
    const int n = (int) Q.qpos.size(), nh = s.n_head, ss = kvq_st_size(HD);
    kvq_layer & L = D.L;
    const int64_t N = kvq_layer_rows(L), wsc_n = (int64_t) L.pools[LLAMA_KVQ_WINDOW].n();
    const bool feat = wsc_n > 0;
    const int nc = kvq_n_chunks(N, kvq_chunk_slots(s.n_ctx));
    std::vector<float> part((size_t) nc * n * nh * ss);
    result R;
    R.out.assign((size_t) n * nh * HD, NAN);
    R.wsc.assign((size_t) n * nh * std::max<int64_t>(wsc_n, 1), NAN);
    L.recv_t.assign(nth, std::vector<float>(wsc_n * nh, 0.0f));
    L.nq_t.assign(nth, std::vector<int32_t>(wsc_n * nh, 0));
    L.ent.assign((size_t) n * nh, NAN);
    L.qacc_t.assign(nth, std::vector<float>(wsc_n * s.n_embd_kv, 0.0f));
    const kvq_qsrc qs{ (const char *) Q.q.data(), HD * sizeof(float), (size_t) nh * HD * sizeof(float) };
    const kvq_qset set{ n, Q.idx.data(), Q.qpos.data(), 0 };
    float * wsc = feat ? R.wsc.data() : nullptr;
    auto work = [&](int ith) {
        std::vector<float> buf;
        kvq_fused_partial(s, L, qs, set, 0.125f, part.data(), nc, ith, nth, buf, wsc, wsc_n);
    };
    auto merge = [&](int ith) {
        kvq_fused_merge(s, L, 0, part.data(), nc, set, (char *) R.out.data(), (size_t) nh * HD * sizeof(float), ith, nth,
                        feat, wsc, wsc_n, qs);
    };
    if (nth == 1) {
        work(0);
        merge(0);
    } else {
        std::vector<std::thread> th;
        for (int i = 0; i < nth; ++i) th.emplace_back(work, i);
        for (auto & t : th) t.join();
        th.clear();
        for (int i = 0; i < nth; ++i) th.emplace_back(merge, i);
        for (auto & t : th) t.join();
    }
    R.ent = L.ent;
    R.recv.assign(wsc_n * nh, 0.0);
    R.nq.assign(wsc_n * nh, 0);
    R.qacc.assign(wsc_n * s.n_embd_kv, 0.0);
    for (int i = 0; i < nth; ++i) {
        for (size_t e = 0; e < R.recv.size(); ++e) {
            R.recv[e] += L.recv_t[i][e];
            R.nq[e] += L.nq_t[i][e];
        }
        for (size_t e = 0; e < R.qacc.size(); ++e) R.qacc[e] += L.qacc_t[i][e];
    }
    return R;
}

//
// checks
//

// max |got - want| over the entries where want is a number, divided by max |want| (`relative`);
// inf if got is not finite there.
template <typename T>
static double max_err(const std::vector<T> & got, const std::vector<double> & want, bool relative = true) {
    double err = 0.0, scale = 0.0;
    for (size_t e = 0; e < want.size(); ++e) {
        if (std::isnan(want[e])) continue;
        scale = std::max(scale, std::fabs(want[e]));
        err = std::isfinite((double) got[e]) ? std::max(err, std::fabs((double) got[e] - want[e])) : INFINITY;
    }
    return relative && scale > 0.0 ? err / scale : err;
}

struct tally {
    int cases = 0, failed = 0;
    // worst errors: outputs against exact and the scalar tiles, window scores, entropy (absolute),
    // received attention, sum of p^2 q
    double err = 0.0, err_scalar = 0.0, err_wsc = 0.0, err_ent = 0.0, err_recv = 0.0, err_qacc = 0.0;
    // the integer path's cases: outputs against the rounded-query reference and the unrounded one
    int int_cases = 0;
    double err_int = 0.0, err_int_exact = 0.0;
};

static int g_fail_lines = 0;

static void fail(const std::string & what) {
    if (g_fail_lines++ < 40) fprintf(stderr, "FAIL %s\n", what.c_str());
}

// Every check of one run; false (and a FAIL line each) on a mismatch. ref_int: the reference
// with the integer path's rounded query (null: the run has no integer tiles); the features are
// checked against it.
static bool check(const std::string & what, const result & got, const reference & exact_ref, const reference * ref_int,
                  const std::vector<float> * scalar, const std::vector<float> * one_thread, tally & T) {
    bool ok = true;
    auto expect = [&](bool cond, const std::string & msg) {
        if (!cond) fail(what + ": " + msg);
        ok = ok && cond;
    };
    const reference & ref = ref_int ? *ref_int : exact_ref;
    double err = 0.0, err_scalar = 0.0;
    if (ref_int) {
        const double ei = max_err(got.out, ref_int->out), ee = max_err(got.out, exact_ref.out);
        expect(ei <= TOL_INT, "integer path: max |out - exact with rounded q| / max |exact| = " + std::to_string(ei));
        expect(ee <= TOL_LOOSE, "integer path: max |out - exact| / max |exact| = " + std::to_string(ee));
        T.int_cases++;
        T.err_int = std::max(T.err_int, ei);
        T.err_int_exact = std::max(T.err_int_exact, ee);
    } else {
        err = max_err(got.out, ref.out);
        expect(err <= TOL_EXACT, "max |out - exact| / max |exact| = " + std::to_string(err));
    }
    if (scalar && !ref_int) {
        std::vector<double> sd(scalar->begin(), scalar->end());
        err_scalar = max_err(got.out, sd);
        expect(err_scalar <= TOL_SCALAR, "max |out - scalar tiles| / max |scalar| = " + std::to_string(err_scalar));
    }
    if (one_thread) {
        expect(memcmp(one_thread->data(), got.out.data(), got.out.size() * sizeof(float)) == 0, "differs from 1 thread");
    }
    if (!ref.recv.empty()) {
        // raw scores: exact where the row is visible; where it is not, -inf (masked in its tile) or
        // never written (the whole tile lies after the query block)
        bool masked = true;
        for (size_t e = 0; e < ref.wsc.size(); ++e) {
            if (std::isnan(ref.wsc[e])) masked = masked && (std::isnan(got.wsc[e]) || got.wsc[e] == -INFINITY);
        }
        expect(masked, "a masked window row has a finite score");
        const double ew = max_err(got.wsc, ref.wsc), ee = max_err(got.ent, ref.ent, false), er = max_err(got.recv, ref.recv),
                     eq = max_err(got.qacc, ref.qacc);
        expect(ew <= TOL_EXACT, "window scores: max err / max |exact| = " + std::to_string(ew));
        expect(ee <= TOL_ENT, "entropy: max |err| = " + std::to_string(ee));
        expect(er <= TOL_FEAT, "received attention: max err / max |exact| = " + std::to_string(er));
        expect(eq <= TOL_FEAT, "query-aware rounding's sum of p^2 q: max err / max |exact| = " + std::to_string(eq));
        expect(got.nq == ref.nq, "received attention: query counts differ");
        T.err_wsc = std::max(T.err_wsc, ew);
        T.err_ent = std::max(T.err_ent, ee);
        T.err_recv = std::max(T.err_recv, er);
        T.err_qacc = std::max(T.err_qacc, eq);
    }
    T.cases++;
    T.failed += !ok;
    T.err = std::max(T.err, err);
    T.err_scalar = std::max(T.err_scalar, err_scalar);
    return ok;
}

int main() {
    llama_kvq_state & s = test_state();
    s.hd = HD;
    s.n_head_kv = N_HEAD_KV;
    s.n_embd_kv = N_HEAD_KV * HD;
    s.n_ctx = 512; // 8 chunk slots: N_ROWS keys make 3 chunks

    std::vector<kvq_isa> isas; // the scalar tiles first: the SIMD ones are compared with them
    for (kvq_isa isa : { KVQ_ISA_SCALAR, KVQ_ISA_AVX2, KVQ_ISA_AVX512, KVQ_ISA_NEON }) {
        bool all = true;
        for (int G : { 1, 3, 8 }) all = all && kvq_isa_supported(isa, HD, G);
        if (all) isas.push_back(isa);
    }
    // the AVX-512 tiles take their integer path on q4_0 and kvq2 rows (kvq_fused_partial's use_q8)
    const bool int_path = kvq_isa_supported(KVQ_ISA_AVX512, HD, 1) && kvq_cpu_has_avx512_int();
    std::vector<tally> tallies(isas.size());
    std::mt19937 rng(52);
    int n_ref = 0;
    for (const layout & lay : LAYOUTS) {
        for (bool rotate : { true, false }) {
            layer_data D = make_layer(lay, rotate, rng);
            query_kind kinds[LLAMA_KVQ_N_STORED];
            bool any_int = false;
            for (int p = 0; p < LLAMA_KVQ_N_STORED; ++p) {
                kinds[p] = pool_query_kind(D.L.pools[p], int_path);
                any_int = any_int || (kinds[p] != Q_EXACT && lay.rows[p] > 0);
            }
            for (int G : { 1, 3, 8 }) {
                s.n_head = G * N_HEAD_KV;
                s.rotate = rotate;
                for (const query_set & Q : make_queries(s.n_head, rng)) {
                    const reference ref = exact(D, Q, s.n_head, lay.rows[LLAMA_KVQ_WINDOW], nullptr);
                    reference ref_int;
                    if (any_int) ref_int = exact(D, Q, s.n_head, lay.rows[LLAMA_KVQ_WINDOW], kinds);
                    n_ref += 1 + any_int;
                    const std::string name = std::string(lay.name) + (rotate ? " rotated" : " plain") + " G=" +
                                             std::to_string(G) + " " + Q.name;
                    std::vector<float> scalar_out;
                    for (size_t ii = 0; ii < isas.size(); ++ii) {
                        s.isa = isas[ii];
                        std::vector<float> one_thread;
                        for (int nth : { 1, 2 }) {
                            const result got = run_fused(s, D, Q, nth);
                            check(name + " " + kvq_isa_name(s.isa) + " threads=" + std::to_string(nth), got, ref,
                                  any_int && s.isa == KVQ_ISA_AVX512 ? &ref_int : nullptr,
                                  scalar_out.empty() ? nullptr : &scalar_out, nth == 1 ? nullptr : &one_thread,
                                  tallies[ii]);
                            if (nth == 1) one_thread = got.out;
                        }
                        if (s.isa == KVQ_ISA_SCALAR) scalar_out = one_thread;
                    }
                }
            }
        }
    }
    int failed = 0;
    std::string names;
    for (size_t ii = 0; ii < isas.size(); ++ii) {
        const tally & T = tallies[ii];
        printf("isa %-6s: %d cases, %d failed; max errors: out %.1e (vs scalar tiles %.1e), window scores %.1e, "
               "entropy %.1e, received %.1e, p^2 q %.1e",
               kvq_isa_name(isas[ii]), T.cases, T.failed, T.err, T.err_scalar, T.err_wsc, T.err_ent, T.err_recv, T.err_qacc);
        if (T.int_cases > 0) {
            printf("; integer path (q4_0/kvq2 rows; the %d cases not in `out`): out vs exact with the kernel's rounded "
                   "query %.1e (tolerance %.0e), vs exact %.1e (tolerance %.0e)",
                   T.int_cases, T.err_int, TOL_INT, T.err_int_exact, TOL_LOOSE);
        }
        printf("\n");
        failed += T.failed;
        names += std::string(names.empty() ? "" : " ") + kvq_isa_name(isas[ii]);
    }
    printf("cases: %d layouts (f16 and q8_0 windows, f16, q8_0, q4_0, k4v2, kvq2, all six) x rotation on/off x GQA "
           "groups 1, 3, 8 x batch 1 and %d (%d exact references), each at threads 1 and 2\n",
           (int) (sizeof(LAYOUTS) / sizeof(LAYOUTS[0])), N_PREFILL, n_ref);
    printf("tolerances (x max |exact|; entropy, in [0, 1], absolute): outputs and window scores %.0e, outputs against "
           "the scalar tiles %.0e, entropy %.0e, received attention and p^2 q %.0e; integer path: outputs %.0e against "
           "exact with the kernel's rounded query, %.0e against exact\n", TOL_EXACT, TOL_SCALAR, TOL_ENT, TOL_FEAT, TOL_INT,
           TOL_LOOSE);
    printf("integer path (AVX-512 VNNI + VBMI, q4_0/kvq2 rows): %s\n",
           int_path ? "tested" : "not on this CPU");
    printf("isas tested: %s\n", names.c_str());
    printf("kvq_kernel_test: %s\n", failed ? "FAILED" : "ok");
    return failed ? 1 : 0;
}
