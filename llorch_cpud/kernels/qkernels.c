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
 * Written with GCC/Clang vector extensions (16 x float32): the compiler emits AVX-512, AVX2 or
 * SSE for -march=native. The GIL is released while computing; OpenMP spreads chunks over cores.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

/* Negative controls for `validate` (scripts/kernel_faults.py, tests/test_kernel_faults.py): a test build with -DLLORCH_FAULT=FAULT_<NAME>
 * computes one decode-path stage wrongly, and the validator must fail at the checkpoint of that stage.
 * Without LLORCH_FAULT (every build pip makes) FAULT(x) is the constant 0 and each faulty branch is
 * compiled away: the production binary holds no fault code. Each is described, with the checkpoint that must
 * catch it, in validate/bugs.py (KERNEL_FAULTS). */
enum {
    FAULT_NONE, FAULT_ATTN_RESIDUAL, FAULT_NORM_EPS, FAULT_ROPE_SIN, FAULT_SILU_SLOPE, FAULT_GELU_SLOPE,
    FAULT_ATTN_SCALE, FAULT_ROW_TILE_DROP_BLOCK, FAULT_BATCH_OTHER_CACHE, FAULT_KV_SLOT_PAST_40,
    FAULT_ATTN_BLOCK_OFF_BY_ONE, FAULT_SOFTMAX_SUM, FAULT_Q8_DROP_BLOCK, FAULT_FFN_RESIDUAL,
};
#ifdef LLORCH_FAULT
#define FAULT(name) (LLORCH_FAULT == FAULT_##name)
#else
#define FAULT(name) 0
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* 16 half floats -> 16 x float32 (the per-block scales stay float16, as ggml stores them). */
static inline float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13); /* inf, nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float32 -> float16 bits, rounded to nearest even (IEEE; what numpy's astype(float16) does). */
static inline uint16_t float_to_half(float f)
{
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
#endif
}

static inline f32x16 load16h(const uint16_t *p)
{
#if defined(__AVX512F__)
    return (f32x16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__)
    __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    f32x16 r;
    memcpy(&r, &a, 32);
    memcpy((char *)&r + 32, &b, 32);
    return r;
#else
    f32x16 r;
    for (int i = 0; i < 16; i++) r[i] = half_to_float(p[i]);
    return r;
#endif
}

/* The row tiles' vector: VW lanes (output rows) of float32, one machine register. AVX-512: 16 (one zmm, the
 * f32x16 of the rest of the file). Without it (AVX2): 8, one ymm. A 16-lane generic vector there is two ymm,
 * and a tile of 8 activation rows needs 2-3 such vectors per row: more than AVX2's 16 registers, so GCC spilled
 * every partial sum to the stack at every step (prefill ran at ~1/10 of the FMA rate). Each lane's arithmetic is
 * the same whatever VW (same operations, same order), so the results are the same bits.
 * RT: activation rows per pass (each converted weight vector feeds RT rows); with AVX2's 16 registers, 4 rows'
 * two partial sums (8) + the weights' scales, bytes and converted values fit. */
#if defined(__AVX512F__) || !defined(__AVX2__)
#define VW 16
#define RT 8
#else
#define VW 8
#define RT 4
#endif
typedef float fv __attribute__((vector_size(VW * 4)));
typedef int32_t iv __attribute__((vector_size(VW * 4)));
typedef uint32_t uv __attribute__((vector_size(VW * 4)));

/* Weights are read as one stream; with RT rows the out-of-order window holds too few iterations to
 * hide DRAM latency, so the stream is prefetched this many 64-byte lines ahead (measured: without
 * it 8 rows ran at 33 GB/s, half of what 1 row reaches). */
#ifndef PF_LINES
#define PF_LINES 64
#endif

static inline f32x16 load16(const float *p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, f32x16 v) { memcpy(p, &v, sizeof v); }
static inline fv loadv(const float *p) { fv v; memcpy(&v, p, sizeof v); return v; }
static inline void storev(float *p, fv v) { memcpy(p, &v, sizeof v); }

static inline fv splatv(float a)
{
    fv v;
    for (int i = 0; i < VW; i++) v[i] = a;
    return v;
}

/* a * b + c rounded once: the FMA that GCC contracts a * b + c to (where it does) */
static inline fv fmav(fv a, fv b, fv c)
{
#if VW == 8 && defined(__FMA__)
    return (fv)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* VW half floats -> VW x float32 */
static inline fv loadvh(const uint16_t *p)
{
#if VW == 16
    return load16h(p);
#elif defined(__F16C__)
    return (fv)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    fv r;
    for (int i = 0; i < VW; i++) r[i] = half_to_float(p[i]);
    return r;
#endif
}

#if RT == 8 /* the remainders of 5-7 rows */
#define ROW_TILES_8(tile, ...)                                                   \
        case 7: tile(__VA_ARGS__, r0_, 7); break;                                \
        case 6: tile(__VA_ARGS__, r0_, 6); break;                                \
        case 5: tile(__VA_ARGS__, r0_, 5); break;                                \
        case 4: tile(__VA_ARGS__, r0_, 4); break;
#else
#define ROW_TILES_8(tile, ...)
#endif

/* Run tile(..., r0, nr) over the M activation rows: full tiles of RT rows, then the remainder
 * (nr a compile-time constant in every call, so each tile's row loops unroll). */
#define ROW_TILES(tile, M, ...)                                                  \
    do {                                                                         \
        int64_t r0_ = 0;                                                         \
        for (; r0_ + RT <= (M); r0_ += RT) tile(__VA_ARGS__, r0_, RT);           \
        switch ((M) - r0_) {                                                     \
        ROW_TILES_8(tile, __VA_ARGS__)                                           \
        case 3: tile(__VA_ARGS__, r0_, 3); break;                                \
        case 2: tile(__VA_ARGS__, r0_, 2); break;                                \
        case 1: tile(__VA_ARGS__, r0_, 1); break;                                \
        }                                                                        \
    } while (0)

/* A tile's single-row case (nr == 1, chunks of 32 or 64 rows): the row tile with NL = L/16 lane groups
 * side by side, NL a compile-time constant in each call (see q4_1_row_tile). */
#if defined(__AVX512F__)
#define ONE_ROW_TILE(row_tile, ...)                                              \
    do {                                                                         \
        if (nr == 1 && L == 64) { row_tile(__VA_ARGS__, 4); return; }           \
        if (nr == 1 && L == 32) { row_tile(__VA_ARGS__, 2); return; }           \
    } while (0)
#else /* 2-4 lane groups side by side need 2-4x the 32 vector registers AVX-512 has: with 16 (AVX2, NEON) they
       * spill to the stack every block, ~10x slower than the tile's one group at a time (same sums, same bits) */
#define ONE_ROW_TILE(row_tile, ...) do { } while (0)
#endif

typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* 16 rows x 4 bytes (one group of the layout) as 16 lanes of 4 packed bytes. */
static inline u32x16 load_group(const uint8_t *p) { u32x16 v; memcpy(&v, p, sizeof v); return v; }

/* Group g of block b of chunk c: [L rows][4 bytes]; G groups per block (Q4_1: 4, Q8_0: 8). */
static inline const uint8_t *group_at(const void *qs, int64_t NB, int64_t L, int64_t c, int64_t b, int64_t g, int G)
{
    return (const uint8_t *)qs + (((c * NB + b) * G + g) * L) * 4;
}

/* Byte jj of each of the 16 lanes, zero-extended: one vpshufb (within 128-bit lanes, which hold whole
 * 32-bit lanes), or two shifts-and-masks without AVX-512BW. */
static inline i32x16 byte_of_lanes(u32x16 v, const int jj)
{
#if defined(__AVX512BW__)
    const __m512i idx = _mm512_set4_epi32((int)(0x80808000u | (12 + jj)), (int)(0x80808000u | (8 + jj)),
                                          (int)(0x80808000u | (4 + jj)), (int)(0x80808000u | jj));
    return (i32x16)_mm512_shuffle_epi8((__m512i)v, idx);
#else
    return (i32x16)((v >> (8 * jj)) & 255);
#endif
}

/* VW rows x 4 bytes as VW lanes of 4 packed bytes, and byte jj of each lane (vpshufb on AVX2 too). */
static inline uv load_group_v(const uint8_t *p) { uv v; memcpy(&v, p, sizeof v); return v; }
static inline iv byte_of_lanes_v(uv v, const int jj)
{
#if VW == 16
    return byte_of_lanes(v, jj);
#else
    const __m256i idx = _mm256_setr_epi32((int)(0x80808000u | jj), (int)(0x80808000u | (4 + jj)),
                                          (int)(0x80808000u | (8 + jj)), (int)(0x80808000u | (12 + jj)),
                                          (int)(0x80808000u | jj), (int)(0x80808000u | (4 + jj)),
                                          (int)(0x80808000u | (8 + jj)), (int)(0x80808000u | (12 + jj)));
    return (iv)_mm256_shuffle_epi8((__m256i)v, idx);
#endif
}

/* The chunk's bytes are one stream read front to back in the first 16-row pass: prefetch it. */
static inline void prefetch_group(const uint8_t *grp, int64_t L)
{
    for (int64_t o = 0; o < L * 4; o += 64) __builtin_prefetch(grp + o + PF_LINES * 64, 0, 3);
}

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

/* ---- 8-bit activations (the `q8` numerics: llama.cpp's) ----------------------------------
 *
 * Each 32-element block of an activation row is quantized as ggml's quantize_row_q8_1 / q8_0 do:
 * d = max|x| / 127, q = round-to-nearest-even(x * 127 / max|x|) (int8), d kept as float16, and for
 * Q4_1 weights s = d * sum(q) as float16 too. The block's dot product is then an exact integer sum
 *   Q4_1:  sum_j (d_w q_j + m_w) (d_x p_j)  ~  d_w d_x * sum_j q_j p_j  +  m_w s_x
 *   Q8_0:  d_w d_x * sum_j q_j p_j
 * computed with AVX-512 VNNI (vpdpbusd: 64 byte products per instruction), or exactly the same
 * integers with plain vector code where VNNI is missing. The float32 block sums then run in a fixed
 * order, as in the float32 kernels. */

static inline float f16_round(float f)
{
#if defined(__F16C__)
    return _cvtsh_ss(_cvtss_sh(f, 0)); /* round to nearest even, as ggml's FP32_TO_FP16 */
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = x & 0x80000000u, ax = x & 0x7fffffffu;
    uint16_t h;
    if (ax >= 0x7f800000u) h = (uint16_t)((sign >> 16) | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    else if (ax >= 0x477ff000u) h = (uint16_t)((sign >> 16) | 0x7c00); /* overflow to inf */
    else if (ax < 0x38800000u) { /* subnormal half: round x / 2^-24 to an integer, ties to even */
        float a;
        memcpy(&a, &ax, 4);
        h = (uint16_t)((sign >> 16) | (uint16_t)nearbyintf(a * 16777216.f));
    } else {
        uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u); /* round to nearest even on the dropped 13 bits */
        h = (uint16_t)((sign >> 16) | ((r - 0x38000000u) >> 13));
    }
    return half_to_float(h);
#endif
}

/* x [M, K] float32 -> xq [M, K] bytes, dx [M, NB], sx [M, NB] (sx may be NULL). With offset, the bytes
 * are q + 128 (unsigned: the u8 operand of vpdpbusd when the weights are the signed side). */
static void quantize_rows_q8(const float *x, int64_t M, int64_t K, uint8_t *xq, float *dx, float *sx, int offset)
{
    int64_t NB = K / 32;
#pragma omp parallel for schedule(static) if (M * K >= 65536)
    for (int64_t rb = 0; rb < M * NB; rb++) {
        const float *v = x + rb * 32; /* row r = rb / NB, block b = rb % NB: rows are contiguous */
#if defined(__AVX512F__)
        /* the same numbers, 16 lanes at a time: max is exact, the products are the same float32
         * multiplications, and the conversion rounds to nearest even like nearbyintf */
        __m512 a = _mm512_loadu_ps(v), c = _mm512_loadu_ps(v + 16);
        float vmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
        float vd = vmax / 127.f, vid = vmax != 0.f ? 127.f / vmax : 0.f;
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(vid)));
        __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(vid)));
        int32_t vsum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
        if (offset) {
            qa = _mm512_add_epi32(qa, _mm512_set1_epi32(128));
            qc = _mm512_add_epi32(qc, _mm512_set1_epi32(128));
        }
        _mm_storeu_si128((__m128i *)(xq + rb * 32), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(xq + rb * 32 + 16), _mm512_cvtepi32_epi8(qc));
        dx[rb] = f16_round(vd);
        if (sx) sx[rb] = f16_round(vd * (float)vsum);
        continue;
#endif
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
        float d = amax / 127.f, id = amax != 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) {
            int32_t q = (int32_t)nearbyintf(v[j] * id);
            sum += q;
            xq[rb * 32 + j] = (uint8_t)(offset ? q + 128 : (int8_t)q);
        }
        dx[rb] = f16_round(d);
        if (sx) sx[rb] = f16_round(d * (float)sum);
    }
}

static inline uint32_t load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* acc + sum over the 4 bytes of each lane of u8(a) * s8(b): vpdpbusd, or the same integers without it. */
static inline i32x16 dpbusd(i32x16 acc, u32x16 a, u32x16 b)
{
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    return (i32x16)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)a, (__m512i)b);
#else
    for (int k = 0; k < 4; k++)
        acc += (i32x16)((a >> (8 * k)) & 255) * (((i32x16)(b << (24 - 8 * k))) >> 24);
    return acc;
#endif
}

static inline u32x16 splat_u32(uint32_t v) { return (u32x16){0} + v; }
static inline uv splat_uv(uint32_t v) { return (uv){0} + v; }

/* dpbusd on VW lanes. AVX2 (VW 8): the even and the odd bytes as 16-bit words (u8 zero-extended, s8 sign-extended),
 * two vpmaddwd: every product and sum exact, the same integers as vpdpbusd. */
