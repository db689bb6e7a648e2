/* HDF5's Fletcher-32 chunk checksum (store/_fletcher.py explains it). Built at install time (setup.py) as
 * a plain shared library and called through ctypes; without it the store writes through h5py's filter.
 * On x86-64 with AVX2 (checked once at run time) sixteen words are summed per instruction: 33 GB/s against
 * 6 GB/s for the scalar loop (benchmarks/writer_cost.py); both give HDF5's value (tests/test_chunk_append.py). */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86 1
#endif
static inline void acc_scalar(const uint8_t* p, size_t n, uint64_t* st) {
    uint64_t s1 = st[0], s2 = st[1];
    uint32_t nz = 0;
    while (n) {
        uint32_t m = n > 256 ? 256 : (uint32_t)n;
        uint32_t a = 0, t = 0, o = 0;
        for (uint32_t j = 0; j < m; j++) {
            uint32_t w = ((uint32_t)p[2 * j] << 8) | p[2 * j + 1];
            a += w; t += j * w; o |= w;
        }
        s2 = (s2 + (uint64_t)m * s1 + (uint64_t)m * a - t) % 65535;
        s1 = (s1 + a) % 65535;
        nz |= o;
        p += 2 * (size_t)m; n -= m;
    }
    st[0] = s1; st[1] = s2; st[2] |= nz;
}
#ifdef HAVE_X86
/* 16 words per vector; lane l of a block of V vectors sums w[16 v + l] (sa) and the prefix sums of sa (sb),
 * from which sum_j j w_j follows: sum_v v w_{v,l} = (V - 1) sa_l - sb_l. V <= 256 keeps sb below 2^32. */
__attribute__((target("avx2"))) static void acc_avx2(const uint8_t* p, size_t n, uint64_t* st) {
    const __m256i swap = _mm256_setr_epi8(1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14,
                                          1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    uint64_t s1 = st[0], s2 = st[1];
    __m256i nzv = _mm256_setzero_si256();
    while (n >= 16) {
        size_t V = n / 16;
        if (V > 256) V = 256;
        __m256i sa0 = _mm256_setzero_si256(), sa1 = sa0, sb0 = sa0, sb1 = sa0;
        for (size_t v = 0; v < V; v++) {
            __m256i x = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(p + 32 * v)), swap);
            nzv = _mm256_or_si256(nzv, x);
            sb0 = _mm256_add_epi32(sb0, sa0);
            sb1 = _mm256_add_epi32(sb1, sa1);
            sa0 = _mm256_add_epi32(sa0, _mm256_cvtepu16_epi32(_mm256_castsi256_si128(x)));
            sa1 = _mm256_add_epi32(sa1, _mm256_cvtepu16_epi32(_mm256_extracti128_si256(x, 1)));
        }
        uint32_t sa[16], sb[16];
        _mm256_storeu_si256((__m256i*)sa, sa0); _mm256_storeu_si256((__m256i*)(sa + 8), sa1);
        _mm256_storeu_si256((__m256i*)sb, sb0); _mm256_storeu_si256((__m256i*)(sb + 8), sb1);
        uint64_t a = 0, t = 0;
        for (int l = 0; l < 16; l++) {
            a += sa[l];
            t += 16 * ((uint64_t)(V - 1) * sa[l] - sb[l]) + (uint64_t)l * sa[l];
        }
        uint64_t m = 16 * V;  /* s2 gains m s1 + sum_j (m - j) w_j = m s1 + m a - t */
        s2 = (s2 + (m % 65535) * s1 + (m * a - t) % 65535) % 65535;
        s1 = (s1 + a) % 65535;
        p += 2 * m; n -= m;
    }
    st[0] = s1; st[1] = s2;
    st[2] |= (uint64_t)!_mm256_testz_si256(nzv, nzv);
    if (n) acc_scalar(p, n, st);
}
static int use_avx2 = -1;
static inline void acc(const uint8_t* p, size_t n, uint64_t* st) {
    if (use_avx2 < 0) use_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    if (use_avx2) acc_avx2(p, n, st); else acc_scalar(p, n, st);
}
#else
#define acc acc_scalar
#endif
/* state st = {s1, s2, nonzero}: start from {0, 0, 0}; len must be even */
void fletcher32_update(const uint8_t* p, size_t len, uint64_t* st) { acc(p, len / 2, st); }
void fletcher32_copy(uint8_t* dst, const uint8_t* src, size_t len, uint64_t* st) {
    while (len) {  /* copy a piece, then sum it while it is in L1 */
        size_t m = len > 8192 ? 8192 : len;
        memcpy(dst, src, m);
        acc(dst, m / 2, st);
        dst += m; src += m; len -= m;
    }
}
uint32_t fletcher32_finish(const uint64_t* st, uint64_t zero_words) {
    if (!st[2]) return 0;
    uint64_t s1 = st[0], s2 = (st[1] + (zero_words % 65535) * s1) % 65535;
    if (s1 == 0) s1 = 65535;
    if (s2 == 0) s2 = 65535;
    return (uint32_t)((s2 << 16) | s1);
}
uint32_t fletcher32(const uint8_t* p, size_t len) {
    uint64_t st[3] = {0, 0, 0};
    acc(p, len / 2, st);
    if (len % 2) {
        uint32_t w = (uint32_t)p[len - 1] << 8;
        st[0] = (st[0] + w) % 65535; st[1] = (st[1] + st[0]) % 65535; st[2] |= w;
    }
    return fletcher32_finish(st, 0);
}
