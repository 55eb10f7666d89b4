/* What every kernel file shares: the standard headers (and Python's, unless LLORCH_NO_PYTHON: the kernels
 * alone, e.g. tests/kernel_driver.c), the 16-lane vector types and the injected-fault switch.
 * Layout of the sources (one translation unit: module.c includes the others in this order):
 *   common.h        this file
 *   simd.h          the ISA layer: vector width, loads/stores, float16 conversion, reductions (per ISA + generic)
 *   matmul_quant.c  quantized matrices x float32 activations (Q4_1, Q8_0, K-quants rewritten), dequantization
 *   q8.c            the `q8` numerics: activations quantized to 8 bits, integer dot products
 *   matmul_f32.c    float32 / float16 / bfloat16 matrices packed row-interleaved
 *   attention.c     decode attention
 *   rowwise.c       a decode step's elementwise stages (norms, SiLU/GELU, RoPE)
 *   matmul.c        one product for every matrix kind (the Python-held matrix, its buffers checked)
 *   block.c         a whole pre-norm block for decode rows, one call
 *   module.c        the Python module: argument parsing, build_info, the method table
 * Each ISA-specific branch (#if __AVX512F__ / __AVX2__ / __F16C__ / __FMA__ / __AVX512VNNI__) sits beside a
 * generic one in GCC/Clang vector extensions (what baseline x86-64 and aarch64 builds compile). */
#ifndef LLORCH_COMMON_H
#define LLORCH_COMMON_H
#ifndef LLORCH_NO_PYTHON
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#else
#include <stddef.h>
typedef ptrdiff_t Py_ssize_t;
#endif
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
#endif
