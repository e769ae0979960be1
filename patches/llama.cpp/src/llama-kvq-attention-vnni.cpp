// kvq: the AVX-512 tiles' integer path for q4_0 and kvq2 rows (head_dim 64; CPUs with AVX-512
// VNNI and VBMI, kvq_cpu_has_avx512_int), called by kvq_tile_avx512.
#include "llama-kvq-impl.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#ifdef KVQ_HAVE_X86
// Scores: the query as int8 (kvq_q8), K rows as u8 (q4_0 nibbles; kvq2 codewords over 55 plus
// 128), 4-way byte dot products (vpdpbusd), offsets and steps applied per row in f32. Values:
// each head's weights w = p * step as int16 over the tile's largest, V rows as int16 pairs of
// two rows (vpdpwssd), the int32 sums added to the f32 accumulator once per tile. For the
// scores a 128-bit lane holds one row (kvq2) or one block of a row (q4_0), so four
// accumulators reduce to one vector of 16 sums (kvq_tree4).

static const int KVQ_KVQ2_INT = 55; // kvq2's magnitudes are multiples of 1/55 (patch 0001)

struct kvq_int_tables {
    alignas(64) uint8_t kp[4][64], kn[4][64]; // position i of the 16 patterns, x4 lanes: 128 + M, 128 - M
    alignas(64) int8_t vp[4][64], vn[4][64];  // +M, -M
    alignas(64) uint8_t pair_q4[64];          // vpermb: [a.b0 a.b1 b.b0 b.b1] -> byte pairs (a, b) of block 0, block 1
    alignas(64) uint8_t pair_k2[64];          // vpermb: rows [0 1 2 3] -> byte pairs (0, 1), then (2, 3)
    alignas(64) int32_t unq4[16];             // q4_0 scores: merged lane -> natural row order (vpermps)
    alignas(64) int32_t unk2[16];             // kvq2 scores: tree lane 4 rho + k holds row 4k + rho
    alignas(64) int32_t q4_row[16], q4_blk[16]; // q4_0 tree lane 4L + a: row 2a + L / 2, block L % 2
    alignas(64) int32_t iota[16];
    bool kvq2_exact = true;                   // every magnitude is an integer over 55
    kvq_int_tables() {
        const float (*G)[4] = kvq_kvq2_grid();
        for (int m = 0; m < 16; ++m) {
            for (int i = 0; i < 4; ++i) {
                const float g = G[m << 4][i]; // sign bits clear: the magnitude
                const long M = std::lround(g * KVQ_KVQ2_INT);
                kvq2_exact = kvq2_exact && M >= 0 && M <= 127 && std::fabs((float) M / KVQ_KVQ2_INT - g) < 1e-6f;
                for (int l = 0; l < 4; ++l) {
                    kp[i][16 * l + m] = (uint8_t) (128 + M);
                    kn[i][16 * l + m] = (uint8_t) (128 - M);
                    vp[i][16 * l + m] = (int8_t) M;
                    vn[i][16 * l + m] = (int8_t) -M;
                }
            }
        }
        for (int j = 0; j < 16; ++j) {
            pair_q4[2 * j] = (uint8_t) j;
            pair_q4[2 * j + 1] = (uint8_t) (32 + j);
            pair_q4[32 + 2 * j] = (uint8_t) (16 + j);
            pair_q4[33 + 2 * j] = (uint8_t) (48 + j);
            pair_k2[2 * j] = (uint8_t) j;
            pair_k2[2 * j + 1] = (uint8_t) (16 + j);
            pair_k2[32 + 2 * j] = (uint8_t) (32 + j);
            pair_k2[33 + 2 * j] = (uint8_t) (48 + j);
        }
        // q4_0: after the block sums are added, lanes 0-3 of half h hold rows 8h + 0, 2, 4, 6 and
        // lanes 8-11 rows 8h + 1, 3, 5, 7; the two halves are merged as [h0 lanes 0-3, h0 8-11,
        // h1 0-3, h1 8-11]: lane 4q + a holds row 8 (q / 2) + 2a + q % 2.
        for (int q = 0; q < 4; ++q) {
            for (int a = 0; a < 4; ++a) unq4[8 * (q / 2) + 2 * a + q % 2] = 4 * q + a;
        }
        for (int k = 0; k < 4; ++k) {
            for (int rho = 0; rho < 4; ++rho) unk2[4 * k + rho] = 4 * rho + k;
        }
        for (int L = 0; L < 4; ++L) {
            for (int a = 0; a < 4; ++a) {
                q4_row[4 * L + a] = 2 * a + L / 2;
                q4_blk[4 * L + a] = L % 2;
            }
        }
        for (int l = 0; l < 16; ++l) iota[l] = l;
    }
};

