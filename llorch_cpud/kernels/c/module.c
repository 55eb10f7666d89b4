/* The Python module _qkernels_<variant> (LLORCH_MODULE; setup.py builds these same sources once per ISA level,
 * and kernels/isa.py imports the best one the CPU runs). One translation unit: the kernel files are included
 * here, in order, so their static inline helpers inline as they did in one file. Layout: see common.h. */
#include "common.h"
#include "simd.h"
#include "matmul_quant.c"
#include "q8.c"
#include "matmul_f32.c"
#include "attention.c"
#include "rowwise.c"

#ifndef LLORCH_MODULE
#define LLORCH_MODULE _qkernels
#endif
#define LLORCH_STR2(x) #x
#define LLORCH_STR(x) LLORCH_STR2(x)
#define LLORCH_CAT2(a, b) a##b
#define LLORCH_CAT(a, b) LLORCH_CAT2(a, b)

static int check_size(Py_buffer *b, Py_ssize_t need, const char *what)
{
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: buffer of %zd bytes, kernel needs %zd", what, b->len, need);
        return -1;
    }
    return 0;
}

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

/* ---- Python bindings -------------------------------------------------------------------- */

#include "matmul.c"

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

#include "block.c"

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
    return Py_BuildValue("{s:N,s:s,s:i,s:i,s:i}", "isa", isa, "module", LLORCH_STR(LLORCH_MODULE), "openmp", openmp,
                         "fault", fault, "one_row_tiles",
#if defined(__AVX512F__)
                         1
#else
                         0
#endif
    );
}

/* cpu_features(): the instruction sets this CPU (and its OS) runs, as /proc/cpuinfo spells them, asked of the CPU
 * itself (cpuid through __builtin_cpu_supports: where /proc/cpuinfo is absent, e.g. macOS or Windows on x86);
 * kernels/isa.py picks the variant with it. Empty where the compiler cannot ask (not x86). */
static PyObject *py_cpu_features(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
#define LLORCH_HAS(gcc_name, cpuinfo_name)                                                    \
    if (__builtin_cpu_supports(gcc_name)) {                                                   \
        PyObject *s = PyUnicode_FromString(cpuinfo_name);                                     \
        if (!s || PyList_Append(out, s) < 0) { Py_XDECREF(s); Py_DECREF(out); return NULL; } \
        Py_DECREF(s);                                                                         \
    }
    LLORCH_HAS("sse3", "pni") LLORCH_HAS("ssse3", "ssse3") LLORCH_HAS("sse4.1", "sse4_1") LLORCH_HAS("sse4.2", "sse4_2")
    LLORCH_HAS("popcnt", "popcnt") LLORCH_HAS("avx", "avx") LLORCH_HAS("avx2", "avx2") LLORCH_HAS("fma", "fma")
    LLORCH_HAS("bmi", "bmi1") LLORCH_HAS("bmi2", "bmi2") LLORCH_HAS("avx512f", "avx512f")
    LLORCH_HAS("avx512bw", "avx512bw") LLORCH_HAS("avx512cd", "avx512cd") LLORCH_HAS("avx512dq", "avx512dq")
    LLORCH_HAS("avx512vl", "avx512vl") LLORCH_HAS("avx512vnni", "avx512_vnni")
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 /* the micro-architecture levels, whole */
    LLORCH_HAS("x86-64-v2", "x86-64-v2") LLORCH_HAS("x86-64-v3", "x86-64-v3") LLORCH_HAS("x86-64-v4", "x86-64-v4")
#endif
#undef LLORCH_HAS
#endif
    return out;
}

static PyMethodDef methods[] = {
    {"cpu_features", py_cpu_features, METH_NOARGS, "the CPU's instruction sets (cpuid; /proc/cpuinfo spelling)"},
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

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, LLORCH_STR(LLORCH_MODULE), "Matrix, attention and decode-step kernels (see c/common.h).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC LLORCH_CAT(PyInit_, LLORCH_MODULE)(void)
{
    PyObject *m = PyModule_Create(&module);
#ifdef LLORCH_FAULT
    if (m && PyModule_AddIntConstant(m, "FAULT", LLORCH_FAULT) < 0) { Py_DECREF(m); return NULL; }
#endif
    return m;
}
