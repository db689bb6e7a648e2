/* lightning-dualform's fused CPU pass over a block of attention scores (attend/_fused.py explains it).
 * Built at install time (setup.py) as a plain shared library and called through ctypes; without it the
 * library uses torch ops, which give the same answers (tests/test_attention.py, tests/test_inference.py). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

/* The hot loops get AVX-512 and AVX2 clones beside the portable one where the compiler can make them (GCC on x86-64);
 * which one runs is chosen when the library loads. The two give the same sums in the same order. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HOT
#endif

#define T float
#define FN(name) name##_float
#include "fused_body.h"
#undef T
#undef FN

#define T double
#define FN(name) name##_double
#include "fused_body.h"
#undef T
#undef FN
