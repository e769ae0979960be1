// kvq internals shared by the llama-kvq-*.cpp sources (the API and the design: llama-kvq.h).
#pragma once

#include "llama-kvq.h"

#include "ggml.h"
#include "ggml-cpu.h"

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVQ_HAVE_X86 1
#include <immintrin.h>
// AVX2 + FMA + F16C and AVX-512 (F, BW, VL, DQ) code is compiled for that target and chosen at
// run time (kvq_isa_best); declarations carry the attribute too (a different one would declare
// another version)
#define KVQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KVQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define KVQ_AVX512I __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c")))
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define KVQ_HAVE_NEON 1 // every aarch64 CPU has NEON (Advanced SIMD) and f16 conversions
#endif

//
// errors, timing, CPU features
//

// Sets llama_kvq_last_error() (per thread) and returns -1.
int32_t kvq_fail(const std::string & msg);

// AVX2, FMA and F16C (false off x86).
bool kvq_cpu_has_avx2();
// AVX-512 F, BW, VL and DQ (false off x86).
bool kvq_cpu_has_avx512();
// AVX-512 VNNI and VBMI besides: the AVX-512 tiles' integer path (q4_0 and kvq2 rows).
bool kvq_cpu_has_avx512_int();

// The tiles the fused attention kernel runs (llama-kvq-attention.cpp): scalar everywhere; the
// SIMD ones need head_dim 64 and at most 64 query heads per KV head, and the CPU's support.
enum kvq_isa { KVQ_ISA_SCALAR = 0, KVQ_ISA_AVX2 = 1, KVQ_ISA_AVX512 = 2, KVQ_ISA_NEON = 3 };
bool        kvq_isa_supported(kvq_isa isa, int hd, int n_group);
kvq_isa     kvq_isa_best(int hd, int n_group); // the widest supported
const char * kvq_isa_name(kvq_isa isa);       // "scalar", "avx2", "avx512", "neon"

static inline double kvq_now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

//
// precisions
//

extern const char * const KVQ_FEATURE_NAMES[LLAMA_KVQ_N_FEATURES];
enum { F_FREQ, F_QUALITY, F_ATTN_VAR, F_ATTN_ENT, F_LAYER, F_POS, F_KMAX, F_VMAX, F_RECV };

// Effective bits per element of each class (K+V bytes of a row x 8 / elements), block scales included.
static const float KVQ_EFF_BITS_BY_BITS[17] = { 0, 0, 2.25f, 3.375f, 4.5f, 0, 0, 0, 8.5f, 0, 0, 0, 0, 0, 0, 0, 16.0f };

// Pool index <-> bits <-> ggml types of K and V. The window is f16 staging (q8_0 with
// window_bits 8, set in llama_kvq_enable); pools 1..5 are the
// precisions, in falling cost (demotion walks up the index). Bits 3 names the one pool whose
// sides differ: K in q4_0, V in kvq2 (a K error moves every score, so K gets the bits).
static const int KVQ_BITS[LLAMA_KVQ_N_POOLS] = { 16, 16, 8, 4, 3, 2, 0 };
static inline ggml_type kvq_pool_type(int p, bool v) {
    switch (p) {
        case LLAMA_KVQ_WINDOW:
        case LLAMA_KVQ_F16:  return GGML_TYPE_F16;
        case LLAMA_KVQ_Q8:   return GGML_TYPE_Q8_0;
        case LLAMA_KVQ_Q4:   return GGML_TYPE_Q4_0;
        case LLAMA_KVQ_K4V2: return v ? GGML_TYPE_KVQ2 : GGML_TYPE_Q4_0;
        default:             return GGML_TYPE_KVQ2;
    }
}
static inline int kvq_pool_of_bits(int bits) {
    switch (bits) {
        case 16: return LLAMA_KVQ_F16;
        case 8:  return LLAMA_KVQ_Q8;
        case 4:  return LLAMA_KVQ_Q4;
        case 3:  return LLAMA_KVQ_K4V2;
        case 2:  return LLAMA_KVQ_Q2;
        case 0:  return LLAMA_KVQ_DROP;
        default: return -1;
    }
}
// A class data is stored in: every one but DROP (static and rule policies, round trips).
static inline int kvq_stored_pool_of_bits(int bits) {
    const int q = kvq_pool_of_bits(bits);
    return q == LLAMA_KVQ_DROP ? -1 : q;
}

