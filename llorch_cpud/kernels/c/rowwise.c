#include "simd.h"

/* ---- elementwise stages of a decode step (the models' numpy stage functions, one C call each) ----
 * A decode step's norms, activations and rotary embedding run on a few rows: numpy's per-call cost,
 * not arithmetic, is their price (~15 calls a layer). Each function here computes what the stage
 * function of the same name computes - tests/test_kernels.py holds them to each other - with the
 * same operation order, so what may differ is last-bit rounding: a norm's sum (16 lane partial sums
 * and a fixed tree per row, numpy sums pairwise), a multiply-add fused into one rounding, and exp
 * (expv16's polynomial, ~1e-7 relative, against numpy's). Rows are independent (rows of a batch
 * do not change each other's results). */


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
