/* The LSTM cell's elementwise work for one time step of K members, fused.

   Python's `lstm._scan` and `_LSTMLayer.backward` keep the matmuls (torch.bmm) and
   call these once per step instead of 12 (forward) and 4 (backward) ATen ops: at a
   zoo member's size (H = 32, B = 32) those ops cost more in dispatch and passes over
   memory than in arithmetic.

   Layout (the gate-major transposed one of `_scan`): per member k, a gate block is
   HB = H * B contiguous values; the four gate blocks (o, i, f, g) follow each other.
   Every expression is written once (`cell`, `cell_grad`) and compiled with
   -ffp-contract=off, so the no-grad, grad and single-step paths round identically and
   a member's result does not depend on K. float32 uses a polynomial exp (Cephes
   coefficients, about 1 ulp) that the compiler vectorises; float64, used by the
   gradient checks, uses libm. */

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <string.h>

/* A call's members are split over torch's OpenMP threads (the calling thread's count,
   which torch sets) when it has at least this many values per gate: below, the fork
   costs more than it saves. Zoo-build actors run one thread, so their calls stay serial.
   Compiled without OpenMP, every call is serial. */
#define PARALLEL_MIN 16384

static inline int parts(int64_t K, int64_t HB) {
#ifdef _OPENMP
    int n = K * HB >= PARALLEL_MIN ? omp_get_max_threads() : 1;
    return n > K ? (K > 0 ? (int)K : 1) : n;
#else
    (void)HB;
    (void)K;
    return 1;
#endif
}

/* a * b + c in one rounding where the CPU has FMA. Written out, not left to
   -ffp-contract, so that every path computes the same thing. */
#if defined(__FMA__) || defined(__aarch64__)
#define MADD(a, b, c) __builtin_fmaf(a, b, c)
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

