/* A DWS layer's big maps, fused: the pointwise channel mix, the broadcast adds, the
   ReLU and both axis sums in one pass forward, and one pass backward.

   A DWS weight map `[B, R, C, K]` (channels last) is larger than the caches, so the
   layer costs its passes over memory. In torch ops a map was a GEMM, two broadcast
   adds, the ReLU and two sums forward (one pass each) and seven passes backward
   (the ReLU's mask and the broadcast gradients, two sums, two GEMMs). Here, per entry
   (b, r, c) of the map, with I input and O output channels:

   forward   y = relu(x W^T + col[b, c] + row[b, r]);  s_rows[b, c] += y, s_cols[b, r] += y
   backward  g = (y > 0) (gy + gs_rows[b, c] + gs_cols[b, r]);  g_col[b, c] += g,
             g_row[b, r] += g;  gx = g W (if wanted);  gw += g^T x
             (gy may be NULL: the last layer reads only the sums)

   The paper's channel counts (I = 4 or 48, O = 48) get copies of the loops with the
   sizes known at compile time, so the compiler keeps an entry's O outputs in vector
   registers; other sizes run the same loops with run-time sizes. Members are split
   over torch's OpenMP threads (the caller passes the count); each thread sums its
   part of gw one member at a time, and the parts are added at the end. */

#include <stdint.h>
#include <string.h>

#define MAX_CHANNELS 1024 /* an entry's outputs, on the stack */
#define BLOCK 8           /* entries whose gw update shares one load and store of gw */

/* a * b + c: one instruction where the CPU has FMA */
#if defined(__FMA__) || defined(__aarch64__)
#define FMA_F32(a, b, c) __builtin_fmaf(a, b, c)
#define FMA_F64(a, b, c) __builtin_fma(a, b, c)
#else
#define FMA_F32(a, b, c) ((a) * (b) + (c))
#define FMA_F64(a, b, c) ((a) * (b) + (c))
#endif

