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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* 16 bytes -> 16 x int32. (GCC lowers __builtin_convertvector between vectors of different byte
 * sizes one element at a time, 5x slower; the x86 widening instructions do it in one.) */
static inline i32x16 widen_u8(const uint8_t *p)
{
#if defined(__AVX512F__)
    return (i32x16)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    i32x16 r;
    memcpy(&r, &a, 32);
    memcpy((char *)&r + 32, &b, 32);
    return r;
#else
    i32x16 r;
    for (int i = 0; i < 16; i++) r[i] = p[i];
    return r;
#endif
}

static inline i32x16 widen_s8(const int8_t *p)
{
#if defined(__AVX512F__)
    return (i32x16)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    __m256i a = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    i32x16 r;
    memcpy(&r, &a, 32);
    memcpy((char *)&r + 32, &b, 32);
    return r;
#else
    i32x16 r;
    for (int i = 0; i < 16; i++) r[i] = p[i];
    return r;
#endif
}

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

#define RT 8 /* activation rows per pass: each converted weight vector feeds RT rows */

/* Weights are read as one stream; with RT rows the out-of-order window holds too few iterations to
 * hide DRAM latency, so the stream is prefetched this many 64-byte lines ahead (measured: without
 * it 8 rows ran at 33 GB/s, half of what 1 row reaches). */
#ifndef PF_LINES
#define PF_LINES 64
#endif

static inline f32x16 load16(const float *p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, f32x16 v) { memcpy(p, &v, sizeof v); }

/* ---- Q4_1 ------------------------------------------------------------------------------- */

static inline __attribute__((always_inline)) void
q4_1_tile(const float *x, const uint8_t *qs, const uint16_t *d, const uint16_t *m, float *out,
          int64_t K, int64_t ldo, int64_t NB, int64_t L, int64_t c, int64_t r0, const int nr)
{
    for (int64_t i0 = 0; i0 < L; i0 += 16) {
        f32x16 acc[RT];
        for (int r = 0; r < nr; r++) acc[r] = (f32x16){0};
        for (int64_t b = 0; b < NB; b++) {
            const uint8_t *q = qs + ((c * NB + b) * 16) * L + i0;
            f32x16 dv = load16h(d + (c * NB + b) * L + i0);
            f32x16 mv = load16h(m + (c * NB + b) * L + i0);
            f32x16 t[RT]; /* per-block partial sums, then added to acc: shorter float32 sums, smaller error */
            for (int r = 0; r < nr; r++) t[r] = (f32x16){0};
            for (int j = 0; j < 16; j++) {
                __builtin_prefetch(q - i0 + j * L + PF_LINES * 64, 0, 3); /* the chunk is one stream */
                i32x16 qi = widen_u8(q + j * L);
                /* the weights themselves, exactly as ggml dequantizes them (d*q is exact in float32) */
                f32x16 lo = dv * __builtin_convertvector(qi & 15, f32x16) + mv;
                f32x16 hi = dv * __builtin_convertvector(qi >> 4, f32x16) + mv;
                for (int r = 0; r < nr; r++) {
                    const float *xr = x + (r0 + r) * K + b * 32;
                    t[r] += lo * xr[j] + hi * xr[j + 16];
                }
            }
            for (int r = 0; r < nr; r++) acc[r] += t[r];
        }
        for (int r = 0; r < nr; r++) store16(out + (r0 + r) * ldo + c * L + i0, acc[r]);
    }
}

