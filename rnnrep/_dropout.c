/* Dropout for float32 CPU tensors, with a counter-based random stream.

   torch's CPU dropout draws its mask with a sequential generator, one element at
   a time: in the parameter transformer's training step (18 dropouts over up to
   64 x 519 x 512 values) that was a fifth of the step. Here element i is kept iff
   hash(seed, i) >= threshold, where hash is two rounds of MurmurHash3's 32-bit
   finaliser (a bijection) keyed by the two halves of the seed: the loop
   vectorises, and the backward recomputes the same mask from the seed instead of
   storing it. threshold = round(p * 2^32), so the keep probability is 1 - p to
   within 2^-32. */

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
