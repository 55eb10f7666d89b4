/* Python glue (module.c includes it after the other bindings). */
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
