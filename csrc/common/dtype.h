// Element types the kernels read and write, without any torch header.
// Math is done in `acc_t<T>`: double for double inputs, float for everything else.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace fr {

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

template <class T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <class T> using acc_t = typename Acc<T>::type;

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_acc(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }

inline float to_acc(f16_t v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.bits);
#else
  // IEEE half -> float, including subnormals, inf and NaN.
  const uint32_t h = v.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    const float f = float(man) * (1.0f / 16777216.0f);  // man * 2^-24
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
#endif
}

template <class T> inline T from_acc(float v);
template <class T> inline T from_acc(double v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(double v) { return v; }
template <> inline float from_acc<float>(double v) { return float(v); }

template <> inline bf16_t from_acc<bf16_t>(float v) {
  uint32_t u = float_to_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}

template <> inline f16_t from_acc<f16_t>(float v) {
#if defined(__F16C__)
  return f16_t{_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)};
#else
  // float -> IEEE half, round to nearest even, with overflow to inf and subnormals.
  uint32_t u = float_to_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};
  if (u >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (u < 0x38800000u) {  // below 2^-14: subnormal half (or zero)
    const float f = bits_to_float(u) * 16777216.0f;  // scale by 2^24, then round
    return f16_t{uint16_t(sign | uint32_t(__builtin_nearbyintf(f)))};
  }
  const uint32_t r = u + 0xfffu + ((u >> 13) & 1u) - (112u << 23);
  return f16_t{uint16_t(sign | (r >> 13))};
#endif
}

}  // namespace fr

// Runs `body` with `scalar_t` bound to the C++ type for `dtype`.
#define FR_DISPATCH_FLOAT(dtype, ...)                                    \
  switch (dtype) {                                                       \
    case ::fr::DType::f32: { using scalar_t = float; __VA_ARGS__; break; }   \
    case ::fr::DType::f64: { using scalar_t = double; __VA_ARGS__; break; }  \
    case ::fr::DType::bf16: { using scalar_t = ::fr::bf16_t; __VA_ARGS__; break; } \
    case ::fr::DType::f16: { using scalar_t = ::fr::f16_t; __VA_ARGS__; break; }   \
  }