static const kvq_int_tables & kvq_int() {
    static const kvq_int_tables T;
    return T;
}

static inline bool kvq_int_type(ggml_type t) {
    return t == GGML_TYPE_Q4_0 || (t == GGML_TYPE_KVQ2 && kvq_int().kvq2_exact);
}

// 16 bytes at `off` of row r (zeros past n)
KVQ_AVX512I static inline __m128i kvq_ld16(const uint8_t * base, size_t stride, int r, int n, int off) {
    return r < n ? _mm_loadu_si128((const __m128i *) (base + r * stride + off)) : _mm_setzero_si128();
}

// The f16 steps at byte offsets off[lane] from base as f32 (lanes outside `live`: 0).
KVQ_AVX512I static inline __m512 kvq_steps16(const uint8_t * base, __m512i off, __mmask16 live) {
    const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, off, (const void *) base, 1);
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
}

// Lanes whose row (row0 + rows[lane]) is below n.
KVQ_AVX512I static inline __mmask16 kvq_live(__m512i rows, int row0, int n) {
    return _mm512_cmplt_epi32_mask(_mm512_add_epi32(rows, _mm512_set1_epi32(row0)), _mm512_set1_epi32(n));
}

KVQ_AVX512I static inline __m512i kvq_ld4x16(__m128i a, __m128i b, __m128i c, __m128i d) {
    __m512i x = _mm512_castsi128_si512(a);
    x = _mm512_inserti32x4(x, b, 1);
    x = _mm512_inserti32x4(x, c, 2);
    return _mm512_inserti32x4(x, d, 3);
}

// Per 128-bit lane L: [sum(A.L), sum(B.L), sum(C.L), sum(D.L)], i.e. lane 4L + a of accumulator a.
KVQ_AVX512I static inline __m512i kvq_tree4(__m512i A, __m512i B, __m512i C, __m512i D) {
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(A, B), _mm512_unpackhi_epi32(A, B));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(C, D), _mm512_unpackhi_epi32(C, D));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
}

// A tile decoded once for every token and head.
struct kvq_int_tile {
    __m512i k[KVQ_KB / 16][16]; // per 16 rows. q4_0: [a] low nibbles, [8 + a] high, lanes [2a.b0 2a.b1 2a+1.b0 2a+1.b1];
                          // kvq2: [4k + i] position i of rows 4k..4k+3 (a row per lane), as 128 +- M
    float kd[KVQ_KB / 16][2][16]; // K steps in tree lane order (q4_0: [half][4L + a]: row 8 half + 2a + L/2, block L%2; kvq2: [0])
    __m512i v[KVQ_KB / 2][4]; // q4_0: [p] rows (2p, 2p+1), elements 0-15, 32-47, 16-31, 48-63 (values - 8);
                          // kvq2: [2k + {0,1}][i] rows (4k, 4k+1) / (4k+2, 4k+3), element 4g + i at lane g
    float vd[2][KVQ_KB];  // V steps per block and row, 0 past n (kvq2: one block, / 55)
};

