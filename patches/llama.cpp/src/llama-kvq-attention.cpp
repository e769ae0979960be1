// kvq: the fused attention kernel: partial states per (query block, key chunk), their merge,
// the scalar tiles and the choice of tiles. The SIMD tiles: llama-kvq-attention-x86.cpp (AVX2),
// -avx512.cpp (AVX-512), -arm.cpp (NEON).
#include "llama-kvq-impl.h"

#include <algorithm>
#include <cmath>
#include <cstring>

//
// fused attention (default path; kvq_attend_group stays as the reference)
//

// One online-softmax state per (query token, query head) across all pools of a layer.
// Work is cut into items (query block of KVQ_QB tokens) x (chunk of the keys, pools
// concatenated in class order); every item walks its keys in tiles of KVQ_KB rows. A
// tile's K and V rows of one KV head are decoded to f32 once and used by every query head
// of that group and every token of the block (flash-style). Items write partial states
// (max, sum, sum p*s, acc plain, acc rotated) to a tensor; a second op merges the chunks,
// un-rotates the rotated accumulator once, normalises, and derives the window features.
// Decode (1 token) splits the keys into chunks; prefill splits over query blocks.
//
// Partial state layout, floats: [m, l, t, pad, acc_plain[hd], acc_rot[hd]]
//   m: running max of scaled scores, l: sum exp(s - m), t: sum exp(s - m) * s (entropy).
// (Block sizes and the tile and query-block structs: llama-kvq-impl.h.)

// Key chunks for N keys. It depends on N only (not on the ubatch), so a query's result does
// not depend on which tokens share its ubatch: prefix reuse reproduces a fresh decode.
int kvq_n_chunks(int64_t N, int slots) {
    return (int) std::max<int64_t>(1, std::min<int64_t>(std::min(slots, KVQ_MAX_CHUNKS), N / KVQ_CHUNK_MIN));
}

// Chunk slots of the partial-state tensor for a context of n_ctx keys.
int kvq_chunk_slots(int64_t n_ctx) {
    return (int) std::max<int64_t>(1, std::min<int64_t>(KVQ_MAX_CHUNKS, n_ctx / KVQ_CHUNK_MIN));
}

int64_t kvq_layer_rows(const kvq_layer & L) {
    int64_t N = 0;
    for (int p = 0; p < LLAMA_KVQ_N_STORED; ++p) N += L.pools[p].n();
    return N;
}

static inline float kvq_h2f(const uint8_t * p) {
    ggml_fp16_t h;
    memcpy(&h, p, sizeof(h));
    return ggml_fp16_to_fp32(h);
}

//
// the choice of tiles
//

bool kvq_isa_supported(kvq_isa isa, int hd, int n_group) {
    const bool shape = hd == 64 && n_group <= 64;
    switch (isa) {
        case KVQ_ISA_SCALAR: return true;
        case KVQ_ISA_AVX2:   return shape && kvq_cpu_has_avx2();
        case KVQ_ISA_AVX512: return shape && kvq_cpu_has_avx512();
#ifdef KVQ_HAVE_NEON
        case KVQ_ISA_NEON:   return shape;
#endif
        default:             return false;
    }
}

kvq_isa kvq_isa_best(int hd, int n_group) {
    for (kvq_isa isa : { KVQ_ISA_AVX512, KVQ_ISA_AVX2, KVQ_ISA_NEON }) {
        if (kvq_isa_supported(isa, hd, n_group)) return isa;
    }
    return KVQ_ISA_SCALAR;
}

const char * kvq_isa_name(kvq_isa isa) {
    switch (isa) {
        case KVQ_ISA_AVX2:   return "avx2";
        case KVQ_ISA_AVX512: return "avx512";
        case KVQ_ISA_NEON:   return "neon";
        default:             return "scalar";
    }
}

//
// scalar tiles
//

