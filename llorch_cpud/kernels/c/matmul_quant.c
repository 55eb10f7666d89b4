/* Matrix products on ggml Q4_1 / Q8_0 weights, repacked row-interleaved (see quantized.py).
 *
 * Layout of one matrix [N, K] (N padded to n_chunk * L rows, K = NB * 32):
 *   Q4_1  qs [n_chunk][NB][16][L] uint8   byte j of block b for each of the chunk's L rows
 *                                         (low nibble: element j, high nibble: element j + 16)
 *         d, m [n_chunk][NB][L] float16   w = d * q + m
 *   Q8_0  qs [n_chunk][NB][32][L] int8,  d [n_chunk][NB][L] float16   w = d * q
 *
 * Each SIMD lane is one output row, so a lane's sum runs in a fixed order (block by block,
 * element by element), whatever the thread count or the batch: results are deterministic and a
 * row's result does not depend on the other rows.
 *
 *   Q4_1: y[n] = sum_k (d[n,k/32] * q[n,k] + m[n,k/32]) * x[k]    (each weight dequantized in a register)
 *   Q8_0: y[n] = sum_b d[n,b] * sum_j q[n,b,j] * x[b*32+j]        (a pure scale: factoring it out is safe)
 *
 * Q4_1 is not computed as d*sum(q*x) + m*sum(x): with m about -8d the two terms nearly cancel and
 * the float32 result loses digits the dequantized product keeps.
 *
 * Written with GCC/Clang vector extensions (16 x float32): the compiler emits AVX-512, AVX2, SSE or
 * NEON for the variant's -march (kernels/isa.py). The GIL is released while computing; OpenMP spreads chunks over cores.
 */
#include "simd.h"

/* ---- Q4_1, float32 activations ------------------------------------------------------------ */

/* 16 per-row scales: float16 as ggml stores them, or float32 (a K-quant's sub-block scale d·sc). */
static inline f32x16 load_scales(const void *p, int64_t i, const int f32s)
{
    return f32s ? load16((const float *)p + i) : load16h((const uint16_t *)p + i);
}
static inline fv load_scales_v(const void *p, int64_t i, const int f32s)
{
    return f32s ? loadv((const float *)p + i) : loadvh((const uint16_t *)p + i);
}

/* One activation row (a single sequence's decode step): the chunk's NL = L/16 lane groups side by side,
 * so that each block's bytes are consumed as they stream in. (Lane group by lane group, as q4_1_tile does
 * for many rows, the first pass pulls the whole chunk from memory while doing a quarter of the work and the
 * others find it in cache: memory and arithmetic took turns, ~28 GB/s.) Each lane's sums run in the very
 * order of q4_1_tile, so the results are bit-identical. */
static inline __attribute__((always_inline)) void
q4_1_row_tile(const float *x, const uint8_t *qs, const void *d, const void *m, const int f32s, float *out,
              int64_t K, int64_t ldo, int64_t NB, int64_t L, int64_t c, int64_t r0, const int NL)
{
    f32x16 acc[4];
    for (int u = 0; u < NL; u++) acc[u] = (f32x16){0};
    const float *xr = x + r0 * K;
    for (int64_t b = 0; b < NB - FAULT(ROW_TILE_DROP_BLOCK); b++) {
        f32x16 dv[4], mv[4], tl[4], th[4];
        for (int u = 0; u < NL; u++) {
            dv[u] = load_scales(d, (c * NB + b) * L + 16 * u, f32s);
            mv[u] = load_scales(m, (c * NB + b) * L + 16 * u, f32s);
            tl[u] = th[u] = (f32x16){0};
        }
        for (int g = 0; g < 4; g++) {
            const uint8_t *grp = group_at(qs, NB, L, c, b, g, 4);
            prefetch_group(grp, L);
            u32x16 lo4[4], hi4[4];
            for (int u = 0; u < NL; u++) {
                u32x16 v = load_group(grp + 16 * u * 4);
                lo4[u] = v & 0x0f0f0f0fu;
                hi4[u] = (v >> 4) & 0x0f0f0f0fu;
            }
            for (int jj = 0; jj < 4; jj++) {
                const int j = 4 * g + jj;
                const float xl = xr[b * 32 + j], xh = xr[b * 32 + j + 16];
                for (int u = 0; u < NL; u++) {
                    f32x16 lo = dv[u] * __builtin_convertvector(byte_of_lanes(lo4[u], jj), f32x16) + mv[u];
                    f32x16 hi = dv[u] * __builtin_convertvector(byte_of_lanes(hi4[u], jj), f32x16) + mv[u];
                    tl[u] += lo * xl;
                    th[u] += hi * xh;
                }
            }
        }
        for (int u = 0; u < NL; u++) acc[u] += tl[u] + th[u];
    }
    for (int u = 0; u < NL; u++) store16(out + r0 * ldo + c * L + 16 * u, acc[u]);
}