//
// controller (llama-kvq-controller.cpp)
//

struct llama_kvq_controller;

// Running statistics of the controller's inputs (kvq.controller.norm_prior n0 > 0): per input,
// Welford's mean and sum of squared deviations in double over every row decided, started as if n0
// rows at feature_mean and feature_std had been seen. A row is added before it is normalised, so
// a controller trained on one model normalises by the scales of the model it runs on. The count
// is shared (every row updates every input). Empty until the first row: decide starts it.
struct kvq_feature_norm {
    double n = 0.0;
    std::vector<double> mean, m2; // [n_in]

    bool empty() const { return mean.empty(); }
    void init(const llama_kvq_controller & c);
    // Add a row (runtime feature order) to the statistics, then write its normalised inputs z[n_in].
    void normalize(const llama_kvq_controller & c, const float * feat, float * z);
};

struct llama_kvq_controller {
    bool present = false;
    std::string error;           // non-empty: metadata present but malformed
    int n_in = 0, n_hidden = 0, n_out = 0;
    std::vector<int>   feat_idx; // controller input j <- runtime feature feat_idx[j]
    std::vector<int>   bits;     // output class -> bits
    std::vector<float> w1, b1, w2, b2, mean, std_;
    float budget_bits = 0.0f;
    bool log_damage = false;     // head "log_damage": output o is log(damage_o / lambda), logit_o = -exp(out_o) - bits_o
    bool per_layer = false;      // granularity "token_layer": trained on (token, layer) rows, decides per layer
    std::vector<float> k_center; // optional K centering [n_layer][n_embd_kv] trained with the controller
    // optional [n_out - 1] (classes in ascending bits): the damage estimates are projected onto
    // physical ones before the decision, top class >= 0 and d_o >= damage_floor[o] * d_o+1 going down
    std::vector<float> damage_floor;
    uint32_t norm_prior = 0;     // n0 > 0: inputs normalised by running statistics (kvq_feature_norm); 0: fixed

    // Forward pass identical to kvq_cli.controller.ControllerSpec.logits (f32), then
    // argmax over classes of logit - price * effective bits (price 0: the trained choice).
    // Both heads' logits are -(damage / lambda) - bits. With norm_prior > 0, norm holds the
    // running statistics and takes this row first (started from the prior when empty);
    // otherwise it is not used and may be null.
    int decide(const float * feat, float price, kvq_feature_norm * norm) const;
};

// kvq.controller.* of a GGUF: absent (present = false), malformed (error set) or valid.
std::shared_ptr<llama_kvq_controller> kvq_parse_controller(const struct gguf_context * meta);
// A controller file (params.controller_path), valid and present; null after kvq_fail.
std::shared_ptr<llama_kvq_controller> kvq_read_controller_file(const char * path);
// What a valid controller needs of the model's shapes; kvq_fail and false if it does not fit.
// origin names the controller in the message ("the model's kvq controller", "controller file PATH").
bool kvq_controller_fits(const llama_kvq_controller & c, const std::string & origin, int n_layer, int n_embd_kv);

//
// state (llama-kvq-cache.cpp)
//

struct kvq_pool {
    ggml_type tk = GGML_TYPE_F16, tv = GGML_TYPE_F16; // K and V types (differ in the K4V2 pool)
    bool rotated = false;
    size_t row_k = 0, row_v = 0;   // bytes of one token's K (V) row: all KV heads
    size_t head_k = 0, head_v = 0; // bytes of one head within a row
    std::vector<uint8_t> k, v;
    std::vector<int32_t> pos;
    size_t n() const { return pos.size(); }
};

struct kvq_layer {
    kvq_pool pools[LLAMA_KVQ_N_POOLS];
    // window-row feature accumulators (aligned with pools[WINDOW] rows), per thread for the
    // received attention (threads never share a slot), per head for the own-row entropy.
    std::vector<std::vector<float>> recv_t; // [thread][row * n_head + h]: sum of p * (pos_q + 1)
    std::vector<std::vector<int32_t>> nq_t; // [thread][row * n_head + h]: queries counted
    std::vector<float> ent;                 // [row * n_head + h]: entropy of the row's own attention
    // qar_mu > 0: per thread, [row * n_embd_kv + g * hd + e]: sum over later queries of the KV head's
    // query heads of p^2 * q (plain space), the direction query-aware rounding protects
    std::vector<std::vector<float>> qacc_t;
};