static void q4_1_chunk(const float *x, const uint8_t *qs, const uint16_t *d, const uint16_t *m,
                       float *out, int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    int64_t NB = K / 32, r0 = 0;
    for (; r0 + RT <= M; r0 += RT) q4_1_tile(x, qs, d, m, out, K, ldo, NB, L, c, r0, RT);
    switch (M - r0) {
    case 7: q4_1_tile(x, qs, d, m, out, K, ldo, NB, L, c, r0, 7); break;
    case 6: q4_1_tile(x, qs, d, m, out, K, ldo, NB, L, c, r0, 6); break;
    case 5: q4_1_tile(x, qs, d, m, out, K, ldo, NB, L, c, r0, 5); break;
    case 4: q4_1_tile(x, qs, d, m, out, K, ldo, NB, L, c, r0, 4); break;
    case 3: q4_1_tile(x, qs, d, m, out, K, ldo, NB, L, c, r0, 3); break;
    case 2: q4_1_tile(x, qs, d, m, out, K, ldo, NB, L, c, r0, 2); break;
    case 1: q4_1_tile(x, qs, d, m, out, K, ldo, NB, L, c, r0, 1); break;
    }
}

/* ---- Q8_0 ------------------------------------------------------------------------------- */

static inline __attribute__((always_inline)) void
q8_0_tile(const float *x, const int8_t *qs, const uint16_t *d, float *out,
          int64_t K, int64_t ldo, int64_t NB, int64_t L, int64_t c, int64_t r0, const int nr)
{
    for (int64_t i0 = 0; i0 < L; i0 += 16) {
        f32x16 acc[RT];
        for (int r = 0; r < nr; r++) acc[r] = (f32x16){0};
        for (int64_t b = 0; b < NB; b++) {
            f32x16 t[RT];
            for (int r = 0; r < nr; r++) t[r] = (f32x16){0};
            const int8_t *q = qs + ((c * NB + b) * 32) * L + i0;
            for (int j = 0; j < 32; j++) {
                __builtin_prefetch(q - i0 + j * L + PF_LINES * 64, 0, 3);
                f32x16 w = __builtin_convertvector(widen_s8(q + j * L), f32x16);
                for (int r = 0; r < nr; r++) t[r] += w * x[(r0 + r) * K + b * 32 + j];
            }
            f32x16 dv = load16h(d + (c * NB + b) * L + i0);
            for (int r = 0; r < nr; r++) acc[r] += dv * t[r];
        }
        for (int r = 0; r < nr; r++) store16(out + (r0 + r) * ldo + c * L + i0, acc[r]);
    }
}

static void q8_0_chunk(const float *x, const int8_t *qs, const uint16_t *d, float *out,
                       int64_t M, int64_t K, int64_t ldo, int64_t L, int64_t c)
{
    int64_t NB = K / 32, r0 = 0;
    for (; r0 + RT <= M; r0 += RT) q8_0_tile(x, qs, d, out, K, ldo, NB, L, c, r0, RT);
    switch (M - r0) {
    case 7: q8_0_tile(x, qs, d, out, K, ldo, NB, L, c, r0, 7); break;
    case 6: q8_0_tile(x, qs, d, out, K, ldo, NB, L, c, r0, 6); break;
    case 5: q8_0_tile(x, qs, d, out, K, ldo, NB, L, c, r0, 5); break;
    case 4: q8_0_tile(x, qs, d, out, K, ldo, NB, L, c, r0, 4); break;
    case 3: q8_0_tile(x, qs, d, out, K, ldo, NB, L, c, r0, 3); break;
    case 2: q8_0_tile(x, qs, d, out, K, ldo, NB, L, c, r0, 2); break;
    case 1: q8_0_tile(x, qs, d, out, K, ldo, NB, L, c, r0, 1); break;
    }
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
    int64_t r0 = 0;
    for (; r0 + RT <= M; r0 += RT) f32_tile(x, w, out, K, ldo, c, r0, RT);
    switch (M - r0) {
    case 7: f32_tile(x, w, out, K, ldo, c, r0, 7); break;
    case 6: f32_tile(x, w, out, K, ldo, c, r0, 6); break;
    case 5: f32_tile(x, w, out, K, ldo, c, r0, 5); break;
    case 4: f32_tile(x, w, out, K, ldo, c, r0, 4); break;
    case 3: f32_tile(x, w, out, K, ldo, c, r0, 3); break;
    case 2: f32_tile(x, w, out, K, ldo, c, r0, 2); break;
    case 1: f32_tile(x, w, out, K, ldo, c, r0, 1); break;
    }
}