/* f32s: the scales d, m are float32 (Q4_K rewritten: d = d·sc, m = -dmin·m per 32-element sub-block),
 * else float16 (Q4_1). Either way the weight d·q + m is formed exactly as ggml dequantizes it. */
static inline __attribute__((always_inline)) void
q4_1_tile(const float *x, const uint8_t *qs, const void *d, const void *m, const int f32s, float *out,
          int64_t K, int64_t ldo, int64_t NB, int64_t L, int64_t c, int64_t r0, const int nr)
{
    ONE_ROW_TILE(q4_1_row_tile, x, qs, d, m, f32s, out, K, ldo, NB, L, c, r0);
    for (int64_t i0 = 0; i0 < L; i0 += VW) {
        fv acc[RT];
        for (int r = 0; r < nr; r++) acc[r] = (fv){0};
        for (int64_t b = 0; b < NB - FAULT(ROW_TILE_DROP_BLOCK); b++) {
            fv dv = load_scales_v(d, (c * NB + b) * L + i0, f32s);
            fv mv = load_scales_v(m, (c * NB + b) * L + i0, f32s);
            /* per-block partial sums, then added to acc (shorter float32 sums, smaller error): two per row,
             * elements 0-15 and 16-31, so that one row's sums are two independent chains of FMAs (one
             * chain waited on its latency); the same two for any number of rows */
            fv tl[RT], th[RT];
            for (int r = 0; r < nr; r++) tl[r] = th[r] = (fv){0};
            for (int g = 0; g < 4; g++) {
                const uint8_t *grp = group_at(qs, NB, L, c, b, g, 4);
                if (i0 == 0) prefetch_group(grp, L);
                uv v = load_group_v(grp + i0 * 4);
                uv lo4 = v & 0x0f0f0f0fu, hi4 = (v >> 4) & 0x0f0f0f0fu; /* elements 4g+jj, 16+4g+jj */
                for (int jj = 0; jj < 4; jj++) {
                    const int j = 4 * g + jj;
                    /* the weights themselves, exactly as ggml dequantizes them (d*q is exact in float32) */
                    fv lo = dv * __builtin_convertvector(byte_of_lanes_v(lo4, jj), fv) + mv;
                    fv hi = dv * __builtin_convertvector(byte_of_lanes_v(hi4, jj), fv) + mv;
                    for (int r = 0; r < nr; r++) {
                        const float *xr = x + (r0 + r) * K + b * 32;
                        tl[r] += lo * xr[j];
                        th[r] += hi * xr[j + 16];
                    }
                }
            }
            for (int r = 0; r < nr; r++) acc[r] += tl[r] + th[r];
        }
        for (int r = 0; r < nr; r++) storev(out + (r0 + r) * ldo + c * L + i0, acc[r]);
    }
}

static void q4_1_chunk(const float *x, const uint8_t *qs, const uint16_t *d, const uint16_t *m,
                       float *out, int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    ROW_TILES(q4_1_tile, M, x, qs, d, m, 0, out, K, ldo, K / 32, L, c);
}

static void q4_1f_chunk(const float *x, const uint8_t *qs, const float *d, const float *m,
                        float *out, int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    ROW_TILES(q4_1_tile, M, x, qs, d, m, 1, out, K, ldo, K / 32, L, c);
}

/* ---- Q8_0, float32 activations ------------------------------------------------------------ */

/* One activation row: the chunk's lane groups side by side (see q4_1_row_tile); bit-identical to q8_0_tile. */
static inline __attribute__((always_inline)) void
q8_0_row_tile(const float *x, const int8_t *qs, const uint16_t *d, float *out,
              int64_t K, int64_t ldo, int64_t NB, int64_t L, int64_t c, int64_t r0, const int NL)
{
    f32x16 acc[4];
    for (int u = 0; u < NL; u++) acc[u] = (f32x16){0};
    const float *xr = x + r0 * K;
    for (int64_t b = 0; b < NB; b++) {
        f32x16 t[4];
        for (int u = 0; u < NL; u++) t[u] = (f32x16){0};
        for (int g = 0; g < 8; g++) {
            const uint8_t *grp = group_at(qs, NB, L, c, b, g, 8);
            prefetch_group(grp, L);
            i32x16 v[4];
            for (int u = 0; u < NL; u++) v[u] = (i32x16)load_group(grp + 16 * u * 4);
            for (int jj = 0; jj < 4; jj++) {
                const float xv = xr[b * 32 + 4 * g + jj];
                for (int u = 0; u < NL; u++) t[u] += __builtin_convertvector((v[u] << (24 - 8 * jj)) >> 24, f32x16) * xv;
            }
        }
        for (int u = 0; u < NL; u++) acc[u] += load16h(d + (c * NB + b) * L + 16 * u) * t[u];
    }
    for (int u = 0; u < NL; u++) store16(out + r0 * ldo + c * L + 16 * u, acc[u]);
}

