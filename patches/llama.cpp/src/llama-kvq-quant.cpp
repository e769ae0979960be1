// kvq: row codecs: encode/decode of pool rows, v_unbias's scales and query-aware rounding of
// K rows (the Hadamard rotation and the kvq2 codebook: llama-kvq-transform.cpp).
#include "llama-kvq-impl.h"

#include <cmath>
#include <cstring>

//
// row codecs
//

// v_unbias: a least-squares block scale shrinks the decoded block along the original by 1 - D
// (D its relative squared error: <x, x^> = |x^|^2 = (1 - D) |x|^2), and attention sums that
// shrink coherently over the rows it averages (the output of a head whose rows are all at 2 bits
// loses ~11% of its norm). Rescaling each 2- or 4-bit block's f16 scale by |x|^2 / <x, x^> makes
// its projection on the original exact; the error grows to D / (1 - D) but no longer adds up
// along the output. V rows only (K scores are handled by query-aware rounding); a block decoding
// nearly orthogonal to its original (D > 1/2) is left as it is.
void kvq_unbias_v(ggml_type t, uint8_t * row, const float * x, int n) {
    if (t != GGML_TYPE_KVQ2 && t != GGML_TYPE_Q4_0) return;
    const int bs = t == GGML_TYPE_KVQ2 ? 64 : 32;
    const size_t bb = ggml_row_size(t, bs);
    float y[64];
    for (int b = 0; b < n / bs; ++b) {
        uint8_t * blk = row + b * bb;
        const float * xb = x + b * bs;
        ggml_get_type_traits(t)->to_float(blk, y, bs);
        double num = 0.0, den = 0.0;
        for (int j = 0; j < bs; ++j) {
            num += (double) xb[j] * xb[j];
            den += (double) xb[j] * y[j];
        }
        if (!(den > 0.0) || num > 2.0 * den) continue;
        ggml_fp16_t * d = (ggml_fp16_t *) blk;   // both types lead with their f16 scale
        *d = ggml_fp32_to_fp16(ggml_fp16_to_fp32(*d) * (float) (num / den));
    }
}

// Encode one f32 row (n_embd_kv values, un-rotated) into dst as type t (a side of pool P);
// tmp: n_embd_kv floats of scratch.
void kvq_encode(const llama_kvq_state & s, const kvq_pool & P, int side, const float * x, uint8_t * dst, float * tmp) {
    const ggml_type t = side ? P.tv : P.tk;
    if (t == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(x, (ggml_fp16_t *) dst, s.n_embd_kv);
        return;
    }
    memcpy(tmp, x, s.n_embd_kv * sizeof(float));
    if (P.rotated) kvq_hadamard(tmp, s.n_embd_kv);
    ggml_get_type_traits_cpu(t)->from_float(tmp, dst, s.n_embd_kv);
    if (side && s.p.v_unbias) kvq_unbias_v(t, dst, tmp, s.n_embd_kv);
}

// Whole row of side v (0: K, 1: V) of pool P, un-rotated.
void kvq_decode_row(const llama_kvq_state & s, const kvq_pool & P, bool v, const uint8_t * row, float * out) {
    for (int g = 0; g < s.n_head_kv; ++g) {
        kvq_decode_head(v ? P.tv : P.tk, v ? P.head_v : P.head_k, row, g, s.hd, out + g * s.hd);
    }
    if (P.rotated) kvq_hadamard(out, s.n_embd_kv);
}

//
// query-aware rounding (qar_mu > 0)
//

// A K row's error e moves the score of a query q by q.e. The queries that will attend to a row
// are like the window queries that already did, so the codes and block scales of a row leaving
// the window minimise (u.e)^2 + mu |e|^2 instead of |e|^2, with u the unit direction of those
// queries (sum of p^2 q over them, per KV head, in the pool's space): two sweeps of coordinate
// descent over the codes (kvq2: the groups' codewords) from the plain encoding, then the scales
// refitted by least squares for that objective (rounded to f16); a change is kept only if it
// lowers the objective.

struct kvq_qar_obj {
    const float * x;
    const float * u;
    float mu;
    double operator()(const float * y, int n) const {
        double s = 0.0, e2 = 0.0;
        for (int j = 0; j < n; ++j) {
            const double e = (double) y[j] - x[j];
            s += u[j] * e;
            e2 += e * e;
        }
        return s * s + mu * e2;
    }
};