/* ---- dequantization into a transposed slab out_t [K][ldo] (columns c0*L .. c1*L) ---------- */

static void q4_1_dequant_chunk(const uint8_t *qs, const uint16_t *d, const uint16_t *m, float *out_t,
                               int64_t K, int64_t ldo, int64_t L, int64_t c, int64_t c0)
{
    int64_t NB = K / 32, col = (c - c0) * L;
    for (int64_t b = 0; b < NB; b++)
        for (int64_t i0 = 0; i0 < L; i0 += 16) {
            f32x16 dv = load16h(d + (c * NB + b) * L + i0), mv = load16h(m + (c * NB + b) * L + i0);
            for (int j = 0; j < 16; j++) {
                i32x16 qi = widen_u8(qs + ((c * NB + b) * 16 + j) * L + i0);
                store16(out_t + (b * 32 + j) * ldo + col + i0, dv * __builtin_convertvector(qi & 15, f32x16) + mv);
                store16(out_t + (b * 32 + 16 + j) * ldo + col + i0, dv * __builtin_convertvector(qi >> 4, f32x16) + mv);
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
            for (int j = 0; j < 32; j++) {
                store16(out_t + (b * 32 + j) * ldo + col + i0,
                        dv * __builtin_convertvector(widen_s8(qs + ((c * NB + b) * 32 + j) * L + i0), f32x16));
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

#include <math.h>

/* exp of 16 floats: x = n ln2 + r, |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial (relative
 * error ~2e-7, about one float32 ulp), times 2^n built in the exponent bits. Inputs here are <= 0
 * (scores minus their max); below -87 the result is 0, as expf's underflow is. */
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

static inline void exp16(float *v)
{
    float y[16];
    int32_t e[16];
    for (int i = 0; i < 16; i++) { /* written lane by lane; GCC vectorises the loop */
        float x = v[i] < -87.f ? -87.f : v[i];
        float n = floorf(x * 1.44269504088896341f + 0.5f);
        float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
        float p = 1.f / 720;
        p = p * r + 1.f / 120;
        p = p * r + 1.f / 24;
        p = p * r + 1.f / 6;
        p = p * r + 0.5f;
        p = p * r + 1.f;
        p = p * r + 1.f;
        y[i] = p;
        e[i] = ((int32_t)n + 127) << 23;
    }
    float sc[16];
    memcpy(sc, e, sizeof sc);
    for (int i = 0; i < 16; i++) v[i] = v[i] < -87.f ? 0.f : y[i] * sc[i];
}

/* One (sequence, KV head) with its g query heads: softmax(q . K[0:T]^T * scale) . V[0:T].
 * k, v point at this KV head's [max_seq][hd] slab; q at g consecutive query rows [g][hd];
 * scores scratch holds g * T floats (T rounded up to 16). */
static void attend_group(const float *q, const float *k, const float *v, int64_t T, int64_t hd, int64_t g,
                         float scale, float *scores, float *out)
{
    int64_t Tp = (T + 15) & ~(int64_t)15;
    const int wide = hd % 64 == 0; /* 4 vectors per 64 elements, kept in registers */
    int64_t t = 0;
    if (hd % 16 == 0) /* 4 positions at a time: their 4 dot products reduced together */
        for (; t + 4 <= T; t += 4) {
            for (int64_t i = 0; i < 4 * hd; i += 16) __builtin_prefetch(k + (t + ATT_PF) * hd + i, 0, 3);
            for (int64_t h = 0; h < g; h++) {
                const float *qh = q + h * hd;
                f32x16 a[4];
                for (int j = 0; j < 4; j++) {
                    const float *kt = k + (t + j) * hd;
                    f32x16 acc = {0};
                    for (int64_t i = 0; i < hd; i += 16) acc += load16(qh + i) * load16(kt + i);
                    a[j] = acc;
                }
                f32x4 s4 = hsum4x16(a[0], a[1], a[2], a[3]);
                for (int j = 0; j < 4; j++) scores[h * Tp + t + j] = s4[j] * scale;
            }
        }
    for (; t < T; t++) {
        const float *kt = k + t * hd;
        for (int64_t h = 0; h < g; h++) {
            const float *qh = q + h * hd;
            float s = 0.f;
            if (wide) { /* 64 partial sums, then a fixed tree: vectorised, deterministic */
                f32x16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                for (int64_t i = 0; i < hd; i += 64) {
                    a0 += load16(qh + i) * load16(kt + i);
                    a1 += load16(qh + i + 16) * load16(kt + i + 16);
                    a2 += load16(qh + i + 32) * load16(kt + i + 32);
                    a3 += load16(qh + i + 48) * load16(kt + i + 48);
                }
                s = hsum16((a0 + a1) + (a2 + a3));
            } else {
                for (int64_t i = 0; i < hd; i++) s += qh[i] * kt[i];
            }
            scores[h * Tp + t] = s * scale;
        }
    }
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
        float inv = 1.f / sum;
        for (int64_t t = 0; t < T; t++) sh[t] *= inv; /* the softmax weights */
        float *oh = out + h * hd;
        if (wide) {
            for (int64_t i = 0; i < hd; i += 64) {
                f32x16 o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0};
                for (int64_t t = 0; t < T; t++) {
                    const float *vt = v + t * hd + i;
                    __builtin_prefetch(vt + ATT_PF * hd, 0, 3);
                    __builtin_prefetch(vt + ATT_PF * hd + 32, 0, 3);
                    float p = sh[t];
                    o0 += p * load16(vt);
                    o1 += p * load16(vt + 16);
                    o2 += p * load16(vt + 32);
                    o3 += p * load16(vt + 48);
                }
                store16(oh + i, o0);
                store16(oh + i + 16, o1);
                store16(oh + i + 32, o2);
                store16(oh + i + 48, o3);
            }
        } else {
            for (int64_t i = 0; i < hd; i++) oh[i] = 0.f;
            for (int64_t t = 0; t < T; t++) {
                const float *vt = v + t * hd;
                float p = sh[t];
                for (int64_t i = 0; i < hd; i++) oh[i] += p * vt[i];
            }
        }
    }
}

/* attend_decode(q, k_new, v_new, ks, vs, lengths, out, n_head, n_kv, hd)
 *   q [B, n_head, hd]; k_new, v_new [B, n_kv, hd]: the new position's K, V, written into the caches at
 *   position T_b - 1 first; ks[b], vs[b]: that sequence's layer slab [n_kv, max_seq_b, hd]
 *   (C-contiguous, writable); lengths[b]: positions to attend (T_b); out [B, n_head * hd]. */
static PyObject *py_attend_decode(PyObject *self, PyObject *args)
{
    Py_buffer q, kn, vn, out;
    PyObject *ks, *vs, *lens;
    Py_ssize_t H, Hkv, hd;
    if (!PyArg_ParseTuple(args, "y*y*y*OOOw*nnn", &q, &kn, &vn, &ks, &vs, &lens, &out, &H, &Hkv, &hd)) return NULL;
    PyObject *ret = NULL;
    Py_ssize_t B = PySequence_Size(lens);
    Py_buffer *kb = NULL, *vb = NULL;
    int64_t *T = NULL, *ms = NULL;
    Py_ssize_t nk = 0, nv = 0, maxT = 0;
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
        int rk = PyObject_GetBuffer(o, &kb[b], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE);
        Py_DECREF(o);
        if (rk < 0) goto done;
        nk++;
        o = PySequence_GetItem(vs, b);
        if (!o) goto done;
        int rv = PyObject_GetBuffer(o, &vb[b], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE);
        Py_DECREF(o);
        if (rv < 0) goto done;
        nv++;
        o = PySequence_GetItem(lens, b);
        if (!o) goto done;
        T[b] = PyLong_AsLongLong(o);
        Py_DECREF(o);
        if (T[b] == -1 && PyErr_Occurred()) goto done;
        ms[b] = kb[b].len / (Py_ssize_t)(Hkv * hd * 4);
        if (kb[b].len != vb[b].len || kb[b].len != ms[b] * Hkv * hd * 4 || T[b] < 1 || T[b] > ms[b]) {
            PyErr_Format(PyExc_ValueError, "sequence %zd: cache of %zd bytes cannot hold %lld positions of %zd x %zd",
                         b, kb[b].len, (long long)T[b], Hkv, hd);
            goto done;
        }
        if (T[b] > maxT) maxT = T[b];
    }
    {
        float scale = 1.f / sqrtf((float)hd);
        const float *qp = q.buf;
        float *op = out.buf;
        int64_t g = H / Hkv;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t b = 0; b < B; b++) /* the new position's K, V into the cache (cache_write's job) */
            for (Py_ssize_t kvh = 0; kvh < Hkv; kvh++) {
                size_t at = (size_t)((kvh * ms[b] + T[b] - 1) * hd);
                memcpy((float *)kb[b].buf + at, (const float *)kn.buf + (b * Hkv + kvh) * hd, hd * 4);
                memcpy((float *)vb[b].buf + at, (const float *)vn.buf + (b * Hkv + kvh) * hd, hd * 4);
            }
#pragma omp parallel
        {
            float *scores = malloc(sizeof(float) * g * ((maxT + 15) & ~(int64_t)15));
#pragma omp for schedule(dynamic, 1)
            for (Py_ssize_t bk = 0; bk < B * Hkv; bk++) {
                int64_t b = bk / Hkv, kvh = bk % Hkv; /* query heads kvh*g .. kvh*g+g-1 read this KV head */
                const float *kp = (const float *)kb[b].buf + kvh * ms[b] * hd;
                const float *vp = (const float *)vb[b].buf + kvh * ms[b] * hd;
                int64_t h0 = b * H + kvh * g;
                attend_group(qp + h0 * hd, kp, vp, T[b], hd, g, scale, scores, op + h0 * hd);
            }
            free(scores);
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None; Py_INCREF(ret);
done:
    for (Py_ssize_t b = 0; b < nk; b++) PyBuffer_Release(&kb[b]);
    for (Py_ssize_t b = 0; b < nv; b++) PyBuffer_Release(&vb[b]);
    PyMem_Free(kb); PyMem_Free(vb); PyMem_Free(T); PyMem_Free(ms);
    PyBuffer_Release(&q); PyBuffer_Release(&kn); PyBuffer_Release(&vn); PyBuffer_Release(&out);
    return ret;
}

/* ---- Python bindings -------------------------------------------------------------------- */

/* q4_1_matmul(x, qs, d, m, out, M, K, n_chunk, L) ; out [M, n_chunk*L] */
static PyObject *py_q4_1_matmul(PyObject *self, PyObject *args)
{
    Py_buffer x, qs, d, m, out;
    Py_ssize_t M, K, nc, L;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*nnnn", &x, &qs, &d, &m, &out, &M, &K, &nc, &L)) return NULL;
    PyObject *ret = NULL;
    if (K % 32 || L % 16 || check_size(&x, M * K * 4, "x") ||
        check_size(&qs, nc * (K / 32) * 16 * L, "qs") || check_size(&d, nc * (K / 32) * L * 2, "d") ||
        check_size(&m, nc * (K / 32) * L * 2, "m") || check_size(&out, M * nc * L * 4, "out")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "K must be a multiple of 32 and L of 16");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static)
    for (Py_ssize_t c = 0; c < nc; c++)
        q4_1_chunk(x.buf, qs.buf, d.buf, m.buf, out.buf, M, K, nc * L, L, c);
    Py_END_ALLOW_THREADS
    ret = Py_None; Py_INCREF(ret);
done:
    PyBuffer_Release(&x); PyBuffer_Release(&qs);
    PyBuffer_Release(&d); PyBuffer_Release(&m); PyBuffer_Release(&out);
    return ret;
}

/* q8_0_matmul(x, qs, d, out, M, K, n_chunk, L) */
static PyObject *py_q8_0_matmul(PyObject *self, PyObject *args)
{
    Py_buffer x, qs, d, out;
    Py_ssize_t M, K, nc, L;
    if (!PyArg_ParseTuple(args, "y*y*y*w*nnnn", &x, &qs, &d, &out, &M, &K, &nc, &L)) return NULL;
    PyObject *ret = NULL;
    if (K % 32 || L % 16 || check_size(&x, M * K * 4, "x") || check_size(&qs, nc * K * L, "qs") ||
        check_size(&d, nc * (K / 32) * L * 2, "d") || check_size(&out, M * nc * L * 4, "out")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "K must be a multiple of 32 and L of 16");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static)
    for (Py_ssize_t c = 0; c < nc; c++)
        q8_0_chunk(x.buf, qs.buf, d.buf, out.buf, M, K, nc * L, L, c);
    Py_END_ALLOW_THREADS
    ret = Py_None; Py_INCREF(ret);
done:
    PyBuffer_Release(&x); PyBuffer_Release(&qs); PyBuffer_Release(&d); PyBuffer_Release(&out);
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

/* f32_matmul(x, w, out, M, K, n_chunk) ; w packed [n_chunk, K, 16]; out [M, n_chunk*16] */
static PyObject *py_f32_matmul(PyObject *self, PyObject *args)
{
    Py_buffer x, w, out;
    Py_ssize_t M, K, nc;
    if (!PyArg_ParseTuple(args, "y*y*w*nnn", &x, &w, &out, &M, &K, &nc)) return NULL;
    PyObject *ret = NULL;
    if (check_size(&x, M * K * 4, "x") || check_size(&w, nc * K * 16 * 4, "w") ||
        check_size(&out, M * nc * 16 * 4, "out"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static)
    for (Py_ssize_t c = 0; c < nc; c++)
        f32_chunk(x.buf, w.buf, out.buf, M, K, nc * 16, c);
    Py_END_ALLOW_THREADS
    ret = Py_None; Py_INCREF(ret);
done:
    PyBuffer_Release(&x); PyBuffer_Release(&w); PyBuffer_Release(&out);
    return ret;
}

static PyMethodDef methods[] = {
    {"attend_decode", py_attend_decode, METH_VARARGS, "softmax(q K^T / sqrt(hd)) V for one query row per sequence"},
    {"f32_matmul", py_f32_matmul, METH_VARARGS, "out[M, n_chunk*16] = x[M, K] @ W.T for a packed float32 matrix"},
    {"q4_1_matmul", py_q4_1_matmul, METH_VARARGS, "out[M, n_chunk*L] = x[M, K] @ W.T for a repacked Q4_1 matrix"},
    {"q8_0_matmul", py_q8_0_matmul, METH_VARARGS, "out[M, n_chunk*L] = x[M, K] @ W.T for a repacked Q8_0 matrix"},
    {"q4_1_dequant_t", py_q4_1_dequant_t, METH_VARARGS, "chunks c0..c1 of a repacked Q4_1 matrix, float32, transposed"},
    {"q8_0_dequant_t", py_q8_0_dequant_t, METH_VARARGS, "chunks c0..c1 of a repacked Q8_0 matrix, float32, transposed"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qkernels", "Quantized matrix kernels (see qkernels.c).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__qkernels(void) { return PyModule_Create(&module); }