static inline iv dpbusd_v(iv acc, uv a, uv b)
{
#if VW == 16
    return dpbusd(acc, a, b);
#else
    const __m256i lo8 = _mm256_set1_epi16(0x00ff);
    __m256i ae = _mm256_and_si256((__m256i)a, lo8), ao = _mm256_srli_epi16((__m256i)a, 8);
    __m256i be = _mm256_srai_epi16(_mm256_slli_epi16((__m256i)b, 8), 8), bo = _mm256_srai_epi16((__m256i)b, 8);
    return acc + (iv)_mm256_add_epi32(_mm256_madd_epi16(ae, be), _mm256_madd_epi16(ao, bo));
#endif
}

/* Independent integer sums per activation row: with few rows one chain of dependent vpdpbusd per row
 * would wait on the instruction's latency; with many rows the rows themselves are independent. */
#define NCHAIN(nr) ((nr) <= 2 ? 4 : (nr) <= 4 ? 2 : 1)

/* One activation row: the chunk's lane groups side by side (see q4_1_row_tile), two integer chains each
 * (integer sums: any split is exact); the float steps as in q4_1_q8_tile, so bit-identical to it. */
static inline __attribute__((always_inline)) void
q4_1_q8_row_tile(const int8_t *xq, const float *dx, const float *sx, const uint8_t *qs, const void *d,
                 const void *m, const int f32s, const int w8, float *out, int64_t K, int64_t ldo, int64_t NB,
                 int64_t L, int64_t c, int64_t r0, const int NL)
{
    f32x16 acc[4];
    for (int u = 0; u < NL; u++) acc[u] = (f32x16){0};
    for (int64_t b = 0; b < NB - FAULT(Q8_DROP_BLOCK); b++) {
        i32x16 s0[4], s1[4];
        for (int u = 0; u < NL; u++) s0[u] = s1[u] = (i32x16){0};
        const uint8_t *xb = (const uint8_t *)xq + r0 * K + b * 32;
        if (w8) /* 8-bit weights (Q8_DM): 8 groups of 4 elements */
            for (int g = 0; g < 8; g++) {
                const uint8_t *grp = group_at(qs, NB, L, c, b, g, 8);
                prefetch_group(grp, L);
                u32x16 xv = splat_u32(load_u32(xb + 4 * g));
                for (int u = 0; u < NL; u++) {
                    i32x16 *sg = g & 1 ? &s1[u] : &s0[u];
                    *sg = dpbusd(*sg, load_group(grp + 16 * u * 4), xv);
                }
            }
        else /* nibbles: group g holds elements 4g.. (low) and 16+4g.. (high) */
            for (int g = 0; g < 4; g++) {
                const uint8_t *grp = group_at(qs, NB, L, c, b, g, 4);
                prefetch_group(grp, L);
                u32x16 xl = splat_u32(load_u32(xb + 4 * g)), xh = splat_u32(load_u32(xb + 16 + 4 * g));
                for (int u = 0; u < NL; u++) {
                    u32x16 v = load_group(grp + 16 * u * 4);
                    s0[u] = dpbusd(s0[u], v & 0x0f0f0f0fu, xl);
                    s1[u] = dpbusd(s1[u], (v >> 4) & 0x0f0f0f0fu, xh);
                }
            }
        int64_t rb = r0 * NB + b;
        for (int u = 0; u < NL; u++) {
            f32x16 dv = load_scales(d, (c * NB + b) * L + 16 * u, f32s), mv = load_scales(m, (c * NB + b) * L + 16 * u, f32s);
            acc[u] += (dv * dx[rb]) * __builtin_convertvector(s0[u] + s1[u], f32x16) + mv * sx[rb];
        }
    }
    for (int u = 0; u < NL; u++) store16(out + r0 * ldo + c * L + 16 * u, acc[u]);
}

#if VW == 8
/* AVX2 without VNNI, Q4_1 nibbles: vpmaddubsw (u8 x s8, adjacent pairs summed to 16 bits) then vpmaddwd by 1.
 * A pair is at most 2 * 15 * 128 = 3840, the block's 8 of them per lane 30720 < 32767: the 16-bit sums never
 * saturate nor wrap, so the block's integer sum is exact, the very integer of the dpbusd chains; the float steps
 * are those of q4_1_q8_tile, so the same bits. */
static inline __attribute__((always_inline)) void
q4_1_q8_tile_avx2(const int8_t *xq, const float *dx, const float *sx, const uint8_t *qs, const void *d,
                  const void *m, const int f32s, float *out, int64_t K, int64_t ldo, int64_t NB, int64_t L,
                  int64_t c, int64_t r0, const int nr)
{
    const __m256i nib = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int64_t i0 = 0; i0 < L; i0 += VW) {
        fv acc[RT];
        for (int r = 0; r < nr; r++) acc[r] = (fv){0};
        for (int64_t b = 0; b < NB - FAULT(Q8_DROP_BLOCK); b++) {
            __m256i s16[RT];
            for (int r = 0; r < nr; r++) s16[r] = _mm256_setzero_si256();
            for (int g = 0; g < 4; g++) {
                const uint8_t *grp = group_at(qs, NB, L, c, b, g, 4);
                if (i0 == 0) prefetch_group(grp, L);
                __m256i v = _mm256_loadu_si256((const __m256i *)(grp + i0 * 4));
                __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
                for (int r = 0; r < nr; r++) {
                    const uint8_t *xb = (const uint8_t *)xq + (r0 + r) * K + b * 32;
                    __m256i xl = _mm256_set1_epi32((int)load_u32(xb + 4 * g));
                    __m256i xh = _mm256_set1_epi32((int)load_u32(xb + 16 + 4 * g));
                    s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lo, xl));
                    s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hi, xh));
                }
            }
            fv dv = load_scales_v(d, (c * NB + b) * L + i0, f32s), mv = load_scales_v(m, (c * NB + b) * L + i0, f32s);
            for (int r = 0; r < nr; r++) {
                int64_t rb = (r0 + r) * NB + b;
                iv t = (iv)_mm256_madd_epi16(s16[r], ones);
                acc[r] += (dv * dx[rb]) * __builtin_convertvector(t, fv) + mv * sx[rb];
            }
        }
        for (int r = 0; r < nr; r++) storev(out + (r0 + r) * ldo + c * L + i0, acc[r]);
    }
}
#endif

/* f32s: float32 scales (a Q4_K matrix rewritten as Q4_1F: d·sc, -dmin·mn per 32), else Q4_1's float16.
 * w8: 8-bit unsigned weights in 8 groups (Q8_DM, float32 scales), else nibbles in 4. */
static inline __attribute__((always_inline)) void
q4_1_q8_tile(const int8_t *xq, const float *dx, const float *sx, const uint8_t *qs, const void *d,
             const void *m, const int f32s, const int w8, float *out, int64_t K, int64_t ldo, int64_t NB, int64_t L,
             int64_t c, int64_t r0, const int nr)
{
    ONE_ROW_TILE(q4_1_q8_row_tile, xq, dx, sx, qs, d, m, f32s, w8, out, K, ldo, NB, L, c, r0);
#if VW == 8
    if (!w8) { q4_1_q8_tile_avx2(xq, dx, sx, qs, d, m, f32s, out, K, ldo, NB, L, c, r0, nr); return; }
#endif
    for (int64_t i0 = 0; i0 < L; i0 += VW) {
        fv acc[RT];
        for (int r = 0; r < nr; r++) acc[r] = (fv){0};
        for (int64_t b = 0; b < NB - FAULT(Q8_DROP_BLOCK); b++) {
            iv isum[RT * NCHAIN(nr)]; /* NCHAIN independent sums per row (integers: any split is exact) */
            for (int r = 0; r < nr * NCHAIN(nr); r++) isum[r] = (iv){0};
            for (int g = 0; w8 && g < 8; g++) { /* 8-bit weights: the unsigned operand as they are */
                const uint8_t *grp = group_at(qs, NB, L, c, b, g, 8);
                if (i0 == 0) prefetch_group(grp, L);
                uv w = load_group_v(grp + i0 * 4);
                for (int r = 0; r < nr; r++) {
                    iv *s0 = &isum[r * NCHAIN(nr) + g % NCHAIN(nr)];
                    *s0 = dpbusd_v(*s0, w, splat_uv(load_u32((const uint8_t *)xq + (r0 + r) * K + b * 32 + 4 * g)));
                }
            }
            for (int g = 0; !w8 && g < 4; g++) {
                const uint8_t *grp = group_at(qs, NB, L, c, b, g, 4);
                if (i0 == 0) prefetch_group(grp, L);
                uv v = load_group_v(grp + i0 * 4);
                uv lo = v & 0x0f0f0f0fu, hi = (v >> 4) & 0x0f0f0f0fu; /* elements 4g.., 16+4g.. */
                for (int r = 0; r < nr; r++) {
                    const uint8_t *xb = (const uint8_t *)xq + (r0 + r) * K + b * 32;
                    iv *s0 = &isum[r * NCHAIN(nr) + (2 * g) % NCHAIN(nr)];
                    iv *s1 = &isum[r * NCHAIN(nr) + (2 * g + 1) % NCHAIN(nr)];
                    *s0 = dpbusd_v(*s0, lo, splat_uv(load_u32(xb + 4 * g)));
                    *s1 = dpbusd_v(*s1, hi, splat_uv(load_u32(xb + 16 + 4 * g)));
                }
            }
            fv dv = load_scales_v(d, (c * NB + b) * L + i0, f32s), mv = load_scales_v(m, (c * NB + b) * L + i0, f32s);
            for (int r = 0; r < nr; r++) {
                int64_t rb = (r0 + r) * NB + b;
                iv t = isum[r * NCHAIN(nr)];
                for (int a = 1; a < NCHAIN(nr); a++) t += isum[r * NCHAIN(nr) + a];
                acc[r] += (dv * dx[rb]) * __builtin_convertvector(t, fv) + mv * sx[rb];
            }
        }
        for (int r = 0; r < nr; r++) storev(out + (r0 + r) * ldo + c * L + i0, acc[r]);
    }
}

static void q4_1_q8_chunk(const int8_t *xq, const float *dx, const float *sx, const uint8_t *qs, const uint16_t *d,
                          const uint16_t *m, float *out, int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    ROW_TILES(q4_1_q8_tile, M, xq, dx, sx, qs, d, m, 0, 0, out, K, ldo, K / 32, L, c);
}

static void q4_1f_q8_chunk(const int8_t *xq, const float *dx, const float *sx, const uint8_t *qs, const float *d,
                           const float *m, float *out, int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    ROW_TILES(q4_1_q8_tile, M, xq, dx, sx, qs, d, m, 1, 0, out, K, ldo, K / 32, L, c);
}

/* Q8_DM (int8 q in 0..31 - a rewritten Q5_K or Q5_1 - with float32 d, m per 32): the weights are the
 * unsigned operand, as Q4_1's nibbles are: d dx Σ q p + m s per block (q4_1_q8_tile with w8). */
static void q8_dm_q8_chunk(const int8_t *xq, const float *dx, const float *sx, const uint8_t *qs, const float *d,
                           const float *m, float *out, int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    ROW_TILES(q4_1_q8_tile, M, xq, dx, sx, qs, d, m, 1, 1, out, K, ldo, K / 32, L, c);
}

/* One activation row for the signed-weight kinds (Q8_0: float16 d per 32; s16: Q8_S16, float32 d per 16):
 * the chunk's lane groups side by side (see q4_1_row_tile); integer sums (exact in any split) and the float
 * steps of q8s_q8_tile, so bit-identical to it. */
static inline __attribute__((always_inline)) void
q8s_q8_row_tile(const uint8_t *xu, const float *dx, const int8_t *qs, const void *d, const int s16, float *out,
                int64_t K, int64_t ldo, int64_t NB, int64_t L, int64_t c, int64_t r0, const int NL)
{
    f32x16 acc[4];
    for (int u = 0; u < NL; u++) acc[u] = (f32x16){0};
    for (int64_t b = 0; b < NB; b++) {
        i32x16 is[2][4], corr[2][4];
        for (int u = 0; u < NL; u++) is[0][u] = is[1][u] = corr[0][u] = corr[1][u] = (i32x16){0};
        const uint8_t *xb = xu + r0 * K + b * 32;
        for (int g = 0; g < 8; g++) {
            const uint8_t *grp = group_at(qs, NB, L, c, b, g, 8);
            prefetch_group(grp, L);
            u32x16 xv = splat_u32(load_u32(xb + 4 * g));
            const int h = s16 ? g / 4 : g & 1; /* Q8_S16: the half's sums; Q8_0: two chains (any split is exact) */
            for (int u = 0; u < NL; u++) {
                u32x16 w = load_group(grp + 16 * u * 4);
                corr[h][u] = dpbusd(corr[h][u], splat_u32(0x80808080u), w);
                is[h][u] = dpbusd(is[h][u], xv, w);
            }
        }
        const float xd = dx[r0 * NB + b];
        for (int u = 0; u < NL; u++) {
            if (s16) {
                f32x16 d0 = load16((const float *)d + ((c * NB + b) * 2) * L + 16 * u);
                f32x16 d1 = load16((const float *)d + ((c * NB + b) * 2 + 1) * L + 16 * u);
                acc[u] += (d0 * xd) * __builtin_convertvector(is[0][u] - corr[0][u], f32x16) +
                          (d1 * xd) * __builtin_convertvector(is[1][u] - corr[1][u], f32x16);
            } else {
                f32x16 dv = load16h((const uint16_t *)d + (c * NB + b) * L + 16 * u);
                i32x16 cs = corr[0][u] + corr[1][u];
                acc[u] += (dv * xd) * __builtin_convertvector((is[0][u] + is[1][u]) - cs, f32x16);
            }
        }
    }
    for (int u = 0; u < NL; u++) store16(out + r0 * ldo + c * L + 16 * u, acc[u]);
}

/* xu: the activation bytes + 128 (unsigned); the weights are the signed operand. sum (p+128) q - 128 sum q
 * = sum p q, the correction computed once per block for all rows. s16: a Q8_S16 matrix (int8 q-32 - a
 * rewritten Q6_K - with a float32 scale per 16): one integer sum per 16-element half, d0 dx Σ_0..15 q p +
 * d1 dx Σ_16..31 q p per block; else Q8_0 (float16 d per 32). */