// One sequence's rows (llama.cpp's seq_id): every sequence keeps its own window and pools per
// layer, its own token statistics and positions, so a query attends only to the rows of the
// sequence asking. seq_cp copies rows (each copy is held and counted in the budget).
struct kvq_seq {
    std::vector<kvq_layer> layers;        // empty until the sequence stores its first row
    std::vector<llama_token> tok_at;      // token id per position held (-1 unknown)
    std::unordered_map<llama_token, int32_t> tok_count;
    int64_t n_tok_seen = 0;
    int32_t max_pos = -1;
    // current ubatch: this sequence's tokens are ub_order[ub_first .. ub_first + ub_n) of the state
    int32_t ub_first = 0, ub_n = 0;
    size_t ub_base = 0;                   // its first window row of the ubatch (same in every layer)
    // LEARNED with a budget: the price per effective bit is price_step times the overspend of the
    // sequence's decided rows against the target (online dual ascent), kept as exact totals so that
    // removing rows undoes their decisions' effect on it exactly. Per sequence, so that one request's
    // decisions do not depend on another's.
    int64_t paid_bytes = 0;               // bytes of the decided rows counted in the price
    int64_t paid_rows = 0;                // and their number
    // LEARNED with norm_prior > 0: the controller's running input statistics over every row it decided
    // in this sequence. Rows removed stay in them (they estimate the model's feature scales, which a
    // rolled-back row measured as well as a kept one); with several sequences, a sequence emptied from
    // position 0 starts over from the prior, as its price does (kvq_refunds).
    kvq_feature_norm norm;

    bool used() const { return !layers.empty(); }
};

struct kvq_trace_rec {
    int32_t pos, layer, token, bits;
    float feat[LLAMA_KVQ_N_FEATURES];
};

// A window row on its way out of the window: K and V in plain and in pool (rotated) space,
// and, when features are needed, its encoding at the lowest precision (for the quality
// feature; reused as is when that is the decision). Rotation and trial encoding happen once.
// Buffers are sized from the model in llama_kvq_enable (n_embd_kv values, the lowest pool's row).
struct kvq_exit_row {
    std::vector<float> k, v;           // plain
    std::vector<float> kr, vr;         // rotated (copies of k, v when rotation is off)
    std::vector<uint8_t> k_min, v_min; // trial encoding at the lowest precision
    bool has_min = false;
    std::vector<float> u;              // query-aware rounding: unit attending-query direction per KV head (pool space)
    bool has_u = false;
    float quality = 0.0f;              // relative squared error of K and V at the lowest precision
    std::vector<float> back;           // scratch: the trial encoding decoded
};

struct llama_kvq_state;
struct kvq_attn_args {
    llama_kvq_state * s;
    int il;
    float scale;
};

struct llama_kvq_state {
    ~llama_kvq_state(); // leaves the memory registry
    llama_kvq_params p;
    const llama_model * model = nullptr;
    std::shared_ptr<const llama_kvq_controller> controller; // the one in use: controller_path's, else the model's (may be absent)
    const llama_kvq_controller * ctrl = nullptr;            // LEARNED: the controller deciding
    int n_layer = 0, n_head = 0, n_head_kv = 0, hd = 0, n_embd_kv = 0;
    int64_t n_ctx = 0;
    bool rotate = true;
    bool need_feat = false;
    bool direct = false;     // static policy, W = 0: quantize at store time (stock semantics)
    int64_t budget = 0;      // bytes; 0 = none
    int64_t c_row[LLAMA_KVQ_N_POOLS] = {}; // K+V bytes of one token-layer row per class
    int64_t held = 0;        // bytes held, all layers
    int64_t rows_held = 0;   // token-layer rows held, all layers
    int64_t win_rows = 0;    // of which still counted at the window's cost
    int min_pool = LLAMA_KVQ_Q2;
    kvq_layer proto;         // the pools' formats (types, row sizes), no rows: what every layer of a sequence starts as
    std::vector<kvq_seq> seqs; // [n_seq_max]
    int64_t w_total = 0;     // window rows a full cache reserves: min(W x n_seq_max, n_ctx)
    const llama_context * lctx = nullptr;    // the context (its cparams: RoPE of a position shift)
    const llama_memory_i * memory = nullptr; // the context's memory, whose seq_* calls reach this state
    bool shifted = false;    // a position shift could not be applied (RoPE factors off the host): the next decode fails

