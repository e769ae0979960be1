// kvq: reference and debug access (read back, round trips, attention on given queries).
#include "llama-kvq-impl.h"

#include <cmath>
#include <cstring>

//
// reference access
//

int64_t llama_kvq_read_layer(const llama_context * ctx, int32_t il, float * k, float * v, int32_t * pos,
                             int32_t * prec, int64_t cap) {
    const llama_kvq_state * s = kvq_of(ctx);
    if (!s) return kvq_fail("kvq is not enabled");
    if (il < 0 || il >= s->n_layer) return kvq_fail("layer out of range");
    const kvq_seq & S = s->seqs[0]; // sequence 0 (tests and training run one sequence)
    const kvq_layer & L = S.used() ? S.layers[il] : s->proto;
    int64_t n = 0;
    for (int q = 0; q < LLAMA_KVQ_N_STORED; ++q) {
        const kvq_pool & P = L.pools[q];
        for (size_t r = 0; r < P.n(); ++r, ++n) {
            if (n >= cap) continue;
            if (k) kvq_decode_row(*s, P, false, P.k.data() + r * P.row_k, k + n * s->n_embd_kv);
            if (v) kvq_decode_row(*s, P, true, P.v.data() + r * P.row_v, v + n * s->n_embd_kv);
            if (pos) pos[n] = P.pos[r];
            if (prec) prec[n] = q;
        }
    }
    return n;
}

// Rows x stored at `bits` on one side (0: K, 1: V, with v_unbias's rescale when it is on) and decoded back.
static int32_t kvq_roundtrip(const llama_context * ctx, int32_t bits, int side, const float * x, float * y, int64_t n_rows) {
    const llama_kvq_state * s = kvq_of(ctx);
    if (!s) return kvq_fail("kvq is not enabled");
    const int q = kvq_stored_pool_of_bits(bits);
    if (q < 0 || q == LLAMA_KVQ_K4V2) return kvq_fail("round-trip bits must be 16, 8, 4 or 2 (pool 3 is K at 4 bits, V at 2)");
    const kvq_pool & P = s->proto.pools[q];
    std::vector<uint8_t> enc(side ? P.row_v : P.row_k);
    std::vector<float> tmp(s->n_embd_kv);
    for (int64_t r = 0; r < n_rows; ++r) {
        kvq_encode(*s, P, side, x + r * s->n_embd_kv, enc.data(), tmp.data());
        kvq_decode_row(*s, P, side != 0, enc.data(), y + r * s->n_embd_kv);
    }
    return 0;
}

int32_t llama_kvq_roundtrip(const llama_context * ctx, int32_t bits, const float * x, float * y, int64_t n_rows) {
    return kvq_roundtrip(ctx, bits, 0, x, y, n_rows);
}

int32_t llama_kvq_roundtrip_v(const llama_context * ctx, int32_t bits, const float * x, float * y, int64_t n_rows) {
    return kvq_roundtrip(ctx, bits, 1, x, y, n_rows);
}

int32_t llama_kvq_roundtrip_qar(const llama_context * ctx, int32_t bits, const float * x, const float * u, float * y,
                                int64_t n_rows) {
    const llama_kvq_state * s = kvq_of(ctx);
    if (!s) return kvq_fail("kvq is not enabled");
    if (!u || !(s->p.qar_mu > 0.0f) || s->hd != 64 || (bits != 2 && bits != 4)) {
        return llama_kvq_roundtrip(ctx, bits, x, y, n_rows);
    }
    const kvq_pool & P = s->proto.pools[kvq_pool_of_bits(bits)];
    const int n = s->n_embd_kv;
    std::vector<uint8_t> enc(P.row_k);
    std::vector<float> xr(n), ur(n);
    for (int64_t r = 0; r < n_rows; ++r) {
        // as kvq_exit_prepare and kvq_exit_append do: pool space, per-head unit directions
        memcpy(xr.data(), x + r * n, n * sizeof(float));
        memcpy(ur.data(), u + r * n, n * sizeof(float));
        if (P.rotated) {
            kvq_hadamard(xr.data(), n);
            kvq_hadamard(ur.data(), n);
        }
        kvq_qar_unit_heads(ur.data(), s->n_head_kv);
        ggml_get_type_traits_cpu(P.tk)->from_float(xr.data(), enc.data(), n);
        kvq_qar_row(P.tk, enc.data(), P.head_k, xr.data(), ur.data(), s->n_head_kv, s->p.qar_mu);
        kvq_decode_row(*s, P, false, enc.data(), y + r * n);
    }
    return 0;
}