// One coordinate-descent sweep: code c[j] of value lv(c) moves to the best of `cands` offsets.
template <typename Level>
static void kvq_qar_sweep(int * c, int n, int cmin, int cmax, const float * x, const float * u, float mu, Level lv) {
    double s = 0.0;
    float e[64];
    for (int j = 0; j < n; ++j) {
        e[j] = lv(j, c[j]) - x[j];
        s += u[j] * e[j];
    }
    for (int sweep = 0; sweep < 2; ++sweep) {
        for (int j = 0; j < n; ++j) {
            int best = c[j];
            double bestv = 0.0;
            for (int off = -2; off <= 2; ++off) {
                const int cand = c[j] + off;
                if (off == 0 || cand < cmin || cand > cmax) continue;
                const double dl = (double) lv(j, cand) - lv(j, c[j]);
                const double v = 2.0 * s * u[j] * dl + (double) u[j] * u[j] * dl * dl + mu * (2.0 * e[j] * dl + dl * dl);
                if (v < bestv) {
                    bestv = v;
                    best = cand;
                }
            }
            if (best != c[j]) {
                const float dl = lv(j, best) - lv(j, c[j]);
                e[j] += dl;
                s += u[j] * dl;
                c[j] = best;
            }
        }
    }
}

static inline float kvq_f16r(float x) { return ggml_fp16_to_fp32(ggml_fp32_to_fp16(x)); }
static inline float kvq_qar_h2f(const uint8_t * p) {
    ggml_fp16_t h;
    memcpy(&h, p, sizeof(h));
    return ggml_fp16_to_fp32(h);
}

// kvq2 block of 64: f16 step d, group g of 4 values is d times codeword qs[g] (ggml-common.h).
// The sweep moves one group at a time to the best of the 16 magnitude patterns with x's signs
// and the current codeword with one sign flipped.
static void kvq_qar_kvq2(uint8_t * blk, const float * x, const float * u, float mu) {
    const float (*G)[4] = kvq_kvq2_grid();
    const float d = kvq_qar_h2f(blk);
    uint8_t c[16];
    memcpy(c, blk + 2, 16);
    const kvq_qar_obj obj{ x, u, mu };
    float y[64], e[64];
    for (int j = 0; j < 64; ++j) y[j] = d * G[c[j / 4]][j % 4];
    const double f0 = obj(y, 64);
    double s = 0.0;
    for (int j = 0; j < 64; ++j) {
        e[j] = y[j] - x[j];
        s += u[j] * e[j];
    }
    for (int sweep = 0; sweep < 2; ++sweep) {
        for (int g = 0; g < 16; ++g) {
            const float * xg = x + 4 * g, * ug = u + 4 * g;
            float * eg = e + 4 * g;
            int sx = 0;
            for (int i = 0; i < 4; ++i) sx |= (xg[i] < 0.0f) << i;
            int cand[20];
            for (int m = 0; m < 16; ++m) cand[m] = m << 4 | sx;
            for (int i = 0; i < 4; ++i) cand[16 + i] = c[g] ^ (1 << i);
            int best = c[g];
            double bestv = 0.0;
            for (int k = 0; k < 20; ++k) {
                if (cand[k] == c[g]) continue;
                double ud = 0.0, ed = 0.0, dd = 0.0;
                for (int i = 0; i < 4; ++i) {
                    const double dl = (double) d * (G[cand[k]][i] - G[c[g]][i]);
                    ud += ug[i] * dl; ed += eg[i] * dl; dd += dl * dl;
                }
                const double v = 2.0 * s * ud + ud * ud + mu * (2.0 * ed + dd);
                if (v < bestv) {
                    bestv = v;
                    best = cand[k];
                }
            }
            if (best != c[g]) {
                for (int i = 0; i < 4; ++i) {
                    const float dl = d * (G[best][i] - G[c[g]][i]);
                    eg[i] += dl;
                    s += ug[i] * dl;
                }
                c[g] = (uint8_t) best;
            }
        }
    }
    // refit d for these codewords
    double uz = 0, zz = 0, zx = 0, ux = 0;
    for (int j = 0; j < 64; ++j) {
        const double z = G[c[j / 4]][j % 4];
        uz += u[j] * z; zz += z * z; zx += z * x[j]; ux += u[j] * x[j];
    }
    float bd = d;
    for (int j = 0; j < 64; ++j) y[j] = d * G[c[j / 4]][j % 4];
    double best = obj(y, 64);
    const double a = uz * uz + mu * zz;
    if (a > 0.0) {
        const float d2 = kvq_f16r((float) ((uz * ux + mu * zx) / a));
        if (std::isfinite(d2)) {
            for (int j = 0; j < 64; ++j) y[j] = d2 * G[c[j / 4]][j % 4];
            const double f2 = obj(y, 64);
            if (f2 < best) { best = f2; bd = d2; }
        }
    }
    if (!(best < f0)) return;
    const ggml_fp16_t dh = ggml_fp32_to_fp16(bd);
    memcpy(blk, &dh, 2);
    memcpy(blk + 2, c, 16);
}