static inline __attribute__((always_inline)) void
q8s_q8_tile(const uint8_t *xu, const float *dx, const int8_t *qs, const void *d, const int s16, float *out,
            int64_t K, int64_t ldo, int64_t NB, int64_t L, int64_t c, int64_t r0, const int nr)
{
    ONE_ROW_TILE(q8s_q8_row_tile, xu, dx, qs, d, s16, out, K, ldo, NB, L, c, r0);
    const int nch = s16 ? 2 : NCHAIN(nr); /* integer sums per row: the two halves, or independent chains */
    for (int64_t i0 = 0; i0 < L; i0 += VW) {
        fv acc[RT];
        for (int r = 0; r < nr; r++) acc[r] = (fv){0};
        for (int64_t b = 0; b < NB; b++) {
            iv isum[RT * 4], corr[2] = {{0}, {0}};
            for (int r = 0; r < nr * nch; r++) isum[r] = (iv){0};
            for (int g = 0; g < 8; g++) {
                const uint8_t *grp = group_at(qs, NB, L, c, b, g, 8);
                if (i0 == 0) prefetch_group(grp, L);
                uv w = load_group_v(grp + i0 * 4);
                corr[s16 ? g / 4 : g & 1] = dpbusd_v(corr[s16 ? g / 4 : g & 1], splat_uv(0x80808080u), w);
                for (int r = 0; r < nr; r++) {
                    iv *s0 = &isum[r * nch + (s16 ? g / 4 : g % nch)];
                    *s0 = dpbusd_v(*s0, splat_uv(load_u32(xu + (r0 + r) * K + b * 32 + 4 * g)), w);
                }
            }
            if (s16) {
                fv d0 = loadv((const float *)d + ((c * NB + b) * 2) * L + i0);
                fv d1 = loadv((const float *)d + ((c * NB + b) * 2 + 1) * L + i0);
                for (int r = 0; r < nr; r++) {
                    float xd = dx[(r0 + r) * NB + b];
                    acc[r] += (d0 * xd) * __builtin_convertvector(isum[r * 2] - corr[0], fv) +
                              (d1 * xd) * __builtin_convertvector(isum[r * 2 + 1] - corr[1], fv);
                }
            } else {
                fv dv = loadvh((const uint16_t *)d + (c * NB + b) * L + i0);
                iv cs = corr[0] + corr[1];
                for (int r = 0; r < nr; r++) {
                    iv t = isum[r * nch];
                    for (int a = 1; a < nch; a++) t += isum[r * nch + a];
                    acc[r] += (dv * dx[(r0 + r) * NB + b]) * __builtin_convertvector(t - cs, fv);
                }
            }
        }
        for (int r = 0; r < nr; r++) storev(out + (r0 + r) * ldo + c * L + i0, acc[r]);
    }
}

static void q8_0_q8_chunk(const uint8_t *xu, const float *dx, const int8_t *qs, const uint16_t *d, float *out,
                          int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    ROW_TILES(q8s_q8_tile, M, xu, dx, qs, d, 0, out, K, ldo, K / 32, L, c);
}

static void q8_s16_q8_chunk(const uint8_t *xu, const float *dx, const int8_t *qs, const float *d, float *out,
                            int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    ROW_TILES(q8s_q8_tile, M, xu, dx, qs, d, 1, out, K, ldo, K / 32, L, c);
}

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

static int check_size(Py_buffer *b, Py_ssize_t need, const char *what)
{
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: buffer of %zd bytes, kernel needs %zd", what, b->len, need);
        return -1;
    }
    return 0;
}

/* ---- decode attention: one query row per sequence, each sequence with its own KV cache ------ */

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

/* Sum of 16 lanes as a fixed tree (halves added: 16 -> 8 -> 4 -> 2 -> 1), deterministic. */
static inline float hsum16(f32x16 a)
{
    f32x8 a0, a1;
    memcpy(&a0, &a, 32);
    memcpy(&a1, (char *)&a + 32, 32);
    f32x8 b = a0 + a1;
    f32x4 b0, b1;
    memcpy(&b0, &b, 16);
    memcpy(&b1, (char *)&b + 16, 16);
    f32x4 c = b0 + b1;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

typedef int32_t i32x8 __attribute__((vector_size(32)));

/* The sums of 4 vectors' 16 lanes, as one fixed tree (deterministic): [sum(a), sum(b), sum(c), sum(d)]. */
static inline f32x4 hsum4x16(f32x16 a, f32x16 b, f32x16 c, f32x16 d)
{
    f32x8 a8, b8, c8, d8, t;
    memcpy(&a8, &a, 32); memcpy(&t, (char *)&a + 32, 32); a8 += t;
    memcpy(&b8, &b, 32); memcpy(&t, (char *)&b + 32, 32); b8 += t;
    memcpy(&c8, &c, 32); memcpy(&t, (char *)&c + 32, 32); c8 += t;
    memcpy(&d8, &d, 32); memcpy(&t, (char *)&d + 32, 32); d8 += t;
    const i32x8 lo = {0, 8, 1, 9, 2, 10, 3, 11}, hi = {4, 12, 5, 13, 6, 14, 7, 15};
    f32x8 ab = __builtin_shuffle(a8, b8, lo) + __builtin_shuffle(a8, b8, hi); /* a0 b0 a1 b1 a2 b2 a3 b3 */
    f32x8 cd = __builtin_shuffle(c8, d8, lo) + __builtin_shuffle(c8, d8, hi);
    const i32x8 lo2 = {0, 1, 8, 9, 2, 3, 10, 11}, hi2 = {4, 5, 12, 13, 6, 7, 14, 15};
    f32x8 abcd = __builtin_shuffle(ab, cd, lo2) + __builtin_shuffle(ab, cd, hi2); /* a b c d a b c d */
    f32x4 r0, r1;
    memcpy(&r0, &abcd, 16);
    memcpy(&r1, (char *)&abcd + 16, 16);
    return r0 + r1;
}

/* K and V rows are read as streams, prefetched this many positions ahead (as PF_LINES above). */
#ifndef ATT_PF
#define ATT_PF 16
#endif

/* exp(x) for any float32 x: x = n ln2 + r with n the nearest integer to x/ln2 (the 1.5*2^23 rounding
 * trick), exp(r) by its degree-7 Taylor polynomial (|r| <= ln2/2: truncation ~3e-9 relative), 2^n by
 * building the float's exponent. Below -87 gives 0; above 88 gives exp(88) (callers only form
 * 1/(1+e^x) with it, which is then 0 to float32 precision as it would be with infinity). */
static inline f32x16 expv16(f32x16 x)
{
    const f32x16 zero = {0};
    i32x16 under = x < zero - 87.f;
    x = (f32x16)((i32x16)x & ~under) + (f32x16)(under & (i32x16)(zero - 87.f));
    i32x16 over = x > zero + 88.f;
    x = (f32x16)((i32x16)x & ~over) + (f32x16)(over & (i32x16)(zero + 88.f));
    f32x16 n = (x * 1.44269504088896341f + (zero + 12582912.f)) - 12582912.f; /* nearest integer to x/ln2 */
    f32x16 r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    f32x16 p = zero + 1.f / 5040;
    p = p * r + 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    i32x16 e = (__builtin_convertvector(n, i32x16) + 127) << 23; /* 2^n */
    return (f32x16)((i32x16)(p * (f32x16)e) & ~under);
}

/* exp of the 16 floats at v, in place (softmax: x - max <= 0; -inf gives 0). */
static inline void exp16(float *v) { store16(v, expv16(load16(v))); }

/* K/V elements: float32, or float16 (the `q8` numerics' cache, as llama.cpp keeps it), widened exactly. */
static inline f32x16 kv16(const void *p, int64_t i, const int f16)
{
    return f16 ? load16h((const uint16_t *)p + i) : load16((const float *)p + i);
}

static inline float kv1(const void *p, int64_t i, const int f16)
{
    return f16 ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline const void *kv_at(const void *p, int64_t i, const int f16)
{
    return (const char *)p + i * (f16 ? 2 : 4);
}

/* The g heads' scaled scores (before the softmax) copied to sout, rows lds floats apart: a traced decode
 * step's checkpoint-4 tensor, taken from the very buffer the softmax then reads (sout NULL: not traced). */
static inline void trace_scores(const float *scores, int64_t Tp, int64_t T, int64_t g, float *sout, int64_t lds)
{
    if (sout)
        for (int64_t h = 0; h < g; h++) memcpy(sout + h * lds, scores + h * Tp, sizeof(float) * T);
}

/* Softmax denominators: 1 / sum (FAULT_SOFTMAX_SUM: weights that do not sum to 1). */
static inline float inv_sum(float sum) { return 1.f / (FAULT(SOFTMAX_SUM) ? 1.02f * sum : sum); }

/* One (sequence, KV head) with its g query heads: softmax(q . K[0:T]^T * scale) . V[0:T].
 * k, v point at this KV head's [max_seq][hd] slab (float32, or float16 when f16); q at g consecutive
 * query rows [g][hd]; scores scratch holds g * T floats (T rounded up to 16); sout, lds: trace_scores. */
static inline __attribute__((always_inline)) void
attend_group(const float *q, const void *k, const void *v, const int f16, int64_t T, int64_t hd, int64_t g,
             float scale, float *scores, float *out, float *sout, int64_t lds)
{
    const int64_t pf = f16 ? 2 * ATT_PF : ATT_PF; /* positions ahead: the same bytes ahead either way */
    int64_t Tp = (T + 15) & ~(int64_t)15;
    const int wide = hd % 64 == 0; /* 4 vectors per 64 elements, kept in registers */
    int64_t t = 0;
    if (hd % 16 == 0) /* 4 positions at a time: their 4 dot products reduced together */
        for (; t + 4 <= T; t += 4) {
            for (int64_t i = 0; i < 4 * hd; i += (f16 ? 32 : 16)) /* one prefetch per 64-byte line */
                __builtin_prefetch(kv_at(k, (t + pf) * hd + i, f16), 0, 3);
            for (int64_t h = 0; h < g; h++) {
                const float *qh = q + h * hd;
                f32x16 a[4];
                for (int j = 0; j < 4; j++) {
                    const int64_t kt = (t + j) * hd;
                    f32x16 acc = {0};
                    for (int64_t i = 0; i < hd; i += 16) acc += load16(qh + i) * kv16(k, kt + i, f16);
                    a[j] = acc;
                }
                f32x4 s4 = hsum4x16(a[0], a[1], a[2], a[3]);
                for (int j = 0; j < 4; j++) scores[h * Tp + t + j] = s4[j] * scale;
            }
        }
    for (; t < T; t++) {
        const int64_t kt = t * hd;
        for (int64_t h = 0; h < g; h++) {
            const float *qh = q + h * hd;
            float s = 0.f;
            if (wide) { /* 64 partial sums, then a fixed tree: vectorised, deterministic */
                f32x16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                for (int64_t i = 0; i < hd; i += 64) {
                    a0 += load16(qh + i) * kv16(k, kt + i, f16);
                    a1 += load16(qh + i + 16) * kv16(k, kt + i + 16, f16);
                    a2 += load16(qh + i + 32) * kv16(k, kt + i + 32, f16);
                    a3 += load16(qh + i + 48) * kv16(k, kt + i + 48, f16);
                }
                s = hsum16((a0 + a1) + (a2 + a3));
            } else {
                for (int64_t i = 0; i < hd; i++) s += qh[i] * kv1(k, kt + i, f16);
            }
            scores[h * Tp + t] = s * scale;
        }
    }
    trace_scores(scores, Tp, T, g, sout, lds);
    for (int64_t h = 0; h < g; h++) {
        float *sh = scores + h * Tp;
        float mx = -INFINITY;
        for (int64_t t = 0; t < T; t++) mx = sh[t] > mx ? sh[t] : mx;
        for (int64_t t = T; t < Tp; t++) sh[t] = -INFINITY;
        for (int64_t t = 0; t < Tp; t++) sh[t] -= mx;
        f32x16 acc = {0}; /* the padding lanes hold exp(-inf) = 0 */
        for (int64_t t = 0; t < Tp; t += 16) {
            exp16(sh + t);
            acc += load16(sh + t);
        }
        float sum = hsum16(acc); /* 16 partial sums and a fixed tree: vectorised, deterministic */
        float inv = inv_sum(sum);
        for (int64_t t = 0; t < T; t++) sh[t] *= inv; /* the softmax weights */
        float *oh = out + h * hd;
        if (wide) {
            for (int64_t i = 0; i < hd; i += 64) {
                f32x16 o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0};
                for (int64_t t = 0; t < T; t++) {
                    const int64_t vt = t * hd + i;
                    __builtin_prefetch(kv_at(v, vt + pf * hd, f16), 0, 3);
                    if (!f16) __builtin_prefetch(kv_at(v, vt + pf * hd + 32, f16), 0, 3); /* 64 float16 = 1 line */
                    float p = sh[t];
                    o0 += p * kv16(v, vt, f16);
                    o1 += p * kv16(v, vt + 16, f16);
                    o2 += p * kv16(v, vt + 32, f16);
                    o3 += p * kv16(v, vt + 48, f16);
                }
                store16(oh + i, o0);
                store16(oh + i + 16, o1);
                store16(oh + i + 32, o2);
                store16(oh + i + 48, o3);
            }
        } else {
            for (int64_t i = 0; i < hd; i++) oh[i] = 0.f;
            for (int64_t t = 0; t < T; t++) {
                float p = sh[t];
                for (int64_t i = 0; i < hd; i++) oh[i] += p * kv1(v, t * hd + i, f16);
            }
        }
    }
}

/* ---- decode attention for head_dim a multiple of 16, up to 128 (NV = hd/16 vectors per row) ----
 * Same math as attend_group, arranged so that the two cores' FMA units, not dependency chains or
 * horizontal sums, set the pace:
 *   scores: 16 positions at a time - 16 dot products kept as 16 vectors, then one fixed transpose-add
 *           tree turns them into one vector of 16 sums (45 shuffles/adds per 16 positions instead of a
 *           horizontal sum per position); a float16 K block is widened once, not once per query head;
 *   values: position by position, each V row loaded (widened) once and multiplied into every query
 *           head of a tile - GH x NV independent accumulators, so no FMA waits on the previous one.
 * Every sum runs in a fixed order that depends on neither the batch nor the thread count. */

/* r[j] = sum of the 16 lanes of a[j], j = 0..15 (a fixed tree: each level adds lane halves). */
static inline f32x16 transpose_sum16(const f32x16 *a)
{
    const i32x16 l1a = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                 l1b = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
                 l2a = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
                 l2b = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31},
                 l3a = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
                 l3b = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31},
                 l4a = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
                 l4b = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    f32x16 b[8], c[4], d[2];
    for (int k = 0; k < 8; k++) /* lanes 0-7: 8 partials of a[2k], 8-15: of a[2k+1] */
        b[k] = __builtin_shuffle(a[2 * k], a[2 * k + 1], l1a) + __builtin_shuffle(a[2 * k], a[2 * k + 1], l1b);
    for (int k = 0; k < 4; k++) /* 4 lanes each of a[4k..4k+3] */
        c[k] = __builtin_shuffle(b[2 * k], b[2 * k + 1], l2a) + __builtin_shuffle(b[2 * k], b[2 * k + 1], l2b);
    for (int k = 0; k < 2; k++) /* 2 lanes each of a[8k..8k+7] */
        d[k] = __builtin_shuffle(c[2 * k], c[2 * k + 1], l3a) + __builtin_shuffle(c[2 * k], c[2 * k + 1], l3b);
    return __builtin_shuffle(d[0], d[1], l4a) + __builtin_shuffle(d[0], d[1], l4b);
}