int32_t llama_kvq_attend(llama_context * ctx, int32_t il, const float * q, int32_t n_q, const int32_t * q_pos, float * out) {
    return llama_kvq_attend_kernel(ctx, LLAMA_KVQ_ATTN_DEFAULT, il, q, n_q, q_pos, out);
}

const char * llama_kvq_attn_isa(const llama_context * ctx) {
    const llama_kvq_state * s = kvq_of(ctx);
    return s ? kvq_isa_name(s->isa) : nullptr;
}

int32_t llama_kvq_attend_kernel(llama_context * ctx, int32_t kernel, int32_t il, const float * q, int32_t n_q,
                                const int32_t * q_pos, float * out) {
    llama_kvq_state * s = kvq_of(ctx);
    if (!s) return kvq_fail("kvq is not enabled");
    if (il < 0 || il >= s->n_layer) return kvq_fail("layer out of range");
    if (kernel < LLAMA_KVQ_ATTN_DEFAULT || kernel > LLAMA_KVQ_ATTN_FUSED_NEON) return kvq_fail("unknown attention kernel");
    if (n_q < 0) return kvq_fail("n_q must be >= 0");
    const int n_group = s->n_head / s->n_head_kv;
    kvq_isa isa = s->isa;
    switch (kernel) {
        case LLAMA_KVQ_ATTN_FUSED_SCALAR: isa = KVQ_ISA_SCALAR; break;
        case LLAMA_KVQ_ATTN_FUSED_SIMD:   isa = kvq_isa_best(s->hd, n_group); break;
        case LLAMA_KVQ_ATTN_FUSED_AVX2:   isa = KVQ_ISA_AVX2; break;
        case LLAMA_KVQ_ATTN_FUSED_AVX512: isa = KVQ_ISA_AVX512; break;
        case LLAMA_KVQ_ATTN_FUSED_NEON:   isa = KVQ_ISA_NEON; break;
        default: break;
    }
    if (kernel >= LLAMA_KVQ_ATTN_FUSED_SIMD && (isa == KVQ_ISA_SCALAR || !kvq_isa_supported(isa, s->hd, n_group))) {
        return kvq_fail("no such SIMD attention tiles here: they need head_dim 64, at most 64 query heads per KV head "
                        "and the CPU's support (AVX2 + FMA + F16C, AVX-512 F/BW/VL/DQ, or NEON)");
    }
    std::vector<float> buf;
    const float scale = 1.0f / std::sqrt((float) s->hd);
    kvq_layer empty = s->proto;
    kvq_layer & L = s->seqs[0].used() ? s->seqs[0].layers[il] : empty; // sequence 0's rows
    const bool ref = kernel == LLAMA_KVQ_ATTN_REF || (kernel == LLAMA_KVQ_ATTN_DEFAULT && s->attn_ref);
    if (!ref) {
        // same chunking as in a graph; one thread runs every work item
        const kvq_isa isa0 = s->isa;
        s->isa = isa;
        const int nc = kvq_n_chunks(kvq_layer_rows(L), kvq_chunk_slots(s->n_ctx));
        std::vector<float> part((size_t) nc * n_q * s->n_head * kvq_st_size(s->hd));
        const kvq_qsrc qs{ (const char *) q, s->hd * sizeof(float), (size_t) s->n_head * s->hd * sizeof(float) };
        const kvq_qset Q{ n_q, nullptr, q_pos, 0 };
        kvq_fused_partial(*s, L, qs, Q, scale, part.data(), nc, 0, 1, buf, nullptr, 0);
        kvq_fused_merge(*s, L, 0, part.data(), nc, Q, (char *) out, (size_t) s->n_head * s->hd * sizeof(float),
                        0, 1, false, nullptr, 0, qs);
        s->isa = isa0;
        return 0;
    }
    for (int32_t i = 0; i < n_q; ++i) {
        for (int g = 0; g < s->n_head_kv; ++g) {
            kvq_attend_group(*s, L, q + (int64_t) i * s->n_head * s->hd, q_pos[i], g, scale,
                             out + (int64_t) i * s->n_head * s->hd, buf, -1, -1);
        }
    }
    return 0;
}
