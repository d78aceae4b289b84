/* Dropout for float32 and bfloat16 CPU tensors, with a counter-based random stream.

   torch's CPU dropout draws its mask with a sequential generator, one element at
   a time: in the parameter transformer's training step (18 dropouts over up to
   64 x 519 x 512 values) that was a fifth of the step. Here element i is kept iff
   hash(seed, i) >= threshold, where hash is two rounds of MurmurHash3's 32-bit
   finaliser (a bijection) keyed by the two halves of the seed: the loop
   vectorises, and the backward recomputes the same mask from the seed instead of
   storing it. threshold = round(p * 2^32), so the keep probability is 1 - p to
   within 2^-32. The bfloat16 variant (for `--precision bf16`) uses the same mask and
   rounds x * scale to nearest even once, as torch rounds a float to bfloat16. */

#include <stdint.h>

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* out[i] = x[i] * scale where element i is kept, else 0 (n < 2^32). */
void dropout_f32(int64_t n, const float *restrict x, float *restrict out, uint64_t seed, uint32_t threshold,
                 float scale) {
    const uint32_t k1 = (uint32_t)seed, k2 = (uint32_t)(seed >> 32);
    for (int64_t i = 0; i < n; i++) {
        uint32_t h = fmix32(fmix32((uint32_t)i ^ k1) + k2);
        out[i] = h >= threshold ? x[i] * scale : 0.0f;
    }
}

static inline float bf16_to_f32(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* The same for bfloat16 values (their bits as uint16). */
void dropout_bf16(int64_t n, const uint16_t *restrict x, uint16_t *restrict out, uint64_t seed, uint32_t threshold,
                  float scale) {
    const uint32_t k1 = (uint32_t)seed, k2 = (uint32_t)(seed >> 32);
    for (int64_t i = 0; i < n; i++) {
        uint32_t h = fmix32(fmix32((uint32_t)i ^ k1) + k2);
        out[i] = h >= threshold ? f32_to_bf16(bf16_to_f32(x[i]) * scale) : (uint16_t)0;
    }
}
