// kvq: the fused kernel's NEON tiles (aarch64, head_dim 64): kvq_tile_avx2's contract in Advanced
// SIMD, chosen at run time by kvq_isa_best (every aarch64 CPU has it). Only ARMv8.0 intrinsics,
// so any aarch64 target compiles it. ARM speed is not measured (no ARM machine); its correctness
// is checked under qemu-aarch64 (tests/native, scripts/kernel_test.py).
#include "llama-kvq-impl.h"

#ifdef KVQ_HAVE_NEON

#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstring>

//
// vector helpers
//

// exp(x) (Cephes polynomial as kvq_exp_avx2, ~1 ulp; clamps below -87.3).
static inline float32x4_t kvq_exp_neon(float32x4_t x) {
    x = vmaxq_f32(x, vdupq_n_f32(-87.33654f));
    x = vminq_f32(x, vdupq_n_f32(88.3762626647949f));
    const float32x4_t fx = vrndmq_f32(vfmaq_f32(vdupq_n_f32(0.5f), x, vdupq_n_f32(1.44269504088896341f)));
    x = vfmsq_f32(x, fx, vdupq_n_f32(0.693359375f));
    x = vfmsq_f32(x, fx, vdupq_n_f32(-2.12194440e-4f));
    const float32x4_t z = vmulq_f32(x, x);
    float32x4_t y = vdupq_n_f32(1.9875691500E-4f);
    y = vfmaq_f32(vdupq_n_f32(1.3981999507E-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(8.3334519073E-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(4.1665795894E-2f), y, x);
    y = vfmaq_f32(vdupq_n_f32(1.6666665459E-1f), y, x);
    y = vfmaq_f32(vdupq_n_f32(5.0000001201E-1f), y, x);
    y = vfmaq_f32(vaddq_f32(x, vdupq_n_f32(1.0f)), y, z);
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(fx), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}

static inline float kvq_h2f_neon(const uint8_t * p) {
    uint16_t h;
    memcpy(&h, p, sizeof(h));
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

// 16 signed bytes times d -> 16 floats
static inline void kvq_s8x16_neon(int8x16_t q, float32x4_t d, float * o) {
    const int16x8_t lo = vmovl_s8(vget_low_s8(q)), hi = vmovl_s8(vget_high_s8(q));
    vst1q_f32(o + 0,  vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)))));
    vst1q_f32(o + 4,  vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)))));
    vst1q_f32(o + 8,  vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)))));
    vst1q_f32(o + 12, vmulq_f32(d, vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)))));
}

// Decode n rows of 64 values (one head) to f32; rows n..n4 are zeroed.
static void kvq_dequant64_neon(ggml_type type, const uint8_t * base, size_t stride, int n, float * out) {
    const int n4 = (n + 3) & ~3;
    switch (type) {
        case GGML_TYPE_F16:
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                for (int c = 0; c < 8; ++c) {
                    const float16x8_t h = vreinterpretq_f16_u8(vld1q_u8(x + 16 * c));
                    vst1q_f32(o + 8 * c, vcvt_f32_f16(vget_low_f16(h)));
                    vst1q_f32(o + 8 * c + 4, vcvt_high_f32_f16(h));
                }
            }
            break;
        case GGML_TYPE_Q8_0: // {f16 d, int8 qs[32]}
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                for (int b = 0; b < 2; ++b, x += 34) {
                    const float32x4_t d = vdupq_n_f32(kvq_h2f_neon(x));
                    kvq_s8x16_neon(vreinterpretq_s8_u8(vld1q_u8(x + 2)), d, o + 32 * b);
                    kvq_s8x16_neon(vreinterpretq_s8_u8(vld1q_u8(x + 18)), d, o + 32 * b + 16);
                }
            }
            break;
        case GGML_TYPE_Q4_0: { // {f16 d, u8 qs[16]}: j -> low nibble of qs[j], j+16 -> high
            const uint8x16_t m4 = vdupq_n_u8(0xF);
            const int8x16_t eight = vdupq_n_s8(8);
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                for (int b = 0; b < 2; ++b, x += 18) {
                    const float32x4_t d = vdupq_n_f32(kvq_h2f_neon(x));
                    const uint8x16_t raw = vld1q_u8(x + 2);
                    // d * (code - 8), as the scalar tiles compute it
                    kvq_s8x16_neon(vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, m4)), eight), d, o + 32 * b);
                    kvq_s8x16_neon(vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), eight), d, o + 32 * b + 16);
                }
            }
            break;
        }
        default: { // KVQ2 {f16 d, u8 qs[16]}: group g of 4 values is d times codeword qs[g]
            const float (*G)[4] = kvq_kvq2_grid();
            for (int r = 0; r < n; ++r) {
                const uint8_t * x = base + r * stride;
                float * o = out + r * 64;
                const float32x4_t d = vdupq_n_f32(kvq_h2f_neon(x));
                for (int g = 0; g < 16; ++g) vst1q_f32(o + 4 * g, vmulq_f32(d, vld1q_f32(G[x[2 + g]])));
            }
            break;
        }
    }
    for (int r = n; r < n4; ++r) memset(out + r * 64, 0, 64 * sizeof(float));
}