// V rows as int16 pairs of two rows (the layout of kvq_int_tile::v).
struct kvq_v_dec {
    __m512i m4, perm, eight, p[4], q[4];
    KVQ_AVX512I explicit kvq_v_dec(ggml_type tv) {
        const kvq_int_tables & I = kvq_int();
        m4 = _mm512_set1_epi8(0x0F);
        eight = _mm512_set1_epi16(8);
        perm = _mm512_load_si512(tv == GGML_TYPE_Q4_0 ? I.pair_q4 : I.pair_k2);
        for (int i = 0; i < 4; ++i) {
            p[i] = _mm512_load_si512(I.vp[i]);
            q[i] = _mm512_load_si512(I.vn[i]);
        }
    }
    // q4_0 rows (2p, 2p+1) -> values - 8 of elements 0-15, 32-47, 16-31, 48-63
    KVQ_AVX512I inline void q4_pair(const kvq_tile & T, int pr, __m512i * out) const {
        const int ra = 2 * pr, rb = ra + 1, n = T.n;
        const __m512i y = kvq_ld4x16(kvq_ld16(T.v, T.stride_v, ra, n, 2), kvq_ld16(T.v, T.stride_v, ra, n, 20),
                                     kvq_ld16(T.v, T.stride_v, rb, n, 2), kvq_ld16(T.v, T.stride_v, rb, n, 20));
        const __m512i z = _mm512_permutexvar_epi8(perm, y);
        const __m512i lo = _mm512_and_si512(z, m4), hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
        out[0] = _mm512_sub_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(lo)), eight);
        out[1] = _mm512_sub_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(lo, 1)), eight);
        out[2] = _mm512_sub_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(hi)), eight);
        out[3] = _mm512_sub_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(hi, 1)), eight);
    }
    // kvq2 rows 4k..4k+3 -> pairs (4k, 4k+1) in o01[i], (4k+2, 4k+3) in o23[i]: element 4g + i at lane g
    KVQ_AVX512I inline void k2_quad(const kvq_tile & T, int k, __m512i * o01, __m512i * o23) const {
        const int r = 4 * k, n = T.n;
        const __m512i c = kvq_ld4x16(kvq_ld16(T.v, T.stride_v, r, n, 2), kvq_ld16(T.v, T.stride_v, r + 1, n, 2),
                                     kvq_ld16(T.v, T.stride_v, r + 2, n, 2), kvq_ld16(T.v, T.stride_v, r + 3, n, 2));
        const __m512i m = _mm512_and_si512(_mm512_srli_epi16(c, 4), m4);
        for (int i = 0; i < 4; ++i) {
            const __m512i x = _mm512_mask_blend_epi8(_mm512_test_epi8_mask(c, _mm512_set1_epi8((char) (1 << i))),
                                                     _mm512_shuffle_epi8(p[i], m), _mm512_shuffle_epi8(q[i], m));
            const __m512i z = _mm512_permutexvar_epi8(perm, x);
            o01[i] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(z));
            o23[i] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(z, 1));
        }
    }
};

