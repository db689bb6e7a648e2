/* HDF5's Fletcher-32 chunk checksum (store/_fletcher.py explains it). Built at install time (setup.py) as
 * a plain shared library and called through ctypes; without it the store writes through h5py's filter. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HOT
#endif
#include <stdint.h>
#include <stddef.h>
#include <string.h>
static inline void acc(const uint8_t* p, size_t n, uint64_t* st) {
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
/* state st = {s1, s2, nonzero}: start from {0, 0, 0}; len must be even */
HOT void fletcher32_update(const uint8_t* p, size_t len, uint64_t* st) { acc(p, len / 2, st); }
HOT void fletcher32_copy(uint8_t* dst, const uint8_t* src, size_t len, uint64_t* st) {
    while (len) {  /* copy a piece, then sum it while it is in L1 */
        size_t m = len > 4096 ? 4096 : len;
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
HOT uint32_t fletcher32(const uint8_t* p, size_t len) {
    uint64_t st[3] = {0, 0, 0};
    acc(p, len / 2, st);
    if (len % 2) {
        uint32_t w = (uint32_t)p[len - 1] << 8;
        st[0] = (st[0] + w) % 65535; st[1] = (st[1] + st[0]) % 65535; st[2] |= w;
    }
    return fletcher32_finish(st, 0);
}
