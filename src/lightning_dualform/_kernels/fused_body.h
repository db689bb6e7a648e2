/* The fused attention pass, written once for T = float and T = double (see fused.c and attend/_fused.py). */
static inline void FN(ins)(T* v, int64_t* m, int64_t* cnt, int64_t k, int64_t M, T x, const int64_t* meta) {
    int64_t c = *cnt, p;
    if (c == k) { p = k - 1; } else { p = c; *cnt = c + 1; }
    while (p > 0 && x > v[p - 1]) {
        v[p] = v[p - 1];
        memcpy(m + p * M, m + (p - 1) * M, (size_t)M * sizeof(int64_t));
        p--;
    }
    v[p] = x;
    memcpy(m + p * M, meta, (size_t)M * sizeof(int64_t));
}

/* threshold of a running top-k: -inf until it holds k entries */
static inline T FN(thr)(const T* v, int64_t c, int64_t k) { return c < k ? (T)-INFINITY : v[k - 1]; }

/* One block. ST: (B, n) scores, row stride lds. meta: (B, M). Top-k: (n, k) values best first, (n, k, M)
   metadata, (n,) counts; opponents are kept negated. Tables: (E, ldt) per-example sums, (Gtot, ldm) mass;
   only columns 0..n-1 are touched. A, C: (B, U) contribution coefficients (c_w v, c_b v). Optional results
   are skipped when their pointer is NULL. Threads split the queries (columns). */
HOT void FN(fold)(int64_t n, int64_t B, const T* ST, int64_t lds, int nthreads,
              const int64_t* meta, int64_t M, int64_t k,
              T* top_v, int64_t* top_m, int64_t* top_c,
              const int64_t* ex, int64_t E, int64_t ldt, T* ex_tab, T* exc_tab,
              const int64_t* grp, int64_t G, int64_t Gtot, int64_t ldm, T* m_signed, T* m_abs,
              const int64_t* units, const T* A, const T* C, int64_t U,
              T* pro_v, int64_t* pro_m, int64_t* pro_c, T* con_v, int64_t* con_m, int64_t* con_c, int64_t* ex_rows) {
    if (ex_rows && ex)
        for (int64_t r = 0; r < B; r++) if (ex[r] >= 0 && ex[r] < E) ex_rows[ex[r]]++;
    #pragma omp parallel num_threads(nthreads)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t per = ((n + nt - 1) / nt + 15) / 16 * 16;
        int64_t i0 = id * per, i1 = i0 + per < n ? i0 + per : n;
        int64_t w = i1 - i0;
        if (w > 0) {
            T* thr = (T*)malloc(sizeof(T) * (size_t)(4 * w));
            T *hi = thr + w, *lo = thr + 2 * w, *cr = thr + 3 * w;
            for (int64_t i = i0; i < i1; i++) {
                if (top_v) thr[i - i0] = FN(thr)(top_v + i * k, top_c[i], k);
                if (pro_v) { hi[i - i0] = FN(thr)(pro_v + i * k, pro_c[i], k); lo[i - i0] = -FN(thr)(con_v + i * k, con_c[i], k); }
            }
            for (int64_t r = 0; r < B; r++) {
                const T* s = ST + r * lds;
                const int64_t* mr = meta + r * M;
                if (top_v) {
                    for (int64_t i = i0; i < i1; i += 16) {
                        int64_t j1 = i + 16 < i1 ? i + 16 : i1;
                        int hit = 0;
                        for (int64_t j = i; j < j1; j++) hit |= s[j] > thr[j - i0];
                        if (!hit) continue;
                        for (int64_t j = i; j < j1; j++) {
                            if (s[j] > thr[j - i0]) {
                                FN(ins)(top_v + j * k, top_m + j * k * M, top_c + j, k, M, s[j], mr);
                                thr[j - i0] = FN(thr)(top_v + j * k, top_c[j], k);
                            }
                        }
                    }
                }
                int64_t e = ex ? ex[r] : -1;
                int ok = e >= 0 && e < E;
                if (ex_tab && ok) {
                    T* row = ex_tab + e * ldt;
                    for (int64_t i = i0; i < i1; i++) row[i] += s[i];
                }
                if (m_signed) {
                    for (int64_t g = 0; g < G; g++) {
                        int64_t c = grp[r * G + g];
                        if (c < 0 || c >= Gtot) continue;
                        T* ms = m_signed + c * ldm; T* ma = m_abs + c * ldm;
                        for (int64_t i = i0; i < i1; i++) { ms[i] += s[i]; ma[i] += fabs(s[i]); }
                    }
                }
                if (units) {
                    const T* a = A + r * U; const T* b = C + r * U;
                    for (int64_t i = i0; i < i1; i++) cr[i - i0] = s[i] * a[units[i]] + b[units[i]];
                    if (exc_tab && ok) {
                        T* row = exc_tab + e * ldt;
                        for (int64_t i = i0; i < i1; i++) row[i] += cr[i - i0];
                    }
                    if (pro_v) {
                        for (int64_t i = i0; i < i1; i += 16) {
                            int64_t j1 = i + 16 < i1 ? i + 16 : i1;
                            int hit = 0;
                            for (int64_t j = i; j < j1; j++) hit |= (cr[j - i0] > hi[j - i0]) | (cr[j - i0] < lo[j - i0]);
                            if (!hit) continue;
                            for (int64_t j = i; j < j1; j++) {
                                T c = cr[j - i0];
                                if (c > hi[j - i0]) {
                                    FN(ins)(pro_v + j * k, pro_m + j * k * M, pro_c + j, k, M, c, mr);
                                    hi[j - i0] = FN(thr)(pro_v + j * k, pro_c[j], k);
                                }
                                if (c < lo[j - i0]) {
                                    FN(ins)(con_v + j * k, con_m + j * k * M, con_c + j, k, M, -c, mr);
                                    lo[j - i0] = -FN(thr)(con_v + j * k, con_c[j], k);
                                }
                            }
                        }
                    }
                }
            }
            free(thr);
        }
    }
}
