#include "simd.h"

/* ---- float32 matrices, packed [n_chunk][K][16]: the 16 rows of a chunk interleaved ------------ */

static inline __attribute__((always_inline)) void
f32_tile(const float *x, const float *w, float *out, int64_t K, int64_t ldo, int64_t c, int64_t r0, const int nr)
{
    const float *wc = w + c * K * 16;
    f32x16 acc[RT];
    for (int r = 0; r < nr; r++) acc[r] = (f32x16){0};
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
        f32x16 t[RT]; /* 32-term partial sums added to acc: shorter float32 sums, as BLAS blocks them */
        for (int r = 0; r < nr; r++) t[r] = (f32x16){0};
        int64_t k1 = k0 + 32 < K ? k0 + 32 : K;
        for (int64_t k = k0; k < k1; k++) {
            __builtin_prefetch(wc + (k + PF_LINES) * 16, 0, 3); /* see PF_LINES */
            f32x16 wv = load16(wc + k * 16);
            for (int r = 0; r < nr; r++) t[r] += wv * x[(r0 + r) * K + k];
        }
        for (int r = 0; r < nr; r++) acc[r] += t[r];
    }
    for (int r = 0; r < nr; r++) store16(out + (r0 + r) * ldo + c * 16, acc[r]);
}

static void f32_chunk(const float *x, const float *w, float *out, int64_t M, int64_t K, int64_t ldo, int64_t c)
{
    ROW_TILES(f32_tile, M, x, w, out, K, ldo, c);
}

/* The same kernel on 16-bit storage: float16 (a GGUF F16 matrix) or bfloat16 (BF16), kept as stored: half
 * the bytes. Each weight is widened exactly to float32 before the same float32 arithmetic as f32_tile. */
static inline f32x16 load16bf(const uint16_t *p)
{
    u32x16 u;
    for (int i = 0; i < 16; i++) u[i] = (uint32_t)p[i] << 16; /* bfloat16 = the top half of a float32 */
    f32x16 r;
    memcpy(&r, &u, sizeof r);
    return r;
}

static inline __attribute__((always_inline)) void
f16_tile(const float *x, const uint16_t *w, const int bf, float *out, int64_t K, int64_t ldo, int64_t c, int64_t r0,
         const int nr)
{
    const uint16_t *wc = w + c * K * 16;
    f32x16 acc[RT];
    for (int r = 0; r < nr; r++) acc[r] = (f32x16){0};
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
        f32x16 t[RT];
        for (int r = 0; r < nr; r++) t[r] = (f32x16){0};
        int64_t k1 = k0 + 32 < K ? k0 + 32 : K;
        for (int64_t k = k0; k < k1; k++) {
            __builtin_prefetch(wc + (k + 2 * PF_LINES) * 16, 0, 3); /* PF_LINES lines ahead: 32 bytes a position */
            f32x16 wv = bf ? load16bf(wc + k * 16) : load16h(wc + k * 16);
            for (int r = 0; r < nr; r++) t[r] += wv * x[(r0 + r) * K + k];
        }
        for (int r = 0; r < nr; r++) acc[r] += t[r];
    }
    for (int r = 0; r < nr; r++) store16(out + (r0 + r) * ldo + c * 16, acc[r]);
}

static void f16_chunk(const float *x, const uint16_t *w, float *out, int64_t M, int64_t K, int64_t ldo, int64_t c)
{
    ROW_TILES(f16_tile, M, x, w, 0, out, K, ldo, c);
}

static void bf16_chunk(const float *x, const uint16_t *w, float *out, int64_t M, int64_t K, int64_t ldo, int64_t c)
{
    ROW_TILES(f16_tile, M, x, w, 1, out, K, ldo, c);
}