static void kvq_dequant_rows_scalar(ggml_type type, const uint8_t * base, size_t stride, int n, int hd, float * out) {
    for (int r = 0; r < n; ++r) {
        const uint8_t * x = base + r * stride;
        float * o = out + (size_t) r * hd;
        switch (type) {
            case GGML_TYPE_F16:
                ggml_fp16_to_fp32_row((const ggml_fp16_t *) x, o, hd);
                break;
            case GGML_TYPE_Q8_0: // {f16 d, int8 qs[32]}
                for (int b = 0; b < hd / 32; ++b, x += 34) {
                    const float d = kvq_h2f(x);
                    for (int j = 0; j < 32; ++j) o[b * 32 + j] = d * (float) (int8_t) x[2 + j];
                }
                break;
            case GGML_TYPE_Q4_0: // {f16 d, u8 qs[16]}: j -> low nibble of qs[j], j+16 -> high
                for (int b = 0; b < hd / 32; ++b, x += 18) {
                    const float d = kvq_h2f(x);
                    for (int j = 0; j < 16; ++j) {
                        o[b * 32 + j]      = d * (float) ((x[2 + j] & 0xF) - 8);
                        o[b * 32 + j + 16] = d * (float) ((x[2 + j] >> 4) - 8);
                    }
                }
                break;
            default: { // KVQ2 {f16 d, u8 qs[16]}: group g of 4 values is d times codeword qs[g]
                const float (*G)[4] = kvq_kvq2_grid();
                for (int b = 0; b < hd / 64; ++b, x += 18) {
                    const float d = kvq_h2f(x);
                    for (int j = 0; j < 64; ++j) o[b * 64 + j] = d * G[x[2 + j / 4]][j % 4];
                }
                break;
            }
        }
    }
}

static void kvq_tile_scalar(const kvq_tile & T, const kvq_qblock & B, float * kt, float * vt, float * sb) {
    const int n = T.n, hd = B.hd, ss = kvq_st_size(hd);
    int32_t pmin = INT32_MAX, qmax = INT32_MIN;
    for (int r = 0; r < n; ++r) pmin = std::min(pmin, T.pos[r]);
    for (int t = 0; t < B.nt; ++t) qmax = std::max(qmax, B.qpos[t]);
    if (pmin > qmax) return;
    kvq_dequant_rows_scalar(T.tk, T.k, T.stride_k, n, hd, kt);
    kvq_dequant_rows_scalar(T.tv, T.v, T.stride_v, n, hd, vt);
    for (int t = 0; t < B.nt; ++t) {
        const int32_t qp = B.qpos[t];
        if (pmin > qp) continue;
        for (int j = 0; j < B.G; ++j) {
            const int h = B.g * B.G + j;
            const float * q = (T.rot ? B.qr : B.q) + ((size_t) t * B.n_head + h) * hd;
            float * st = B.st + ((size_t) t * B.n_head + h) * ss;
            float mx = -INFINITY;
            for (int r = 0; r < n; ++r) {
                float d = -INFINITY;
                if (T.pos[r] <= qp) {
                    d = 0.0f;
                    const float * kr = kt + (size_t) r * hd;
                    for (int e = 0; e < hd; ++e) d += q[e] * kr[e];
                }
                sb[r] = d;
                mx = std::max(mx, d);
            }
            if (B.wsc) memcpy(B.wsc + ((size_t) t * B.n_head + h) * B.wsc_n + T.row0, sb, n * sizeof(float));
            if (mx == -INFINITY) continue;
            if (mx > st[0]) {
                const float c = expf(st[0] - mx);
                st[1] *= c;
                st[2] *= c;
                for (int e = 0; e < 2 * hd; ++e) st[4 + e] *= c;
                st[0] = mx;
            }
            float * acc = st + 4 + (T.rot ? hd : 0);
            float l = 0.0f, tt = 0.0f;
            for (int r = 0; r < n; ++r) {
                if (sb[r] == -INFINITY) continue;
                const float p = expf(sb[r] - st[0]);
                l += p;
                tt += p * sb[r];
                const float * vr = vt + (size_t) r * hd;
                for (int e = 0; e < hd; ++e) acc[e] += p * vr[e];
            }
            st[1] += l;
            st[2] += tt;
        }
    }
}

