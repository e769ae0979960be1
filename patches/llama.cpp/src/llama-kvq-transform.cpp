// kvq: the Hadamard rotation and the kvq2 codebook (ggml-base only: tests/native links this file).
#include "llama-kvq-impl.h"

#include <cstring>

//
// Hadamard rotation
//

#ifdef KVQ_HAVE_X86
// kvq_hadamard of one 64-element chunk in eight registers: the same butterflies in the same
// order (in-register strides 1, 2, 4, then across registers 8, 16, 32), so the same bits.
KVQ_AVX2 static void kvq_hadamard64_avx2(float * y) {
    __m256 a[8];
    for (int c = 0; c < 8; ++c) a[c] = _mm256_loadu_ps(y + 8 * c);
    for (int c = 0; c < 8; ++c) {
        __m256 t = _mm256_permute_ps(a[c], 0xB1);                       // stride 1
        a[c] = _mm256_blend_ps(_mm256_add_ps(a[c], t), _mm256_sub_ps(t, a[c]), 0xAA);
        t = _mm256_permute_ps(a[c], 0x4E);                              // stride 2
        a[c] = _mm256_blend_ps(_mm256_add_ps(a[c], t), _mm256_sub_ps(t, a[c]), 0xCC);
        t = _mm256_permute2f128_ps(a[c], a[c], 1);                      // stride 4
        a[c] = _mm256_blend_ps(_mm256_add_ps(a[c], t), _mm256_sub_ps(t, a[c]), 0xF0);
    }
    for (int len = 1; len < 8; len <<= 1) {                             // strides 8, 16, 32
        for (int i = 0; i < 8; i += 2 * len) {
            for (int j = i; j < i + len; ++j) {
                const __m256 u = a[j], v = a[j + len];
                a[j] = _mm256_add_ps(u, v);
                a[j + len] = _mm256_sub_ps(u, v);
            }
        }
    }
    const __m256 k = _mm256_set1_ps(0.125f);
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(y + 8 * c, _mm256_mul_ps(a[c], k));
}
#endif

// Normalised fast Walsh-Hadamard transform over each 64-element chunk (self-inverse).
void kvq_hadamard(float * x, int n) {
#ifdef KVQ_HAVE_X86
    if (kvq_cpu_has_avx2()) {
        for (int c = 0; c < n; c += 64) kvq_hadamard64_avx2(x + c);
        return;
    }
#endif
    for (int c = 0; c < n; c += 64) {
        float * y = x + c;
        for (int len = 1; len < 64; len <<= 1) {
            for (int i = 0; i < 64; i += 2 * len) {
                for (int j = i; j < i + len; ++j) {
                    const float a = y[j], b = y[j + len];
                    y[j] = a + b;
                    y[j + len] = a - b;
                }
            }
        }
        for (int i = 0; i < 64; ++i) y[i] *= 0.125f;
    }
}

//
// kvq2 codebook
//

// kvq2's 256 codewords (4 values each, signs applied, step 1), read once from the type's own
// decoder (one block per 16 codes with d = 1), so the table lives in ggml only.
struct kvq_kvq2_grid_t {
    float w[256][4];
    kvq_kvq2_grid_t() {
        uint8_t blk[18];
        const ggml_fp16_t one = ggml_fp32_to_fp16(1.0f);
        for (int b = 0; b < 16; ++b) {
            memcpy(blk, &one, 2);
            for (int g = 0; g < 16; ++g) blk[2 + g] = (uint8_t) (16 * b + g);
            ggml_get_type_traits(GGML_TYPE_KVQ2)->to_float(blk, &w[16 * b][0], 64);
        }
    }
};
const float (*kvq_kvq2_grid())[4] {
    static const kvq_kvq2_grid_t G;
    return G.w;
}
