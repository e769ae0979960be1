// test for GGML_TYPE_KVQ2
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdint.h>
#include <time.h>
#include "ggml.h"
#include "ggml-cpu.h"

void quantize_row_kvq2_ref(const float *x, void *y, int64_t k);
void dequantize_row_kvq2(const void *x, float *y, int64_t k);
void ggml_vec_dot_kvq2_q8_0(int n, float *s, size_t bs, const void *vx, size_t bx, const void *vy, size_t by, int nrc);

static int fails = 0;
#define CHECK(c, ...) do { if (!(c)) { fails++; printf("FAIL: " __VA_ARGS__); printf("\n"); } else { printf("ok:   " __VA_ARGS__); printf("\n"); } } while (0)

static uint64_t s = 88172645463325252ull;
static double urand(void){ s^=s<<13; s^=s>>7; s^=s<<17; return ((s>>11)+0.5)*(1.0/9007199254740992.0);}
static double gauss(void){ double u=urand(),v=urand(); return sqrt(-2*log(u))*cos(2*M_PI*v);}
static double laplace(void){ double u=urand()-0.5; return (u<0?1:-1)*log(1-2*fabs(u));}
static double student4(void){ double z=gauss(); double c=0; for(int i=0;i<4;i++){double g=gauss(); c+=g*g;} return z/sqrt(c/4);}
static void wht64(float *x){ for(int h=1;h<64;h*=2) for(int i=0;i<64;i+=2*h) for(int j=i;j<i+h;j++){float a=x[j],b=x[j+h];x[j]=a+b;x[j+h]=a-b;} for(int i=0;i<64;i++) x[i]*=0.125f;}

static void gen(float *x, int64_t n, int dist, int had) {
    for (int64_t i = 0; i < n; i++) x[i] = dist==0 ? gauss() : dist==1 ? laplace() : student4();
    if (had) for (int64_t i = 0; i < n; i += 64) wht64(x + i);
}

// round trip through a type via ggml_quantize_chunk + to_float
static double nmse_type(enum ggml_type t, const float *x, int64_t nrows, int64_t n) {
    size_t rs = ggml_row_size(t, n);
    void *q = malloc(rs*nrows); float *y = malloc(sizeof(float)*n*nrows);
    ggml_quantize_chunk(t, x, q, 0, nrows, n, NULL);
    ggml_get_type_traits(t)->to_float(q, y, n*nrows);
    double se=0, sx=0; for (int64_t i=0;i<n*nrows;i++){ se+=(x[i]-y[i])*(double)(x[i]-y[i]); sx+=x[i]*(double)x[i]; }
    free(q); free(y); return se/sx;
}