static inline __attribute__((always_inline)) void
q8_0_tile(const float *x, const int8_t *qs, const uint16_t *d, float *out,
          int64_t K, int64_t ldo, int64_t NB, int64_t L, int64_t c, int64_t r0, const int nr)
{
    ONE_ROW_TILE(q8_0_row_tile, x, qs, d, out, K, ldo, NB, L, c, r0);
    for (int64_t i0 = 0; i0 < L; i0 += VW) {
        fv acc[RT];
        for (int r = 0; r < nr; r++) acc[r] = (fv){0};
        for (int64_t b = 0; b < NB; b++) {
            fv t[RT];
            for (int r = 0; r < nr; r++) t[r] = (fv){0};
            for (int g = 0; g < 8; g++) {
                const uint8_t *grp = group_at(qs, NB, L, c, b, g, 8);
                if (i0 == 0) prefetch_group(grp, L);
                iv v = (iv)load_group_v(grp + i0 * 4);
                for (int jj = 0; jj < 4; jj++) {
                    fv w = __builtin_convertvector((v << (24 - 8 * jj)) >> 24, fv); /* sign-extended byte jj */
                    for (int r = 0; r < nr; r++) t[r] = fmav(w, splatv(x[(r0 + r) * K + b * 32 + 4 * g + jj]), t[r]);
                }
            }
            fv dv = loadvh(d + (c * NB + b) * L + i0);
            for (int r = 0; r < nr; r++) acc[r] = fmav(dv, t[r], acc[r]);
        }
        for (int r = 0; r < nr; r++) storev(out + (r0 + r) * ldo + c * L + i0, acc[r]);
    }
}

static void q8_0_chunk(const float *x, const int8_t *qs, const uint16_t *d, float *out,
                       int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    ROW_TILES(q8_0_tile, M, x, qs, d, out, K, ldo, K / 32, L, c);
}

/* ---- int8 weights with float32 scales: the K-quants rewritten -------------------------------
 * The Q8_0 layout (8 groups of 4 elements per 32-block). S = 2: d [n_chunk][NB][2][L], the scale of
 * elements 0-15 (groups 0-3) and 16-31 (groups 4-7), no m (Q6_K: q-32, d·sc per 16). S = 1 with m:
 * d, m [n_chunk][NB][L] (Q5_K: q of 5 bits, d·sc and -dmin·mn per 32). Each weight d·q (+ m) is formed
 * in a register exactly as ggml's dequantization forms it, then multiplied with the float32 activations. */
/* One activation row: the chunk's lane groups side by side (see q4_1_row_tile); bit-identical to q8f_tile. */
static inline __attribute__((always_inline)) void
q8f_row_tile(const float *x, const int8_t *qs, const float *d, const float *m, const int S, float *out,
             int64_t K, int64_t ldo, int64_t NB, int64_t L, int64_t c, int64_t r0, const int NL)
{
    f32x16 acc[4];
    for (int u = 0; u < NL; u++) acc[u] = (f32x16){0};
    const float *xr = x + r0 * K;
    for (int64_t b = 0; b < NB; b++) {
        f32x16 t[4], mv[4];
        for (int u = 0; u < NL; u++) {
            t[u] = mv[u] = (f32x16){0};
            if (m) mv[u] = load16(m + (c * NB + b) * L + 16 * u);
        }
        for (int g = 0; g < 8; g++) {
            const uint8_t *grp = group_at(qs, NB, L, c, b, g, 8);
            prefetch_group(grp, L);
            f32x16 dv[4];
            i32x16 v[4];
            for (int u = 0; u < NL; u++) {
                dv[u] = load16(d + ((c * NB + b) * S + (S == 2 ? g / 4 : 0)) * L + 16 * u);
                v[u] = (i32x16)load_group(grp + 16 * u * 4);
            }
            for (int jj = 0; jj < 4; jj++) {
                const float xv = xr[b * 32 + 4 * g + jj];
                for (int u = 0; u < NL; u++) {
                    f32x16 w = dv[u] * __builtin_convertvector((v[u] << (24 - 8 * jj)) >> 24, f32x16);
                    if (m) w += mv[u];
                    t[u] += w * xv;
                }
            }
        }
        for (int u = 0; u < NL; u++) acc[u] += t[u];
    }
    for (int u = 0; u < NL; u++) store16(out + r0 * ldo + c * L + 16 * u, acc[u]);
}