/* dst[m][j] = scale * (q[m] . kb[j]) for nq query rows q[m] and the 16 rows of kb [16][16*nv] float32: per
 * (query, key) 16 lane partial sums over the 16-element chunks in order, then transpose_sum16's fixed tree - the
 * same sum whichever queries share the call. Two queries and two keys at a time, each load feeding two FMAs. */
#if VW == 8 && defined(__AVX2__)
/* AVX2: a 16-lane vector is two ymm (lanes 0-7, 8-15), so 16 keys' partial sums at once would be 32 registers,
 * spilled at every step. Here each key's lanes l and l+8 are added (transpose_sum16's first level) and this
 * finishes its tree for 8 keys: lanes l + l+4, then l + l+2, then l + l+1; the 8 sums in key order. */
static inline __m256 reduce8(const __m256 *x)
{
    __m256 y[4], z[2];
    for (int k = 0; k < 4; k++) /* lanes 0-3: key 2k's x_l + x_l+4, lanes 4-7: key 2k+1's */
        y[k] = _mm256_add_ps(_mm256_permute2f128_ps(x[2 * k], x[2 * k + 1], 0x20),
                             _mm256_permute2f128_ps(x[2 * k], x[2 * k + 1], 0x31));
    for (int k = 0; k < 2; k++) /* per 128 bits: y_0 + y_2, y_1 + y_3 of two keys */
        z[k] = _mm256_add_ps(_mm256_shuffle_ps(y[2 * k], y[2 * k + 1], 0x44), _mm256_shuffle_ps(y[2 * k], y[2 * k + 1], 0xEE));
    __m256 w = _mm256_add_ps(_mm256_shuffle_ps(z[0], z[1], 0x88), _mm256_shuffle_ps(z[0], z[1], 0xDD));
    return _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* keys 0,2,4,6 | 1,3,5,7 */
}

static void scores16(const float *const *q, int nq, const float *kb, int64_t nv, float scale, float *const *dst)
{
    const int64_t hd = 16 * nv;
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 x[2][16];
    for (int m = 0; m < nq; m += 2) {
        const float *q0 = q[m], *q1 = q[m + 1 < nq ? m + 1 : m]; /* an odd last query computed twice */
        for (int j = 0; j < 16; j += 2) {
            const float *k0 = kb + j * hd, *k1 = k0 + hd;
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int64_t i = 0; i < hd; i += 16) {
                __m256 x0l = _mm256_loadu_ps(q0 + i), x0h = _mm256_loadu_ps(q0 + i + 8);
                __m256 x1l = _mm256_loadu_ps(q1 + i), x1h = _mm256_loadu_ps(q1 + i + 8);
                __m256 yl = _mm256_loadu_ps(k0 + i), yh = _mm256_loadu_ps(k0 + i + 8);
                a[0] = _mm256_fmadd_ps(x0l, yl, a[0]), a[1] = _mm256_fmadd_ps(x0h, yh, a[1]);
                a[2] = _mm256_fmadd_ps(x1l, yl, a[2]), a[3] = _mm256_fmadd_ps(x1h, yh, a[3]);
                yl = _mm256_loadu_ps(k1 + i), yh = _mm256_loadu_ps(k1 + i + 8);
                a[4] = _mm256_fmadd_ps(x0l, yl, a[4]), a[5] = _mm256_fmadd_ps(x0h, yh, a[5]);
                a[6] = _mm256_fmadd_ps(x1l, yl, a[6]), a[7] = _mm256_fmadd_ps(x1h, yh, a[7]);
            }
            x[0][j] = _mm256_add_ps(a[0], a[1]), x[1][j] = _mm256_add_ps(a[2], a[3]);
            x[0][j + 1] = _mm256_add_ps(a[4], a[5]), x[1][j + 1] = _mm256_add_ps(a[6], a[7]);
        }
        for (int r = 0; r < 2 && m + r < nq; r++) {
            _mm256_storeu_ps(dst[m + r], _mm256_mul_ps(reduce8(x[r]), sc));
            _mm256_storeu_ps(dst[m + r] + 8, _mm256_mul_ps(reduce8(x[r] + 8), sc));
        }
    }
}
#else
static void scores16(const float *const *q, int nq, const float *kb, int64_t nv, float scale, float *const *dst)
{
    const int64_t hd = 16 * nv;
    f32x16 part[2][16];
    for (int m = 0; m < nq; m += 2) {
        const float *q0 = q[m], *q1 = q[m + 1 < nq ? m + 1 : m]; /* an odd last query computed twice */
        for (int j = 0; j < 16; j += 2) {
            const float *k0 = kb + j * hd, *k1 = k0 + hd;
            f32x16 a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0};
            for (int64_t i = 0; i < hd; i += 16) {
                f32x16 x0 = load16(q0 + i), x1 = load16(q1 + i), y0 = load16(k0 + i), y1 = load16(k1 + i);
                a00 += x0 * y0;
                a01 += x0 * y1;
                a10 += x1 * y0;
                a11 += x1 * y1;
            }
            part[0][j] = a00, part[0][j + 1] = a01, part[1][j] = a10, part[1][j + 1] = a11;
        }
        store16(dst[m], transpose_sum16(part[0]) * scale);
        if (m + 1 < nq) store16(dst[m + 1], transpose_sum16(part[1]) * scale);
    }
}
#endif

/* out[h] (+)= sum_{t0 <= t < t1} p[h][t] V[t] for GH query heads (p rows Tp apart, out rows 16*NV apart):
 * from zero when t0 == 0, else onward from what out holds - a row's sum taken in blocks of positions is
 * the same sum, in the same order, as in one pass. */
static inline __attribute__((always_inline)) void
values_tile(const float *p, int64_t Tp, const void *v, const int F16, int64_t t0, int64_t t1, const int NV,
            const int GH, int64_t pf, float *out)
{
    const int64_t hd = 16 * NV;
    const int NW = NV * (16 / VW); /* machine vectors per head row */
    fv acc[4][16];
    for (int h = 0; h < GH; h++)
        for (int i = 0; i < NW; i++) acc[h][i] = t0 ? loadv(out + h * hd + VW * i) : splatv(0.f);
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t i = 0; i < hd * (F16 ? 2 : 4); i += 64) __builtin_prefetch((const char *)kv_at(v, (t + pf) * hd, F16) + i, 0, 3);
        for (int h = 0; h < GH; h++) {
            const fv ph = splatv(p[h * Tp + t]);
            for (int i = 0; i < NW; i++) {
                const int64_t at = t * hd + VW * i;
                acc[h][i] = fmav(ph, F16 ? loadvh((const uint16_t *)v + at) : loadv((const float *)v + at), acc[h][i]);
            }
        }
    }
    for (int h = 0; h < GH; h++)
        for (int i = 0; i < NW; i++) storev(out + h * hd + VW * i, acc[h][i]);
}

/* GH heads per tile: at most 16 registers of sums, at most 4 heads; any GH gives the same bits (lane by lane the
 * same sums in the same order). */
static inline int values_heads(int nv)
{
    int gh = (VW == 16 ? 16 : 4) / nv; /* AVX2: 8 ymm of sums (a 16-lane vector is two ymm) */
    return gh > 4 ? 4 : gh < 1 ? 1 : gh;
}

#define VALUES_CASE(NV_, GH_) \
    case (NV_) * 8 + (GH_):                                                                       \
        if (f16) values_tile(p, Tp, v, 1, t0, t1, NV_, GH_, pf, out);                              \
        else values_tile(p, Tp, v, 0, t0, t1, NV_, GH_, pf, out);                                  \
        break;

static void values_dispatch(const float *p, int64_t Tp, const void *v, const int f16, int64_t t0, int64_t t1, int nv,
                            int gh, int64_t pf, float *out)
{
    switch (nv * 8 + gh) {
        VALUES_CASE(1, 1) VALUES_CASE(1, 2) VALUES_CASE(1, 3) VALUES_CASE(1, 4)
        VALUES_CASE(2, 1) VALUES_CASE(2, 2) VALUES_CASE(2, 3) VALUES_CASE(2, 4)
        VALUES_CASE(3, 1) VALUES_CASE(3, 2) VALUES_CASE(3, 3) VALUES_CASE(3, 4)
        VALUES_CASE(4, 1) VALUES_CASE(4, 2) VALUES_CASE(4, 3) VALUES_CASE(4, 4)
        VALUES_CASE(5, 1) VALUES_CASE(5, 2) VALUES_CASE(5, 3)
        VALUES_CASE(6, 1) VALUES_CASE(6, 2)
        VALUES_CASE(7, 1) VALUES_CASE(7, 2)
        VALUES_CASE(8, 1) VALUES_CASE(8, 2)
    }
}

/* Positions per block of the values pass: V rows of a block are read once for every row of a row block. */
#define VALUES_BLOCK 128

/* attend_group for hd = 16*nv, nv = 1..8, over R consecutive query rows of one sequence that attend T[0..R-1]
 * positions (a decode row: R = 1; a prefill's rows: T[r] = T[0] + r) through one KV head, each row with its
 * g query heads (row r's at q + r*ldq, its output at out + r*ldq). Row by row the same arithmetic in the same
 * order as for that row alone, so a row's numbers do not depend on the rows beside it; each K block (16
 * positions) and V block (VALUES_BLOCK positions) is read from memory once for all R rows. scores holds
 * R * g * S floats (S >= every T rounded up to 16); kscratch 16*hd; sout: row r, head h at
 * sout + (r * sld + h) * lds (trace_scores), or NULL. */
static void attend_group16(const float *q, int64_t ldq, const void *k, const void *v, const int f16, const int64_t *T,
                           int R, int64_t nv, int64_t g, float scale, float *scores, int64_t S, float *kscratch,
                           float *out, float *sout, int64_t sld, int64_t lds)
{
    const int64_t hd = 16 * nv, pf = f16 ? 2 * ATT_PF : ATT_PF;
    const float *qs[R * g];
    float *ds[R * g];
    int64_t Tmax = 0;
    for (int r = 0; r < R; r++) Tmax = T[r] > Tmax ? T[r] : Tmax;
    for (int64_t t = 0; t < Tmax; t += 16) {
        const float *kb;
        int64_t n = Tmax - t < 16 ? Tmax - t : 16;
        for (int64_t i = 0; i < 16 * hd * (f16 ? 2 : 4); i += 64) /* the block pf positions ahead */
            __builtin_prefetch((const char *)kv_at(k, (t + pf) * hd, f16) + i, 0, 3);
        if (f16 || n < 16) { /* widened, or the last rows zero-padded to a whole block */
            for (int64_t j = 0; j < n; j++)
                for (int64_t i = 0; i < hd; i += 16) store16(kscratch + j * hd + i, kv16(k, (t + j) * hd + i, f16));
            memset(kscratch + n * hd, 0, sizeof(float) * (16 - n) * hd);
            kb = kscratch;
        } else {
            kb = (const float *)k + t * hd;
        }
        int nq = 0; /* the query heads of the rows that reach this block (past its T a row is masked below) */
        for (int r = 0; r < R; r++)
            if (t < T[r])
                for (int64_t h = 0; h < g; h++, nq++) {
                    qs[nq] = q + r * ldq + h * hd;
                    ds[nq] = scores + (r * g + h) * S + t;
                }
        scores16(qs, nq, kb, nv, scale, ds);
    }
    for (int r = 0; r < R; r++) {
        const int64_t Tr = T[r], Tp = (Tr + 15) & ~(int64_t)15;
        float *sr = scores + r * g * S;
        if (FAULT(ATTN_BLOCK_OFF_BY_ONE) && Tr % 16) /* the last partial block's last position read as zeros */
            for (int64_t h = 0; h < g; h++) sr[h * S + Tr - 1] = 0.f;
        trace_scores(sr, S, Tr, g, sout ? sout + r * sld * lds : NULL, lds);
        for (int64_t h = 0; h < g; h++) { /* softmax over the T scores of each head */
            float *sh = sr + h * S;
            for (int64_t t = Tr; t < Tp; t++) sh[t] = -INFINITY;
            f32x16 m = load16(sh);
            for (int64_t t = 16; t < Tp; t += 16) {
                f32x16 s = load16(sh + t);
                i32x16 gt = s > m; /* lane by lane s > m ? s : m, as a vector select (a lane loop ran scalar) */
                m = (f32x16)(((i32x16)s & gt) | ((i32x16)m & ~gt));
            }
            float mx = m[0];
            for (int i = 1; i < 16; i++) mx = m[i] > mx ? m[i] : mx;
            f32x16 acc = {0}; /* the padding lanes hold exp(-inf) = 0 */
            for (int64_t t = 0; t < Tp; t += 16) {
                store16(sh + t, load16(sh + t) - mx);
                exp16(sh + t);
                acc += load16(sh + t);
            }
            float inv = inv_sum(hsum16(acc));
            for (int64_t t = 0; t < Tp; t += 16) store16(sh + t, load16(sh + t) * inv); /* the softmax weights */
        }
    }
    const int gh = values_heads((int)nv);
    for (int64_t t0 = 0; t0 < Tmax; t0 += VALUES_BLOCK)
        for (int r = 0; r < R; r++) {
            const int64_t t1 = t0 + VALUES_BLOCK < T[r] ? t0 + VALUES_BLOCK : T[r];
            for (int64_t h = 0; t0 < t1 && h < g; h += gh) {
                int n = g - h < gh ? (int)(g - h) : gh;
                values_dispatch(scores + (r * g + h) * S, S, v, f16, t0, t1, (int)nv, n, pf, out + r * ldq + h * hd);
            }
        }
}