// K decoded to D.k and the steps D.kd, D.vd; V to D.v with decode_v (several query tokens share it).
KVQ_AVX512I static void kvq_int_decode(const kvq_tile & T, kvq_int_tile & D, bool decode_v) {
    const kvq_int_tables & I = kvq_int();
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int n = T.n;
    const __m512i iota = _mm512_load_si512(I.iota);
    const __m512i sk = _mm512_set1_epi32((int) T.stride_k), sv = _mm512_set1_epi32((int) T.stride_v);
    if (T.tk == GGML_TYPE_Q4_0) {
        const __m512i row = _mm512_load_si512(I.q4_row), boff = _mm512_mullo_epi32(_mm512_load_si512(I.q4_blk), _mm512_set1_epi32(18));
        for (int gr = 0; gr * 16 < n; ++gr) {
            const int r0 = gr * 16;
            for (int a = 0; a < 8; ++a) {
                const int ra = r0 + 2 * a, rb = ra + 1;
                const __m512i x = kvq_ld4x16(kvq_ld16(T.k, T.stride_k, ra, n, 2), kvq_ld16(T.k, T.stride_k, ra, n, 20),
                                             kvq_ld16(T.k, T.stride_k, rb, n, 2), kvq_ld16(T.k, T.stride_k, rb, n, 20));
                D.k[gr][a] = _mm512_and_si512(x, m4);
                D.k[gr][8 + a] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
            }
            for (int h = 0; h < 2; ++h) {
                const int rh = r0 + 8 * h;
                const __m512i off = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_add_epi32(row, _mm512_set1_epi32(rh)), sk), boff);
                _mm512_storeu_ps(D.kd[gr][h], kvq_steps16(T.k, off, kvq_live(row, rh, n)));
            }
        }
    } else {
        const __m512i kp0 = _mm512_load_si512(I.kp[0]), kp1 = _mm512_load_si512(I.kp[1]), kp2 = _mm512_load_si512(I.kp[2]), kp3 = _mm512_load_si512(I.kp[3]);
        const __m512i kn0 = _mm512_load_si512(I.kn[0]), kn1 = _mm512_load_si512(I.kn[1]), kn2 = _mm512_load_si512(I.kn[2]), kn3 = _mm512_load_si512(I.kn[3]);
        const __m512i rowk = _mm512_load_si512(I.unk2); // tree lane 4 rho + k: row 4k + rho (the same table)
        const __m512 inv = _mm512_set1_ps(1.0f / KVQ_KVQ2_INT);
        for (int gr = 0; gr * 16 < n; ++gr) {
            const int r0 = gr * 16;
            for (int k = 0; k < 4; ++k) {
                const int r = r0 + 4 * k;
                const __m512i c = kvq_ld4x16(kvq_ld16(T.k, T.stride_k, r, n, 2), kvq_ld16(T.k, T.stride_k, r + 1, n, 2),
                                             kvq_ld16(T.k, T.stride_k, r + 2, n, 2), kvq_ld16(T.k, T.stride_k, r + 3, n, 2));
                const __m512i m = _mm512_and_si512(_mm512_srli_epi16(c, 4), m4);
                D.k[gr][4 * k + 0] = _mm512_mask_blend_epi8(_mm512_test_epi8_mask(c, _mm512_set1_epi8(1)), _mm512_shuffle_epi8(kp0, m), _mm512_shuffle_epi8(kn0, m));
                D.k[gr][4 * k + 1] = _mm512_mask_blend_epi8(_mm512_test_epi8_mask(c, _mm512_set1_epi8(2)), _mm512_shuffle_epi8(kp1, m), _mm512_shuffle_epi8(kn1, m));
                D.k[gr][4 * k + 2] = _mm512_mask_blend_epi8(_mm512_test_epi8_mask(c, _mm512_set1_epi8(4)), _mm512_shuffle_epi8(kp2, m), _mm512_shuffle_epi8(kn2, m));
                D.k[gr][4 * k + 3] = _mm512_mask_blend_epi8(_mm512_test_epi8_mask(c, _mm512_set1_epi8(8)), _mm512_shuffle_epi8(kp3, m), _mm512_shuffle_epi8(kn3, m));
            }
            // tree lane 4 rho + k holds row 4k + rho: unk2[4k + rho] = 4 rho + k, i.e. lane l <- row unk2[l]
            const __m512i off = _mm512_mullo_epi32(_mm512_add_epi32(rowk, _mm512_set1_epi32(r0)), sk);
            _mm512_storeu_ps(D.kd[gr][0], _mm512_mul_ps(kvq_steps16(T.k, off, kvq_live(rowk, r0, n)), inv));
        }
    }
    const int nb = T.tv == GGML_TYPE_Q4_0 ? 2 : 1;
    alignas(64) uint16_t h[2][KVQ_KB] = {}; // V steps, natural row order (zero past n: masked rows get no weight)
    for (int b = 0; b < nb; ++b) {
        for (int r = 0; r < n; ++r) memcpy(&h[b][r], T.v + r * T.stride_v + 18 * b, 2);
        for (int r0 = 0; r0 < n; r0 += 16) {
            __m512 d = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *) (h[b] + r0)));
            if (T.tv != GGML_TYPE_Q4_0) d = _mm512_mul_ps(d, _mm512_set1_ps(1.0f / KVQ_KVQ2_INT));
            _mm512_storeu_ps(D.vd[b] + r0, d);
        }
    }
    if (!decode_v) return;
    const kvq_v_dec vdec(T.tv);
    if (T.tv == GGML_TYPE_Q4_0) {
        for (int p = 0; 2 * p < n; ++p) vdec.q4_pair(T, p, D.v[p]);
    } else {
        for (int k = 0; 4 * k < n; ++k) vdec.k2_quad(T, k, D.v[2 * k], D.v[2 * k + 1]);
    }
}

