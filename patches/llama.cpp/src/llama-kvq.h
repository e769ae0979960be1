// kvq: per-token mixed-precision KV cache for llama.cpp (CPU; every sequence keeps its own rows).
//
// Tokens enter a *window* (staging: f16, or q8_0 rotated with window_bits 8) when their
// ubatch is stored. After each ubatch, tokens older than the last W positions leave the
// window: a policy (static, rule, learned controller, or an externally supplied assignment)
// picks 16/8/4/3/2 bits per token (or per token and layer), and the rows are re-stored in
// that precision's *pool* (f16, q8_0, q4_0, "3" = K in q4_0 with V in kvq2 at 3.375
// bits/element, kvq2). kvq2 is the ggml type of patch 0001: per 64 values one f16 step and
// 16 bytes, each group of 4 values one of 256 codewords of a 4-d codebook (2.25 bits/element).
// Quantized pools hold Hadamard-rotated rows. Attention runs over the window and all pools
// with one softmax, so the stock KV tensors are not read or written while kvq is enabled.
// Two kernels (ggml custom ops): the fused one (default: online softmax over all pools, key
// tiles decoded once per KV head and query block, AVX2 tiles with a scalar fallback, keys
// split over threads at decode) and the two-pass reference (params.attn_ref = 1) that tests
// compare it with.
//
// The controller MLP travels as GGUF metadata (kvq.controller.*, names below): embedded in
// the model (read and validated when the model loads), or in a controller file
// (params.controller_path: a GGUF with no tensors holding the same keys), which a context
// uses instead of the model's.
//
// Sources (all internal but this header): llama-kvq-impl.h (shared structs), -controller
// (the MLP), -cache (state, enable, pools and budget), -policy (ubatch hooks, features,
// decisions), -quant (rotation, row codecs, query-aware rounding), -graph (custom ops),
// -attention (fused kernel), -attention-x86 (its AVX2 tiles), -attention-ref (reference),
// -seq (sequences, memory hooks, position shifts), -state (state save/restore), -api (debug and
// reference access).
#pragma once

#include "llama.h"

#include <stddef.h>
#include <stdint.h>

// GGUF keys (mirrored by kvq_cli/gguf_keys.py).
#define LLAMA_KVQ_KEY_VERSION      "kvq.controller.version"
#define LLAMA_KVQ_KEY_FEATURES     "kvq.controller.features"
#define LLAMA_KVQ_KEY_PRECISIONS   "kvq.controller.precisions"
#define LLAMA_KVQ_KEY_HIDDEN       "kvq.controller.hidden"
#define LLAMA_KVQ_KEY_W1           "kvq.controller.w1"
#define LLAMA_KVQ_KEY_B1           "kvq.controller.b1"
#define LLAMA_KVQ_KEY_W2           "kvq.controller.w2"
#define LLAMA_KVQ_KEY_B2           "kvq.controller.b2"
#define LLAMA_KVQ_KEY_FEAT_MEAN    "kvq.controller.feature_mean"
#define LLAMA_KVQ_KEY_FEAT_STD     "kvq.controller.feature_std"
#define LLAMA_KVQ_KEY_BUDGET_BITS  "kvq.controller.budget_bits"
#define LLAMA_KVQ_KEY_K_CENTER     "kvq.controller.k_center"  // optional f32 [n_layer][n_embd_kv]
#define LLAMA_KVQ_KEY_HEAD         "kvq.controller.head"      // optional string: "logits" (default) or "log_damage"
#define LLAMA_KVQ_KEY_DAMAGE_FLOOR "kvq.controller.damage_floor" // optional f32 [n_precisions - 1]: damage_o >= floor_o * damage_o+1
#define LLAMA_KVQ_KEY_NORM_PRIOR   "kvq.controller.norm_prior"   // optional u32 n0 > 0: normalise by running feature statistics (prior: n0 rows)
#define LLAMA_KVQ_KEY_GRANULARITY  "kvq.controller.granularity"  // optional string: "token" (default) or "token_layer" (per_layer decisions)
#define LLAMA_KVQ_CONTROLLER_VERSION 1