/* One new row per sequence b: its K and V (rows of k_new, v_new, ldk and ldv floats apart) written into the
 * sequence's cache slabs kp[b], vp[b] ([Hkv][ms[b]][hd], float32 or float16) at position T[b] - 1 - what
 * cache_write does - then softmax(q . K[0:T]^T / sqrt(hd)) . V[0:T] per query head: q [B][H*hd] -> out [B][H*hd].
 * sout: NULL, or [B][H][lds] floats (lds >= max T) that receive each head's scaled scores (a traced step). */
static void attend_rows(const float *q, const float *kn, int64_t ldk, const float *vn, int64_t ldv, void *const *kp,
                        void *const *vp, const int64_t *ms, const int64_t *T, int64_t B, int64_t H, int64_t Hkv,
                        int64_t hd, const int f16, float *out, float *sout, int64_t lds)
{
    const int64_t es = f16 ? 2 : 4, g = H / Hkv;
    const float scale = (FAULT(ATTN_SCALE) ? 1.02f : 1.f) / sqrtf((float)hd);
    int64_t maxT = 0;
    for (int64_t b = 0; b < B; b++) {
        if (T[b] > maxT) maxT = T[b];
        for (int64_t kvh = 0; kvh < Hkv; kvh++) { /* the new position's K, V into the cache (cache_write's job) */
            const int64_t slot = FAULT(KV_SLOT_PAST_40) && T[b] > 40 && T[b] < ms[b] ? T[b] : T[b] - 1;
            size_t at = (size_t)((kvh * ms[b] + slot) * hd);
            const float *kr = kn + b * ldk + kvh * hd, *vr = vn + b * ldv + kvh * hd;
            if (f16) { /* rounded to nearest even, as numpy's astype(float16) (cache_write) rounds */
                for (int64_t i = 0; i < hd; i++) {
                    ((uint16_t *)kp[b])[at + i] = float_to_half(kr[i]);
                    ((uint16_t *)vp[b])[at + i] = float_to_half(vr[i]);
                }
            } else {
                memcpy((float *)kp[b] + at, kr, hd * 4);
                memcpy((float *)vp[b] + at, vr, hd * 4);
            }
        }
    }
    /* Row blocks: up to ROW_BLOCK consecutive rows of one sequence at consecutive positions (a prefill's rows)
     * share each K and V read; a decode row is a block of its own. */
    enum { ROW_BLOCK = 8 };
    const int fast = hd % 16 == 0 && hd <= 128;
    int64_t *first = malloc(sizeof(int64_t) * (B + 1)), nb = 0;
    for (int64_t b = 0; b < B; b++)
        if (!fast || b == 0 || b - first[nb - 1] == ROW_BLOCK || kp[b] != kp[b - 1] || T[b] != T[b - 1] + 1)
            first[nb++] = b;
    first[nb] = B;
    const int64_t S = (maxT + 15) & ~(int64_t)15;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (fast ? ROW_BLOCK : 1) * g * S);
        float *kscratch = malloc(sizeof(float) * 16 * hd);
#pragma omp for schedule(dynamic, 1)
        for (int64_t bk = 0; bk < nb * Hkv; bk++) {
            int64_t i = bk / Hkv, kvh = bk % Hkv, b = first[i]; /* query heads kvh*g .. kvh*g+g-1 read this KV head */
            const int R = (int)(first[i + 1] - b);
            const int64_t c = FAULT(BATCH_OTHER_CACHE) && b > 0 && T[b] <= ms[b - 1] ? b - 1 : b; /* the cache read */
            const void *k = (const char *)kp[c] + kvh * ms[c] * hd * es;
            const void *v = (const char *)vp[c] + kvh * ms[c] * hd * es;
            int64_t h0 = b * H + kvh * g;
            float *so = sout ? sout + h0 * lds : NULL;
            if (fast) attend_group16(q + h0 * hd, H * hd, k, v, f16, T + b, R, hd / 16, g, scale, scores, S, kscratch,
                                     out + h0 * hd, so, H, lds);
            else if (f16) attend_group(q + h0 * hd, k, v, 1, T[b], hd, g, scale, scores, out + h0 * hd, so, lds);
            else attend_group(q + h0 * hd, k, v, 0, T[b], hd, g, scale, scores, out + h0 * hd, so, lds);
        }
        free(scores);
        free(kscratch);
    }
    free(first);
}

/* A traced step's scores buffer: None, or float32 [B, H, lds] C-contiguous with lds >= every T_b (the caller's
 * array, its padding untouched); *lds receives its last dimension. */
static int scores_arg(PyObject *o, Py_buffer *b, Py_ssize_t B, Py_ssize_t H, const int64_t *T, int64_t *lds)
{
    memset(b, 0, sizeof *b);
    *lds = 0;
    if (!o || o == Py_None) return 0;
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_ND) < 0) return -1;
    int ok = b->format && !strcmp(b->format, "f") && b->ndim == 3 && b->shape[0] == B && b->shape[1] == H;
    for (Py_ssize_t i = 0; ok && i < B; i++) ok = T[i] <= b->shape[2];
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "scores must be float32 [%zd, %zd, >= max length]", B, H);
        PyBuffer_Release(b);
        b->obj = NULL;
        return -1;
    }
    *lds = b->shape[2];
    return 0;
}

/* attend_decode(q, k_new, v_new, ks, vs, lengths, out, n_head, n_kv, hd[, f16[, scores]])
 *   q [B, n_head, hd]; k_new, v_new [B, n_kv, hd]: the new position's K, V, written into the caches at
 *   position T_b - 1 first; ks[b], vs[b]: that sequence's layer slab [n_kv, max_seq_b, hd]
 *   (C-contiguous, writable; float16 when f16, else float32); lengths[b]: positions to attend (T_b);
 *   out [B, n_head * hd]; scores: None or [B, n_head, >= max T_b] for the scaled scores (scores_arg). */
static PyObject *py_attend_decode(PyObject *self, PyObject *args)
{
    Py_buffer q, kn, vn, out, sb;
    PyObject *ks, *vs, *lens, *so = NULL;
    Py_ssize_t H, Hkv, hd;
    int64_t lds = 0;
    int f16 = 0;
    memset(&sb, 0, sizeof sb);
    if (!PyArg_ParseTuple(args, "y*y*y*OOOw*nnn|pO", &q, &kn, &vn, &ks, &vs, &lens, &out, &H, &Hkv, &hd, &f16, &so))
        return NULL;
    const Py_ssize_t es = f16 ? 2 : 4; /* bytes per cached element */
    PyObject *ret = NULL;
    Py_ssize_t B = PySequence_Size(lens);
    Py_buffer *kb = NULL, *vb = NULL;
    int64_t *T = NULL, *ms = NULL;
    Py_ssize_t nk = 0, nv = 0;
    if (B < 0 || PySequence_Size(ks) != B || PySequence_Size(vs) != B) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "ks, vs and lengths differ in length");
        goto done;
    }
    if (H <= 0 || Hkv <= 0 || H % Hkv || hd <= 0 || check_size(&q, B * H * hd * 4, "q") ||
        check_size(&kn, B * Hkv * hd * 4, "k_new") || check_size(&vn, B * Hkv * hd * 4, "v_new") ||
        check_size(&out, B * H * hd * 4, "out")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad head counts");
        goto done;
    }
    kb = PyMem_Calloc(B ? B : 1, sizeof(Py_buffer));
    vb = PyMem_Calloc(B ? B : 1, sizeof(Py_buffer));
    T = PyMem_Calloc(B ? B : 1, sizeof(int64_t));
    ms = PyMem_Calloc(B ? B : 1, sizeof(int64_t));
    if (!kb || !vb || !T || !ms) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t b = 0; b < B; b++) {
        PyObject *o;
        o = PySequence_GetItem(ks, b);
        if (!o) goto done;
        int rk = PyObject_GetBuffer(o, &kb[b], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT);
        Py_DECREF(o);
        if (rk < 0) goto done;
        nk++;
        o = PySequence_GetItem(vs, b);
        if (!o) goto done;
        int rv = PyObject_GetBuffer(o, &vb[b], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT);
        Py_DECREF(o);
        if (rv < 0) goto done;
        nv++;
        if (!kb[b].format || !vb[b].format || strcmp(kb[b].format, f16 ? "e" : "f") || strcmp(vb[b].format, f16 ? "e" : "f")) {
            PyErr_Format(PyExc_ValueError, "sequence %zd: every K/V cache must be float32, or every one float16 (f16 %s)",
                         b, f16 ? "set" : "not set");
            goto done;
        }
        o = PySequence_GetItem(lens, b);
        if (!o) goto done;
        T[b] = PyLong_AsLongLong(o);
        Py_DECREF(o);
        if (T[b] == -1 && PyErr_Occurred()) goto done;
        ms[b] = kb[b].len / (Py_ssize_t)(Hkv * hd * es);
        if (kb[b].len != vb[b].len || kb[b].len != ms[b] * Hkv * hd * es || T[b] < 1 || T[b] > ms[b]) {
            PyErr_Format(PyExc_ValueError, "sequence %zd: cache of %zd bytes cannot hold %lld positions of %zd x %zd",
                         b, kb[b].len, (long long)T[b], Hkv, hd);
            goto done;
        }
    }
    if (scores_arg(so, &sb, B, H, T, &lds)) goto done;
    {
        void **kp = PyMem_Calloc(B ? B : 1, sizeof(void *)), **vp = PyMem_Calloc(B ? B : 1, sizeof(void *));
        if (!kp || !vp) {
            PyMem_Free(kp); PyMem_Free(vp);
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t b = 0; b < B; b++) kp[b] = kb[b].buf, vp[b] = vb[b].buf;
        Py_BEGIN_ALLOW_THREADS
        attend_rows(q.buf, kn.buf, Hkv * hd, vn.buf, Hkv * hd, kp, vp, ms, T, B, H, Hkv, hd, f16, out.buf, sb.buf, lds);
        Py_END_ALLOW_THREADS
        PyMem_Free(kp); PyMem_Free(vp);
    }
    ret = Py_None; Py_INCREF(ret);
done:
    if (sb.obj) PyBuffer_Release(&sb);
    for (Py_ssize_t b = 0; b < nk; b++) PyBuffer_Release(&kb[b]);
    for (Py_ssize_t b = 0; b < nv; b++) PyBuffer_Release(&vb[b]);
    PyMem_Free(kb); PyMem_Free(vb); PyMem_Free(T); PyMem_Free(ms);
    PyBuffer_Release(&q); PyBuffer_Release(&kn); PyBuffer_Release(&vn); PyBuffer_Release(&out);
    return ret;
}

/* ---- elementwise stages of a decode step (the models' numpy stage functions, one C call each) ----
 * A decode step's norms, activations and rotary embedding run on a few rows: numpy's per-call cost,
 * not arithmetic, is their price (~15 calls a layer). Each function here computes what the stage
 * function of the same name computes - tests/test_kernels.py holds them to each other - with the
 * same operation order, so what may differ is last-bit rounding: a norm's sum (16 lane partial sums
 * and a fixed tree per row, numpy sums pairwise), a multiply-add fused into one rounding, and exp
 * (expv16's polynomial, ~1e-7 relative, against numpy's). Rows are independent (rows of a batch
 * do not change each other's results). */

/* A float32 row-major [rows, n] operand whose rows may be strided (a column slice of a fused product);
 * returns the row stride in floats, or -1 with an exception set. */
