// Philox4x32-10, the counter-based RNG of Salmon, Moraes, Dror & Shaw, "Parallel random numbers:
// as easy as 1, 2, 3" (SC 2011). A pure function of (counter, key): a stream addressed by
// (row, draw) gives the same numbers whatever the thread count, schedule or device, so the CUDA
// sampler can reproduce the CPU one. Header-only, no torch; usable from CUDA device code.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FR_HOST_DEVICE __host__ __device__
#else
#define FR_HOST_DEVICE
#endif

namespace fr {

struct Philox4x32 {
  uint32_t v[4];
};

// One Philox round: two 32x32->64 multiplies, the high halves mixed with the other words and the key.
FR_HOST_DEVICE inline void philox_round(uint32_t c[4], uint32_t k0, uint32_t k1) {
  const uint64_t p0 = uint64_t(0xD2511F53u) * c[0];
  const uint64_t p1 = uint64_t(0xCD9E8D57u) * c[2];
  const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
  const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
  const uint32_t c1 = c[1], c3 = c[3];
  c[0] = hi1 ^ c1 ^ k0;
  c[1] = lo1;
  c[2] = hi0 ^ c3 ^ k1;
  c[3] = lo0;
}

// Ten rounds; the key is bumped by the Weyl constants (golden ratio, sqrt(3) - 1) between rounds.
FR_HOST_DEVICE inline Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                               uint32_t k0, uint32_t k1) {
  uint32_t c[4] = {c0, c1, c2, c3};
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    philox_round(c, k0, k1);
  }
  return Philox4x32{{c[0], c[1], c[2], c[3]}};
}

// The draw-th block of four words of stream `row` under a 64-bit seed:
// counter = (row lo, row hi, draw lo, draw hi), key = (seed lo, seed hi).
FR_HOST_DEVICE inline Philox4x32 philox_block(uint64_t seed, uint64_t row, uint64_t draw) {
  return philox4x32_10(uint32_t(row), uint32_t(row >> 32), uint32_t(draw), uint32_t(draw >> 32),
                       uint32_t(seed), uint32_t(seed >> 32));
}

// A double uniform in [0, 1) from the top 53 bits of words 0 (high) and 1 (low) of a block.
FR_HOST_DEVICE inline double philox_uniform(uint64_t seed, uint64_t row, uint64_t draw) {
  const Philox4x32 r = philox_block(seed, row, draw);
  const uint64_t bits = ((uint64_t(r.v[0]) << 32) | r.v[1]) >> 11;
  return double(bits) * (1.0 / 9007199254740992.0);  // 2^-53
}

}  // namespace fr