int main(void) {
    ggml_cpu_init();
    const enum ggml_type T = GGML_TYPE_KVQ2;

    // ---- 1. traits ----
    printf("== traits\n");
    CHECK(strcmp(ggml_type_name(T), "kvq2") == 0, "ggml_type_name = %s", ggml_type_name(T));
    CHECK(ggml_blck_size(T) == 64 && ggml_type_size(T) == 18, "blck_size %lld type_size %zu", (long long)ggml_blck_size(T), ggml_type_size(T));
    CHECK(ggml_row_size(T, 64) == 18 && ggml_row_size(T, 4096) == 1152, "row_size(64)=%zu row_size(4096)=%zu  -> %.3f bpw", ggml_row_size(T,64), ggml_row_size(T,4096), 8.0*ggml_row_size(T,4096)/4096);
    CHECK(ggml_is_quantized(T) && !ggml_quantize_requires_imatrix(T), "is_quantized, no imatrix");
    const struct ggml_type_traits_cpu *tc = ggml_get_type_traits_cpu(T);
    CHECK(tc->from_float && tc->vec_dot && tc->vec_dot_type == GGML_TYPE_Q8_0 && tc->nrows == 1, "cpu traits: vec_dot_type=%s", ggml_type_name(tc->vec_dot_type));

    // ---- 2. round-trip error ----
    printf("== normalised MSE (sum err^2 / sum x^2), 20000 rows x 64, via ggml_quantize_chunk + to_float\n");
    const int64_t NR = 20000, N = 64;
    float *x = malloc(sizeof(float)*NR*N);
    const char *dn[3] = {"gauss","laplace","t4"};
    const enum ggml_type types[3] = {GGML_TYPE_KVQ2, GGML_TYPE_Q2_0, GGML_TYPE_Q4_0};
    // scalar 2-bit codes with one step per 64 values (layout C of sim.c, exhaustive step search), the
    // layout before the 4-value codebook
    const double expect_h[3] = {0.1129, 0.1101, 0.1079};
    printf("%-6s", "type");
    for (int h=0;h<2;h++) for (int d=0;d<3;d++) printf(" %10s%s", dn[d], h?"+H":"  ");
    printf("\n");
    double nm[3][2][3];
    for (int ti=0; ti<3; ti++) {
        printf("%-6s", ggml_type_name(types[ti]));
        for (int h=0;h<2;h++) for (int d=0;d<3;d++) {
            s = 88172645463325252ull + d*1000 + h; gen(x, NR*N, d, h);
            nm[ti][h][d] = nmse_type(types[ti], x, NR, N);
            printf(" %12.5f", nm[ti][h][d]);
        }
        printf("\n");
    }
    for (int d=0; d<3; d++) CHECK(nm[0][1][d] < 0.9*expect_h[d], "kvq2 %s+H nmse %.5f more than 10%% below scalar 2-bit codes' %.4f (sim.c layout C)", dn[d], nm[0][1][d], expect_h[d]);

    // ---- 3. from_float == ref bytes; quantize_chunk == ref; validate ----
    printf("== byte equality\n");
    {
        s = 42; gen(x, NR*N, 0, 1);
        size_t bytes = ggml_row_size(T, NR*N);
        uint8_t *a = malloc(bytes), *b = malloc(bytes), *c = malloc(bytes);
        quantize_row_kvq2_ref(x, a, NR*N);
        tc->from_float(x, b, NR*N);
        ggml_quantize_chunk(T, x, c, 0, NR, N, NULL);
        CHECK(memcmp(a, b, bytes) == 0, "cpu from_float bytes == quantize_row_kvq2_ref bytes (%zu bytes)", bytes);
        CHECK(memcmp(a, c, bytes) == 0, "ggml_quantize_chunk bytes == ref bytes");
        CHECK(ggml_validate_row_data(T, a, bytes), "ggml_validate_row_data ok");
        ggml_get_type_traits(T)->from_float_ref(x, b, NR*N);
        CHECK(memcmp(a, b, bytes) == 0, "type_traits from_float_ref == ref");
        free(a); free(b); free(c);
        // edge cases
        float e[3*64]; uint8_t qb[54]; float r[3*64];
        for (int i=0;i<64;i++){ e[i]=0; e[64+i]=1.25f; e[128+i] = (i==7) ? 1000.f : 0.01f*(i%5); }
        quantize_row_kvq2_ref(e, qb, 3*64); dequantize_row_kvq2(qb, r, 3*64);
        // no codeword keeps a lone 1000x outlier exact (the Hadamard rotation spreads such spikes
        // before rows reach the type): it stays the block's largest value at its least-squares step
        int okz=1, okc=1, okmax=1; double eo=0, xo=0;
        for (int i=0;i<64;i++){ okz &= r[i]==0.f; okc &= fabsf(r[64+i]-1.25f) < 1e-3f; okmax &= r[128+i] <= r[128+7];
                                eo += (r[128+i]-e[128+i])*(r[128+i]-e[128+i]); xo += e[128+i]*e[128+i]; }
        if (!(okz && okc && okmax)) printf("  zero %d const %d (%.4f) max %d\n", okz, okc, r[64], okmax);
        CHECK(okz && okc && okmax && eo < 0.9*xo,
              "edge cases: zero block exact, constant block to f16 rounding of its step; outlier block at its least-squares step (%.2f, err %.2f of |x|^2)", r[128+7], eo/xo);
    }

    // ---- 4. vec_dot (one generic implementation since the codebook) vs float dot of dequantized values ----
    printf("== vec_dot (kvq2 x q8_0)\n");
    {
        const int sizes[3] = {64, 128, 4096};
        const struct ggml_type_traits_cpu *t8 = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0);
        double maxrel = 0;
        for (int si=0; si<3; si++) for (int trial=0; trial<200; trial++) {
            int n = sizes[si];
            float *k = malloc(sizeof(float)*n), *q = malloc(sizeof(float)*n), *kd = malloc(sizeof(float)*n), *qd = malloc(sizeof(float)*n);
            gen(k, n, trial%3, 1); gen(q, n, 0, 0);
            if (trial % 7 == 0) for (int i=0;i<n;i++) k[i] += 0.5f;  // blocks with a common offset
            uint8_t *kq = malloc(ggml_row_size(T, n)), *qq = malloc(ggml_row_size(GGML_TYPE_Q8_0, n));
            tc->from_float(k, kq, n); t8->from_float(q, qq, n);
            dequantize_row_kvq2(kq, kd, n);
            // dequantize q8_0 by hand: block = {half d, int8 qs[32]}
            for (int b=0; b<n/32; b++) { const uint8_t *blk = qq + 34*b; uint16_t dh; memcpy(&dh, blk, 2);
                float d = ggml_fp16_to_fp32(dh); for (int j=0;j<32;j++) qd[32*b+j] = d*(int8_t)blk[2+j]; }
            double ref = 0, aref = 0; for (int i=0;i<n;i++){ ref += (double)kd[i]*qd[i]; aref += fabs((double)kd[i]*qd[i]); }
            float rs;
            ggml_vec_dot_kvq2_q8_0(n, &rs, 0, kq, 0, qq, 0, 1);
            double den = fmax(fabs(ref), 1e-2*aref); // guard near-zero dots
            maxrel = fmax(maxrel, fabs(rs-ref)/den);
            free(k); free(q); free(kd); free(qd); free(kq); free(qq);
        }
        CHECK(maxrel < 1e-3, "vec_dot vs float dot of dequantized: max rel err %.2e", maxrel);
    }

    // ---- 5. dot-product error of quantized K ----
    printf("== dot-product error: q Gaussian f32, k (WHT) quantized; rel = sqrt(sum (q.k^ - q.k)^2 / sum (q.k)^2), 64-dim\n");
    for (int ti=0; ti<3; ti++) for (int d=0; d<3; d++) {
        s = 7 + d; const int M = 20000; double de=0, dx=0;
        float *k = malloc(sizeof(float)*64*M), *kd = malloc(sizeof(float)*64*M);
        gen(k, 64*M, d, 1);
        void *kq = malloc(ggml_row_size(types[ti], 64*M));
        ggml_quantize_chunk(types[ti], k, kq, 0, M, 64, NULL);
        ggml_get_type_traits(types[ti])->to_float(kq, kd, 64*M);
        for (int r=0; r<M; r++) { double a=0,b=0; for (int j=0;j<64;j++){ float q=gauss(); a+=q*k[64*r+j]; b+=q*kd[64*r+j]; } de+=(a-b)*(a-b); dx+=a*a; }
        printf("  %-5s %-8s  %.4f\n", ggml_type_name(types[ti]), dn[d], sqrt(de/dx));
        free(k); free(kd); free(kq);
    }

    // ---- 6. graph: get_rows and mul_mat on the CPU backend ----
    printf("== ggml graph (CPU)\n");
    {
        const int K = 128, R = 8;
        struct ggml_init_params ip = { 16*1024*1024, NULL, false };
        struct ggml_context *ctx = ggml_init(ip);
        struct ggml_tensor *a = ggml_new_tensor_2d(ctx, T, K, R);
        struct ggml_tensor *v = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, 1);
        struct ggml_tensor *idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 3);
        float src[128*8]; s = 99; gen(src, K*R, 0, 1);
        for (int i=0;i<K*R;i++) src[i] = src[i]*0.3f + 0.05f;
        ggml_quantize_chunk(T, src, a->data, 0, R, K, NULL);
        float *vd = (float*)v->data; for (int i=0;i<K;i++) vd[i] = gauss();
        int32_t *id = (int32_t*)idx->data; id[0]=5; id[1]=0; id[2]=7;
        struct ggml_tensor *gr = ggml_get_rows(ctx, a, idx);
        struct ggml_tensor *mm = ggml_mul_mat(ctx, a, v);
        struct ggml_cgraph *gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, gr); ggml_build_forward_expand(gf, mm);
        int st = ggml_graph_compute_with_ctx(ctx, gf, 2);
        CHECK(st == GGML_STATUS_SUCCESS && gr->type == GGML_TYPE_F32 && mm->ne[0] == R && mm->ne[1] == 1, "graph computed (get_rows type %s, mul_mat ne=[%lld,%lld])", ggml_type_name(gr->type), (long long)mm->ne[0], (long long)mm->ne[1]);
        float deq[128*8]; dequantize_row_kvq2(a->data, deq, K*R);
        double maxd = 0; for (int r=0;r<3;r++) for (int j=0;j<K;j++) maxd = fmax(maxd, fabs(((float*)gr->data)[r*K+j] - deq[id[r]*K+j]));
        CHECK(maxd == 0, "get_rows == dequantized rows (max abs diff %g)", maxd);
        double maxrel_exact = 0, maxrel_f32 = 0;
        const struct ggml_type_traits_cpu *t8 = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0);
        uint8_t vq[34*4]; t8->from_float(vd, vq, K);
        for (int r=0;r<R;r++) {
            float e; ggml_vec_dot_kvq2_q8_0(K, &e, 0, (uint8_t*)a->data + r*ggml_row_size(T,K), 0, vq, 0, 1);
            double f = 0, af = 0; for (int j=0;j<K;j++){ f += (double)deq[r*K+j]*vd[j]; af += fabs((double)deq[r*K+j]*vd[j]); }
            float got = ((float*)mm->data)[r];
            maxrel_exact = fmax(maxrel_exact, fabs(got - e)/fmax(fabs(e),1e-6));
            maxrel_f32   = fmax(maxrel_f32, fabs(got - f)/af);
            printf("  row %d: mul_mat %+9.5f  f32 dot(dequant, v) %+9.5f\n", r, got, f);
        }
        CHECK(maxrel_exact < 1e-5, "mul_mat == vec_dot(kvq2, q8_0(v)) (max rel %.2e)", maxrel_exact);
        CHECK(maxrel_f32 < 1e-2, "mul_mat vs f32 dot of dequantized rows: max err / sum|terms| = %.2e (v is quantized to q8_0 internally)", maxrel_f32);
        ggml_free(ctx);
    }

    // ---- 7. speed ----
    {
        s = 5; gen(x, NR*N, 0, 1); uint8_t *qb = malloc(ggml_row_size(T, NR*N)); float *y = malloc(sizeof(float)*NR*N);
        struct timespec t0, t1, t2;
        clock_gettime(CLOCK_MONOTONIC, &t0); tc->from_float(x, qb, NR*N);
        clock_gettime(CLOCK_MONOTONIC, &t1); dequantize_row_kvq2(qb, y, NR*N);
        clock_gettime(CLOCK_MONOTONIC, &t2);
        double q_ns = ((t1.tv_sec-t0.tv_sec)*1e9 + (t1.tv_nsec-t0.tv_nsec))/NR, dq_ns = ((t2.tv_sec-t1.tv_sec)*1e9 + (t2.tv_nsec-t1.tv_nsec))/NR;
        printf("== speed: quantize %.0f ns/block(64), dequantize %.0f ns/block\n", q_ns, dq_ns);
        free(qb); free(y);
    }
    free(x);
    printf("\n%s (%d failures)\n", fails ? "SOME TESTS FAILED" : "ALL TESTS PASSED", fails);
    return fails != 0;
}