static Py_ssize_t get_rows(PyObject *o, Py_buffer *b, Py_ssize_t rows, Py_ssize_t n, int writable, const char *what)
{
    if (PyObject_GetBuffer(o, b, PyBUF_RECORDS_RO | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    Py_ssize_t ld = -1;
    if (b->ndim != 2 || b->shape[0] != rows || b->shape[1] != n || b->itemsize != 4 || !b->format ||
        strcmp(b->format, "f") || b->strides[1] != 4 || b->strides[0] % 4 || (rows > 1 && b->strides[0] < 4 * n))
        PyErr_Format(PyExc_ValueError, "%s: expected float32 rows [%zd, %zd] with contiguous columns", what, rows, n);
    else
        ld = b->strides[0] / 4;
    if (ld < 0) PyBuffer_Release(b);
    return ld;
}

typedef struct { Py_buffer b; Py_ssize_t ld; int ok; } Rows;

static int rows_arg(Rows *r, PyObject *o, Py_ssize_t rows, Py_ssize_t n, int writable, const char *what)
{
    r->ld = get_rows(o, &r->b, rows, n, writable, what);
    r->ok = r->ld >= 0;
    return r->ok ? 0 : -1;
}

static void rows_release(Rows *r, int count)
{
    for (int i = 0; i < count; i++)
        if (r[i].ok) PyBuffer_Release(&r[i].b);
}

/* Loads/stores of 16 lanes, or of the first `m` (the row's tail) with zeros beyond. */
static inline f32x16 load_n(const float *p, int64_t m)
{
    if (m >= 16) return load16(p);
    f32x16 v = {0};
    for (int64_t i = 0; i < m; i++) v[i] = p[i];
    return v;
}

static inline void store_n(float *p, f32x16 v, int64_t m)
{
    if (m >= 16) { store16(p, v); return; }
    for (int64_t i = 0; i < m; i++) p[i] = v[i];
}

/* Sum over a row of x, or of (x - center)^2: 16 lane partial sums, then hsum16's fixed tree. */
static inline float row_sum(const float *x, int64_t n, float center, int square)
{
    f32x16 acc = {0};
    for (int64_t i = 0; i < n; i += 16) {
        f32x16 v = load_n(x + i, n - i);
        if (square) {
            v -= center;
            for (int64_t j = n - i; j < 16; j++) v[j] = 0.f; /* lanes past the row */
            v *= v;
        }
        acc += v;
    }
    return hsum16(acc);
}

/* rms_norm: y = w * (x * (1 / sqrt(sum(x*x) / n + eps))) */
static void rms_norm_rows(const float *x, Py_ssize_t ldx, const float *w, float *y, int64_t rows, int64_t n, float eps)
{
#pragma omp parallel for schedule(static) if (rows * n >= (1 << 16))
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        float ms = row_sum(xr, n, 0.f, 1) / (float)n;
        float inv = 1.f / sqrtf(ms + (FAULT(NORM_EPS) ? 1e-3f : eps));
        for (int64_t i = 0; i < n; i += 16)
            store_n(y + r * n + i, load_n(w + i, n - i) * (load_n(xr + i, n - i) * inv), n - i);
    }
}

/* layer_norm: xc = x - sum(x)/n; y = xc / sqrt(sum(xc*xc)/n + eps) * w + b */
static void layer_norm_rows(const float *x, Py_ssize_t ldx, const float *w, const float *b, float *y, int64_t rows,
                            int64_t n, float eps)
{
#pragma omp parallel for schedule(static) if (rows * n >= (1 << 16))
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        float mean = row_sum(xr, n, 0.f, 0) / (float)n;
        float var = row_sum(xr, n, mean, 1) / (float)n;
        float s = sqrtf(var + (FAULT(NORM_EPS) ? 1e-3f : eps));
        for (int64_t i = 0; i < n; i += 16) {
            f32x16 xc = load_n(xr + i, n - i) - mean;
            f32x16 t = xc / s;
            t = t * load_n(w + i, n - i);
            store_n(y + r * n + i, t + load_n(b + i, n - i), n - i);
        }
    }
}

/* silu(gate) * up = gate / (1 + exp(-gate)) * up */
static void silu_mul_rows(const float *g, Py_ssize_t ldg, const float *u, Py_ssize_t ldu, float *y, int64_t rows, int64_t n)
{
    const f32x16 one = {0};
#pragma omp parallel for schedule(static) if (rows * n >= (1 << 16))
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i += 16) {
            f32x16 x = load_n(g + r * ldg + i, n - i);
            f32x16 d = (one + 1.f) + expv16(FAULT(SILU_SLOPE) ? -1.01f * x : -x);
            f32x16 s = x / d;
            store_n(y + r * n + i, s * load_n(u + r * ldu + i, n - i), n - i);
        }
}

/* gelu_new: 0.5 x (1 + tanh(u)), u = c (x + k x^3) - computed as x / (1 + exp(-2u)), the same function
 * (1 + tanh(u) = 2 / (1 + exp(-2u))) without the cancellation of 1 + tanh(u) for negative u. */
static void gelu_new_rows(const float *x, Py_ssize_t ldx, float *y, int64_t rows, int64_t n, float c, float k)
{
    const f32x16 one = {0};
#pragma omp parallel for schedule(static) if (rows * n >= (1 << 16))
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i += 16) {
            f32x16 v = load_n(x + r * ldx + i, n - i);
            f32x16 cube = v * v;
            cube = cube * v;
            f32x16 kc = cube * k;
            f32x16 u = v + kc;
            u = u * (FAULT(GELU_SLOPE) ? 1.01f * c : c);
            f32x16 d = (one + 1.f) + expv16(-2.f * u);
            store_n(y + r * n + i, v / d, n - i);
        }
}

/* apply_rope: y = x * cos + rotate_half(x) * sin per head, rotate_half(x) = (-x2, x1). */
static void rope_rows(const float *x, Py_ssize_t ldx, const float *cs, const float *sn, float *y, int64_t rows,
                      int64_t heads, int64_t hd)
{
    const int64_t half = hd / 2;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + r * ldx + h * hd;
            float *yh = y + (r * heads + h) * hd;
            const float *c = cs + r * hd, *s = sn + r * hd;
            for (int64_t i = 0; i < half; i++) {
                float a = xh[i] * c[i], b = (FAULT(ROPE_SIN) ? xh[i + half] : -xh[i + half]) * s[i];
                yh[i] = a + b;
            }
            for (int64_t i = half; i < hd; i++) {
                float a = xh[i] * c[i], b = xh[i - half] * s[i];
                yh[i] = a + b;
            }
        }
}

/* rowwise(op, x, a, b, out, rows, n, hd, p, q): the elementwise stages above, op by op -
 *   0 rms_norm    x [rows, n], a = weight [1, n], p = eps
 *   1 layer_norm  x, a = weight, b = bias [1, n], p = eps
 *   2 silu_mul    x = gate, a = up [rows, n]
 *   3 gelu_new    x, p = c, q = k
 *   4 rope        x [rows, n = heads*hd], a = cos, b = sin [rows, hd] (C-contiguous)
 * out [rows, n] (C-contiguous); x and up may be column slices (strided rows); unused operands None. */
enum { OP_RMS_NORM, OP_LAYER_NORM, OP_SILU_MUL, OP_GELU_NEW, OP_ROPE };

static PyObject *py_rowwise(PyObject *self, PyObject *args)
{
    PyObject *xo, *ao, *bo, *yo;
    Py_ssize_t rows, n, hd;
    int op;
    float p, q;
    if (!PyArg_ParseTuple(args, "iOOOOnnnff", &op, &xo, &ao, &bo, &yo, &rows, &n, &hd, &p, &q)) return NULL;
    if (op < OP_RMS_NORM || op > OP_ROPE) return PyErr_Format(PyExc_ValueError, "rowwise: unknown op %d", op);
    if (op == OP_ROPE && (hd <= 0 || hd % 2 || n % hd))
        return PyErr_Format(PyExc_ValueError, "rope: head_dim %zd must be even and divide the row (%zd)", hd, n);
    Rows r[4];
    memset(r, 0, sizeof r);
    PyObject *ret = NULL;
    const int vec = op == OP_RMS_NORM || op == OP_LAYER_NORM; /* a (and b) are one row of n */
    if (rows_arg(&r[0], xo, rows, n, 0, op == OP_SILU_MUL ? "gate" : "x") ||
        (op != OP_GELU_NEW && rows_arg(&r[1], ao, vec ? 1 : rows, op == OP_ROPE ? hd : n, 0,
                                       op == OP_SILU_MUL ? "up" : op == OP_ROPE ? "cos" : "weight")) ||
        ((op == OP_LAYER_NORM || op == OP_ROPE) &&
         rows_arg(&r[2], bo, op == OP_ROPE ? rows : 1, op == OP_ROPE ? hd : n, 0, op == OP_ROPE ? "sin" : "bias")) ||
        rows_arg(&r[3], yo, rows, n, 1, "out"))
        goto done;
    if (r[3].ld != n || (op == OP_ROPE && (r[1].ld != hd || r[2].ld != hd))) {
        PyErr_SetString(PyExc_ValueError, "rowwise: out (and rope's cos, sin) must be C-contiguous");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const float *x = r[0].b.buf, *a = r[1].b.buf, *b = r[2].b.buf;
    float *y = r[3].b.buf;
    switch (op) {
    case OP_RMS_NORM: rms_norm_rows(x, r[0].ld, a, y, rows, n, p); break;
    case OP_LAYER_NORM: layer_norm_rows(x, r[0].ld, a, b, y, rows, n, p); break;
    case OP_SILU_MUL: silu_mul_rows(x, r[0].ld, a, r[1].ld, y, rows, n); break;
    case OP_GELU_NEW: gelu_new_rows(x, r[0].ld, y, rows, n, p, q); break;
    case OP_ROPE: rope_rows(x, r[0].ld, a, b, y, rows, n / hd, hd); break;
    }
    Py_END_ALLOW_THREADS
    ret = Py_None; Py_INCREF(ret);
done:
    rows_release(r, 4);
    return ret;
}

/* ---- Python bindings -------------------------------------------------------------------- */

/* ---- one matrix product for every kernel kind ------------------------------------------------
 * A weight matrix as kernels/quantized.py and packed.py hold it: its kind, its arrays, and whether its
 * activations are quantized to 8 bits first (the `q8` numerics; quantized kinds only). */
/* in the order of quantized.KERNEL_KINDS, then packed.PackedMatrix's three storages */
enum { MK_Q4_1, MK_Q8_0, MK_Q4_1F, MK_Q8_S16, MK_Q8_DM, MK_F32, MK_F16, MK_BF16, MK_COUNT };

typedef struct {
    int kind, q8;
    Py_buffer qs, d, m; /* .obj NULL when not acquired (d, m unused by the float kinds; m by Q8_0, Q8_S16) */
    int64_t K, nc, L;
} Mat;

static void mat_release(Mat *w)
{
    if (w->qs.obj) PyBuffer_Release(&w->qs);
    if (w->d.obj) PyBuffer_Release(&w->d);
    if (w->m.obj) PyBuffer_Release(&w->m);
}

static int mat_buffer(PyObject *o, Py_buffer *b, Py_ssize_t need, const char *what)
{
    if (o == Py_None) {
        PyErr_Format(PyExc_ValueError, "%s: missing", what);
        return -1;
    }
    if (PyObject_GetBuffer(o, b, PyBUF_SIMPLE) < 0) return -1; /* C-contiguous bytes */
    return check_size(b, need, what);
}

/* Acquire a matrix's buffers, checking each holds what the kernel reads; -1 with an exception set. */
static int mat_get(Mat *w, int kind, int q8, PyObject *qs, PyObject *d, PyObject *m, Py_ssize_t K, Py_ssize_t nc,
                   Py_ssize_t L)
{
    memset(w, 0, sizeof *w);
    w->kind = kind, w->q8 = q8 && kind < MK_F32, w->K = K, w->nc = nc, w->L = L;
    if (kind < 0 || kind >= MK_COUNT) {
        PyErr_Format(PyExc_ValueError, "unknown matrix kind %d", kind);
        return -1;
    }
    if (K <= 0 || nc <= 0 || (kind < MK_F32 && (K % 32 || L % 16)) || (kind >= MK_F32 && L != 16)) {
        PyErr_SetString(PyExc_ValueError, "K must be a multiple of 32 and L of 16 (16 for a float matrix)");
        return -1;
    }
    const Py_ssize_t NB = K / 32;
    switch (kind) {
    case MK_Q4_1: case MK_Q4_1F: {
        const Py_ssize_t sw = kind == MK_Q4_1 ? 2 : 4;
        return mat_buffer(qs, &w->qs, nc * NB * 16 * L, "qs") || mat_buffer(d, &w->d, nc * NB * L * sw, "d") ||
               mat_buffer(m, &w->m, nc * NB * L * sw, "m") ? -1 : 0;
    }
    case MK_Q8_0: return mat_buffer(qs, &w->qs, nc * K * L, "qs") || mat_buffer(d, &w->d, nc * NB * L * 2, "d") ? -1 : 0;
    case MK_Q8_S16: return mat_buffer(qs, &w->qs, nc * K * L, "qs") || mat_buffer(d, &w->d, nc * NB * 2 * L * 4, "d") ? -1 : 0;
    case MK_Q8_DM:
        return mat_buffer(qs, &w->qs, nc * K * L, "qs") || mat_buffer(d, &w->d, nc * NB * L * 4, "d") ||
               mat_buffer(m, &w->m, nc * NB * L * 4, "m") ? -1 : 0;
    default: return mat_buffer(qs, &w->qs, nc * K * 16 * (kind == MK_F32 ? 4 : 2), "w");
    }
}

/* out [M, nc*L] = x [M, K] @ W.T (GIL released by the caller). With q8, x is first quantized per 32-block:
 * Q8_1 (d and s = d·Σq) for the kinds whose weights are the unsigned operand (Q4_1, Q4_1F, Q8_DM), Q8_0
 * with the bytes offset by 128 for the signed ones (Q8_0, Q8_S16). Returns -1 when out of memory. */
static int mat_run(const Mat *w, const float *x, int64_t M, float *out)
{
    const int64_t K = w->K, nc = w->nc, L = w->L, ldo = nc * L;
    const void *qs = w->qs.buf, *d = w->d.buf, *m = w->m.buf;
    if (!w->q8) {
#pragma omp parallel for schedule(static)
        for (int64_t c = 0; c < nc; c++) switch (w->kind) {
            case MK_Q4_1: q4_1_chunk(x, qs, d, m, out, M, K, ldo, L, c); break;
            case MK_Q4_1F: q4_1f_chunk(x, qs, d, m, out, M, K, ldo, L, c); break;
            case MK_Q8_0: q8_0_chunk(x, qs, d, out, M, K, ldo, L, c); break;
            case MK_Q8_S16: q8_s16_chunk(x, qs, d, out, M, K, ldo, L, c); break;
            case MK_Q8_DM: q8_dm_chunk(x, qs, d, m, out, M, K, ldo, L, c); break;
            case MK_F32: f32_chunk(x, qs, out, M, K, ldo, c); break;
            case MK_F16: f16_chunk(x, qs, out, M, K, ldo, c); break;
            default: bf16_chunk(x, qs, out, M, K, ldo, c); break;
            }
        return 0;
    }
    const int signed_w = w->kind == MK_Q8_0 || w->kind == MK_Q8_S16;
    uint8_t *xq = malloc(M * K + 1);
    float *dx = malloc(sizeof(float) * (M * (K / 32) + 1)), *sx = signed_w ? NULL : malloc(sizeof(float) * (M * (K / 32) + 1));
    if (!xq || !dx || (!signed_w && !sx)) {
        free(xq); free(dx); free(sx);
        return -1;
    }
    quantize_rows_q8(x, M, K, xq, dx, sx, signed_w);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nc; c++) switch (w->kind) {
        case MK_Q4_1: q4_1_q8_chunk((const int8_t *)xq, dx, sx, qs, d, m, out, M, K, ldo, L, c); break;
        case MK_Q4_1F: q4_1f_q8_chunk((const int8_t *)xq, dx, sx, qs, d, m, out, M, K, ldo, L, c); break;
        case MK_Q8_DM: q8_dm_q8_chunk((const int8_t *)xq, dx, sx, qs, d, m, out, M, K, ldo, L, c); break;
        case MK_Q8_0: q8_0_q8_chunk(xq, dx, qs, d, out, M, K, ldo, L, c); break;
        default: q8_s16_q8_chunk(xq, dx, qs, d, out, M, K, ldo, L, c); break;
        }
    free(xq); free(dx); free(sx);
    return 0;
}