// Scores of rows r0..r0+15 (group gr) for one query (int8 q8), natural row order.
KVQ_AVX512I static inline __m512 kvq_int_scores(const kvq_int_tile & D, ggml_type tk, int gr, const kvq_q8 & q8) {
    const kvq_int_tables & I = kvq_int();
    if (tk == GGML_TYPE_Q4_0) {
        const __m512i qa = _mm512_loadu_si512(q8.a), qb = _mm512_loadu_si512(q8.b);
        // isum - 8 * (sum of q over the block), times the query's block step: lanes 4L + a, block L % 2
        const __m512i off = _mm512_mask_blend_epi32((__mmask16) 0xF0F0, _mm512_set1_epi32(8 * q8.s0), _mm512_set1_epi32(8 * q8.s1));
        const __m512 dq = _mm512_mask_blend_ps((__mmask16) 0xF0F0, _mm512_set1_ps(q8.d0), _mm512_set1_ps(q8.d1));
        __m512 half[2];
        for (int h = 0; h < 2; ++h) {
            __m512i acc[4];
            for (int a = 0; a < 4; ++a) {
                const int x = 4 * h + a;
                acc[a] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), D.k[gr][x], qa), D.k[gr][8 + x], qb);
            }
            const __m512i u = _mm512_sub_epi32(kvq_tree4(acc[0], acc[1], acc[2], acc[3]), off);
            const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(u), _mm512_mul_ps(_mm512_loadu_ps(D.kd[gr][h]), dq));
            half[h] = _mm512_add_ps(f, _mm512_shuffle_f32x4(f, f, _MM_SHUFFLE(2, 3, 0, 1))); // + the row's other block
        }
        const __m512 s = _mm512_shuffle_f32x4(half[0], half[1], _MM_SHUFFLE(2, 0, 2, 0));
        return _mm512_permutexvar_ps(_mm512_load_si512(I.unq4), s);
    }
    __m512i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *) (q8.c + 16 * i)));
    __m512i acc[4];
    for (int k = 0; k < 4; ++k) {
        __m512i x = _mm512_dpbusd_epi32(_mm512_setzero_si512(), D.k[gr][4 * k], q[0]);
        x = _mm512_dpbusd_epi32(x, D.k[gr][4 * k + 1], q[1]);
        x = _mm512_dpbusd_epi32(x, D.k[gr][4 * k + 2], q[2]);
        acc[k] = _mm512_dpbusd_epi32(x, D.k[gr][4 * k + 3], q[3]);
    }
    // 32-bit lanes 0-1 of a 128-bit lane hold groups 0-7 (block 0 of the query), lanes 2-3 groups
    // 8-15: each half gets its step and half its block's offset 128 * sum (two lanes per block),
    // then the four partials of a row add up (per 128-bit lane: [row of acc 0, 1, 2, 3], the order
    // of kvq_tree4)
    const __m512i o0 = _mm512_set1_epi32(64 * q8.s0), o1 = _mm512_set1_epi32(64 * q8.s1);
    const __m512 d0 = _mm512_set1_ps(q8.d0), d1 = _mm512_set1_ps(q8.d1);
    __m512 f[2];
    for (int x = 0; x < 2; ++x) {
        const __m512i lo = _mm512_unpacklo_epi64(acc[2 * x], acc[2 * x + 1]), hi = _mm512_unpackhi_epi64(acc[2 * x], acc[2 * x + 1]);
        f[x] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, o0)), d0,
                               _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, o1)), d1));
    }
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(f[0], f[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(f[0], f[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_permutexvar_ps(_mm512_load_si512(I.unk2), _mm512_mul_ps(r, _mm512_loadu_ps(D.kd[gr][0])));
}

// A head's tile weights w = p * V step as int16 over the largest |w| (rows 2k, 2k+1 of block b in
// wd[b][k]); returns the step of one int16 unit, 0 when every weight is 0.
KVQ_AVX512I static float kvq_int_weights(const kvq_int_tile & D, int nb, int n, const float * p, int32_t (*wd)[KVQ_KB / 2]) {
    const int n16 = (n + 15) & ~15;
    __m512 w[2][KVQ_KB / 16];
    __m512 wmax = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b) {
        for (int r = 0; r < n16; r += 16) {
            w[b][r / 16] = _mm512_mul_ps(_mm512_loadu_ps(p + r), _mm512_loadu_ps(D.vd[b] + r));
            wmax = _mm512_max_ps(wmax, _mm512_abs_ps(w[b][r / 16]));
        }
    }
    const float mx = _mm512_reduce_max_ps(wmax);
    if (!(mx > 0.0f)) return 0.0f;
    const __m512 inv = _mm512_set1_ps(32767.0f / mx);
    for (int b = 0; b < nb; ++b) {
        for (int r = 0; r < n16; r += 16) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(w[b][r / 16], inv));
            _mm256_storeu_si256((__m256i *) (wd[b] + r / 2), _mm512_cvtepi32_epi16(q));
        }
    }
    return mx / 32767.0f;
}