// Two q4_0 blocks of 32 (one head of 64): f16 scale d, value (code - 8) * d, code of element j in
// the low (j < 16) or high nibble of qs[j % 16].
static void kvq_qar_q4_0(uint8_t * blk, const float * x, const float * u, float mu) {
    float d[2] = { kvq_qar_h2f(blk), kvq_qar_h2f(blk + 18) };
    int c[64];
    for (int b = 0; b < 2; ++b) {
        for (int j = 0; j < 32; ++j) c[b * 32 + j] = j < 16 ? blk[b * 18 + 2 + j] & 15 : blk[b * 18 + 2 + j - 16] >> 4;
    }
    const kvq_qar_obj obj{ x, u, mu };
    float y[64];
    for (int j = 0; j < 64; ++j) y[j] = (c[j] - 8) * d[j / 32];
    const double f0 = obj(y, 64);
    kvq_qar_sweep(c, 64, 0, 15, x, u, mu, [&](int j, int cj) { return (cj - 8) * d[j / 32]; });
    double uz[2] = {}, zz[2] = {}, zx[2] = {}, ux = 0;
    for (int j = 0; j < 64; ++j) {
        const double z = c[j] - 8;
        uz[j / 32] += u[j] * z; zz[j / 32] += z * z; zx[j / 32] += z * x[j]; ux += u[j] * x[j];
    }
    const double a11 = uz[0] * uz[0] + mu * zz[0], a12 = uz[0] * uz[1], a22 = uz[1] * uz[1] + mu * zz[1];
    const double b1 = uz[0] * ux + mu * zx[0], b2 = uz[1] * ux + mu * zx[1];
    const double det = a11 * a22 - a12 * a12;
    float bd[2] = { d[0], d[1] };
    for (int j = 0; j < 64; ++j) y[j] = (c[j] - 8) * d[j / 32];
    double best = obj(y, 64);
    if (det > 1e-12 * a11 * a22) {
        const float d0 = kvq_f16r((float) ((a22 * b1 - a12 * b2) / det));
        const float d1 = kvq_f16r((float) ((a11 * b2 - a12 * b1) / det));
        if (std::isfinite(d0) && std::isfinite(d1)) {
            for (int j = 0; j < 64; ++j) y[j] = (c[j] - 8) * (j < 32 ? d0 : d1);
            const double f2 = obj(y, 64);
            if (f2 < best) { best = f2; bd[0] = d0; bd[1] = d1; }
        }
    }
    if (!(best < f0)) return;
    for (int b = 0; b < 2; ++b) {
        const ggml_fp16_t dh = ggml_fp32_to_fp16(bd[b]);
        memcpy(blk + b * 18, &dh, 2);
        for (int j = 0; j < 16; ++j) blk[b * 18 + 2 + j] = (uint8_t) (c[b * 32 + j] | (c[b * 32 + j + 16] << 4));
    }
}

// Scale each 64-value head of u to unit length (zero heads stay zero); true if any is non-zero.
bool kvq_qar_unit_heads(float * u, int n_head_kv) {
    bool any = false;
    for (int g = 0; g < n_head_kv; ++g) {
        double nn = 0.0;
        for (int e = 0; e < 64; ++e) nn += (double) u[g * 64 + e] * u[g * 64 + e];
        const float inv = nn > 0.0 ? (float) (1.0 / std::sqrt(nn)) : 0.0f;
        for (int e = 0; e < 64; ++e) u[g * 64 + e] *= inv;
        any = any || nn > 0.0;
    }
    return any;
}

// Refine a K row encoded as type t (pool space x, per-head unit directions u) in place.
void kvq_qar_row(ggml_type t, uint8_t * row, size_t head_bytes, const float * x, const float * u, int n_head_kv,
                        float mu) {
    for (int g = 0; g < n_head_kv; ++g) {
        const float * ug = u + g * 64;
        bool any = false;
        for (int e = 0; e < 64 && !any; ++e) any = ug[e] != 0.0f;
        if (!any) continue;
        if (t == GGML_TYPE_KVQ2) kvq_qar_kvq2(row + g * head_bytes, x + g * 64, ug, mu);
        else if (t == GGML_TYPE_Q4_0) kvq_qar_q4_0(row + g * head_bytes, x + g * 64, ug, mu);
    }
}