/* matmul(x, out, M, kind, q8, qs, d, m, K, n_chunk, L): out [M, n_chunk*L] = x [M, K] @ W.T for a matrix
 * of kernel kind `kind` (MK_*: Q4_1, Q8_0, Q4_1F, Q8_S16, Q8_DM; F32, F16, BF16 packed [n_chunk][K][16] in qs,
 * d and m None), with 8-bit activations when q8 (quantized kinds). */
static PyObject *py_matmul(PyObject *self, PyObject *args)
{
    Py_buffer x, out;
    PyObject *qs, *d, *m, *ret = NULL;
    Py_ssize_t M, K, nc, L;
    int kind, q8;
    if (!PyArg_ParseTuple(args, "y*w*niiOOOnnn", &x, &out, &M, &kind, &q8, &qs, &d, &m, &K, &nc, &L)) return NULL;
    Mat w;
    if (mat_get(&w, kind, q8, qs, d, m, K, nc, L) || check_size(&x, M * K * 4, "x") ||
        check_size(&out, M * nc * L * 4, "out"))
        goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mat_run(&w, x.buf, M, out.buf);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_NoMemory();
        goto done;
    }
    ret = Py_None; Py_INCREF(ret);
done:
    mat_release(&w);
    PyBuffer_Release(&x); PyBuffer_Release(&out);
    return ret;
}

/* quantize_q8(x, xq, dx, sx, M, K, offset): the activation quantization alone (for tests) */
static PyObject *py_quantize_q8(PyObject *self, PyObject *args)
{
    Py_buffer x, xq, dx, sx;
    Py_ssize_t M, K;
    int offset;
    if (!PyArg_ParseTuple(args, "y*w*w*w*nnp", &x, &xq, &dx, &sx, &M, &K, &offset)) return NULL;
    PyObject *ret = NULL;
    if (K % 32 || check_size(&x, M * K * 4, "x") || check_size(&xq, M * K, "xq") ||
        check_size(&dx, M * (K / 32) * 4, "dx") || check_size(&sx, M * (K / 32) * 4, "sx")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "K must be a multiple of 32");
        goto done;
    }
    quantize_rows_q8(x.buf, M, K, xq.buf, dx.buf, sx.buf, offset);
    ret = Py_None; Py_INCREF(ret);
done:
    PyBuffer_Release(&x); PyBuffer_Release(&xq); PyBuffer_Release(&dx); PyBuffer_Release(&sx);
    return ret;
}

