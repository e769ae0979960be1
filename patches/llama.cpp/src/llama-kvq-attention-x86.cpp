// kvq: the fused kernel's AVX2 + FMA + F16C pieces (head_dim 64), compiled for that target
// and chosen at run time (kvq_isa_best): K/V tiles, received attention,
// query-aware rounding's accumulation.
#include "llama-kvq-impl.h"

#include <algorithm>
#include <cmath>
#include <cstring>

bool kvq_cpu_has_avx2() {
#ifdef KVQ_HAVE_X86
    static const bool ok = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }();
    return ok;
#else
    return false;
#endif
}

bool kvq_cpu_has_avx512() {
#ifdef KVQ_HAVE_X86
    static const bool ok = [] {
        __builtin_cpu_init();
        return kvq_cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    }();
    return ok;
#else
    return false;
#endif
}

bool kvq_cpu_has_avx512_int() {
#ifdef KVQ_HAVE_X86
    static const bool ok = [] {
        __builtin_cpu_init();
        return kvq_cpu_has_avx512() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
    }();
    return ok;
#else
    return false;
#endif
}

#ifdef KVQ_HAVE_X86

//
// vector helpers
//

KVQ_AVX2 static inline float kvq_hsum_avx2(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

KVQ_AVX2 static inline float kvq_hmax_avx2(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

// [sum(v0), ..., sum(v7)]
KVQ_AVX2 static inline __m256 kvq_hsum8_avx2(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5,
                                             __m256 v6, __m256 v7) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// exp(x) for x <= 0 (Cephes polynomial, ~1 ulp; clamps below -87.3).
KVQ_AVX2 static inline __m256 kvq_exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
    fx = _mm256_floor_ps(fx);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

KVQ_AVX2 static inline float kvq_h2f_avx2(const uint8_t * p) {
    uint16_t h;
    memcpy(&h, p, sizeof(h));
    return _cvtsh_ss(h);
}

// 8 unsigned bytes -> 8 floats
KVQ_AVX2 static inline __m256 kvq_u8x8_avx2(__m128i b) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}

// Decode n rows of 64 values (one head) to f32; rows n..n8 are zeroed.
KVQ_AVX2 static void kvq_dequant64_avx2(ggml_type type, const uint8_t * base, size_t stride, int n, float * out) {
    const int n8 = (n + 7) & ~7;
    switch (type) {
        case GGML_TYPE_F16:
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                for (int c = 0; c < 8; ++c) {
                    _mm256_storeu_ps(o + 8 * c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + 16 * c))));
                }
            }
            break;
        case GGML_TYPE_Q8_0:
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                for (int b = 0; b < 2; ++b, x += 34) {
                    const __m256 d = _mm256_set1_ps(kvq_h2f_avx2(x));
                    for (int c = 0; c < 4; ++c) {
                        const __m128i q = _mm_loadl_epi64((const __m128i *) (x + 2 + 8 * c));
                        _mm256_storeu_ps(o + 32 * b + 8 * c, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
                    }
                }
            }
            break;
        case GGML_TYPE_Q4_0: {
            const __m128i m4 = _mm_set1_epi8(0xF);
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                for (int b = 0; b < 2; ++b, x += 18) {
                    const float df = kvq_h2f_avx2(x);
                    const __m256 d = _mm256_set1_ps(df), off = _mm256_set1_ps(-8.0f * df);
                    const __m128i raw = _mm_loadu_si128((const __m128i *) (x + 2));
                    const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
                    float * ob = o + 32 * b;
                    _mm256_storeu_ps(ob + 0,  _mm256_fmadd_ps(kvq_u8x8_avx2(lo), d, off));
                    _mm256_storeu_ps(ob + 8,  _mm256_fmadd_ps(kvq_u8x8_avx2(_mm_srli_si128(lo, 8)), d, off));
                    _mm256_storeu_ps(ob + 16, _mm256_fmadd_ps(kvq_u8x8_avx2(hi), d, off));
                    _mm256_storeu_ps(ob + 24, _mm256_fmadd_ps(kvq_u8x8_avx2(_mm_srli_si128(hi, 8)), d, off));
                }
            }
            break;
        }
        default: { // KVQ2: two codewords (4 floats each) per 8 values
            const float (*G)[4] = kvq_kvq2_grid();
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                const __m256 d = _mm256_set1_ps(kvq_h2f_avx2(x));
                for (int g = 0; g < 16; g += 2) {
                    const __m256 w = _mm256_set_m128(_mm_loadu_ps(G[x[3 + g]]), _mm_loadu_ps(G[x[2 + g]]));
                    _mm256_storeu_ps(o + 4 * g, _mm256_mul_ps(d, w));
                }
            }
            break;
        }
    }
    for (int r = n; r < n8; ++r) memset(out + r * 64, 0, 64 * sizeof(float));
}

