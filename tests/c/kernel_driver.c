/* The kernels without Python (tests/test_kernel_aarch64.py): each kernel family run on fixed pseudo-random inputs,
 * every output float printed as its bits ("name hex hex ..."), so two builds (another ISA, another machine under
 * qemu) can be compared bit for bit. Built from the same sources as the module: kernels/c/ with LLORCH_NO_PYTHON. */
#define LLORCH_NO_PYTHON
#include "../../llorch_cpud/kernels/c/common.h"
#include "../../llorch_cpud/kernels/c/simd.h"
#include "../../llorch_cpud/kernels/c/matmul_quant.c"
#include "../../llorch_cpud/kernels/c/q8.c"
#include "../../llorch_cpud/kernels/c/matmul_f32.c"
#include "../../llorch_cpud/kernels/c/attention.c"
#include "../../llorch_cpud/kernels/c/rowwise.c"
#include <stdio.h>

static uint32_t state = 12345;
static uint32_t next(void) { state = state * 1664525u + 1013904223u; return state >> 8; }
static float uniform(void) { return (float)(next() & 0xffff) / 32768.f - 1.f; } /* [-1, 1), exact */
static void fill(float *p, int64_t n, float scale) { for (int64_t i = 0; i < n; i++) p[i] = scale * uniform(); }
static void fill_bytes(void *p, int64_t n) { for (int64_t i = 0; i < n; i++) ((uint8_t *)p)[i] = (uint8_t)next(); }
static void fill_half(uint16_t *p, int64_t n, float scale)
{
    for (int64_t i = 0; i < n; i++) p[i] = float_to_half(scale * uniform());
}
static void put(const char *name, const float *v, int64_t n)
{
    printf("%s", name);
    for (int64_t i = 0; i < n; i++) { uint32_t u; memcpy(&u, &v[i], 4); printf(" %08x", u); }
    printf("\n");
}

enum { M = 5, K = 128, NB = K / 32, L = 32, NC = 2, N = NC * L };

int main(void)
{
    static float x[M * K], out[M * N], d32[NC * NB * L * 2], m32[NC * NB * L];
    static uint8_t qs[NC * NB * 32 * L];
    static uint16_t d[NC * NB * L], m[NC * NB * L], w16[NC * K * 16];
    static float w32[NC * K * 16];
    fill(x, M * K, 2.f);
    fill_bytes(qs, sizeof qs);
    fill_half(d, NC * NB * L, 0.05f);
    fill_half(m, NC * NB * L, 0.4f);
    fill(d32, NC * NB * L * 2, 0.05f);
    fill(m32, NC * NB * L, 0.4f);
    for (int rows = 1; rows <= M; rows += M - 1) { /* one row (the row tiles) and a batch */
        char name[32];
#define RUN(label, call)                                      \
        memset(out, 0, sizeof out);                           \
        for (int64_t c = 0; c < NC; c++) call;                \
        snprintf(name, sizeof name, "%s/%d", label, rows);    \
        put(name, out, rows * N);
        RUN("q4_1", q4_1_chunk(x, qs, d, m, out, rows, K, N, L, c))
        RUN("q4_1f", q4_1f_chunk(x, qs, d32, m32, out, rows, K, N, L, c))
        RUN("q8_0", q8_0_chunk(x, (const int8_t *)qs, d, out, rows, K, N, L, c))
        RUN("q8_s16", q8_s16_chunk(x, (const int8_t *)qs, d32, out, rows, K, N, L, c))
        static uint8_t xq[M * K];
        static float dx[M * NB], sx[M * NB];
        quantize_rows_q8(x, rows, K, xq, dx, sx, 0);
        put("q8_scales", dx, rows * NB);
        RUN("q4_1_q8", q4_1_q8_chunk((const int8_t *)xq, dx, sx, qs, d, m, out, rows, K, N, L, c))
        quantize_rows_q8(x, rows, K, xq, dx, NULL, 1);
        RUN("q8_0_q8", q8_0_q8_chunk(xq, dx, (const int8_t *)qs, d, out, rows, K, N, L, c))
        fill(w32, NC * K * 16, 1.f);
        for (int64_t i = 0; i < NC * K * 16; i++) w16[i] = float_to_half(w32[i]);
        RUN("f32", f32_chunk(x, w32, out, rows, K, NC * 16, c))
        RUN("f16", f16_chunk(x, w16, out, rows, K, NC * 16, c))
    }
    { /* decode attention: 3 sequences, 4 query heads on 2 KV heads, head_dim 64 (the 16-lane path) and 24 */
        enum { B = 3, H = 4, HKV = 2, MS = 40 };
        for (int hd = 24; hd <= 64; hd += 40)
            for (int f16 = 0; f16 <= 1; f16++) {
                static float q[B * H * 64], kn[B * HKV * 64], vn[B * HKV * 64], o[B * H * 64];
                static float kc[B][HKV * MS * 64], vc[B][HKV * MS * 64];
                void *kp[B], *vp[B];
                int64_t ms[B] = {MS, MS, MS}, T[B] = {1, 17, 40};
                fill(q, B * H * hd, 1.f); fill(kn, B * HKV * hd, 1.f); fill(vn, B * HKV * hd, 1.f);
                for (int b = 0; b < B; b++) {
                    if (f16) { fill_half((uint16_t *)kc[b], HKV * MS * hd, 1.f); fill_half((uint16_t *)vc[b], HKV * MS * hd, 1.f); }
                    else { fill(kc[b], HKV * MS * hd, 1.f); fill(vc[b], HKV * MS * hd, 1.f); }
                    kp[b] = kc[b]; vp[b] = vc[b];
                }
                attend_rows(q, kn, HKV * hd, vn, HKV * hd, kp, vp, ms, T, B, H, HKV, hd, f16, o, NULL, 0);
                char name[32];
                snprintf(name, sizeof name, "attend/%d/%s", hd, f16 ? "f16" : "f32");
                put(name, o, B * H * hd);
            }
    }
    { /* the elementwise stages on rows of 200 (tails of 8) */
        enum { R = 3, W = 200, HD = 40 };
        static float a[R * W], b[R * W], w[W], bias[W], y[R * W], cs[R * HD], sn[R * HD];
        fill(a, R * W, 3.f); fill(b, R * W, 3.f); fill(w, W, 1.f); fill(bias, W, 1.f); fill(cs, R * HD, 1.f);
        fill(sn, R * HD, 1.f);
        rms_norm_rows(a, W, w, y, R, W, 1e-5f); put("rms_norm", y, R * W);
        layer_norm_rows(a, W, w, bias, y, R, W, 1e-5f); put("layer_norm", y, R * W);
        silu_mul_rows(a, W, b, W, y, R, W); put("silu_mul", y, R * W);
        gelu_new_rows(a, W, y, R, W, 0.7978845608f, 0.044715f); put("gelu_new", y, R * W);
        rope_rows(a, W, cs, sn, y, R, W / HD, HD); put("rope", y, R * W);
    }
    return 0;
}