// acc (f32, natural order) += ws * the int32 sums a[0..3] (q4_0: elements 0-15, 32-47, 16-31, 48-63;
// kvq2: a[i] lane g = element 4g + i, put in order by 4x4 transposes within and across 128-bit lanes).
KVQ_AVX512I static inline void kvq_int_store(ggml_type tv, const __m512i * a, float ws, float * acc) {
    const __m512 s = _mm512_set1_ps(ws);
    if (tv == GGML_TYPE_Q4_0) {
        _mm512_storeu_ps(acc,      _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[0]), s, _mm512_loadu_ps(acc)));
        _mm512_storeu_ps(acc + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[2]), s, _mm512_loadu_ps(acc + 16)));
        _mm512_storeu_ps(acc + 32, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[1]), s, _mm512_loadu_ps(acc + 32)));
        _mm512_storeu_ps(acc + 48, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[3]), s, _mm512_loadu_ps(acc + 48)));
        return;
    }
    const __m512 f0 = _mm512_mul_ps(_mm512_cvtepi32_ps(a[0]), s), f1 = _mm512_mul_ps(_mm512_cvtepi32_ps(a[1]), s);
    const __m512 f2 = _mm512_mul_ps(_mm512_cvtepi32_ps(a[2]), s), f3 = _mm512_mul_ps(_mm512_cvtepi32_ps(a[3]), s);
    const __m512d x01l = _mm512_castps_pd(_mm512_unpacklo_ps(f0, f1)), x01h = _mm512_castps_pd(_mm512_unpackhi_ps(f0, f1));
    const __m512d x23l = _mm512_castps_pd(_mm512_unpacklo_ps(f2, f3)), x23h = _mm512_castps_pd(_mm512_unpackhi_ps(f2, f3));
    const __m512 t0 = _mm512_castpd_ps(_mm512_unpacklo_pd(x01l, x23l)), t1 = _mm512_castpd_ps(_mm512_unpackhi_pd(x01l, x23l));
    const __m512 t2 = _mm512_castpd_ps(_mm512_unpacklo_pd(x01h, x23h)), t3 = _mm512_castpd_ps(_mm512_unpackhi_pd(x01h, x23h));
    const __m512 A = _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)), B = _mm512_shuffle_f32x4(t2, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 C = _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)), E = _mm512_shuffle_f32x4(t2, t3, _MM_SHUFFLE(3, 2, 3, 2));
    _mm512_storeu_ps(acc,      _mm512_add_ps(_mm512_loadu_ps(acc),      _mm512_shuffle_f32x4(A, B, _MM_SHUFFLE(2, 0, 2, 0))));
    _mm512_storeu_ps(acc + 16, _mm512_add_ps(_mm512_loadu_ps(acc + 16), _mm512_shuffle_f32x4(A, B, _MM_SHUFFLE(3, 1, 3, 1))));
    _mm512_storeu_ps(acc + 32, _mm512_add_ps(_mm512_loadu_ps(acc + 32), _mm512_shuffle_f32x4(C, E, _MM_SHUFFLE(2, 0, 2, 0))));
    _mm512_storeu_ps(acc + 48, _mm512_add_ps(_mm512_loadu_ps(acc + 48), _mm512_shuffle_f32x4(C, E, _MM_SHUFFLE(3, 1, 3, 1))));
}

// acc += sum_r p[r] V[r] for one head from the decoded V rows (several query tokens).
KVQ_AVX512I static void kvq_int_pv(const kvq_int_tile & D, ggml_type tv, int n, const int32_t (*wd)[KVQ_KB / 2], float ws, float * acc) {
    __m512i a[4] = { _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512() };
    if (tv == GGML_TYPE_Q4_0) {
        for (int k = 0; 2 * k < n; ++k) {
            const __m512i w0 = _mm512_set1_epi32(wd[0][k]), w1 = _mm512_set1_epi32(wd[1][k]);
            a[0] = _mm512_dpwssd_epi32(a[0], D.v[k][0], w0);
            a[1] = _mm512_dpwssd_epi32(a[1], D.v[k][1], w1);
            a[2] = _mm512_dpwssd_epi32(a[2], D.v[k][2], w0);
            a[3] = _mm512_dpwssd_epi32(a[3], D.v[k][3], w1);
        }
    } else {
        for (int k = 0; 4 * k < n; ++k) {
            const __m512i w01 = _mm512_set1_epi32(wd[0][2 * k]), w23 = _mm512_set1_epi32(wd[0][2 * k + 1]);
            for (int i = 0; i < 4; ++i) a[i] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(a[i], D.v[2 * k][i], w01), D.v[2 * k + 1][i], w23);
        }
    }
    kvq_int_store(tv, a, ws, acc);
}