    // current ubatch: its tokens (positions, ids, sequences) in ubatch order, and the order that
    // groups them by sequence (stable): sequence S's tokens are ub_order[S.ub_first .. + S.ub_n)
    std::vector<int32_t> ub_pos;
    std::vector<llama_token> ub_tok;
    std::vector<int32_t> ub_seq;
    std::vector<int32_t> ub_order;
    std::vector<int32_t> ub_qpos;  // positions in that order
    std::vector<int32_t> ub_rank;  // per ubatch token: its index among its sequence's tokens
    std::vector<int32_t> ub_seqs;  // the sequences of the ubatch, ascending
    int n_threads_max = 1;

    std::vector<int32_t> assign;
    std::vector<float> k_mu;  // K centering [n_layer][n_embd_kv]; empty: none
    std::vector<kvq_trace_rec> trace;
    std::vector<std::vector<float>> scratch; // per thread
    std::vector<struct kvq_attn_args> op_args; // per layer, fixed size (ops keep pointers)
    std::vector<kvq_exit_row> exit_rows; // per layer, reused by after_ubatch
    std::vector<float> wsc;  // fused kernel, features: raw window scores [n_tok][n_head][wsc_n]
    int64_t wsc_n = 0;
    kvq_isa isa = KVQ_ISA_SCALAR; // fused kernel: the tiles it runs (kvq_isa_best, env KVQ_ATTN_ISA)
    bool attn_ref = false;   // reference attention (kvq_attend_group) instead of the fused kernel
    int64_t n_budget_demotions = 0;
    double t_policy_ms = 0.0, t_attn_ms = 0.0;
    // record_q: every query row the attention saw, per layer ([row][n_head * hd]) with its position
    std::vector<std::vector<float>> qrec;
    std::vector<std::vector<int32_t>> qrec_pos;
};

// The context's kvq state, null when kvq is off; the state of the context owning a memory.
llama_kvq_state * kvq_of(const llama_context * ctx);
llama_kvq_state * kvq_of_memory(const llama_memory_i * mem);
// llama_kvq_enable: the state answers its context memory's llama_memory_* calls (until it is destroyed).
void kvq_register(const llama_memory_i * mem, llama_kvq_state * s);

// Sequence rows: a sequence's layers are created with the pools' formats on first use; remove the
// rows of positions [p0, p1) (p1 < 0: to the end) of one sequence. `refund`: the removed decided
// rows leave the price's totals, else the price keeps them. kvq_refunds says which a removal of
// [p0, p1) from S does: rows rolled back behind a kept prefix refund, and so do rows dropped before
// kept ones (a context shift); a sequence emptied from position 0 keeps the price it learned when the
// context has one sequence (scoring loops: items in turn) and refunds when it serves several (slots:
// a request's decisions then depend on its own rows only).
kvq_seq & kvq_seq_use(llama_kvq_state & s, int32_t seq);
void kvq_seq_forget_token(kvq_seq & S, int32_t pos);
void kvq_seq_remove(llama_kvq_state & s, kvq_seq & S, int32_t p0, int32_t p1, bool refund);
bool kvq_refunds(const llama_kvq_state & s, const kvq_seq & S, int32_t p0, int32_t p1);
// Move positions [p0, p1) of S by delta (div <= 1) or divide them by div (seq_add, seq_div); false if
// the model's RoPE could not be applied.
bool kvq_seq_move(llama_kvq_state & s, kvq_seq & S, int32_t p0, int32_t p1, int32_t delta, int div);

// Rows: append (encoding from plain f32; tmp: n_embd_kv floats of scratch), swap-remove, and the
// budget check every new or converted row passes.
void kvq_append(llama_kvq_state & s, kvq_pool & P, const float * k, const float * v, int32_t pos, float * tmp);
void kvq_remove(kvq_pool & P, size_t i);
void kvq_window_remove(kvq_layer & L, size_t i, int n_head, int n_embd_kv);
bool kvq_fits(const llama_kvq_state & s, int64_t delta, int64_t d_rows, int64_t d_win);
int  kvq_fit_pool(llama_kvq_state & s, int pool, int from, int64_t rows);