static inline __attribute__((always_inline)) void
q8f_tile(const float *x, const int8_t *qs, const float *d, const float *m, const int S, float *out,
         int64_t K, int64_t ldo, int64_t NB, int64_t L, int64_t c, int64_t r0, const int nr)
{
    ONE_ROW_TILE(q8f_row_tile, x, qs, d, m, S, out, K, ldo, NB, L, c, r0);
    for (int64_t i0 = 0; i0 < L; i0 += 16) {
        f32x16 acc[RT];
        for (int r = 0; r < nr; r++) acc[r] = (f32x16){0};
        for (int64_t b = 0; b < NB; b++) {
            f32x16 t[RT];
            for (int r = 0; r < nr; r++) t[r] = (f32x16){0};
            f32x16 mv = {0};
            if (m) mv = load16(m + (c * NB + b) * L + i0);
            for (int g = 0; g < 8; g++) {
                const uint8_t *grp = group_at(qs, NB, L, c, b, g, 8);
                if (i0 == 0) prefetch_group(grp, L);
                f32x16 dv = load16(d + ((c * NB + b) * S + (S == 2 ? g / 4 : 0)) * L + i0);
                i32x16 v = (i32x16)load_group(grp + i0 * 4);
                for (int jj = 0; jj < 4; jj++) {
                    f32x16 w = dv * __builtin_convertvector((v << (24 - 8 * jj)) >> 24, f32x16);
                    if (m) w += mv;
                    for (int r = 0; r < nr; r++) t[r] += w * x[(r0 + r) * K + b * 32 + 4 * g + jj];
                }
            }
            for (int r = 0; r < nr; r++) acc[r] += t[r];
        }
        for (int r = 0; r < nr; r++) store16(out + (r0 + r) * ldo + c * L + i0, acc[r]);
    }
}

static void q8_s16_chunk(const float *x, const int8_t *qs, const float *d, float *out,
                         int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    ROW_TILES(q8f_tile, M, x, qs, d, NULL, 2, out, K, ldo, K / 32, L, c);
}

static void q8_dm_chunk(const float *x, const int8_t *qs, const float *d, const float *m, float *out,
                        int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    ROW_TILES(q8f_tile, M, x, qs, d, m, 1, out, K, ldo, K / 32, L, c);
}


/* ---- dequantization into a transposed slab out_t [K][ldo] (columns c0*L .. c1*L) ---------- */

static void q4_1_dequant_chunk(const uint8_t *qs, const uint16_t *d, const uint16_t *m, float *out_t,
                               int64_t K, int64_t ldo, int64_t L, int64_t c, int64_t c0)
{
    int64_t NB = K / 32, col = (c - c0) * L;
    for (int64_t b = 0; b < NB; b++)
        for (int64_t i0 = 0; i0 < L; i0 += 16) {
            f32x16 dv = load16h(d + (c * NB + b) * L + i0), mv = load16h(m + (c * NB + b) * L + i0);
            for (int g = 0; g < 4; g++) {
                u32x16 v = load_group(group_at(qs, NB, L, c, b, g, 4) + i0 * 4);
                for (int jj = 0; jj < 4; jj++) {
                    int64_t j = 4 * g + jj;
                    u32x16 byte = v >> (8 * jj);
                    store16(out_t + (b * 32 + j) * ldo + col + i0,
                            dv * __builtin_convertvector((i32x16)(byte & 15), f32x16) + mv);
                    store16(out_t + (b * 32 + 16 + j) * ldo + col + i0,
                            dv * __builtin_convertvector((i32x16)((byte >> 4) & 15), f32x16) + mv);
                }
            }
        }
}

static void q8_0_dequant_chunk(const int8_t *qs, const uint16_t *d, float *out_t,
                               int64_t K, int64_t ldo, int64_t L, int64_t c, int64_t c0)
{
    int64_t NB = K / 32, col = (c - c0) * L;
    for (int64_t b = 0; b < NB; b++)
        for (int64_t i0 = 0; i0 < L; i0 += 16) {
            f32x16 dv = load16h(d + (c * NB + b) * L + i0);
            for (int g = 0; g < 8; g++) {
                i32x16 v = (i32x16)load_group(group_at(qs, NB, L, c, b, g, 8) + i0 * 4);
                for (int jj = 0; jj < 4; jj++)
                    store16(out_t + (b * 32 + 4 * g + jj) * ldo + col + i0,
                            dv * __builtin_convertvector((v << (24 - 8 * jj)) >> 24, f32x16));
            }
        }
}