KVQ_AVX2 static inline __m256 kvq_dot64_avx2(const __m256 * q, const float * k) {
    __m256 a = _mm256_mul_ps(q[0], _mm256_loadu_ps(k));
    __m256 b = _mm256_mul_ps(q[1], _mm256_loadu_ps(k + 8));
    a = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(k + 16), a);
    b = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(k + 24), b);
    a = _mm256_fmadd_ps(q[4], _mm256_loadu_ps(k + 32), a);
    b = _mm256_fmadd_ps(q[5], _mm256_loadu_ps(k + 40), b);
    a = _mm256_fmadd_ps(q[6], _mm256_loadu_ps(k + 48), a);
    b = _mm256_fmadd_ps(q[7], _mm256_loadu_ps(k + 56), b);
    return _mm256_add_ps(a, b);
}

//
// tiles, features
//

// One tile of n <= KVQ_KB rows for the B.G <= 64 query heads of KV head B.g (kvq_isa_supported).
KVQ_AVX2 void kvq_tile_avx2(const kvq_tile & T, const kvq_qblock & B, float * kt, float * vt, float * sbuf) {
    const int n = T.n, n8 = (n + 7) & ~7, ss = kvq_st_size(64);
    alignas(32) float zero[KVQ_KB] = {};
    alignas(32) float spare[64] = {}; // accumulator of padding heads (zero weights)
    alignas(32) int32_t pos[KVQ_KB];
    int32_t pmin = INT32_MAX, pmax = INT32_MIN, qmax = INT32_MIN;
    for (int r = 0; r < n; ++r) {
        pos[r] = T.pos[r];
        pmin = std::min(pmin, pos[r]);
        pmax = std::max(pmax, pos[r]);
    }
    for (int r = n; r < n8; ++r) pos[r] = INT32_MAX;
    for (int t = 0; t < B.nt; ++t) qmax = std::max(qmax, B.qpos[t]);
    if (pmin > qmax) return;
    kvq_dequant64_avx2(T.tk, T.k, T.stride_k, n, kt);
    kvq_dequant64_avx2(T.tv, T.v, T.stride_v, n, vt);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    for (int t = 0; t < B.nt; ++t) {
        const int32_t qp = B.qpos[t];
        if (pmin > qp) continue;
        const bool full = pmax <= qp && n == n8;
        const __m256i qpv = _mm256_set1_epi32(qp);
        bool live[64] = {}; // per query head of the group
        for (int j = 0; j < B.G; ++j) {
            const int h = B.g * B.G + j;
            float * sb = sbuf + (size_t) j * KVQ_KB;
            const float * qf = (T.rot ? B.qr : B.q) + ((size_t) t * B.n_head + h) * 64;
            float * st = B.st + ((size_t) t * B.n_head + h) * ss;
            __m256 q[8];
            for (int c = 0; c < 8; ++c) q[c] = _mm256_loadu_ps(qf + 8 * c);
            __m256 mxv = ninf;
            for (int r8 = 0; r8 < n8; r8 += 8) {
                const float * k = kt + r8 * 64;
                __m256 s = kvq_hsum8_avx2(kvq_dot64_avx2(q, k), kvq_dot64_avx2(q, k + 64), kvq_dot64_avx2(q, k + 128),
                                          kvq_dot64_avx2(q, k + 192), kvq_dot64_avx2(q, k + 256), kvq_dot64_avx2(q, k + 320),
                                          kvq_dot64_avx2(q, k + 384), kvq_dot64_avx2(q, k + 448));
                if (!full) {
                    const __m256i pv = _mm256_load_si256((const __m256i *) (pos + r8));
                    s = _mm256_blendv_ps(s, ninf, _mm256_castsi256_ps(_mm256_cmpgt_epi32(pv, qpv)));
                }
                _mm256_storeu_ps(sb + r8, s);
                mxv = _mm256_max_ps(mxv, s);
            }
            if (B.wsc) memcpy(B.wsc + ((size_t) t * B.n_head + h) * B.wsc_n + T.row0, sb, n * sizeof(float));
            const float mx = kvq_hmax_avx2(mxv);
            if (mx == -INFINITY) continue;
            if (mx > st[0]) {
                const float c = expf(st[0] - mx);
                st[1] *= c;
                st[2] *= c;
                const __m256 cv = _mm256_set1_ps(c);
                for (int e = 0; e < 128; e += 8) _mm256_storeu_ps(st + 4 + e, _mm256_mul_ps(cv, _mm256_loadu_ps(st + 4 + e)));
                st[0] = mx;
            }
            const __m256 mv = _mm256_set1_ps(st[0]);
            __m256 lv = _mm256_setzero_ps(), tv = _mm256_setzero_ps();
            for (int r8 = 0; r8 < n8; r8 += 8) {
                const __m256 s = _mm256_loadu_ps(sb + r8);
                const __m256 valid = _mm256_cmp_ps(s, ninf, _CMP_NEQ_OQ);
                const __m256 p = _mm256_and_ps(kvq_exp_avx2(_mm256_sub_ps(s, mv)), valid);
                lv = _mm256_add_ps(lv, p);
                tv = _mm256_fmadd_ps(p, _mm256_and_ps(s, valid), tv);
                _mm256_storeu_ps(sb + r8, p);
            }
            st[1] += kvq_hsum_avx2(lv);
            st[2] += kvq_hsum_avx2(tv);
            live[j] = true;
        }
        // V: up to 3 heads of the group per pass over the tile, half a row (32 values) at a
        // time so the accumulators (3 x 4) and a V vector fit the 16 registers.
        for (int j0 = 0; j0 < B.G; j0 += 3) {
            const int nj = std::min(3, B.G - j0);
            float * acc[3];
            const float * pj[3];
            bool any = false;
            for (int u = 0; u < 3; ++u) {
                const int j = j0 + u;
                acc[u] = u < nj ? B.st + ((size_t) t * B.n_head + B.g * B.G + j) * ss + 4 + (T.rot ? 64 : 0) : spare;
                pj[u] = u < nj && live[j] ? sbuf + (size_t) j * KVQ_KB : zero;
                any = any || (u < nj && live[j]);
            }
            if (!any) continue;
            for (int half = 0; half < 2; ++half) {
                __m256 a0[4], a1[4], a2[4];
                for (int c = 0; c < 4; ++c) {
                    a0[c] = _mm256_loadu_ps(acc[0] + 32 * half + 8 * c);
                    a1[c] = _mm256_loadu_ps(acc[1] + 32 * half + 8 * c);
                    a2[c] = _mm256_loadu_ps(acc[2] + 32 * half + 8 * c);
                }
                for (int r = 0; r < n; ++r) {
                    const float w0 = pj[0][r], w1 = pj[1][r], w2 = pj[2][r];
                    if (w0 == 0.0f && w1 == 0.0f && w2 == 0.0f) continue; // masked row
                    const __m256 p0 = _mm256_set1_ps(w0), p1 = _mm256_set1_ps(w1), p2 = _mm256_set1_ps(w2);
                    const float * v = vt + r * 64 + 32 * half;
                    for (int c = 0; c < 4; ++c) {
                        const __m256 x = _mm256_loadu_ps(v + 8 * c);
                        a0[c] = _mm256_fmadd_ps(p0, x, a0[c]);
                        a1[c] = _mm256_fmadd_ps(p1, x, a1[c]);
                        a2[c] = _mm256_fmadd_ps(p2, x, a2[c]);
                    }
                }
                for (int c = 0; c < 4; ++c) {
                    _mm256_storeu_ps(acc[0] + 32 * half + 8 * c, a0[c]);
                    _mm256_storeu_ps(acc[1] + 32 * half + 8 * c, a1[c]);
                    _mm256_storeu_ps(acc[2] + 32 * half + 8 * c, a2[c]);
                }
            }
        }
    }
}

