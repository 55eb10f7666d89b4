/* Python glue (module.c includes it): a matrix's buffers, checked, and its product on any kind. */
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
