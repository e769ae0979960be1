// kvq: the fused kernel's AVX-512 tiles (head_dim 64), compiled for that target and chosen at
// run time (kvq_isa_best). Same contract as kvq_tile_scalar / kvq_tile_avx2; a row of 64 values
// is four 16-lane vectors, so every query head of a group (up to 4 per pass) keeps its whole
// accumulator in registers while the tile's V rows stream by. q4_0 and kvq2 rows take the
// integer path (llama-kvq-attention-vnni.cpp) on CPUs with AVX-512 VNNI and VBMI.
#include "llama-kvq-impl.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#ifdef KVQ_HAVE_X86

//
// vector helpers
//

// [sum(v0), ..., sum(v7)] of eight 8-lane vectors
KVQ_AVX512 static inline __m256 kvq_hsum8_512(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5,
                                              __m256 v6, __m256 v7) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// q . k over 64 values, folded to 8 lanes
KVQ_AVX512 static inline __m256 kvq_dot64_512(const __m512 * q, const float * k) {
    __m512 a = _mm512_mul_ps(q[0], _mm512_loadu_ps(k));
    __m512 b = _mm512_mul_ps(q[1], _mm512_loadu_ps(k + 16));
    a = _mm512_fmadd_ps(q[2], _mm512_loadu_ps(k + 32), a);
    b = _mm512_fmadd_ps(q[3], _mm512_loadu_ps(k + 48), b);
    a = _mm512_add_ps(a, b);
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

// Decode n rows of 64 values (one head) to f32; rows n..n16 are zeroed.
KVQ_AVX512 static void kvq_dequant64_512(ggml_type type, const uint8_t * base, size_t stride, int n, float * out) {
    const int n16 = (n + 15) & ~15;
    switch (type) {
        case GGML_TYPE_F16:
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                for (int c = 0; c < 4; ++c) {
                    _mm512_storeu_ps(o + 16 * c, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (x + 32 * c))));
                }
            }
            break;
        case GGML_TYPE_Q8_0: // {f16 d, int8 qs[32]} x 2
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                for (int b = 0; b < 2; ++b, x += 34) {
                    const __m512 d = _mm512_set1_ps(kvq_h2f_512(x));
                    for (int c = 0; c < 2; ++c) {
                        const __m128i q = _mm_loadu_si128((const __m128i *) (x + 2 + 16 * c));
                        _mm512_storeu_ps(o + 32 * b + 16 * c, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))));
                    }
                }
            }
            break;
        case GGML_TYPE_Q4_0: { // {f16 d, u8 qs[16]} x 2: j -> low nibble of qs[j], j+16 -> high
            const __m128i m4 = _mm_set1_epi8(0xF);
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                for (int b = 0; b < 2; ++b, x += 18) {
                    const float df = kvq_h2f_512(x);
                    const __m512 d = _mm512_set1_ps(df), off = _mm512_set1_ps(-8.0f * df);
                    const __m128i raw = _mm_loadu_si128((const __m128i *) (x + 2));
                    const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
                    _mm512_storeu_ps(o + 32 * b,      _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, off));
                    _mm512_storeu_ps(o + 32 * b + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, off));
                }
            }
            break;
        }
        default: { // KVQ2 {f16 d, u8 qs[16]}: group g of 4 values is d times codeword qs[g]
            const float (*G)[4] = kvq_kvq2_grid();
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                const __m512 d = _mm512_set1_ps(kvq_h2f_512(x));
                for (int g = 0; g < 16; g += 4) {
                    __m512 w = _mm512_castps128_ps512(_mm_loadu_ps(G[x[2 + g]]));
                    w = _mm512_insertf32x4(w, _mm_loadu_ps(G[x[3 + g]]), 1);
                    w = _mm512_insertf32x4(w, _mm_loadu_ps(G[x[4 + g]]), 2);
                    w = _mm512_insertf32x4(w, _mm_loadu_ps(G[x[5 + g]]), 3);
                    _mm512_storeu_ps(o + 4 * g, _mm512_mul_ps(d, w));
                }
            }
            break;
        }
    }
    for (int r = n; r < n16; ++r) memset(out + r * 64, 0, 64 * sizeof(float));
}


//
// tiles
//