// Received attention of window rows r < n with pos[r] < qp: recv[r*nh] += exp(sc[r] - M) * rel.
// Scores of the other rows may be stale; they are clamped, then skipped.
KVQ_AVX2 void kvq_recv_avx2(const float * sc, const int32_t * pos, size_t n, int32_t qp, float M, float rel,
                                   float * recv, int32_t * nq, int nh) {
    alignas(32) float e[8];
    size_t r = 0;
    for (; r + 8 <= n; r += 8) {
        const __m256 x = _mm256_min_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + r), _mm256_set1_ps(M)), _mm256_setzero_ps());
        _mm256_store_ps(e, _mm256_mul_ps(kvq_exp_avx2(x), _mm256_set1_ps(rel)));
        for (int k = 0; k < 8; ++k) {
            if (pos[r + k] < qp) {
                recv[(r + k) * nh] += e[k];
                nq[(r + k) * nh] += 1;
            }
        }
    }
    for (; r < n; ++r) {
        if (pos[r] < qp) {
            recv[r * nh] += expf(sc[r] - M) * rel;
            nq[r * nh] += 1;
        }
    }
}


// kvq_qacc_add for the G query heads of one KV head (hd 64) in one pass over the window rows:
// per row r with pos[r] < qp, acc[r * stride + e] += sum_j p_j^2 q_j[e], p_j = exp(sc_j[r] - M_j) * inv_l_j
// (sc_j = sc + j * sc_n), the row's accumulator loaded and stored once for all G heads.
KVQ_AVX2 void kvq_qacc_group_avx2(float * acc, size_t stride, const int32_t * pos, size_t n, int32_t qp,
                                         const float * sc, int64_t sc_n, const float * M, const float * inv_l,
                                         const float * const * qh, int G) {
    alignas(32) float w[8][8]; // [head j][row k of the block]
    for (size_t r0 = 0; r0 < n; r0 += 8) {
        const size_t nb = std::min<size_t>(8, n - r0);
        for (int j = 0; j < G; ++j) {
            const float * sj = sc + j * sc_n + r0;
            if (nb == 8) {
                const __m256 x = _mm256_min_ps(_mm256_sub_ps(_mm256_loadu_ps(sj), _mm256_set1_ps(M[j])), _mm256_setzero_ps());
                const __m256 p = _mm256_mul_ps(kvq_exp_avx2(x), _mm256_set1_ps(inv_l[j]));
                _mm256_store_ps(w[j], _mm256_mul_ps(p, p));
            } else {
                for (size_t k = 0; k < nb; ++k) {
                    const float p = pos[r0 + k] < qp ? expf(sj[k] - M[j]) * inv_l[j] : 0.0f;
                    w[j][k] = p * p;
                }
            }
        }
        for (size_t k = 0; k < nb; ++k) {
            if (pos[r0 + k] >= qp) continue;
            float * a = acc + (r0 + k) * stride;
            __m256 a0 = _mm256_loadu_ps(a),      a1 = _mm256_loadu_ps(a + 8),  a2 = _mm256_loadu_ps(a + 16), a3 = _mm256_loadu_ps(a + 24);
            __m256 a4 = _mm256_loadu_ps(a + 32), a5 = _mm256_loadu_ps(a + 40), a6 = _mm256_loadu_ps(a + 48), a7 = _mm256_loadu_ps(a + 56);
            for (int j = 0; j < G; ++j) {
                if (!(w[j][k] > 1e-12f)) continue;
                const __m256 b = _mm256_set1_ps(w[j][k]);
                const float * q = qh[j];
                a0 = _mm256_fmadd_ps(b, _mm256_loadu_ps(q),      a0);
                a1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(q + 8),  a1);
                a2 = _mm256_fmadd_ps(b, _mm256_loadu_ps(q + 16), a2);
                a3 = _mm256_fmadd_ps(b, _mm256_loadu_ps(q + 24), a3);
                a4 = _mm256_fmadd_ps(b, _mm256_loadu_ps(q + 32), a4);
                a5 = _mm256_fmadd_ps(b, _mm256_loadu_ps(q + 40), a5);
                a6 = _mm256_fmadd_ps(b, _mm256_loadu_ps(q + 48), a6);
                a7 = _mm256_fmadd_ps(b, _mm256_loadu_ps(q + 56), a7);
            }
            _mm256_storeu_ps(a, a0);      _mm256_storeu_ps(a + 8, a1);  _mm256_storeu_ps(a + 16, a2); _mm256_storeu_ps(a + 24, a3);
            _mm256_storeu_ps(a + 32, a4); _mm256_storeu_ps(a + 40, a5); _mm256_storeu_ps(a + 48, a6); _mm256_storeu_ps(a + 56, a7);
        }
    }
}
#endif // KVQ_HAVE_X86
