#include "simd.h"

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