// acc[u] += sum_r pj[u][r] * vt[r] for NJ heads: whole rows, so the NJ x 4 accumulators, a V row
// and the weights stay in the 32 registers.
template <int NJ>
KVQ_AVX512 static inline void kvq_pv_512(float * const * acc, const float * const * pj, const float * vt, int n) {
    __m512 a[NJ][4];
    for (int u = 0; u < NJ; ++u) {
        for (int c = 0; c < 4; ++c) a[u][c] = _mm512_loadu_ps(acc[u] + 16 * c);
    }
    for (int r = 0; r < n; ++r) {
        bool skip = true; // masked row (every weight zero)
        for (int u = 0; u < NJ; ++u) skip = skip && pj[u][r] == 0.0f;
        if (skip) continue;
        __m512 p[NJ];
        for (int u = 0; u < NJ; ++u) p[u] = _mm512_set1_ps(pj[u][r]);
        const float * v = vt + r * 64;
        for (int c = 0; c < 4; ++c) {
            const __m512 x = _mm512_loadu_ps(v + 16 * c);
            for (int u = 0; u < NJ; ++u) a[u][c] = _mm512_fmadd_ps(p[u], x, a[u][c]);
        }
    }
    for (int u = 0; u < NJ; ++u) {
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc[u] + 16 * c, a[u][c]);
    }
}

// One tile of n <= KVQ_KB rows for the B.G <= 64 query heads of KV head B.g (kvq_isa_supported).
KVQ_AVX512 void kvq_tile_avx512(const kvq_tile & T, const kvq_qblock & B, float * kt, float * vt, float * sbuf) {
    static_assert(KVQ_KB % 16 == 0, "AVX-512 tiles walk rows 16 at a time");
    if (B.q8 && kvq_tile_int_types(T.tk, T.tv)) { // B.q8: kvq_cpu_has_avx512_int
        kvq_tile_avx512_int(T, B, sbuf, kt);
        return;
    }
    const int n = T.n, n16 = (n + 15) & ~15, ss = kvq_st_size(64);
    alignas(64) float zero[KVQ_KB] = {};
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
    kvq_dequant64_512(T.tk, T.k, T.stride_k, n, kt);
    kvq_dequant64_512(T.tv, T.v, T.stride_v, n, vt);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int t = 0; t < B.nt; ++t) {
        const int32_t qp = B.qpos[t];
        if (pmin > qp) continue;
        const bool full = pmax <= qp && n == n16;
        const __m512i qpv = _mm512_set1_epi32(qp);
        bool live[64] = {}; // per query head of the group
        for (int j = 0; j < B.G; ++j) {
            const int h = B.g * B.G + j;
            float * sb = sbuf + (size_t) j * KVQ_KB;
            const float * qf = (T.rot ? B.qr : B.q) + ((size_t) t * B.n_head + h) * 64;
            float * st = B.st + ((size_t) t * B.n_head + h) * ss;
            __m512 q[4];
            for (int c = 0; c < 4; ++c) q[c] = _mm512_loadu_ps(qf + 16 * c);
            __m512 mxv = ninf;
            for (int r16 = 0; r16 < n16; r16 += 16) {
                const float * k = kt + r16 * 64;
                const __m256 s0 = kvq_hsum8_512(kvq_dot64_512(q, k), kvq_dot64_512(q, k + 64), kvq_dot64_512(q, k + 128),
                                                kvq_dot64_512(q, k + 192), kvq_dot64_512(q, k + 256), kvq_dot64_512(q, k + 320),
                                                kvq_dot64_512(q, k + 384), kvq_dot64_512(q, k + 448));
                k += 512;
                const __m256 s1 = kvq_hsum8_512(kvq_dot64_512(q, k), kvq_dot64_512(q, k + 64), kvq_dot64_512(q, k + 128),
                                                kvq_dot64_512(q, k + 192), kvq_dot64_512(q, k + 256), kvq_dot64_512(q, k + 320),
                                                kvq_dot64_512(q, k + 384), kvq_dot64_512(q, k + 448));
                __m512 s = _mm512_insertf32x8(_mm512_castps256_ps512(s0), s1, 1);
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
            live[j] = true;
        }
        // V: up to 4 heads of the group per pass over the tile (kvq_pv_512)
        for (int j0 = 0; j0 < B.G; j0 += 4) {
            const int nj = std::min(4, B.G - j0);
            float * acc[4];
            const float * pj[4];
            bool any = false;
            for (int u = 0; u < nj; ++u) {
                const int j = j0 + u;
                acc[u] = B.st + ((size_t) t * B.n_head + B.g * B.G + j) * ss + 4 + (T.rot ? 64 : 0);
                pj[u] = live[j] ? sbuf + (size_t) j * KVQ_KB : zero;
                any = any || live[j];
            }
            if (!any) continue;
            switch (nj) {
                case 1:  kvq_pv_512<1>(acc, pj, vt, n); break;
                case 2:  kvq_pv_512<2>(acc, pj, vt, n); break;
                case 3:  kvq_pv_512<3>(acc, pj, vt, n); break;
                default: kvq_pv_512<4>(acc, pj, vt, n); break;
            }
        }
    }
}

#endif // KVQ_HAVE_X86
