#include "simd.h"

/* ---- decode attention: one query row per sequence, each sequence with its own KV cache ------ */

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