#ifdef __cplusplus
extern "C" {
#endif

enum llama_kvq_policy {
    LLAMA_KVQ_POLICY_STATIC  = 0, // every token at static_bits
    LLAMA_KVQ_POLICY_RULE    = 1, // sink tokens 16, heavy hitters 8, the rest rule_base_bits
    LLAMA_KVQ_POLICY_LEARNED = 2, // the controller MLP (params.controller_path's, else the model's embedded one)
    LLAMA_KVQ_POLICY_ASSIGN  = 3, // oracle: bits per position (and layer) given by llama_kvq_set_assignment
};

// Precision classes, used to index stats arrays: window (staging, f16 or q8_0), then the pools.
enum llama_kvq_prec {
    LLAMA_KVQ_WINDOW = 0,
    LLAMA_KVQ_F16    = 1,
    LLAMA_KVQ_Q8     = 2,
    LLAMA_KVQ_Q4     = 3,
    LLAMA_KVQ_K4V2   = 4, // bits 3: K at q4_0, V at kvq2 (K errors cost more than V errors)
    LLAMA_KVQ_Q2     = 5,
    LLAMA_KVQ_N_STORED = 6, // classes above hold K/V data; the one below only positions
    LLAMA_KVQ_DROP   = 6,   // bits 0: the row is left out (evicted for its layer), 0 bytes
    LLAMA_KVQ_N_POOLS = 7,
};

#define LLAMA_KVQ_N_FEATURES 9

struct llama_kvq_params {
    int32_t policy;         // enum llama_kvq_policy
    int32_t static_bits;    // STATIC: 16, 8, 4, 3 (K4V2) or 2; ASSIGN: bits for positions the table does not cover
    int32_t window;         // W: most recent tokens kept at window_bits before a decision (0 allowed); -1: the
                            //    policy's default for the context, chosen by llama_kvq_enable: 0 for static, with a
                            //    q8_0 window (window_bits 8) n_ctx / n_seq_max / 16 within [32, 128], else 32
    float   budget_bits;    // memory cap as bits/element at full context (<= 0: none); LEARNED: also the
                            //    effective bits the price steers the whole cache to
    int64_t budget_bytes;   // memory cap in bytes (<= 0: none); the smaller cap applies
    int32_t per_layer;      // 1: decide per (token, layer); 0: one decision per token for all layers (LEARNED:
                            //    also 1 when the controller's granularity is token_layer, as it was trained)
    int32_t trace;          // 1: record features and decisions (llama_kvq_get_trace)
    int32_t rotate;         // 1: Hadamard-rotate the rows of quantized pools
    int32_t rule_sink;      // RULE: first positions kept at 16 bits
    float   rule_heavy;     // RULE: received attention >= rule_heavy x uniform share -> 8 bits
    int32_t rule_base_bits; // RULE: bits for the other tokens
    int32_t attn_ref;       // 1: reference attention (two-pass, per query token and KV head) instead of
                            //    the fused kernel; env KVQ_ATTN_REF=1 forces it, KVQ_ATTN_ISA=NAME the tiles
    int32_t record_q;       // 1: keep every query row per layer (llama_kvq_get_queries; training oracle)
    float   price_step;     // LEARNED with budget_bits: price change per row and effective bit of overspend;
                            //    decisions maximise logit - price * bits so the cache tracks budget_bits
    int32_t k_center;       // 1: center K with the controller's kvq.controller.k_center when it has one
                            //    (llama_kvq_set_k_center); 0: store K as is
    float   qar_mu;         // > 0: query-aware rounding of K rows leaving the window into the 2- and
                            //    4-bit pools: their codes and block scales minimise (u.e)^2 + qar_mu |e|^2,
                            //    e the row's error, u the direction of the window queries that attended
                            //    to it (weighted by p^2); 0: plain rounding (minimises |e|^2). Default 0.5.
                            //    Needs a window (W > 0): static W = 0 caches round plainly, as stock does
    int32_t window_bits;    // 16: window rows in f16 (default); 8: in q8_0 (8.5 bits/element, rotated),
                            //    which leaves the decided rows more of a budget; rows leaving the window
                            //    are coded from their q8_0 values
    int32_t v_unbias;       // 1 (default): V rows in the 2- and 4-bit pools get block scales that make each
                            //    decoded block's projection on the original exact (<x, x^> = |x|^2), so the
                            //    shrink of least-squares scales does not add up in the attention output;
                            //    0: least-squares / stock scales
    const char * controller_path; // GGUF holding kvq.controller.* keys (a controller file); when set, used
                            //    instead of the model's embedded controller (LEARNED and k_center). NULL: none
};

struct llama_kvq_stats {
    int64_t n_tokens;                     // tokens held (window included)
    int64_t rows[LLAMA_KVQ_N_POOLS];      // token-layer rows per class (window, f16, q8, q4, k4v2, q2, drop)
    int64_t bytes_held;                   // K+V bytes of all rows (block scales included)
    int64_t bytes_budget;                 // the cap in force (0: none)
    int64_t n_elements;                   // K+V elements held
    double  bits_per_elem;                // bytes_held * 8 / n_elements
    int64_t n_budget_demotions;           // decisions lowered to respect the budget
    double  t_policy_ms;                  // features (those taken from attention: thread 0's time) + decisions + re-quantization
    double  t_attn_ms;                    // kvq attention ops, thread 0's wall time, feature work excluded
};

LLAMA_API struct llama_kvq_params llama_kvq_default_params(void);

// Parameters for a policy named as kvq's CLI and llama.cpp's --kvq name it: f16 | q8 | q4 | k4v2 | q2
// (static: every row in that pool, stored as it arrives, K centering and V unbiasing off: the stock
// caches' equal) | rule | adaptive (a q8_0 window of the default length, K centering, unbiased V),
// with an optional @BITS memory cap in bits per element (2..16; not for static policies). `adaptive`
// runs the model's embedded controller unless controller_path is set. 0 on success, else -1 and
// llama_kvq_last_error() says why.
LLAMA_API int32_t llama_kvq_params_from_spec(const char * spec, struct llama_kvq_params * out);

// Enable kvq on a fresh context (before its first decode). 0 on success; on error a
// negative value and llama_kvq_last_error() says why (an unsupported model or context, bad
// params, a controller_path that cannot be read or does not fit the model).
LLAMA_API int32_t llama_kvq_enable(struct llama_context * ctx, const struct llama_kvq_params * params);
LLAMA_API int32_t llama_kvq_enabled(const struct llama_context * ctx);

// A context whose KV cache is kvq's (what llama.cpp's tools do for --kvq): llama_init_from_model
// then llama_kvq_enable, except that the stock KV tensors, which kvq never reads or writes, get no
// memory. The stock cache type is set to q2_0 (no memory either way) with flash attention, and
// several sequences share one unified cache (kv_unified). NULL on error (llama_kvq_last_error()).
LLAMA_API struct llama_context * llama_kvq_init_from_model(struct llama_model * model, struct llama_context_params cparams,
                                                          const struct llama_kvq_params * params);
LLAMA_API const char * llama_kvq_last_error(void);
LLAMA_API void         llama_kvq_clear_error(void); // empties llama_kvq_last_error() (before a call that may set it)

// ASSIGN policy: bits[pos] (per_layer = 0) or bits[pos * n_layer + il] (per_layer = 1).
// Bits 0 (here and as a controller class, never static or rule) leaves the row out: it stays
// a position of the context (stats count its elements at 0 bytes) that no query attends to.
LLAMA_API int32_t llama_kvq_set_assignment(struct llama_context * ctx, const int32_t * bits, int64_t n);

// K centering: one vector per layer (k_mu [n_layer][n_embd_kv], post-RoPE) subtracted from
// every K row as it is stored, in every pool. Each query's scores then all move by the same
// q.mu, so the softmax (and the attention output) is unchanged, while the quantized pools
// code K - mu, which holds much less energy than K. Rows read back (llama_kvq_read_layer) are
// in this shifted space. Must be set before the first row is stored; n = 0 clears it.
// llama_kvq_enable sets the controller's kvq.controller.k_center when params.k_center is 1.
LLAMA_API int32_t llama_kvq_set_k_center(struct llama_context * ctx, const float * k_mu, int64_t n);

LLAMA_API int32_t llama_kvq_get_stats(const struct llama_context * ctx, struct llama_kvq_stats * out);

// Features computed per token (and layer) when it leaves the window.
LLAMA_API int32_t      llama_kvq_n_features(void);
LLAMA_API const char * llama_kvq_feature_name(int32_t i);

// Trace: one record per decision (layer = -1 for per-token decisions). Copies up to
// `cap` records (features: cap x LLAMA_KVQ_N_FEATURES) and returns the number recorded.
LLAMA_API int64_t llama_kvq_get_trace(const struct llama_context * ctx, int32_t * pos, int32_t * layer,
                                      int32_t * token, int32_t * bits, float * features, int64_t cap);
LLAMA_API void    llama_kvq_clear_trace(struct llama_context * ctx);   // also clears recorded queries

// record_q: the query rows (post-RoPE, before scaling) layer il's attention has seen, in decode
// order: q: cap x n_head x head_dim, pos: cap. Returns the number recorded (-1: not recording).
LLAMA_API int64_t llama_kvq_get_queries(const struct llama_context * ctx, int32_t il, float * q, int32_t * pos, int64_t cap);

// Store n_rows rows (n_rows x n_embd_kv, plain) at `bits` (16, 8, 4 or 2) exactly as a pool would
// (rotation, block format) and decode them back into y: the error a precision makes on those rows.
// (Bits 3 stores K and V at different precisions: round-trip K at 4 and V at 2.) Rows are coded as K
// rows are, with plain (least-squares) scales: V rows without v_unbias's rescale.
LLAMA_API int32_t llama_kvq_roundtrip(const struct llama_context * ctx, int32_t bits, const float * x, float * y, int64_t n_rows);
// The same for V rows as a pool stores them: with v_unbias's rescaled block scales when the context has
// v_unbias on (bits 2 and 4), else as llama_kvq_roundtrip.
LLAMA_API int32_t llama_kvq_roundtrip_v(const struct llama_context * ctx, int32_t bits, const float * x, float * y, int64_t n_rows);
// K rows as they leave the window with query-aware rounding (qar_mu > 0; bits 2 and 4, head_dim 64):
// u (n_rows x n_embd_kv, plain) is per row and KV head the direction the window's queries pointed
// in (sum of p^2 q); a head whose u is zero is rounded plainly, and so is every row otherwise.
LLAMA_API int32_t llama_kvq_roundtrip_qar(const struct llama_context * ctx, int32_t bits, const float * x, const float * u,
                                          float * y, int64_t n_rows);

// Controller embedded in the model: 1 valid, 0 absent, -1 malformed (llama_kvq_last_error()).
LLAMA_API int32_t llama_kvq_model_controller(const struct llama_model * model);
// Run the model's controller on n feature rows (n x LLAMA_KVQ_N_FEATURES, runtime feature
// order) at price 0. Writes the chosen bits. 0 on success. Stateless: with norm_prior > 0 the
// rows are normalised as a fresh context's decisions in this order would be (running
// statistics started from the prior); otherwise each row on its own.
LLAMA_API int32_t llama_kvq_controller_eval(const struct llama_model * model, const float * x, int64_t n, int32_t * bits);

// Debug/reference access: every row held for layer il, dequantized and un-rotated
// (k, v: cap x n_embd_kv each), with position and precision class (enum llama_kvq_prec;
// window rows report LLAMA_KVQ_WINDOW).
LLAMA_API int64_t llama_kvq_read_layer(const struct llama_context * ctx, int32_t il, float * k, float * v,
                                       int32_t * pos, int32_t * prec, int64_t cap);
// Run the kvq attention of layer il for n_q query rows (n_q x n_head x head_dim) at
// positions q_pos over what the layer holds; out: n_q x n_head x head_dim.
LLAMA_API int32_t llama_kvq_attend(struct llama_context * ctx, int32_t il, const float * q, int32_t n_q,
                                   const int32_t * q_pos, float * out);

// Kernels for llama_kvq_attend_kernel (tests, A/B): the context's choice, the reference,
// the fused kernel with scalar tiles, with the widest SIMD tiles the CPU has, with the AVX2,
// AVX-512 or NEON tiles (error if unavailable).
enum llama_kvq_attn_kernel {
    LLAMA_KVQ_ATTN_DEFAULT      = 0,
    LLAMA_KVQ_ATTN_REF          = 1,
    LLAMA_KVQ_ATTN_FUSED_SCALAR = 2,
    LLAMA_KVQ_ATTN_FUSED_SIMD   = 3,
    LLAMA_KVQ_ATTN_FUSED_AVX2   = 4,
    LLAMA_KVQ_ATTN_FUSED_AVX512 = 5,
    LLAMA_KVQ_ATTN_FUSED_NEON   = 6,
};
// The tiles a kvq context's fused kernel runs: "scalar", "avx2", "avx512" or "neon" (null: kvq off).
LLAMA_API const char * llama_kvq_attn_isa(const struct llama_context * ctx);
// llama_kvq_attend with an explicit kernel.
LLAMA_API int32_t llama_kvq_attend_kernel(struct llama_context * ctx, int32_t kernel, int32_t il, const float * q,
                                          int32_t n_q, const int32_t * q_pos, float * out);

#ifdef __cplusplus
}