static inline float exp_f32(float x) {
    /* exp(x) = 2^n exp(r), |r| <= ln(2) / 2 */
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = MADD(x, 1.44269504088896341f, magic) - magic;
    float r = MADD(n, -0.693359375f, x);
    r = MADD(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = MADD(p, r, 1.3981999507e-3f);
    p = MADD(p, r, 8.3334519073e-3f);
    p = MADD(p, r, 4.1665795894e-2f);
    p = MADD(p, r, 1.6666665459e-1f);
    p = MADD(p, r, 5.0000001201e-1f);
    p = MADD(p * r, r, r + 1.0f);
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
static inline float tanh_f32(float x) { return 1.0f - 2.0f / (exp_f32(2.0f * x) + 1.0f); }
static inline double sigmoid_f64(double x) { return 1.0 / (1.0 + exp(-x)); }
static inline double tanh_f64(double x) { return tanh(x); }

#define DEFINE_CELL(T, SUF)                                                                   \
    /* acts [K, 4, HB] pre-activations (o, i, f, g); c_prev, c_new [K, HB];                \
       h: member k's block at h + k * h_stride. With grad (f_out non-NULL) also the       \
       backward's factors: f_out [K, HB], q [K, 4, HB] (d pre-activation per unit of       \
       dh, dc, dc, dc) and dc_dh [K, HB]. */                                               \
    static void forward_range_##SUF(int64_t k0, int64_t k1, int64_t HB, const T *restrict acts, \
                                    const T *c_prev, T *c_new, T *restrict h, int64_t h_stride, \
                                    T *restrict f_out, T *restrict q, T *restrict dc_dh) {  \
        for (int64_t k = k0; k < k1; k++) {                                               \
            const T *restrict a = acts + k * 4 * HB;                                      \
            const T *cp = c_prev + k * HB;                                                \
            T *cn = c_new + k * HB, *restrict hk = h + k * h_stride;                      \
            if (f_out == NULL) {                                                          \
                for (int64_t e = 0; e < HB; e++) {                                        \
                    T o = sigmoid_##SUF(a[e]), i = sigmoid_##SUF(a[HB + e]);              \
                    T f = sigmoid_##SUF(a[2 * HB + e]), g = tanh_##SUF(a[3 * HB + e]);    \
                    T c = f * cp[e] + i * g;                                              \
                    cn[e] = c;                                                            \
                    hk[e] = o * tanh_##SUF(c);                                            \
                }                                                                         \
            } else {                                                                      \
                T *restrict fk = f_out + k * HB, *restrict qk = q + k * 4 * HB;           \
                T *restrict dk = dc_dh + k * HB;                                          \
                for (int64_t e = 0; e < HB; e++) {                                        \
                    T o = sigmoid_##SUF(a[e]), i = sigmoid_##SUF(a[HB + e]);              \
                    T f = sigmoid_##SUF(a[2 * HB + e]), g = tanh_##SUF(a[3 * HB + e]);    \
                    T c = f * cp[e] + i * g;                                              \
                    T tc = tanh_##SUF(c);                                                 \
                    cn[e] = c;                                                            \
                    hk[e] = o * tc;                                                       \
                    fk[e] = f;                                                            \
                    qk[e] = tc * o * (1 - o);                                             \
                    qk[HB + e] = g * i * (1 - i);                                         \
                    qk[2 * HB + e] = cp[e] * f * (1 - f);                                 \
                    qk[3 * HB + e] = i * (1 - g * g);                                     \
                    dk[e] = o * (1 - tc * tc);                                            \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    /* One step back: dc <- dc * f_next + dh * dc_dh (f_next NULL at the last step),     \
       then d_acts [K, 4, HB] = (dh q_o, dc q_i, dc q_f, dc q_g). */                      \
    static void backward_range_##SUF(int64_t k0, int64_t k1, int64_t HB, const T *restrict dh, \
                                     T *restrict dc, const T *restrict f_next,            \
                                     const T *restrict dc_dh, const T *restrict q,        \
                                     T *restrict d_acts) {                                \
        for (int64_t k = k0; k < k1; k++) {                                               \
            const T *restrict dhk = dh + k * HB, *restrict dk = dc_dh + k * HB;           \
            const T *restrict qk = q + k * 4 * HB;                                        \
            T *restrict dck = dc + k * HB, *restrict out = d_acts + k * 4 * HB;           \
            const T *restrict fk = f_next == NULL ? NULL : f_next + k * HB;               \
            for (int64_t e = 0; e < HB; e++) {                                            \
                T d = fk == NULL ? dck[e] : dck[e] * fk[e];                               \
                d = d + dhk[e] * dk[e];                                                   \
                dck[e] = d;                                                               \
                out[e] = dhk[e] * qk[e];                                                  \
                out[HB + e] = d * qk[HB + e];                                             \
                out[2 * HB + e] = d * qk[2 * HB + e];                                     \
                out[3 * HB + e] = d * qk[3 * HB + e];                                     \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    void cell_forward_##SUF(int64_t K, int64_t HB, const T *acts, const T *c_prev, T *c_new, \
                            T *h, int64_t h_stride, T *f_out, T *q, T *dc_dh) {           \
        const int n = parts(K, HB);                                                       \
        _Pragma("omp parallel for num_threads(n) schedule(static, 1)")                    \
        for (int i = 0; i < n; i++)                                                       \
            forward_range_##SUF(K * i / n, K * (i + 1) / n, HB, acts, c_prev, c_new, h,   \
                                h_stride, f_out, q, dc_dh);                               \
    }                                                                                     \
                                                                                          \
    void cell_backward_##SUF(int64_t K, int64_t HB, const T *dh, T *dc, const T *f_next,  \
                             const T *dc_dh, const T *q, T *d_acts) {                     \
        const int n = parts(K, HB);                                                       \
        _Pragma("omp parallel for num_threads(n) schedule(static, 1)")                    \
        for (int i = 0; i < n; i++)                                                       \
            backward_range_##SUF(K * i / n, K * (i + 1) / n, HB, dh, dc, f_next, dc_dh, q, \
                                 d_acts);                                                 \
    }

DEFINE_CELL(float, f32)
DEFINE_CELL(double, f64)