// q . k over 64 values, as 4 partial sums (two chains for the FMA latency)
static inline float32x4_t kvq_dot64_neon(const float32x4_t * q, const float * k) {
    float32x4_t a = vmulq_f32(q[0], vld1q_f32(k));
    float32x4_t b = vmulq_f32(q[1], vld1q_f32(k + 4));
    for (int c = 2; c < 16; c += 2) {
        a = vfmaq_f32(a, q[c], vld1q_f32(k + 4 * c));
        b = vfmaq_f32(b, q[c + 1], vld1q_f32(k + 4 * c + 4));
    }
    return vaddq_f32(a, b);
}

//
// tiles
//

// One tile of n <= KVQ_KB rows for the B.G <= 64 query heads of KV head B.g (kvq_isa_supported).
// sbuf: [B.G][KVQ_KB] scores, then weights; kt, vt: KVQ_KB rows of 64 floats.
void kvq_tile_neon(const kvq_tile & T, const kvq_qblock & B, float * kt, float * vt, float * sbuf) {
    const int n = T.n, n4 = (n + 3) & ~3, ss = kvq_st_size(64);
    alignas(16) float spare[64] = {}; // accumulator of padding heads (zero weights)
    alignas(16) int32_t pos[KVQ_KB];
    alignas(16) float w[KVQ_KB][4];   // weights of 4 heads per row
    int32_t pmin = INT32_MAX, pmax = INT32_MIN, qmax = INT32_MIN;
    for (int r = 0; r < n; ++r) {
        pos[r] = T.pos[r];
        pmin = std::min(pmin, pos[r]);
        pmax = std::max(pmax, pos[r]);
    }
    for (int r = n; r < n4; ++r) pos[r] = INT32_MAX;
    for (int t = 0; t < B.nt; ++t) qmax = std::max(qmax, B.qpos[t]);
    if (pmin > qmax) return;
    kvq_dequant64_neon(T.tk, T.k, T.stride_k, n, kt);
    kvq_dequant64_neon(T.tv, T.v, T.stride_v, n, vt);
    const float32x4_t ninf = vdupq_n_f32(-INFINITY), zero = vdupq_n_f32(0.0f);
    for (int t = 0; t < B.nt; ++t) {
        const int32_t qp = B.qpos[t];
        if (pmin > qp) continue;
        const bool full = pmax <= qp && n == n4;
        const int32x4_t qpv = vdupq_n_s32(qp);
        bool live[64] = {}; // per query head of the group
        for (int j = 0; j < B.G; ++j) {
            const int h = B.g * B.G + j;
            float * sb = sbuf + (size_t) j * KVQ_KB;
            const float * qf = (T.rot ? B.qr : B.q) + ((size_t) t * B.n_head + h) * 64;
            float * st = B.st + ((size_t) t * B.n_head + h) * ss;
            float32x4_t q[16];
            for (int c = 0; c < 16; ++c) q[c] = vld1q_f32(qf + 4 * c);
            float32x4_t mxv = ninf;
            for (int r4 = 0; r4 < n4; r4 += 4) {
                const float * k = kt + r4 * 64;
                // [sum(d0), sum(d1), sum(d2), sum(d3)]
                float32x4_t s = vpaddq_f32(vpaddq_f32(kvq_dot64_neon(q, k), kvq_dot64_neon(q, k + 64)),
                                           vpaddq_f32(kvq_dot64_neon(q, k + 128), kvq_dot64_neon(q, k + 192)));
                if (!full) s = vbslq_f32(vcgtq_s32(vld1q_s32(pos + r4), qpv), ninf, s);
                vst1q_f32(sb + r4, s);
                mxv = vmaxq_f32(mxv, s);
            }
            if (B.wsc) memcpy(B.wsc + ((size_t) t * B.n_head + h) * B.wsc_n + T.row0, sb, n * sizeof(float));
            const float mx = vmaxvq_f32(mxv);
            if (mx == -INFINITY) continue;
            if (mx > st[0]) {
                const float c = expf(st[0] - mx);
                st[1] *= c;
                st[2] *= c;
                const float32x4_t cv = vdupq_n_f32(c);
                for (int e = 0; e < 128; e += 4) vst1q_f32(st + 4 + e, vmulq_f32(cv, vld1q_f32(st + 4 + e)));
                st[0] = mx;
            }
            const float32x4_t mv = vdupq_n_f32(st[0]);
            float32x4_t lv = zero, tv = zero;
            for (int r4 = 0; r4 < n4; r4 += 4) {
                const float32x4_t s = vld1q_f32(sb + r4);
                const uint32x4_t valid = vmvnq_u32(vceqq_f32(s, ninf));
                const float32x4_t p = vbslq_f32(valid, kvq_exp_neon(vsubq_f32(s, mv)), zero);
                lv = vaddq_f32(lv, p);
                tv = vfmaq_f32(tv, p, vbslq_f32(valid, s, zero));
                vst1q_f32(sb + r4, p);
            }
            st[1] += vaddvq_f32(lv);
            st[2] += vaddvq_f32(tv);
            live[j] = true;
        }
        // V: 4 heads of the group per pass over the tile, a quarter row (16 values) at a time:
        // 16 accumulators, 4 V vectors and the 4 heads' weights of the row in one vector
        // (vfmaq_laneq_f32) fit the 32 registers.
        for (int j0 = 0; j0 < B.G; j0 += 4) {
            const int nj = std::min(4, B.G - j0);
            float * acc[4];
            bool any = false;
            for (int u = 0; u < 4; ++u) {
                const int j = j0 + u;
                acc[u] = u < nj ? B.st + ((size_t) t * B.n_head + B.g * B.G + j) * ss + 4 + (T.rot ? 64 : 0) : spare;
                any = any || (u < nj && live[j]);
            }
            if (!any) continue;
            uint32_t used = 0; // rows with a non-zero weight (masked rows have none)
            for (int r = 0; r < n; ++r) {
                for (int u = 0; u < 4; ++u) {
                    w[r][u] = u < nj && live[j0 + u] ? sbuf[(size_t) (j0 + u) * KVQ_KB + r] : 0.0f;
                    if (w[r][u] != 0.0f) used |= 1u << r;
                }
            }
            for (int qtr = 0; qtr < 4; ++qtr) {
                float32x4_t a0[4], a1[4], a2[4], a3[4];
                for (int c = 0; c < 4; ++c) {
                    a0[c] = vld1q_f32(acc[0] + 16 * qtr + 4 * c);
                    a1[c] = vld1q_f32(acc[1] + 16 * qtr + 4 * c);
                    a2[c] = vld1q_f32(acc[2] + 16 * qtr + 4 * c);
                    a3[c] = vld1q_f32(acc[3] + 16 * qtr + 4 * c);
                }
                for (int r = 0; r < n; ++r) {
                    if (!(used >> r & 1)) continue;
                    const float32x4_t p = vld1q_f32(w[r]);
                    const float * v = vt + r * 64 + 16 * qtr;
                    for (int c = 0; c < 4; ++c) {
                        const float32x4_t x = vld1q_f32(v + 4 * c);
                        a0[c] = vfmaq_laneq_f32(a0[c], x, p, 0);
                        a1[c] = vfmaq_laneq_f32(a1[c], x, p, 1);
                        a2[c] = vfmaq_laneq_f32(a2[c], x, p, 2);
                        a3[c] = vfmaq_laneq_f32(a3[c], x, p, 3);
                    }
                }
                for (int c = 0; c < 4; ++c) {
                    vst1q_f32(acc[0] + 16 * qtr + 4 * c, a0[c]);
                    vst1q_f32(acc[1] + 16 * qtr + 4 * c, a1[c]);
                    vst1q_f32(acc[2] + 16 * qtr + 4 * c, a2[c]);
                    vst1q_f32(acc[3] + 16 * qtr + 4 * c, a3[c]);
                }
            }
        }
    }
}

#endif // KVQ_HAVE_NEON
