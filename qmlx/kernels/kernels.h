// Interface between the driver (qmm.cpp, plain C++) and the kernels (kernels_isa.cpp, compiled once per
// instruction set). Weights are MLX's affine groups: w = scale * q + bias, q packed little-endian, value j of
// a row at bits [j*bits, (j+1)*bits) of the row's bytes (for 2/4/8 bits this is MLX's uint32 packing too).
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

namespace qk {

enum class SB { f32, f16, bf16 };  // dtype of scales and biases

struct QW {
  const uint8_t* w;  // N rows of row_bytes
  const void* s;     // N x (K / gs)
  const void* b;
  SB sbt;
  int bits, gs;
  int64_t N, K, row_bytes;
};

struct Kernels {
  const char* name;
  int nr;  // columns of a GEMM panel
  // x (M <= 4 rows of K) in the form `gemv` reads, once per call: bytes needed, then the preparation
  // (group sums for the bias term; 4-bit values reordered to match the packing; an integer form where
  // the kernels multiply in integers).
  size_t (*prep_bytes)(int64_t M, int64_t K, int bits, int gs);
  void (*prep_x)(const float* x, int64_t M, int64_t K, int bits, int gs, void* buf);
  // y[m * N + n] = x[m] . W[n]ᵀ for n in [n0, n1), m < M.
  void (*gemv)(const QW& q, const void* buf, int64_t M, float* y, int64_t n0, int64_t n1);
  // Panel [l][nr] of W's rows n0.. (transposed product) for l in [l0, l0 + L): P[l][r] = W[n0 + r][l0 + l].
  void (*pack_t)(const QW& q, int64_t n0, int64_t l0, int64_t L, float* P);
  // Panel [l][nr] of W's columns k0.. (plain product): P[l][c] = W[l0 + l][k0 + c].
  void (*pack_n)(const QW& q, int64_t k0, int64_t l0, int64_t L, float* P);
  // Panel [l][nr] of a float matrix B (element (k, n) at B[k * sk + n * sn]): P[l][c] = B[l0 + l][c0 + c]
  // for c < nr (0 past N).
  void (*pack_f)(const float* B, int64_t sk, int64_t sn, int64_t N, int64_t c0, int64_t l0, int64_t L, float* P);
  // y = softmax(x * scale) over the first `valid` of n values (the rest 0): one attention row.
  void (*softmax_row)(const float* x, float* y, int64_t n, int64_t valid, float scale);
  // y = x - log(sum(exp(x))) over n values (log-softmax: the log-probabilities of one row of logits).
  void (*log_softmax_row)(const float* x, float* y, int64_t n);
  // Row n of W as float32 values (K of them): an embedding lookup.
  void (*dequant_row)(const QW& q, int64_t n, float* out);
  // y = silu(g) * u = g * u / (1 + exp(-g)), n values.
  void (*silu_mul)(const float* g, const float* u, float* y, int64_t n);
  // C[m][0:nc] (+)= A[m][0:L] . P[0:L][0:nc] for m < M; add: accumulate into C.
  void (*gemm)(const float* A, int64_t lda, int64_t M, const float* P, int64_t L, float* C, int64_t ldc, int nc,
               bool add);
};

const Kernels& best_kernels();  // the best set this CPU runs (QMLX_KERNELS_ISA may name a lesser one)
const Kernels& kernels_generic();
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
const Kernels& kernels_avx512vnni();

// ---- scalar helpers shared by both sides ----
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                          // round to nearest even
  return uint16_t(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while (!(man & 0x400u));
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else {
    u = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow (incl. inf) after rounding
  if (a < 0x38800000u) {  // a half subnormal (or zero): a multiple of 2^-24, rounded to nearest even
    float af;
    std::memcpy(&af, &a, 4);
    return uint16_t(sign | uint32_t(std::nearbyint(af * 16777216.0f)));
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
  return uint16_t(sign | ((r - 0x38000000u) >> 13));
}

inline float sb_at(const void* p, SB t, int64_t i) {
  switch (t) {
    case SB::f32:
      return static_cast<const float*>(p)[i];
    case SB::bf16:
      return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default:
      return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

// Value j of a packed row, any bit width.
inline uint32_t unpack_at(const uint8_t* row, int bits, int64_t j) {
  int64_t bit = j * bits;
  const uint8_t* p = row + (bit >> 3);
  uint32_t word = 0;
  int need = int(((bit & 7) + bits + 7) >> 3);
  for (int i = 0; i < need; ++i) word |= uint32_t(p[i]) << (8 * i);
  return (word >> (bit & 7)) & ((1u << bits) - 1u);
}

}  // namespace qk