#define DEFINE_DWS(T, SUF, FMA)                                                                        \
    static inline __attribute__((always_inline)) void forward_range_##SUF(                       \
        int64_t b0, int64_t b1, int64_t R, int64_t C, const int64_t I, const int64_t O,          \
        const T *restrict x, const T *restrict wt, const T *restrict col, const T *restrict row, \
        T *restrict y, T *restrict s_rows, T *restrict s_cols) {                                 \
        T acc[O];                                                                                \
        for (int64_t b = b0; b < b1; b++) {                                                      \
            T *restrict sr = s_rows + b * C * O;                                                 \
            memset(sr, 0, sizeof(T) * C * O);                                                    \
            for (int64_t r = 0; r < R; r++) {                                                    \
                const T *restrict rw = row + (b * R + r) * O;                                    \
                T *restrict sc = s_cols + (b * R + r) * O;                                       \
                memset(sc, 0, sizeof(T) * O);                                                    \
                for (int64_t c = 0; c < C; c++) {                                                \
                    const int64_t at = (b * R + r) * C + c;                                      \
                    const T *restrict xx = x + at * I, *restrict cl = col + (b * C + c) * O;     \
                    for (int64_t k = 0; k < O; k++)                                              \
                        acc[k] = cl[k] + rw[k];                                                  \
                    for (int64_t j = 0; j < I; j++)                                              \
                        for (int64_t k = 0; k < O; k++)                                          \
                            acc[k] = FMA(xx[j], wt[j * O + k], acc[k]);                          \
                    T *restrict yy = y + at * O, *restrict s = sr + c * O;                       \
                    for (int64_t k = 0; k < O; k++) {                                            \
                        const T v = acc[k] > 0 ? acc[k] : 0;                                     \
                        yy[k] = v;                                                               \
                        s[k] += v;                                                               \
                        sc[k] += v;                                                              \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* `n` entries in a row of the map (b, r, c0 ... c0 + n - 1); gw's rows are loaded once    \
       for all n. */                                                                             \
    static inline __attribute__((always_inline)) void backward_entries_##SUF(                    \
        const int64_t n, int64_t b, int64_t r, int64_t c0, int64_t R, int64_t C, const int64_t I, \
        const int64_t O, const T *restrict x, const T *restrict w, const T *restrict y,          \
        const T *restrict gy, const T *restrict gs_rows, const T *restrict gs_cols,             \
        T *restrict gx, T *restrict gw, T *restrict g_col, T *restrict g_row) {                  \
        T g[n][O];                                                                               \
        const int64_t at0 = (b * R + r) * C + c0;                                                \
        const T *restrict gsc = gs_cols + (b * R + r) * O;                                       \
        T *restrict gr = g_row + (b * R + r) * O;                                                \
        for (int64_t e = 0; e < n; e++) {                                                        \
            const int64_t at = at0 + e;                                                          \
            const T *restrict yy = y + at * O, *restrict gsr = gs_rows + (b * C + c0 + e) * O;   \
            T *restrict a = g_col + (b * C + c0 + e) * O;                                        \
            for (int64_t k = 0; k < O; k++) {                                                    \
                const T d = (gy ? gy[at * O + k] : 0) + gsr[k] + gsc[k];                         \
                g[e][k] = yy[k] > 0 ? d : 0;                                                     \
                a[k] += g[e][k];                                                                 \
                gr[k] += g[e][k];                                                                \
            }                                                                                    \
            if (gx) {                                                                            \
                T *restrict gxx = gx + at * I;                                                   \
                for (int64_t j = 0; j < I; j++)                                                  \
                    gxx[j] = 0;                                                                  \
                for (int64_t k = 0; k < O; k++)                                                  \
                    for (int64_t j = 0; j < I; j++)                                              \
                        gxx[j] = FMA(g[e][k], w[k * I + j], gxx[j]);                             \
            }                                                                                    \
        }                                                                                        \
        const T *restrict xx = x + at0 * I;                                                      \
        for (int64_t k = 0; k < O; k++)                                                          \
            for (int64_t e = 0; e < n; e++)                                                      \
                for (int64_t j = 0; j < I; j++)                                                  \
                    gw[k * I + j] = FMA(g[e][k], xx[e * I + j], gw[k * I + j]);                  \
    }                                                                                            \
                                                                                                 \
    static inline __attribute__((always_inline)) void backward_range_##SUF(                      \
        int64_t b0, int64_t b1, int64_t R, int64_t C, const int64_t I, const int64_t O,          \
        const T *restrict x, const T *restrict w, const T *restrict y, const T *restrict gy,     \
        const T *restrict gs_rows, const T *restrict gs_cols, T *restrict gx, T *restrict gw,    \
        T *restrict gw_member, T *restrict g_col, T *restrict g_row) {                           \
        memset(gw, 0, sizeof(T) * O * I);                                                        \
        for (int64_t b = b0; b < b1; b++) {                                                      \
            memset(gw_member, 0, sizeof(T) * O * I);                                             \
            memset(g_col + b * C * O, 0, sizeof(T) * C * O);                                     \
            for (int64_t r = 0; r < R; r++) {                                                    \
                memset(g_row + (b * R + r) * O, 0, sizeof(T) * O);                               \
                int64_t c = 0;                                                                   \
                for (; c + BLOCK <= C; c += BLOCK)                                               \
                    backward_entries_##SUF(BLOCK, b, r, c, R, C, I, O, x, w, y, gy, gs_rows,     \
                                           gs_cols, gx, gw_member, g_col, g_row);                \
                for (; c < C; c++)                                                               \
                    backward_entries_##SUF(1, b, r, c, R, C, I, O, x, w, y, gy, gs_rows,         \
                                           gs_cols, gx, gw_member, g_col, g_row);                \
            }                                                                                    \
            for (int64_t e = 0; e < O * I; e++)                                                  \
                gw[e] += gw_member[e];                                                           \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* x [B, R, C, I], wt = W^T [I, O], col and s_rows [B, C, O], row and s_cols [B, R, O],            \
       y [B, R, C, O]. 0 on success, -1 if O is too large. */                                          \
    int dws_forward_##SUF(int64_t threads, int64_t B, int64_t R, int64_t C, int64_t I, int64_t O,      \
                          const T *x, const T *wt, const T *col, const T *row, T *y, T *s_rows,        \
                          T *s_cols) {                                                                 \
        if (O > MAX_CHANNELS)                                                                          \
            return -1;                                                                                 \
        const int n = parts(threads, B);                                                               \
        _Pragma("omp parallel for num_threads(n) schedule(static, 1)")                                 \
        for (int i = 0; i < n; i++) {                                                                  \
            const int64_t b0 = B * i / n, b1 = B * (i + 1) / n;                                        \
            if (I == 48 && O == 48)                                                                    \
                forward_range_##SUF(b0, b1, R, C, 48, 48, x, wt, col, row, y, s_rows, s_cols);         \
            else if (I == 4 && O == 48)                                                                \
                forward_range_##SUF(b0, b1, R, C, 4, 48, x, wt, col, row, y, s_rows, s_cols);          \
            else                                                                                       \
                forward_range_##SUF(b0, b1, R, C, I, O, x, wt, col, row, y, s_rows, s_cols);           \
        }                                                                                              \
        return 0;                                                                                      \
    }                                                                                                  \
                                                                                                       \
    /* w [O, I]; gy (or NULL) [B, R, C, O]; gx (or NULL) [B, R, C, I]; gw [O, I];                      \
       scratch: 2 * threads * O * I values. 0 on success, -1 if O is too large. */                     \
    int dws_backward_##SUF(int64_t threads, int64_t B, int64_t R, int64_t C, int64_t I, int64_t O,     \
                           const T *x, const T *w, const T *y, const T *gy, const T *gs_rows,          \
                           const T *gs_cols, T *gx, T *gw, T *g_col, T *g_row, T *scratch) {           \
        if (O > MAX_CHANNELS)                                                                          \
            return -1;                                                                                 \
        const int n = parts(threads, B);                                                               \
        const int64_t OI = O * I;                                                                      \
        _Pragma("omp parallel for num_threads(n) schedule(static, 1)")                                 \
        for (int i = 0; i < n; i++) {                                                                  \
            const int64_t b0 = B * i / n, b1 = B * (i + 1) / n;                                        \
            T *part = scratch + 2 * i * OI, *member = part + OI;                                       \
            if (I == 48 && O == 48)                                                                    \
                backward_range_##SUF(b0, b1, R, C, 48, 48, x, w, y, gy, gs_rows, gs_cols, gx, part,    \
                                     member, g_col, g_row);                                            \
            else if (I == 4 && O == 48)                                                                \
                backward_range_##SUF(b0, b1, R, C, 4, 48, x, w, y, gy, gs_rows, gs_cols, gx, part,     \
                                     member, g_col, g_row);                                            \
            else                                                                                       \
                backward_range_##SUF(b0, b1, R, C, I, O, x, w, y, gy, gs_rows, gs_cols, gx, part,      \
                                     member, g_col, g_row);                                            \
        }                                                                                              \
        memset(gw, 0, sizeof(T) * OI);                                                                 \
        for (int i = 0; i < n; i++)                                                                    \
            for (int64_t e = 0; e < OI; e++)                                                           \
                gw[e] += scratch[2 * i * OI + e];                                                      \
        return 0;                                                                                      \
    }

/* the number of parts: the threads, at most one per member */
static inline int parts(int64_t threads, int64_t B) {
    int64_t n = threads < 1 ? 1 : threads;
    n = n > B ? B : n;
    return n < 1 ? 1 : (int)n;
}

DEFINE_DWS(float, f32, FMA_F32)
DEFINE_DWS(double, f64, FMA_F64)
