/* lightning-dualform's fused CPU pass over a block of attention scores (attend/_fused.py explains it), and the
 * certificate's projections on the store writer's thread (record/sketch.py; at the end of this file).
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

/* The certificate's projection of one step's rows (record/sketch.py), on the store writer's thread: for each
 * row r, a_r = k_r Z (float32, Z is d_in x 8 row-major), then G Z += v_r a_r^T and sum v += v_r in float64
 * (gz is d_out x 8 row-major). One thread, no OpenMP: it runs beside torch's threads. */
static void project_keys_portable(int64_t n, int64_t d_in, const float* keys, const float* z, float* a) {
    for (int64_t r = 0; r < n; r++) {
        float acc[8] = {0};
        const float* k = keys + r * d_in;
        for (int64_t c = 0; c < d_in; c++)
            for (int j = 0; j < 8; j++) acc[j] += k[c] * z[c * 8 + j];
        memcpy(a + r * 8, acc, sizeof acc);
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
/* Four rows at once, even and odd key columns apart: eight independent chains of FMAs share each row of Z. */
__attribute__((target("avx2,fma"))) static void project_keys_avx2(int64_t n, int64_t d_in, const float* keys,
                                                                  const float* z, float* a) {
    int64_t r = 0;
    for (; r + 4 <= n; r += 4) {
        const float *k0 = keys + r * d_in, *k1 = k0 + d_in, *k2 = k1 + d_in, *k3 = k2 + d_in;
        __m256 e0 = _mm256_setzero_ps(), e1 = e0, e2 = e0, e3 = e0, o0 = e0, o1 = e0, o2 = e0, o3 = e0;
        int64_t c = 0;
        for (; c + 2 <= d_in; c += 2) {
            const __m256 ze = _mm256_loadu_ps(z + c * 8), zo = _mm256_loadu_ps(z + c * 8 + 8);
            e0 = _mm256_fmadd_ps(_mm256_set1_ps(k0[c]), ze, e0); o0 = _mm256_fmadd_ps(_mm256_set1_ps(k0[c + 1]), zo, o0);
            e1 = _mm256_fmadd_ps(_mm256_set1_ps(k1[c]), ze, e1); o1 = _mm256_fmadd_ps(_mm256_set1_ps(k1[c + 1]), zo, o1);
            e2 = _mm256_fmadd_ps(_mm256_set1_ps(k2[c]), ze, e2); o2 = _mm256_fmadd_ps(_mm256_set1_ps(k2[c + 1]), zo, o2);
            e3 = _mm256_fmadd_ps(_mm256_set1_ps(k3[c]), ze, e3); o3 = _mm256_fmadd_ps(_mm256_set1_ps(k3[c + 1]), zo, o3);
        }
        if (c < d_in) {
            const __m256 ze = _mm256_loadu_ps(z + c * 8);
            e0 = _mm256_fmadd_ps(_mm256_set1_ps(k0[c]), ze, e0); e1 = _mm256_fmadd_ps(_mm256_set1_ps(k1[c]), ze, e1);
            e2 = _mm256_fmadd_ps(_mm256_set1_ps(k2[c]), ze, e2); e3 = _mm256_fmadd_ps(_mm256_set1_ps(k3[c]), ze, e3);
        }
        _mm256_storeu_ps(a + r * 8, _mm256_add_ps(e0, o0));
        _mm256_storeu_ps(a + (r + 1) * 8, _mm256_add_ps(e1, o1));
        _mm256_storeu_ps(a + (r + 2) * 8, _mm256_add_ps(e2, o2));
        _mm256_storeu_ps(a + (r + 3) * 8, _mm256_add_ps(e3, o3));
    }
    project_keys_portable(n - r, d_in, keys + r * d_in, z, a + r * 8);
}
#endif

void project_keys(int64_t n, int64_t d_in, const float* keys, const float* z, float* a) {
#if defined(__GNUC__) && defined(__x86_64__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        project_keys_avx2(n, d_in, keys, z, a);
        return;
    }
#endif
    project_keys_portable(n, d_in, keys, z, a);
}

static void accumulate_values_portable(int64_t n, int64_t d_out, const float* values, const float* a, double* gz,
                                      double* gb) {
    for (int64_t r = 0; r < n; r++) {
        const float* v = values + r * d_out;
        for (int64_t o = 0; o < d_out; o++) {
            const double vo = v[o];
            gb[o] += vo;
            for (int j = 0; j < 8; j++) gz[o * 8 + j] += vo * (double)a[r * 8 + j];
        }
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
/* Four rows at once: each row of G Z is loaded and stored once per four rows. */
__attribute__((target("avx2,fma"))) static void accumulate_values_avx2(int64_t n, int64_t d_out, const float* values,
                                                                       const float* a, double* gz, double* gb) {
    int64_t r = 0;
    for (; r + 4 <= n; r += 4) {
        const __m256d l0 = _mm256_cvtps_pd(_mm_loadu_ps(a + r * 8)), h0 = _mm256_cvtps_pd(_mm_loadu_ps(a + r * 8 + 4));
        const __m256d l1 = _mm256_cvtps_pd(_mm_loadu_ps(a + r * 8 + 8)), h1 = _mm256_cvtps_pd(_mm_loadu_ps(a + r * 8 + 12));
        const __m256d l2 = _mm256_cvtps_pd(_mm_loadu_ps(a + r * 8 + 16)), h2 = _mm256_cvtps_pd(_mm_loadu_ps(a + r * 8 + 20));
        const __m256d l3 = _mm256_cvtps_pd(_mm_loadu_ps(a + r * 8 + 24)), h3 = _mm256_cvtps_pd(_mm_loadu_ps(a + r * 8 + 28));
        const float *v0 = values + r * d_out, *v1 = v0 + d_out, *v2 = v1 + d_out, *v3 = v2 + d_out;
        for (int64_t o = 0; o < d_out; o++) {
            const double x0 = v0[o], x1 = v1[o], x2 = v2[o], x3 = v3[o];
            gb[o] += (x0 + x1) + (x2 + x3);
            const __m256d b0 = _mm256_set1_pd(x0), b1 = _mm256_set1_pd(x1), b2 = _mm256_set1_pd(x2), b3 = _mm256_set1_pd(x3);
            double* g = gz + o * 8;
            __m256d lo = _mm256_fmadd_pd(b1, l1, _mm256_mul_pd(b0, l0)), hi = _mm256_fmadd_pd(b1, h1, _mm256_mul_pd(b0, h0));
            lo = _mm256_fmadd_pd(b3, l3, _mm256_fmadd_pd(b2, l2, lo));
            hi = _mm256_fmadd_pd(b3, h3, _mm256_fmadd_pd(b2, h2, hi));
            _mm256_storeu_pd(g, _mm256_add_pd(_mm256_loadu_pd(g), lo));
            _mm256_storeu_pd(g + 4, _mm256_add_pd(_mm256_loadu_pd(g + 4), hi));
        }
    }
    accumulate_values_portable(n - r, d_out, values + r * d_out, a + r * 8, gz, gb);
}
#endif

void accumulate_values(int64_t n, int64_t d_out, const float* values, const float* a, double* gz, double* gb) {
#if defined(__GNUC__) && defined(__x86_64__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        accumulate_values_avx2(n, d_out, values, a, gz, gb);
        return;
    }
#endif
    accumulate_values_portable(n, d_out, values, a, gz, gb);
}