//
// driver: partial states, merge
//

// Per-thread scratch: q (plain, rotated), states, K/V tiles, scores, int8 queries.
static size_t kvq_q8_floats(int n_head) {
    return ((size_t) KVQ_QB * n_head * 2 * sizeof(kvq_q8) + sizeof(float) - 1) / sizeof(float);
}

static float * kvq_fused_scratch(std::vector<float> & buf, int n_head, int hd) {
    const size_t need = (size_t) KVQ_QB * n_head * (2 * hd + kvq_st_size(hd)) + 2 * (size_t) KVQ_KB * hd + (size_t) KVQ_KB * n_head + 64
                      + kvq_q8_floats(n_head);
    if (buf.size() < need) buf.resize(need);
    return buf.data();
}

// int8 over the largest magnitude of n values; returns the step and the sum of the codes.
static float kvq_q8_round(const float * q, int n, int8_t * v, int32_t & sum) {
    float amax = 0.0f;
    for (int e = 0; e < n; ++e) amax = std::max(amax, std::fabs(q[e]));
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    sum = 0;
    for (int e = 0; e < n; ++e) {
        v[e] = (int8_t) std::nearbyint(q[e] * id); // to nearest, ties to even (one instruction)
        sum += v[e];
    }
    return amax / 127.0f;
}

void kvq_q8_prepare(const float * q, kvq_q8 & out) {
    int8_t u[64];
    out.d0 = kvq_q8_round(q, 32, u, out.s0);
    out.d1 = kvq_q8_round(q + 32, 32, u + 32, out.s1);
    for (int rep = 0; rep < 2; ++rep) {
        for (int j = 0; j < 16; ++j) {
            out.a[32 * rep + j] = u[j];
            out.a[32 * rep + 16 + j] = u[32 + j];
            out.b[32 * rep + j] = u[16 + j];
            out.b[32 * rep + 16 + j] = u[48 + j];
        }
    }
    for (int i = 0; i < 4; ++i) {
        for (int g = 0; g < 16; ++g) out.c[16 * i + g] = u[4 * g + i];
    }
}

// Tiles ahead whose K and V rows are prefetched: a tile's compute hides the next ones' memory
// latency, which the hardware prefetcher does not (two streams, all heads of a row per line).
#define KVQ_PF 2

static inline void kvq_prefetch_rows(const kvq_pool & P, int64_t r0, int64_t r1) {
    if (r0 >= r1) return;
    const uint8_t * k = P.k.data() + r0 * P.row_k, * v = P.v.data() + r0 * P.row_v;
    const size_t nk = (size_t) (r1 - r0) * P.row_k, nv = (size_t) (r1 - r0) * P.row_v;
    for (size_t o = 0; o < nk; o += 64) __builtin_prefetch(k + o);
    for (size_t o = 0; o < nv; o += 64) __builtin_prefetch(v + o);
}

// This thread's first local item of a set whose items start at global index work0.
static int64_t kvq_first_item(int64_t work0, int ith, int nth) {
    return ((ith - work0) % nth + nth) % nth;
}