// -- internal hooks (called from upstream files) ---------------------------------------
struct ggml_context;
struct ggml_cgraph;
struct ggml_tensor;
struct gguf_context;
struct llama_ubatch;
struct llama_kvq_state;
struct llama_kvq_controller;

// llama-kv-cache.cpp (constructor): true while llama_kvq_init_from_model creates its context, whose
// stock KV tensors then get a dummy buffer (as llama.cpp's no_alloc fitting does).
bool llama_kvq_stock_kv_unused();
// llama.cpp (model load): parse kvq.controller.* from the GGUF metadata.
void llama_kvq_load_controller(struct llama_model & model, const struct gguf_context * meta);
// llama-graph.cpp (build_attn): store k/v of the ubatch and attend over all pools.
struct ggml_tensor * llama_kvq_build_attn(struct ggml_context * ctx0, struct ggml_cgraph * gf, void * state,
                                          struct ggml_tensor * q, struct ggml_tensor * k, struct ggml_tensor * v,
                                          struct ggml_tensor ** keep, int n_keep, float kq_scale, int il);
// llama-context.cpp (decode): around each ubatch. Return false on an unsupported batch.
bool llama_kvq_before_ubatch(struct llama_context & ctx, const struct llama_ubatch & ubatch);
void llama_kvq_after_ubatch(struct llama_context & ctx, const struct llama_ubatch & ubatch);
// llama-kv-cache.cpp (state_write, state_read): a kvq context's rows of sequence seq (-1: all) in place of
// the stock K/V data (llama-kvq-state.cpp). write: false when kvq is off for mem; read: false on a state
// that is not this cache's (another policy or model, a stock state, corrupted), with the reason logged and
// in llama_kvq_last_error(). A stock cache that meets a kvq block (LLAMA_KVQ_STATE_MAGIC where it keeps
// v_trans) refuses it with llama_kvq_state_foreign().
#define LLAMA_KVQ_STATE_MAGIC 0x5351564bu // "KVQS"
class llama_io_write_i;
class llama_io_read_i;
bool llama_kvq_state_write(const struct llama_memory_i * mem, llama_io_write_i & io, llama_seq_id seq);
bool llama_kvq_state_read(const struct llama_memory_i * mem, llama_io_read_i & io, llama_seq_id seq);
bool llama_kvq_state_foreign();
// llama-context.cpp (llama_memory_*): the same change on the kvq rows of the memory's context,
// after the memory made it. A shift (seq_add, seq_div) re-encodes the moved K rows at their new
// positions; the stock cache's own K-shift graph is skipped (llama-kv-cache.cpp, update).
bool llama_kvq_memory_enabled(const struct llama_memory_i * mem);
void llama_kvq_memory_seq_rm(const struct llama_memory_i * mem, llama_seq_id seq, llama_pos p0, llama_pos p1);
void llama_kvq_memory_seq_cp(const struct llama_memory_i * mem, llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1);
void llama_kvq_memory_seq_keep(const struct llama_memory_i * mem, llama_seq_id seq);
void llama_kvq_memory_seq_add(const struct llama_memory_i * mem, llama_seq_id seq, llama_pos p0, llama_pos p1, llama_pos delta);
void llama_kvq_memory_seq_div(const struct llama_memory_i * mem, llama_seq_id seq, llama_pos p0, llama_pos p1, int d);
void llama_kvq_memory_clear(const struct llama_memory_i * mem);
#endif
