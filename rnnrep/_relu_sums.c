/* The DWS encoder's activation, fused: broadcast adds, ReLU and both axis sums of a
   feature map in one pass over it forward, and one pass backward.

   A DWS weight map `[B, R, C, K]` (channels last) is too large for the caches. In
   torch ops its activation was six passes forward (two broadcast adds, ReLU, a sum
   over rows, a sum over columns) and ten backward (two out-of-place adds of the
   broadcast gradients, threshold_backward, two sums), each streaming the map from
   memory. Here:

   forward   y <- relu(y + col[b, c] + row[b, r]) in place,
             s_rows[b, c] = sum_r y,  s_cols[b, r] = sum_c y
   backward  g = (gy + gs_rows[b, c] + gs_cols[b, r]) * (y > 0),
             g_col[b, c] = sum_r g,  g_row[b, r] = sum_c g      (gy may be NULL: zero)

   The batch is split over `threads` POSIX threads (the caller passes torch's count):
   the maps are memory-bound, and one core does not saturate memory. */

#include <stdint.h>
#include <string.h>

typedef struct {
    int64_t b0, b1, R, C, K;
    void *y;
    const void *gy, *col, *row;
    void *s_rows, *s_cols, *g;
    void (*range)(const void *job);
} job_t;

/* Runs job->range over [0, B) in `threads` contiguous parts, in parallel. */
static void run_split(int64_t threads, const job_t *job) {
    const int64_t B = job->b1;
    int n = threads < 1 ? 1 : threads > B ? (int)(B > 0 ? B : 1) : (int)threads;
#pragma omp parallel for num_threads(n) schedule(static, 1)
    for (int i = 0; i < n; i++) {
        job_t part = *job;
        part.b0 = B * i / n;
        part.b1 = B * (i + 1) / n;
        job->range(&part);
    }
}

#define DEFINE_RELU_SUMS(T, SUF)                                                                     \
    /* K channels of one map entry; every pointer its own memory, so the loops vectorise */        \
    static inline void forward_row_##SUF(int64_t K, T *restrict y, const T *restrict col,           \
                                         const T *restrict row, T *restrict s_rows,                  \
                                         T *restrict s_cols) {                                       \
        for (int64_t k = 0; k < K; k++) {                                                            \
            T v = y[k] + col[k] + row[k];                                                            \
            v = v > 0 ? v : 0;                                                                       \
            y[k] = v;                                                                                \
            s_rows[k] += v;                                                                          \
            s_cols[k] += v;                                                                          \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    static inline void backward_row_##SUF(int64_t K, const T *restrict y, const T *restrict gy,     \
                                          const T *restrict gs_rows, const T *restrict gs_cols,     \
                                          T *restrict g, T *restrict g_col, T *restrict g_row) {    \
        if (gy) {                                                                                    \
            for (int64_t k = 0; k < K; k++) {                                                        \
                T v = y[k] > 0 ? gy[k] + gs_rows[k] + gs_cols[k] : 0;                                \
                g[k] = v;                                                                            \
                g_col[k] += v;                                                                       \
                g_row[k] += v;                                                                       \
            }                                                                                        \
        } else {                                                                                     \
            for (int64_t k = 0; k < K; k++) {                                                        \
                T v = y[k] > 0 ? gs_rows[k] + gs_cols[k] : 0;                                        \
                g[k] = v;                                                                            \
                g_col[k] += v;                                                                       \
                g_row[k] += v;                                                                       \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    static void forward_range_##SUF(const void *p) {                                                 \
        const job_t *j = p;                                                                          \
        const int64_t R = j->R, C = j->C, K = j->K;                                                  \
        T *restrict y = j->y;                                                                        \
        const T *restrict col = j->col, *restrict row = j->row;                                      \
        T *restrict s_rows = j->s_rows, *restrict s_cols = j->s_cols;                                \
        for (int64_t b = j->b0; b < j->b1; b++) {                                                    \
            T *sr = s_rows + b * C * K;                                                              \
            memset(sr, 0, sizeof(T) * C * K);                                                        \
            for (int64_t r = 0; r < R; r++) {                                                        \
                const T *rw = row + (b * R + r) * K;                                                 \
                T *sc = s_cols + (b * R + r) * K;                                                    \
                memset(sc, 0, sizeof(T) * K);                                                        \
                for (int64_t c = 0; c < C; c++) {                                                    \
                    forward_row_##SUF(K, y + ((b * R + r) * C + c) * K, col + (b * C + c) * K, rw,  \
                                      sr + c * K, sc);                                               \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    static void backward_range_##SUF(const void *p) {                                                \
        const job_t *j = p;                                                                          \
        const int64_t R = j->R, C = j->C, K = j->K;                                                  \
        const T *restrict y = j->y, *restrict gy = j->gy;                                            \
        const T *restrict gs_rows = j->col, *restrict gs_cols = j->row;                              \
        T *restrict g = j->g, *restrict g_col = j->s_rows, *restrict g_row = j->s_cols;              \
        for (int64_t b = j->b0; b < j->b1; b++) {                                                    \
            T *gc = g_col + b * C * K;                                                               \
            memset(gc, 0, sizeof(T) * C * K);                                                        \
            for (int64_t r = 0; r < R; r++) {                                                        \
                const T *gsc = gs_cols + (b * R + r) * K;                                            \
                T *gr = g_row + (b * R + r) * K;                                                     \
                memset(gr, 0, sizeof(T) * K);                                                        \
                for (int64_t c = 0; c < C; c++) {                                                    \
                    const int64_t at = ((b * R + r) * C + c) * K;                                    \
                    backward_row_##SUF(K, y + at, gy ? gy + at : NULL, gs_rows + (b * C + c) * K,   \
                                       gsc, g + at, gc + c * K, gr);                                 \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
                                                                                                     \
    /* y [B, R, C, K] in place; col, s_rows [B, C, K]; row, s_cols [B, R, K] */                     \
    void relu_sums_forward_##SUF(int64_t threads, int64_t B, int64_t R, int64_t C, int64_t K, T *y, \
                                 const T *col, const T *row, T *s_rows, T *s_cols) {                 \
        job_t j = {0, B, R, C, K, y, NULL, col, row, s_rows, s_cols, NULL, forward_range_##SUF};     \
        run_split(threads, &j);                                                                      \
    }                                                                                                \
                                                                                                     \
    /* y, gy (or NULL), g [B, R, C, K]; gs_rows, g_col [B, C, K]; gs_cols, g_row [B, R, K] */         \
    void relu_sums_backward_##SUF(int64_t threads, int64_t B, int64_t R, int64_t C, int64_t K,      \
                                  const T *y, const T *gy, const T *gs_rows, const T *gs_cols, T *g, \
                                  T *g_col, T *g_row) {                                              \
        job_t j = {0,     B,     R,     C,    K, (void *)y, gy, gs_rows, gs_cols, g_col, g_row, g,  \
                   backward_range_##SUF};                                                            \
        run_split(threads, &j);                                                                      \
    }

DEFINE_RELU_SUMS(float, f32)
DEFINE_RELU_SUMS(double, f64)