// One query token: NJ heads' acc[u] += sum_r p_u[r] V[r] in one pass, V rows decoded in registers.
template <int NJ>
KVQ_AVX512I static void kvq_int_pv_heads(const kvq_tile & T, const int32_t (*const *wd)[KVQ_KB / 2], const float * ws,
                                         float * const * acc) {
    const kvq_v_dec vdec(T.tv);
    __m512i a[NJ][4];
    for (int u = 0; u < NJ; ++u) {
        for (int c = 0; c < 4; ++c) a[u][c] = _mm512_setzero_si512();
    }
    if (T.tv == GGML_TYPE_Q4_0) {
        for (int k = 0; 2 * k < T.n; ++k) {
            __m512i v[4];
            vdec.q4_pair(T, k, v);
            for (int u = 0; u < NJ; ++u) {
                const __m512i w0 = _mm512_set1_epi32(wd[u][0][k]), w1 = _mm512_set1_epi32(wd[u][1][k]);
                a[u][0] = _mm512_dpwssd_epi32(a[u][0], v[0], w0);
                a[u][1] = _mm512_dpwssd_epi32(a[u][1], v[1], w1);
                a[u][2] = _mm512_dpwssd_epi32(a[u][2], v[2], w0);
                a[u][3] = _mm512_dpwssd_epi32(a[u][3], v[3], w1);
            }
        }
    } else {
        for (int k = 0; 4 * k < T.n; ++k) {
            __m512i v01[4], v23[4];
            vdec.k2_quad(T, k, v01, v23);
            for (int u = 0; u < NJ; ++u) {
                const __m512i w01 = _mm512_set1_epi32(wd[u][0][2 * k]), w23 = _mm512_set1_epi32(wd[u][0][2 * k + 1]);
                for (int i = 0; i < 4; ++i) a[u][i] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(a[u][i], v01[i], w01), v23[i], w23);
            }
        }
    }
    for (int u = 0; u < NJ; ++u) kvq_int_store(T.tv, a[u], ws[u], acc[u]);
}

bool kvq_tile_int_types(ggml_type tk, ggml_type tv) {
    return kvq_int_type(tk) && kvq_int_type(tv);
}