//
// quantization (llama-kvq-quant.cpp; the rotation and the kvq2 table: llama-kvq-transform.cpp)
//

// Normalised fast Walsh-Hadamard transform over each 64-element chunk (self-inverse).
void kvq_hadamard(float * x, int n);
// v_unbias's block-scale rescale of an encoded V row (kvq2 and q4_0; others untouched).
void kvq_unbias_v(ggml_type t, uint8_t * row, const float * x, int n);
// Encode one f32 row (n_embd_kv values, un-rotated) into dst as a side of pool P (tmp: n_embd_kv floats).
void kvq_encode(const llama_kvq_state & s, const kvq_pool & P, int side, const float * x, uint8_t * dst, float * tmp);
// Whole row of side v (0: K, 1: V) of pool P, un-rotated.
void kvq_decode_row(const llama_kvq_state & s, const kvq_pool & P, bool v, const uint8_t * row, float * out);
// kvq2's 256 codewords (4 values each, signs applied, step 1).
const float (*kvq_kvq2_grid())[4];
// Query-aware rounding: unit directions per 64-value head (true if any is non-zero), and the
// in-place refinement of a K row encoded as type t (pool space x, per-head unit directions u).
bool kvq_qar_unit_heads(float * u, int n_head_kv);
void kvq_qar_row(ggml_type t, uint8_t * row, size_t head_bytes, const float * x, const float * u, int n_head_kv,
                 float mu);

// Decode one head (hd values, `head` bytes per head) of a stored row of type t; the result
// stays in the pool's space.
static inline void kvq_decode_head(ggml_type t, size_t head, const uint8_t * row, int g, int hd, float * out) {
    const uint8_t * src = row + (size_t) g * head;
    if (t == GGML_TYPE_F16) {
        ggml_fp16_to_fp32_row((const ggml_fp16_t *) src, out, hd);
    } else {
        ggml_get_type_traits(t)->to_float(src, out, hd);
    }
}

//
// attention
//

// Reference (llama-kvq-attention-ref.cpp): one query token (position qpos), the query heads of
// KV head g, over layer L of the query's sequence. q: [n_head * hd] for this token; out: same layout. Accumulates window features when
// `feat_row` >= 0 (the query's own window row) and thread slot `ith`.
void kvq_attend_group(const llama_kvq_state & s, kvq_layer & L, const float * q, int32_t qpos, int g, float scale,
                      float * out, std::vector<float> & buf, int ith, int64_t feat_row);

// Fused kernel (llama-kvq-attention.cpp, design there). Partial state layout, floats:
// [m, l, t, pad, acc_plain[hd], acc_rot[hd]]
#define KVQ_QB 16          // query tokens per block
#define KVQ_KB 64          // key rows per tile
#define KVQ_MAX_CHUNKS 8   // key chunks (decode parallelism)
#define KVQ_CHUNK_MIN 64   // fewest keys per chunk

static inline int kvq_st_size(int hd) { return 4 + 2 * hd; }

struct kvq_tile {
    ggml_type tk, tv;       // K and V types
    const uint8_t * k;      // row 0, head g
    const uint8_t * v;
    size_t stride_k, stride_v; // bytes between rows
    const int32_t * pos;
    int n;                  // rows (<= KVQ_KB)
    bool rot;               // rows are Hadamard-rotated: use rotated q, rotated accumulator
    int64_t row0;           // first row's index in its pool (window scores)
};

// A scaled query row of 64 values as int8 for the integer tiles: q ~= d0 * u over values 0..31
// and d1 * u over 32..63 (q8_0's blocks), s0 / s1 the sums of u per block, in the orders the
// tiles read: for q4_0 rows a = [u0..15, u32..47] twice, b = [u16..31, u48..63] twice; for kvq2
// rows c[16 i + g] = u[4 g + i].
struct kvq_q8 {
    int8_t a[64], b[64], c[64];
    float d0, d1;
    int32_t s0, s1;
};
void kvq_q8_prepare(const float * q, kvq_q8 & out);

struct kvq_qblock {
    int nt;                 // tokens in the block
    const int32_t * qpos;   // [nt]
    int n_head, G, g, hd;
    const float * q;        // [nt][n_head][hd], scaled
    const float * qr;       // same, rotated
    float * st;             // [nt][n_head][kvq_st_size(hd)]
    float * wsc;            // raw window scores [nt][n_head][wsc_n] or null
    int64_t wsc_n;
    const kvq_q8 * q8;      // [nt][n_head][2] (plain, rotated) for the integer tiles, or null
};