/* q4_1_dequant_t(qs, d, m, out_t, K, n_chunk, L, c0, c1) ; out_t [K, (c1-c0)*L] */
static PyObject *py_q4_1_dequant_t(PyObject *self, PyObject *args)
{
    Py_buffer qs, d, m, out;
    Py_ssize_t K, nc, L, c0, c1;
    if (!PyArg_ParseTuple(args, "y*y*y*w*nnnnn", &qs, &d, &m, &out, &K, &nc, &L, &c0, &c1)) return NULL;
    PyObject *ret = NULL;
    if (K % 32 || L % 16 || c0 < 0 || c1 > nc || c0 > c1 || check_size(&qs, nc * (K / 32) * 16 * L, "qs") ||
        check_size(&d, nc * (K / 32) * L * 2, "d") || check_size(&m, nc * (K / 32) * L * 2, "m") ||
        check_size(&out, K * (c1 - c0) * L * 4, "out")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad shape or chunk range");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static)
    for (Py_ssize_t c = c0; c < c1; c++)
        q4_1_dequant_chunk(qs.buf, d.buf, m.buf, out.buf, K, (c1 - c0) * L, L, c, c0);
    Py_END_ALLOW_THREADS
    ret = Py_None; Py_INCREF(ret);
done:
    PyBuffer_Release(&qs); PyBuffer_Release(&d); PyBuffer_Release(&m); PyBuffer_Release(&out);
    return ret;
}

/* q8_0_dequant_t(qs, d, out_t, K, n_chunk, L, c0, c1) */
static PyObject *py_q8_0_dequant_t(PyObject *self, PyObject *args)
{
    Py_buffer qs, d, out;
    Py_ssize_t K, nc, L, c0, c1;
    if (!PyArg_ParseTuple(args, "y*y*w*nnnnn", &qs, &d, &out, &K, &nc, &L, &c0, &c1)) return NULL;
    PyObject *ret = NULL;
    if (K % 32 || L % 16 || c0 < 0 || c1 > nc || c0 > c1 || check_size(&qs, nc * K * L, "qs") ||
        check_size(&d, nc * (K / 32) * L * 2, "d") || check_size(&out, K * (c1 - c0) * L * 4, "out")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad shape or chunk range");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static)
    for (Py_ssize_t c = c0; c < c1; c++)
        q8_0_dequant_chunk(qs.buf, d.buf, out.buf, K, (c1 - c0) * L, L, c, c0);
    Py_END_ALLOW_THREADS
    ret = Py_None; Py_INCREF(ret);
done:
    PyBuffer_Release(&qs); PyBuffer_Release(&d); PyBuffer_Release(&out);
    return ret;
}

/* ---- a whole pre-norm block for decode rows, one call --------------------------------------------
 * decode_block(x, attn_norm, attn_norm_b, qkv, qkv_b, o, o_b, ffn_norm, ffn_norm_b, gu, gu_b, down, down_b, cos, sin,
 *              ks, vs, lengths, layer, n_head, n_kv, hd, n_ff, eps, f16, act, gelu_c, gelu_k)
 *   x [B, E] float32, C-contiguous: one row per sequence, replaced by the block's output
 *   qkv: 1 matrix (Q|K|V fused) or 3; gu: 1 (gate|up fused, or GPT-2's c_fc) or 2; o, down: 1 each - a matrix
 *        is the tuple (kind, q8, qs, d, m, K, n_chunk, L) of kernels.ops.kernel_args
 *   *_norm_b: None (RMSNorm, Llama) or the LayerNorm bias [E] (GPT-2); qkv_b [nq + 2 nkv], o_b [E], gu_b [n_ff],
 *        down_b [E]: None or each product's bias (GPT-2's Conv1D), added to the product as conv1d adds it
 *   cos, sin [B, hd] (rotary, Llama) or both None (GPT-2: positions are in the embedding)
 *   ks[b], vs[b]: sequence b's whole cache [n_layer, Hkv, max_seq, hd] (float32, or float16 when f16);
 *        lengths[b] = T_b, positions to attend after this row's K, V are written at T_b - 1
 *   act: 0 silu(gate) * up (Llama), 1 gelu_new(up) with constants gelu_c, gelu_k (GPT-2)
 *   trace (optional): None, or 8 writable float32 C-contiguous arrays that receive the stage tensors as this
 *        very call computes them (the validator's checkpoints at decode rows): ln_1 [B, E], q [B, H*hd] (after
 *        rotary), k, v [B, Hkv*hd], scores [B, H, >= max T_b] (scaled, before the softmax), attn_out [B, E]
 *        (after the output product and its bias), ln_2 [B, E], ffn_out [B, E]. Copies only: the result is
 *        bit-identical with or without it (tests/test_decode_block.py).
 * The stages run in the order the models' `block` runs their kernels.ops versions - the norm, the products
 * (mat_run) and their biases, rope, attend_rows, the residual add, the norm, the activation, the residual
 * add - with the same functions, so the result is bit-identical to that path; only the Python between them
 * is gone. */
#define DB_MATS 7

static int db_mat(Mat *w, PyObject *t, Py_ssize_t *n_out)
{
    int kind, q8;
    PyObject *qs, *d, *m;
    Py_ssize_t K, nc, L;
    if (!PyTuple_Check(t) || !PyArg_ParseTuple(t, "iiOOOnnn", &kind, &q8, &qs, &d, &m, &K, &nc, &L)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a matrix is (kind, q8, qs, d, m, K, n_chunk, L)");
        return -1;
    }
    *n_out = nc * L;
    return mat_get(w, kind, q8, qs, d, m, K, nc, L);
}

/* An optional float32 vector of n values: None leaves b->obj NULL. */
static int opt_vec(PyObject *o, Py_buffer *b, Py_ssize_t n, const char *what)
{
    memset(b, 0, sizeof *b);
    if (o == Py_None) return 0;
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (!b->format || strcmp(b->format, "f") || b->len != n * 4) {
        PyErr_Format(PyExc_ValueError, "decode_block: %s must be %zd float32 values", what, n);
        PyBuffer_Release(b);
        b->obj = NULL;
        return -1;
    }
    return 0;
}

/* dst[b, 0:n] = src[b, 0:n] for B rows (dst dense, src rows lds apart): a traced stage tensor; dst NULL: none. */
static void trace_rows(float *dst, int64_t n, const float *src, int64_t lds, int64_t B)
{
    if (dst)
        for (int64_t b = 0; b < B; b++) memcpy(dst + b * n, src + b * lds, sizeof(float) * n);
}

#define DB_TRACE 8 /* ln_1, q, k, v, scores, attn_out, ln_2, ffn_out */

/* y[b, 0:n] += bias for each of B rows ld apart (conv1d's `y + b`), if there is a bias. */
static void add_bias(float *y, int64_t ld, const Py_buffer *bias, int64_t B, int64_t n)
{
    if (!bias->obj) return;
    const float *bv = bias->buf;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < n; i++) y[b * ld + i] += bv[i];
}

enum { ACT_SILU_MUL, ACT_GELU_NEW };

static PyObject *py_decode_block(PyObject *self, PyObject *args)
{
    Py_buffer x, an, fn, cs, sn, anb, fnb, bias[4], tb[DB_TRACE];
    PyObject *anb_o, *fnb_o, *bias_o[4], *cs_o, *sn_o, *trace_o = Py_None;
    PyObject *qkv, *o, *gu, *down, *ks, *vs, *lens, *ret = NULL;
    Py_ssize_t layer, H, Hkv, hd, F;
    float eps, gelu_c, gelu_k;
    int f16, act;
    int64_t lds = 0;
    memset(&cs, 0, sizeof cs); memset(&sn, 0, sizeof sn); memset(&anb, 0, sizeof anb); memset(&fnb, 0, sizeof fnb);
    memset(bias, 0, sizeof bias); memset(tb, 0, sizeof tb);
    if (!PyArg_ParseTuple(args, "w*y*OOOOOy*OOOOOOOOOOnnnnnfpiff|O", &x, &an, &anb_o, &qkv, &bias_o[0], &o, &bias_o[1],
                          &fn, &fnb_o, &gu, &bias_o[2], &down, &bias_o[3], &cs_o, &sn_o, &ks, &vs, &lens, &layer, &H,
                          &Hkv, &hd, &F, &eps, &f16, &act, &gelu_c, &gelu_k, &trace_o))
        return NULL;
    Mat mats[DB_MATS];
    Py_ssize_t width[DB_MATS];
    memset(mats, 0, sizeof mats);
    Py_buffer *kb = NULL, *vb = NULL;
    void **kp = NULL, **vp = NULL;
    int64_t *T = NULL, *ms = NULL;
    float *scratch = NULL;
    const Py_ssize_t E = an.len / 4, B = PySequence_Size(lens), es = f16 ? 2 : 4;
    const Py_ssize_t nq = H * hd, nkv = Hkv * hd;
    const int rope = cs_o != Py_None;
    if (B < 1 || PySequence_Size(ks) != B || PySequence_Size(vs) != B || !PyTuple_Check(qkv) || !PyTuple_Check(gu) ||
        (PyTuple_GET_SIZE(qkv) != 1 && PyTuple_GET_SIZE(qkv) != 3) || (PyTuple_GET_SIZE(gu) != 1 && PyTuple_GET_SIZE(gu) != 2) ||
        (act != ACT_SILU_MUL && act != ACT_GELU_NEW) || (act == ACT_GELU_NEW && PyTuple_GET_SIZE(gu) != 1) ||
        (bias_o[0] != Py_None && PyTuple_GET_SIZE(qkv) != 1) || (bias_o[2] != Py_None && act != ACT_GELU_NEW) ||
        (cs_o == Py_None) != (sn_o == Py_None)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "decode_block: qkv holds 1 or 3 matrices, gu 1 or 2 (1 for "
                                               "gelu_new), biases on fused qkv and gelu's up only, cos and sin both or "
                                               "neither; ks, vs, lengths one per row");
        goto done;
    }
    if (H <= 0 || Hkv <= 0 || H % Hkv || hd <= 0 || hd % 2 || check_size(&x, B * E * 4, "x") ||
        check_size(&fn, E * 4, "ffn_norm") || opt_vec(anb_o, &anb, E, "attn_norm bias") ||
        opt_vec(fnb_o, &fnb, E, "ffn_norm bias") || opt_vec(bias_o[0], &bias[0], nq + 2 * nkv, "qkv bias") ||
        opt_vec(bias_o[1], &bias[1], E, "o bias") || opt_vec(bias_o[2], &bias[2], F, "up bias") ||
        opt_vec(bias_o[3], &bias[3], E, "down bias") ||
        (rope && (PyObject_GetBuffer(cs_o, &cs, PyBUF_C_CONTIGUOUS) < 0 || check_size(&cs, B * hd * 4, "cos") ||
                  PyObject_GetBuffer(sn_o, &sn, PyBUF_C_CONTIGUOUS) < 0 || check_size(&sn, B * hd * 4, "sin")))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "decode_block: bad head counts");
        goto done;
    }
    { /* the matrices: [0..2] Q,K,V (or [0] fused), [3] o, [4..5] gate, up (or [4] fused, or gelu's up), [6] down */
        const int nqkv = (int)PyTuple_GET_SIZE(qkv), ngu = (int)PyTuple_GET_SIZE(gu);
        PyObject *list[DB_MATS] = {PyTuple_GET_ITEM(qkv, 0), nqkv == 3 ? PyTuple_GET_ITEM(qkv, 1) : NULL,
                                   nqkv == 3 ? PyTuple_GET_ITEM(qkv, 2) : NULL, o, PyTuple_GET_ITEM(gu, 0),
                                   ngu == 2 ? PyTuple_GET_ITEM(gu, 1) : NULL, down};
        const Py_ssize_t k_in[DB_MATS] = {E, E, E, nq, E, E, F};
        const Py_ssize_t need[DB_MATS] = {nqkv == 3 ? nq : nq + 2 * nkv, nkv, nkv, E,
                                          ngu == 2 || act == ACT_GELU_NEW ? F : 2 * F, F, E};
        for (int i = 0; i < DB_MATS; i++) {
            width[i] = 0;
            if (!list[i]) continue;
            if (db_mat(&mats[i], list[i], &width[i])) goto done;
            if (mats[i].K != k_in[i] || width[i] < need[i]) {
                PyErr_Format(PyExc_ValueError, "decode_block: matrix %d is [%zd, %lld], the block needs [>= %zd, %zd]",
                             i, width[i], (long long)mats[i].K, need[i], k_in[i]);
                goto done;
            }
        }
    }
    kb = PyMem_Calloc(B, sizeof(Py_buffer)); vb = PyMem_Calloc(B, sizeof(Py_buffer));
    kp = PyMem_Calloc(B, sizeof(void *)); vp = PyMem_Calloc(B, sizeof(void *));
    T = PyMem_Calloc(B, sizeof(int64_t)); ms = PyMem_Calloc(B, sizeof(int64_t));
    if (!kb || !vb || !kp || !vp || !T || !ms) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t b = 0; b < B; b++) { /* calloc'ed: a buffer not acquired keeps .obj NULL */
        PyObject *ko = PySequence_GetItem(ks, b), *vo = PySequence_GetItem(vs, b), *lo = PySequence_GetItem(lens, b);
        int bad = !ko || !vo || !lo || PyObject_GetBuffer(ko, &kb[b], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0;
        if (!bad && PyObject_GetBuffer(vo, &vb[b], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
            PyBuffer_Release(&kb[b]);
            bad = 1;
        }
        if (!bad) T[b] = PyLong_AsLongLong(lo);
        Py_XDECREF(ko); Py_XDECREF(vo); Py_XDECREF(lo);
        if (bad || (T[b] == -1 && PyErr_Occurred())) goto done;
        const int64_t per_layer_pos = Hkv * hd * es; /* bytes per position of one layer */
        if (!kb[b].format || !vb[b].format || strcmp(kb[b].format, f16 ? "e" : "f") || strcmp(vb[b].format, f16 ? "e" : "f") ||
            kb[b].len != vb[b].len || kb[b].ndim != 4 || kb[b].shape[1] != Hkv || kb[b].shape[3] != hd ||
            layer < 0 || layer >= kb[b].shape[0] || T[b] < 1 || T[b] > kb[b].shape[2]) {
            PyErr_Format(PyExc_ValueError, "sequence %zd: a cache [n_layer, %zd, max_seq, %zd] of %s holding layer %zd and "
                         "position %lld is needed", b, Hkv, hd, f16 ? "float16" : "float32", layer, (long long)T[b]);
            goto done;
        }
        ms[b] = kb[b].shape[2];
        kp[b] = (char *)kb[b].buf + layer * ms[b] * per_layer_pos;
        vp[b] = (char *)vb[b].buf + layer * ms[b] * per_layer_pos;
    }
    if (trace_o != Py_None) { /* the stage tensors' buffers, each checked against its shape */
        const Py_ssize_t n[DB_TRACE] = {E, nq, nkv, nkv, 0, E, E, E};
        if (!PyTuple_Check(trace_o) || PyTuple_GET_SIZE(trace_o) != DB_TRACE) {
            PyErr_SetString(PyExc_ValueError, "decode_block: trace is None or a tuple of 8 arrays");
            goto done;
        }
        for (int i = 0; i < DB_TRACE; i++) {
            if (i == 4) {
                if (scores_arg(PyTuple_GET_ITEM(trace_o, i), &tb[i], B, H, T, &lds)) goto done;
                continue;
            }
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(trace_o, i), &tb[i], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
                goto done;
            if (!tb[i].format || strcmp(tb[i].format, "f") || tb[i].len != B * n[i] * 4) {
                PyErr_Format(PyExc_ValueError, "decode_block: trace array %d must be %zd x %zd float32", i, B, n[i]);
                goto done;
            }
        }
    }
    {
        const int fused_qkv = !mats[1].qs.obj, fused_gu = !mats[5].qs.obj;
        const Py_ssize_t n_scratch = B * (E + width[0] + width[1] + width[2] + nq + nkv + nq + width[3] + width[4] +
                                          width[5] + F + width[6]);
        scratch = malloc(sizeof(float) * (n_scratch + 1));
        if (!scratch) { PyErr_NoMemory(); goto done; }
        float *h = scratch, *y0 = h + B * E, *y1 = y0 + B * width[0], *y2 = y1 + B * width[1], *qr = y2 + B * width[2];
        float *kr = qr + B * nq, *merged = kr + B * nkv, *ob = merged + B * nq, *g0 = ob + B * width[3];
        float *g1 = g0 + B * width[4], *a = g1 + B * width[5], *db = a + B * F;
        float *xp = x.buf;
        int rc = 0;
        Py_BEGIN_ALLOW_THREADS
        /* attention: norm, Q K V (+ bias), rotary, cache write + attention, output projection (+ bias), residual */
        if (anb.obj) layer_norm_rows(xp, E, an.buf, anb.buf, h, B, E, eps);
        else rms_norm_rows(xp, E, an.buf, h, B, E, eps);
        trace_rows(tb[0].buf, E, h, E, B);
        rc |= mat_run(&mats[0], h, B, y0);
        if (!fused_qkv) rc |= mat_run(&mats[1], h, B, y1) | mat_run(&mats[2], h, B, y2);
        add_bias(y0, width[0], &bias[0], B, nq + 2 * nkv);
        const float *qy = y0, *ky = fused_qkv ? y0 + nq : y1, *vy = fused_qkv ? y0 + nq + nkv : y2;
        const int64_t ldq = width[0], ldk = fused_qkv ? width[0] : width[1], ldv = fused_qkv ? width[0] : width[2];
        if (rope) {
            rope_rows(qy, ldq, cs.buf, sn.buf, qr, B, H, hd);
            rope_rows(ky, ldk, cs.buf, sn.buf, kr, B, Hkv, hd);
        } else {
            for (Py_ssize_t b = 0; b < B; b++) memcpy(qr + b * nq, qy + b * ldq, nq * 4); /* attend_rows reads q dense */
        }
        const float *kn = rope ? kr : ky; /* K as written into the cache */
        const int64_t ldkn = rope ? nkv : ldk;
        trace_rows(tb[1].buf, nq, qr, nq, B);
        trace_rows(tb[2].buf, nkv, kn, ldkn, B);
        trace_rows(tb[3].buf, nkv, vy, ldv, B);
        attend_rows(qr, kn, ldkn, vy, ldv, kp, vp, ms, T, B, H, Hkv, hd, f16, merged, tb[4].buf, lds);
        rc |= mat_run(&mats[3], merged, B, ob);
        add_bias(ob, width[3], &bias[1], B, E);
        trace_rows(tb[5].buf, E, ob, width[3], B);
        for (Py_ssize_t b = 0; b < B; b++)
            for (Py_ssize_t i = 0; i < E; i++) xp[b * E + i] += FAULT(ATTN_RESIDUAL) ? 0.99f * ob[b * width[3] + i] : ob[b * width[3] + i];
        /* feed-forward: norm, gate and up (+ bias), the activation, down projection (+ bias), residual */
        if (fnb.obj) layer_norm_rows(xp, E, fn.buf, fnb.buf, h, B, E, eps);
        else rms_norm_rows(xp, E, fn.buf, h, B, E, eps);
        trace_rows(tb[6].buf, E, h, E, B);
        rc |= mat_run(&mats[4], h, B, g0);
        if (!fused_gu) rc |= mat_run(&mats[5], h, B, g1);
        if (act == ACT_GELU_NEW) {
            add_bias(g0, width[4], &bias[2], B, F);
            gelu_new_rows(g0, width[4], a, B, F, gelu_c, gelu_k);
        } else {
            const float *gate = g0, *up = fused_gu ? g0 + F : g1;
            silu_mul_rows(gate, width[4], up, fused_gu ? width[4] : width[5], a, B, F);
        }
        rc |= mat_run(&mats[6], a, B, db);
        add_bias(db, width[6], &bias[3], B, E);
        trace_rows(tb[7].buf, E, db, width[6], B);
        for (Py_ssize_t b = 0; b < B; b++)
            for (Py_ssize_t i = 0; i < E; i++) xp[b * E + i] += FAULT(FFN_RESIDUAL) ? 0.99f * db[b * width[6] + i] : db[b * width[6] + i];
        Py_END_ALLOW_THREADS
        if (rc) { PyErr_NoMemory(); goto done; }
    }
    ret = Py_None; Py_INCREF(ret);
done:
    free(scratch);
    for (int i = 0; i < DB_MATS; i++) mat_release(&mats[i]);
    for (Py_ssize_t b = 0; b < B && kb && vb; b++) {
        if (kb[b].obj) PyBuffer_Release(&kb[b]);
        if (vb[b].obj) PyBuffer_Release(&vb[b]);
    }
    PyMem_Free(kb); PyMem_Free(vb); PyMem_Free(kp); PyMem_Free(vp); PyMem_Free(T); PyMem_Free(ms);
    PyBuffer_Release(&x); PyBuffer_Release(&an); PyBuffer_Release(&fn);
    if (cs.obj) PyBuffer_Release(&cs);
    if (sn.obj) PyBuffer_Release(&sn);
    if (anb.obj) PyBuffer_Release(&anb);
    if (fnb.obj) PyBuffer_Release(&fnb);
    for (int i = 0; i < 4; i++)
        if (bias[i].obj) PyBuffer_Release(&bias[i]);
    for (int i = 0; i < DB_TRACE; i++)
        if (tb[i].obj) PyBuffer_Release(&tb[i]);
    return ret;
}

/* What this build was compiled for: the instruction-set features the compiler was allowed to use (chosen at
 * build time by -march), OpenMP, and the fault a test build carries. kernels.info() sets them beside the CPU's. */
static PyObject *py_build_info(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    PyObject *isa = PyList_New(0);
    if (!isa) return NULL;
    static const char *const names[] = {
#if defined(__AVX512F__)
        "avx512f",
#endif
#if defined(__AVX512BW__)
        "avx512bw",
#endif
#if defined(__AVX512VNNI__)
        "avx512vnni",
#endif
#if defined(__AVX2__)
        "avx2",
#endif
#if defined(__FMA__)
        "fma",
#endif
#if defined(__F16C__)
        "f16c",
#endif
#if defined(__AVXVNNI__)
        "avxvnni",
#endif
#if defined(__ARM_NEON)
        "neon",
#endif
#if defined(__ARM_FEATURE_DOTPROD)
        "dotprod",
#endif
        NULL};
    for (int i = 0; names[i]; i++) {
        PyObject *s = PyUnicode_FromString(names[i]);
        if (!s || PyList_Append(isa, s) < 0) { Py_XDECREF(s); Py_DECREF(isa); return NULL; }
        Py_DECREF(s);
    }
#if defined(_OPENMP)
    const int openmp = _OPENMP;
#else
    const int openmp = 0;
#endif
#ifdef LLORCH_FAULT
    const int fault = LLORCH_FAULT;
#else
    const int fault = 0;
#endif
    return Py_BuildValue("{s:N,s:i,s:i,s:i}", "isa", isa, "openmp", openmp, "fault", fault, "one_row_tiles",
#if defined(__AVX512F__)
                         1
#else
                         0
#endif
    );
}

static PyMethodDef methods[] = {
    {"build_info", py_build_info, METH_NOARGS, "the ISA features, OpenMP version and fault this build was compiled with"},
    {"matmul", py_matmul, METH_VARARGS, "out[M, n_chunk*L] = x[M, K] @ W.T for a kernel-held matrix of any kind"},
    {"decode_block", py_decode_block, METH_VARARGS, "a Llama or GPT-2 block for decode rows, one C call (kernels.ops.decode_block)"},
    {"attend_decode", py_attend_decode, METH_VARARGS, "softmax(q K^T / sqrt(hd)) V for one query row per sequence"},
    {"rowwise", py_rowwise, METH_VARARGS, "a decode step's elementwise stages: norms, SiLU/GELU, RoPE (kernels.ops)"},
    {"quantize_q8", py_quantize_q8, METH_VARARGS, "x -> 8-bit blocks, scales (float16-rounded), scaled sums"},
    {"q4_1_dequant_t", py_q4_1_dequant_t, METH_VARARGS, "chunks c0..c1 of a repacked Q4_1 matrix, float32, transposed"},
    {"q8_0_dequant_t", py_q8_0_dequant_t, METH_VARARGS, "chunks c0..c1 of a repacked Q8_0 matrix, float32, transposed"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qkernels", "Quantized matrix kernels (see qkernels.c).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__qkernels(void)
{
    PyObject *m = PyModule_Create(&module);
#ifdef LLORCH_FAULT
    if (m && PyModule_AddIntConstant(m, "FAULT", LLORCH_FAULT) < 0) { Py_DECREF(m); return NULL; }
#endif
    return m;
}