// The tile contract of kvq_tile_avx512 for q4_0 / kvq2 K and V rows and int8 queries (B.q8).
// scratch: the kt and vt buffers of kvq_fused_partial (2 * KVQ_KB * 64 floats), for the decoded tile.
KVQ_AVX512I void kvq_tile_avx512_int(const kvq_tile & T, const kvq_qblock & B, float * sbuf, float * scratch) {
    static_assert(sizeof(kvq_int_tile) + 64 <= 2 * KVQ_KB * 64 * sizeof(float), "the decoded tile lives in kt and vt");
    void * work = (void *) (((uintptr_t) scratch + 63) & ~(uintptr_t) 63);
    const int n = T.n, n16 = (n + 15) & ~15, ss = kvq_st_size(64);
    alignas(64) int32_t pos[KVQ_KB];
    int32_t pmin = INT32_MAX, pmax = INT32_MIN, qmax = INT32_MIN;
    for (int r = 0; r < n; ++r) {
        pos[r] = T.pos[r];
        pmin = std::min(pmin, pos[r]);
        pmax = std::max(pmax, pos[r]);
    }
    for (int r = n; r < n16; ++r) pos[r] = INT32_MAX;
    for (int t = 0; t < B.nt; ++t) qmax = std::max(qmax, B.qpos[t]);
    if (pmin > qmax) return;
    kvq_int_tile & D = *(kvq_int_tile *) work;
    const bool one = B.nt == 1; // decode: V rows decoded in registers, all heads in one pass
    kvq_int_decode(T, D, !one);
    const int nb = T.tv == GGML_TYPE_Q4_0 ? 2 : 1;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    alignas(64) int32_t wd[64][2][KVQ_KB / 2];
    float ws[64];
    for (int t = 0; t < B.nt; ++t) {
        const int32_t qp = B.qpos[t];
        if (pmin > qp) continue;
        const bool full = pmax <= qp && n == n16;
        const __m512i qpv = _mm512_set1_epi32(qp);
        for (int j = 0; j < B.G; ++j) {
            const int h = B.g * B.G + j;
            float * sb = sbuf + (size_t) j * KVQ_KB;
            const kvq_q8 & q8 = B.q8[((size_t) t * B.n_head + h) * 2 + (T.rot ? 1 : 0)];
            float * st = B.st + ((size_t) t * B.n_head + h) * ss;
            ws[j] = 0.0f;
            __m512 mxv = ninf;
            for (int r16 = 0; r16 < n16; r16 += 16) {
                __m512 s = kvq_int_scores(D, T.tk, r16 / 16, q8);
                if (!full) {
                    const __mmask16 masked = _mm512_cmpgt_epi32_mask(_mm512_load_si512((const void *) (pos + r16)), qpv);
                    s = _mm512_mask_mov_ps(s, masked, ninf);
                }
                _mm512_storeu_ps(sb + r16, s);
                mxv = _mm512_max_ps(mxv, s);
            }
            if (B.wsc) memcpy(B.wsc + ((size_t) t * B.n_head + h) * B.wsc_n + T.row0, sb, n * sizeof(float));
            const float mx = _mm512_reduce_max_ps(mxv);
            if (mx == -INFINITY) continue;
            if (mx > st[0]) {
                const float c = expf(st[0] - mx);
                st[1] *= c;
                st[2] *= c;
                const __m512 cv = _mm512_set1_ps(c);
                for (int e = 0; e < 128; e += 16) _mm512_storeu_ps(st + 4 + e, _mm512_mul_ps(cv, _mm512_loadu_ps(st + 4 + e)));
                st[0] = mx;
            }
            const __m512 mv = _mm512_set1_ps(st[0]);
            __m512 lv = _mm512_setzero_ps(), tv = _mm512_setzero_ps();
            for (int r16 = 0; r16 < n16; r16 += 16) {
                const __m512 s = _mm512_loadu_ps(sb + r16);
                const __mmask16 valid = _mm512_cmp_ps_mask(s, ninf, _CMP_NEQ_OQ);
                const __m512 p = _mm512_maskz_mov_ps(valid, kvq_exp_512(_mm512_sub_ps(s, mv)));
                lv = _mm512_add_ps(lv, p);
                tv = _mm512_mask3_fmadd_ps(p, s, tv, valid);
                _mm512_storeu_ps(sb + r16, p);
            }
            st[1] += _mm512_reduce_add_ps(lv);
            st[2] += _mm512_reduce_add_ps(tv);
            ws[j] = kvq_int_weights(D, nb, n, sb, wd[j]);
            if (!one && ws[j] > 0.0f) kvq_int_pv(D, T.tv, n, wd[j], ws[j], st + 4 + (T.rot ? 64 : 0));
        }
        if (!one) continue;
        // the heads with weight, up to 4 per pass over the V rows
        const int32_t (*wl[4])[KVQ_KB / 2];
        float wsl[4];
        float * accl[4];
        int nl = 0;
        for (int j = 0; j <= B.G; ++j) {
            if (j < B.G && ws[j] > 0.0f) {
                wl[nl] = wd[j];
                wsl[nl] = ws[j];
                accl[nl] = B.st + ((size_t) t * B.n_head + B.g * B.G + j) * ss + 4 + (T.rot ? 64 : 0);
                ++nl;
            }
            if (nl == 4 || (j == B.G && nl > 0)) {
                switch (nl) {
                    case 1:  kvq_int_pv_heads<1>(T, wl, wsl, accl); break;
                    case 2:  kvq_int_pv_heads<2>(T, wl, wsl, accl); break;
                    case 3:  kvq_int_pv_heads<3>(T, wl, wsl, accl); break;
                    default: kvq_int_pv_heads<4>(T, wl, wsl, accl); break;
                }
                nl = 0;
            }
        }
    }
}

#endif // KVQ_HAVE_X86