// Partial states of the thread's work items (items: query blocks x key chunks).
// part: [nc][Q.n][n_head][kvq_st_size(hd)]. wsc (features): raw window scores
// [Q.n][n_head][wsc_n], or null.
void kvq_fused_partial(const llama_kvq_state & s, const kvq_layer & L, const kvq_qsrc & qs, const kvq_qset & Q,
                       float scale, float * part, int nc, int ith, int nth, std::vector<float> & buf,
                       float * wsc, int64_t wsc_n) {
    const int hd = s.hd, nh = s.n_head, G = s.n_head / s.n_head_kv, ss = kvq_st_size(hd);
    const int n_tok = Q.n;
    const int32_t * qpos = Q.qpos;
    float * base = kvq_fused_scratch(buf, nh, hd);
    float * qv = base;
    float * qr = qv + (size_t) KVQ_QB * nh * hd;
    float * kt = qr + (size_t) KVQ_QB * nh * hd;
    float * vt = kt + (size_t) KVQ_KB * hd;
    float * sb = vt + (size_t) KVQ_KB * hd;
    kvq_q8 * q8 = (kvq_q8 *) (sb + (size_t) KVQ_KB * nh + 64);
    // the integer tiles' queries: AVX-512 with VNNI and VBMI, and rows the tiles take (q4_0 / kvq2)
    bool use_q8 = false;
    if (s.isa == KVQ_ISA_AVX512 && kvq_cpu_has_avx512_int()) {
        for (int p = 0; p < LLAMA_KVQ_N_STORED; ++p) {
            const kvq_pool & P = L.pools[p];
            const auto int_type = [](ggml_type t) { return t == GGML_TYPE_Q4_0 || t == GGML_TYPE_KVQ2; };
            use_q8 = use_q8 || (P.n() > 0 && int_type(P.tk) && int_type(P.tv));
        }
    }
    const int64_t N = kvq_layer_rows(L);
    const int n_qb = (n_tok + KVQ_QB - 1) / KVQ_QB;
    int prev_qb = -1; // a thread's consecutive items share a query block: prepare q once
    for (int64_t it = kvq_first_item(Q.work0, ith, nth); it < (int64_t) n_qb * nc; it += nth) {
        const int qb = (int) (it / nc), c = (int) (it % nc);
        const int tb = qb * KVQ_QB, nt = std::min(KVQ_QB, n_tok - tb);
        float * st = part + ((size_t) c * n_tok + tb) * nh * ss; // this item's states, contiguous
        for (int t = 0; t < nt && qb != prev_qb; ++t) {
            for (int h = 0; h < nh; ++h) {
                const size_t ti = Q.idx ? (size_t) Q.idx[tb + t] : (size_t) (tb + t);
                const float * src = (const float *) (qs.data + ti * qs.nb2 + (size_t) h * qs.nb1);
                float * d = qv + ((size_t) t * nh + h) * hd;
                for (int e = 0; e < hd; ++e) d[e] = src[e] * scale;
                float * dr = qr + ((size_t) t * nh + h) * hd;
                memcpy(dr, d, hd * sizeof(float));
                if (s.rotate) kvq_hadamard(dr, hd);
                if (use_q8) {
                    kvq_q8_prepare(d, q8[((size_t) t * nh + h) * 2]);
                    kvq_q8_prepare(dr, q8[((size_t) t * nh + h) * 2 + 1]);
                }
            }
        }
        prev_qb = qb;
        for (int t = 0; t < nt * nh; ++t) {
            st[(size_t) t * ss] = -INFINITY;
            memset(st + (size_t) t * ss + 1, 0, (ss - 1) * sizeof(float));
        }
        kvq_qblock B{ nt, qpos + tb, nh, G, 0, hd, qv, qr, st, nullptr, wsc_n, use_q8 ? q8 : nullptr };
        const int64_t a = N * c / nc, b = N * (c + 1) / nc;
        int64_t off = 0;
        for (int p = 0; p < LLAMA_KVQ_N_STORED; ++p) {
            const kvq_pool & P = L.pools[p];
            const int64_t lo = std::max<int64_t>(a - off, 0), hi = std::min<int64_t>(b - off, P.n());
            off += P.n();
            B.wsc = p == LLAMA_KVQ_WINDOW && wsc ? wsc + (size_t) tb * nh * wsc_n : nullptr;
            for (int64_t r0 = lo; r0 < hi; r0 += KVQ_KB) {
                const int n = (int) std::min<int64_t>(KVQ_KB, hi - r0);
                kvq_prefetch_rows(P, r0 + KVQ_PF * KVQ_KB, std::min<int64_t>(r0 + (KVQ_PF + 1) * KVQ_KB, hi));
                for (int g = 0; g < s.n_head_kv; ++g) {
                    const kvq_tile T{ P.tk, P.tv, P.k.data() + r0 * P.row_k + g * P.head_k, P.v.data() + r0 * P.row_v + g * P.head_v,
                                      P.row_k, P.row_v, P.pos.data() + r0, n, P.rotated, r0 };
                    B.g = g;
                    switch (s.isa) {
#ifdef KVQ_HAVE_X86
                        case KVQ_ISA_AVX2:   kvq_tile_avx2(T, B, kt, vt, sb); break;
                        case KVQ_ISA_AVX512: kvq_tile_avx512(T, B, kt, vt, sb); break;
#endif
#ifdef KVQ_HAVE_NEON
                        case KVQ_ISA_NEON:   kvq_tile_neon(T, B, kt, vt, sb); break;
#endif
                        default:             kvq_tile_scalar(T, B, kt, vt, sb); break;
                    }
                }
            }
        }
    }
}

