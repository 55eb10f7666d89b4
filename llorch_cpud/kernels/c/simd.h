/* The ISA layer (see common.h): everything that depends on the instruction set the file is compiled for. */
#ifndef LLORCH_SIMD_H
#define LLORCH_SIMD_H
#include "common.h"

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


/* ---- reductions (decode attention, rowwise) ---- */
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

#endif