// Query rows of a ubatch: element (token i, head h) at data + i*nb2 + h*nb1 (f32, hd values).
struct kvq_qsrc {
    const char * data;
    size_t nb1, nb2;
};

// The queries of one sequence in a ubatch: n tokens; token t's query and output rows are those of
// ubatch token idx[t] (null: t), at position qpos[t]. work0 is the global index of the set's first
// work item: item i goes to thread i % nth, so the partial states (query block x chunk items) of all
// the ubatch's sequences spread over the threads as one list; the merge passes 0 (see the op).
struct kvq_qset {
    int n;
    const int32_t * idx;
    const int32_t * qpos;
    int64_t work0;
};

int     kvq_n_chunks(int64_t N, int slots);
int     kvq_chunk_slots(int64_t n_ctx);
int64_t kvq_layer_rows(const kvq_layer & L);
// Partial states of layer L (the sequence's) for the queries Q: part [nc][Q.n][n_head][kvq_st_size];
// wsc (features): raw window scores [Q.n][n_head][wsc_n], or null.
void    kvq_fused_partial(const llama_kvq_state & s, const kvq_layer & L, const kvq_qsrc & qs, const kvq_qset & Q,
                          float scale, float * part, int nc, int ith, int nth, std::vector<float> & buf,
                          float * wsc, int64_t wsc_n);
// Merge them into the output rows (ubatch order, out_nb1 bytes apart); with `feat`, the window
// features of L's window rows ub_base + t. Returns the feature time (ms).
double  kvq_fused_merge(const llama_kvq_state & s, kvq_layer & L, size_t ub_base, const float * part, int nc,
                        const kvq_qset & Q, char * out, size_t out_nb1, int ith, int nth, bool feat, const float * wsc,
                        int64_t wsc_n, const kvq_qsrc & qs);

#ifdef KVQ_HAVE_X86
// AVX2 pieces of the fused kernel (llama-kvq-attention-x86.cpp; head_dim 64, kvq_isa_supported).
KVQ_AVX2 void kvq_tile_avx2(const kvq_tile & T, const kvq_qblock & B, float * kt, float * vt, float * sbuf);
KVQ_AVX2 void kvq_recv_avx2(const float * sc, const int32_t * pos, size_t n, int32_t qp, float M, float rel,
                            float * recv, int32_t * nq, int nh);
KVQ_AVX2 void kvq_qacc_group_avx2(float * acc, size_t stride, const int32_t * pos, size_t n, int32_t qp,
                                  const float * sc, int64_t sc_n, const float * M, const float * inv_l,
                                  const float * const * qh, int G);
#endif
#ifdef KVQ_HAVE_X86
// AVX-512 tiles (llama-kvq-attention-avx512.cpp; head_dim 64, kvq_isa_supported).
KVQ_AVX512 void kvq_tile_avx512(const kvq_tile & T, const kvq_qblock & B, float * kt, float * vt, float * sbuf);
// Their integer path (llama-kvq-attention-vnni.cpp): the K and V types it takes, the tile.
bool kvq_tile_int_types(ggml_type tk, ggml_type tv);
KVQ_AVX512I void kvq_tile_avx512_int(const kvq_tile & T, const kvq_qblock & B, float * sbuf, float * scratch);

// Helpers of both AVX-512 files.
KVQ_AVX512 static inline float kvq_h2f_512(const uint8_t * p) {
    uint16_t h;
    memcpy(&h, p, sizeof(h));
    return _cvtsh_ss(h);
}

// exp(x) for x <= 0 (Cephes polynomial as kvq_exp_avx2; clamps below -87.3).
KVQ_AVX512 static inline __m512 kvq_exp_512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f));
    __m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
    fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    const __m512 z = _mm512_mul_ps(x, x);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, z, _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}
#endif
#ifdef KVQ_HAVE_NEON
// NEON tiles (llama-kvq-attention-arm.cpp; head_dim 64, kvq_isa_supported): kvq_tile_avx2's contract.
void kvq_tile_neon(const kvq_tile & T, const kvq_qblock & B, float * kt, float * vt, float * sbuf);
#endif