// Query-aware rounding: add p^2 * q (query head h of KV head column `col`) to the accumulator of
// every earlier window row, p = exp(score - M) * inv_l its attention weight.
static void kvq_qacc_add(std::vector<float> & acc, const kvq_pool & W, int32_t qp, const float * sc, float M, float inv_l,
                         const float * qh, int col, int hd, int n_embd_kv) {
    for (size_t r = 0; r < W.n(); ++r) {
        if (W.pos[r] >= qp) continue;
        const float p = expf(sc[r] - M) * inv_l;
        const float w = p * p;
        if (!(w > 1e-12f)) continue;
        float * a = acc.data() + r * n_embd_kv + col;
        for (int e = 0; e < hd; ++e) a[e] += w * qh[e];
    }
}

// Merge the chunks: work items are (token, KV head) pairs, so one decoded token's heads and
// window features spread over the threads too. Token i's output row is at out + idx[i] * out_nb1
// bytes. With `feat`, also the window features (thread slot ith) as the reference computes them;
// their time is returned (ms) so it counts as policy work, not attention.
double kvq_fused_merge(const llama_kvq_state & s, kvq_layer & L, size_t ub_base, const float * part, int nc,
                       const kvq_qset & Q, char * out, size_t out_nb1, int ith, int nth, bool feat, const float * wsc,
                       int64_t wsc_n, const kvq_qsrc & qs) {
    const int hd = s.hd, nh = s.n_head, ss = kvq_st_size(hd), nkv = s.n_head_kv, G = nh / nkv;
    const int n_tok = Q.n;
    const int32_t * qpos = Q.qpos;
    std::vector<float> buf(2 * (size_t) hd + 4 * (size_t) G);
    float * acc = buf.data();      // [2 * hd]: plain and rotated accumulators of one head
    float * Mh = acc + 2 * hd;     // per head of the group: merged max, sum, sum p*s, 1 / sum
    float * lh = Mh + G;
    float * th = lh + G;
    float * inv_lh = th + G;
    bool qacc_simd = false; // the window's p^2 q accumulation by KV head, AVX2 (hd 64, up to 8 heads per KV head)
#ifdef KVQ_HAVE_X86
    qacc_simd = feat && (s.isa == KVQ_ISA_AVX2 || s.isa == KVQ_ISA_AVX512) && !L.qacc_t.empty() && hd == 64 && G <= 8;
#endif
    double t_feat = 0.0;
    for (int64_t it = kvq_first_item(Q.work0, ith, nth); it < (int64_t) n_tok * nkv; it += nth) {
        const int64_t i = it / nkv;
        const int g = (int) (it % nkv);
        const size_t ti = Q.idx ? (size_t) Q.idx[i] : (size_t) i; // the token's row in the ubatch
        float * o = (float *) (out + ti * out_nb1);
        for (int j = 0; j < G; ++j) {
            const int h = g * G + j;
            float M = -INFINITY;
            for (int c = 0; c < nc; ++c) {
                const float * st = part + (((size_t) c * n_tok + i) * nh + h) * ss;
                if (st[1] > 0.0f) M = std::max(M, st[0]);
            }
            float l = 0.0f, t = 0.0f;
            std::fill(acc, acc + 2 * hd, 0.0f);
            for (int c = 0; c < nc; ++c) {
                const float * st = part + (((size_t) c * n_tok + i) * nh + h) * ss;
                if (!(st[1] > 0.0f)) continue;
                const float w = expf(st[0] - M);
                l += w * st[1];
                t += w * st[2];
                for (int e = 0; e < 2 * hd; ++e) acc[e] += w * st[4 + e];
            }
            if (s.rotate) kvq_hadamard(acc + hd, hd);
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            for (int e = 0; e < hd; ++e) o[h * hd + e] = (acc[e] + acc[hd + e]) * inv;
            Mh[j] = M;
            lh[j] = l;
            th[j] = t;
        }
        if (!feat) continue;
        const double t0 = kvq_now_ms();
        const int32_t qp = qpos[i];
        const kvq_pool & W = L.pools[LLAMA_KVQ_WINDOW];
        auto & recv = L.recv_t[ith];
        auto & nq = L.nq_t[ith];
        for (int j = 0; j < G; ++j) {
            const int h = g * G + j;
            const float M = Mh[j], l = lh[j];
            if (!(l > 0.0f)) continue;
            // entropy of this query's attention: -sum p log p = M + log l - t / l
            const double ent = (double) M + std::log((double) l) - (double) th[j] / l;
            L.ent[(ub_base + i) * nh + h] = qp > 0 ? (float) (std::max(0.0, ent) / std::log((double) qp + 1.0)) : 0.0f;
            // attention received by earlier window rows
            const float * sc = wsc + ((size_t) i * nh + h) * wsc_n;
            const float rel = (float) (qp + 1) / l;
            if (!L.qacc_t.empty() && !qacc_simd) {
                const float * qh = (const float *) (qs.data + ti * qs.nb2 + (size_t) h * qs.nb1);
                kvq_qacc_add(L.qacc_t[ith], W, qp, sc, M, 1.0f / l, qh, g * hd, hd, s.n_embd_kv);
            }
#ifdef KVQ_HAVE_X86
            if (s.isa == KVQ_ISA_AVX2 || s.isa == KVQ_ISA_AVX512) {
                kvq_recv_avx2(sc, W.pos.data(), W.n(), qp, M, rel, recv.data() + h, nq.data() + h, nh);
                continue;
            }
#endif
            for (size_t r = 0; r < W.n(); ++r) {
                if (W.pos[r] >= qp) continue;
                recv[r * nh + h] += expf(sc[r] - M) * rel;
                nq[r * nh + h] += 1;
            }
        }
#ifdef KVQ_HAVE_X86
        if (qacc_simd) {
            const float * qh[8];
            for (int j = 0; j < G; ++j) {
                inv_lh[j] = lh[j] > 0.0f ? 1.0f / lh[j] : 0.0f;
                qh[j] = (const float *) (qs.data + ti * qs.nb2 + (size_t) (g * G + j) * qs.nb1);
            }
            kvq_qacc_group_avx2(L.qacc_t[ith].data() + g * hd, s.n_embd_kv, W.pos.data(), W.n(), qp,
                                wsc + ((size_t) i * nh + g * G) * wsc_n, wsc_n, Mh, inv_lh, qh, G);
        }
#endif
        t_feat += kvq_now_ms() - t0;
    }
    return t_feat;
}
