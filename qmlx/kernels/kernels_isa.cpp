// The kernels, written once with GCC/Clang vector extensions and compiled once per instruction set
// (QK_ISA = generic | avx2 | avx512; see CMakeLists.txt). `generic` is SSE2 on x86-64 and NEON on arm64.
#include <algorithm>
#include <cmath>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#ifndef QK_ISA
#error "QK_ISA must name the instruction set"
#endif
#define QK_CAT2(a, b) a##b
#define QK_CAT(a, b) QK_CAT2(a, b)
#define QK_STR2(a) #a
#define QK_STR(a) QK_STR2(a)

namespace qk {
namespace QK_CAT(isa_, QK_ISA) {

#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX2__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif
constexpr int NR = 2 * VW;  // panel width: two vectors
constexpr int MR = 6;       // rows of the GEMM micro-kernel

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));

static inline vf loadf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline void storef(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// VW bytes widened to int32 lanes (GCC turns a generic u8 -> i32 vector conversion into byte extractions).
static inline vi loadw(const uint8_t* p) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#elif defined(__SSE2__)
  int32_t t;
  std::memcpy(&t, p, 4);
  const __m128i z = _mm_setzero_si128();
  return (vi)_mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(t), z), z);
#elif defined(__ARM_NEON)
  uint32_t t;
  std::memcpy(&t, p, 4);
  return (vi)vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8(t)))));
#else
  vi v;
  for (int i = 0; i < VW; ++i) v[i] = p[i];
  return v;
#endif
}
static inline vf tof(vi v) { return __builtin_convertvector(v, vf); }
static inline vf splat(float a) { return vf{} + a; }
static inline float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

// Row n's scales and biases as float32: the hardware's half conversion where it has one.
static inline void cvt_sb(const void* src, SB t, int64_t o, int64_t G, float* dst) {
  if (t == SB::f32) {
    std::memcpy(dst, static_cast<const float*>(src) + o, G * 4);
  } else if (t == SB::bf16) {
    const uint16_t* p = static_cast<const uint16_t*>(src) + o;
    int64_t g = 0;
    for (; g + VW <= G; g += VW) {  // widened in vectors: GCC leaves the scalar loop scalar
      vh h;
      std::memcpy(&h, p + g, sizeof h);
      const vi u = __builtin_convertvector(h, vi) << 16;
      std::memcpy(dst + g, &u, sizeof u);
    }
    for (; g < G; ++g) {
      uint32_t u = uint32_t(p[g]) << 16;
      std::memcpy(dst + g, &u, 4);
    }
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(src) + o;
    int64_t g = 0;
#if defined(__F16C__)
    for (; g + 8 <= G; g += 8)
      _mm256_storeu_ps(dst + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + g))));
#elif defined(__aarch64__)
    for (; g < G; ++g) {
      __fp16 h;
      std::memcpy(&h, p + g, 2);
      dst[g] = float(h);
    }
#endif
    for (; g < G; ++g) dst[g] = f16_to_f32(p[g]);
  }
}
// Row n's scales and biases as float32 pointers: into the arrays themselves when they are float32 (no
// copy: a per-row memcpy of them was ~10% of a decode step in perf), else converted into s and b.
struct RowSB {
  const float* s;
  const float* b;
};
static inline RowSB row_sb_fast(const QW& q, int64_t n, float* s, float* b) {
  const int64_t G = q.K / q.gs;
  if (q.sbt == SB::f32)
    return {static_cast<const float*>(q.s) + n * G, static_cast<const float*>(q.b) + n * G};
  cvt_sb(q.s, q.sbt, n * G, G, s);
  cvt_sb(q.b, q.sbt, n * G, G, b);
  return {s, b};
}

// Float path. 4 bits: a chunk of VW bytes holds 2*VW values, the even ones in the low nibbles; x is laid
// out to match: per chunk the even-indexed values, then the odd ones. Buffer: xp (M x K), xs (M x G).
static size_t prep_bytes_f(int64_t M, int64_t K, int bits, int gs) { return sizeof(float) * M * (K + K / gs); }

static void group_sums(const float* x, int64_t M, int64_t K, int gs, float* xs) {
  const int64_t G = K / gs;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0;
      for (int64_t j = 0; j < gs; ++j) acc += x[m * K + g * gs + j];
      xs[m * G + g] = acc;
    }
}

static void prep_x_f(const float* x, int64_t M, int64_t K, int bits, int gs, void* buf) {
  float* xp = static_cast<float*>(buf);
  group_sums(x, M, K, gs, xp + M * K);
  if (bits != 4) {
    std::memcpy(xp, x, sizeof(float) * M * K);
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* o = xp + m * K;
    for (int64_t c = 0; c < K; c += 2 * VW)
      for (int i = 0; i < VW; ++i) {
        o[c + i] = xr[c + 2 * i];
        o[c + VW + i] = xr[c + 2 * i + 1];
      }
  }
}

// Σ_k q[n,k] x[k] per group, for one row n and M rows of x, in vector accumulators scaled by the group's scale.
template <int M>
static void gemv_rows(const QW& q, const float* xp, const float* xs, float* y, int64_t n0, int64_t n1) {
  const int64_t K = q.K, G = K / q.gs, gs = q.gs;
  float sbuf[1024], bbuf[1024];  // K / gs <= 1024 groups (checked by the driver)
  for (int64_t n = n0; n < n1; ++n) {
    const auto [s, b] = row_sb_fast(q, n, sbuf, bbuf);
    const uint8_t* row = q.w + n * q.row_bytes;
    vf acc[M];
    float bsum[M];
    for (int m = 0; m < M; ++m) acc[m] = vf{}, bsum[m] = 0;
    for (int64_t g = 0; g < G; ++g) {
      vf ag[M], ah[M];
      for (int m = 0; m < M; ++m) ag[m] = vf{}, ah[m] = vf{};
      const int64_t k0 = g * gs;
      if (q.bits == 4) {
        for (int64_t k = k0; k < k0 + gs; k += 2 * VW) {
          vi v = loadw((row + k / 2));
          vf lo = tof(v & 15), hi = tof(v >> 4);
          for (int m = 0; m < M; ++m) {
            ag[m] += lo * loadf(xp + m * K + k);
            ah[m] += hi * loadf(xp + m * K + k + VW);
          }
        }
      } else if (q.bits == 8) {
        for (int64_t k = k0; k < k0 + gs; k += 2 * VW) {
          vf w0 = tof(loadw((row + k))), w1 = tof(loadw((row + k + VW)));
          for (int m = 0; m < M; ++m) {
            ag[m] += w0 * loadf(xp + m * K + k);
            ah[m] += w1 * loadf(xp + m * K + k + VW);
          }
        }
      } else {
        alignas(64) float wq[128];
        for (int64_t j = 0; j < gs; ++j) wq[j] = float(unpack_at(row, q.bits, k0 + j));
        for (int64_t j = 0; j < gs; j += 2 * VW) {
          vf w0 = loadf(wq + j), w1 = loadf(wq + j + VW);
          for (int m = 0; m < M; ++m) {
            ag[m] += w0 * loadf(xp + m * K + k0 + j);
            ah[m] += w1 * loadf(xp + m * K + k0 + j + VW);
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        acc[m] += (ag[m] + ah[m]) * s[g];
        bsum[m] += b[g] * xs[m * G + g];
      }
    }
    for (int m = 0; m < M; ++m) y[m * q.N + n] = hsum(acc[m]) + bsum[m];
  }
}

static void gemv_f(const QW& q, const void* buf, int64_t M, float* y, int64_t n0, int64_t n1) {
  const float* xp = static_cast<const float*>(buf);
  const float* xs = xp + M * q.K;
  switch (M) {
    case 1:
      return gemv_rows<1>(q, xp, xs, y, n0, n1);
    case 2:
      return gemv_rows<2>(q, xp, xs, y, n0, n1);
    case 3:
      return gemv_rows<3>(q, xp, xs, y, n0, n1);
    default:
      return gemv_rows<4>(q, xp, xs, y, n0, n1);
  }
}

// What the two integer GEMVs below (AVX-512 VNNI; AVX2) share: which widths they take, x's rounding bound
// (x ≈ d_g · i with |i| <= XQ = 127 * 256 + 127, so i splits into two int8 halves), and the prefetch distance.
static inline bool int_path(int bits) { return bits == 4 || bits == 8; }
constexpr int32_t XQ = 32639;
// Bytes ahead of the packed weights the GEMVs prefetch (measured on 2 vCPUs of an AVX-512 VNNI EPYC with the
// VNNI GEMV: 8192 ahead beat 2048; 4096 and 16384 no better; details beside QK_ROWS).
#ifndef QK_PF
#define QK_PF 8192
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Integer path for 4- and 8-bit weights (AVX-512 VNNI). Each row of x is quantized per group to 15-bit integers
// x ≈ d_g * (256 * hi + lo), hi and lo in [-128, 127], both int8; vpdpbusd multiplies the
// unsigned 4- or 8-bit values by both halves (64 products per instruction), so the product is exact up to
// x's 15-bit rounding (error <= 2^-16 of the group's largest |x|), at a fraction of the float path's
// instructions. x is padded to chunks of 128 values (64 bytes of 4-bit weights).
constexpr int64_t CH = 128;
// W's rows the GEMV takes at a time (measured on 2 vCPUs of an AVX-512 VNNI EPYC, 24 copies of a 4864 x 896
// 4-bit matrix streamed from DRAM by 2 threads, 3 rounds: 4 rows with 8192 bytes prefetched ahead 21-26 GB/s,
// 1 row with 2048 ahead 16-20 GB/s; in cache 36 vs 23 GB/s on one thread; 2 or 8 rows and 4096 or 16384
// ahead no better; 2 and 4 rows of x in cache: 100 vs 175 and 165 vs 285 us with 4 rows of W against 1).
#ifndef QK_ROWS
#define QK_ROWS 4
#endif
static inline int64_t padded(int64_t K) { return (K + CH - 1) / CH * CH; }

struct IntX {
  float *xs, *xd;   // M x G: group sums (the bias term), quantization steps
  int8_t *xh, *xl;  // M x padded(K); for 4 bits reordered per chunk: 64 even values, then 64 odd values
};
static IntX int_view(void* buf, int64_t M, int64_t K, int gs) {
  const int64_t G = K / gs, Kp = padded(K);
  IntX v;
  v.xs = static_cast<float*>(buf);
  v.xd = v.xs + M * G;
  v.xh = reinterpret_cast<int8_t*>(v.xd + M * G);
  v.xl = v.xh + M * Kp;
  return v;
}
static size_t prep_bytes_vnni(int64_t M, int64_t K, int bits, int gs) {
  if (!int_path(bits)) return prep_bytes_f(M, K, bits, gs);
  return sizeof(float) * 2 * M * (K / gs) + 2 * M * padded(K);
}
// Sixteen values at a time (the group sizes are multiples of 16): per group its sum (the bias term), its
// largest |x|, then each value rounded to 256 * hi + lo, split and narrowed to bytes. The rounding is
// the scalar definition's (nearest even, clamped to +-XQ), so the integers are the same bit for bit.
static void prep_x_vnni(const float* x, int64_t M, int64_t K, int bits, int gs, void* buf) {
  if (!int_path(bits)) return prep_x_f(x, M, K, bits, gs, buf);
  const int64_t G = K / gs, Kp = padded(K);
  IntX v = int_view(buf, M, K, gs);
  std::memset(v.xh, 0, 2 * M * Kp);
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i lim = _mm512_set1_epi32(XQ), c128 = _mm512_set1_epi32(128), c255 = _mm512_set1_epi32(255);
  // even-indexed lanes first, then the odd ones: the nibble order of a 4-bit chunk
  const __m512i evens_odds = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = xr + g * gs;
      __m512 sum = _mm512_setzero_ps(), amax = _mm512_setzero_ps();
      for (int64_t j = 0; j < gs; j += 16) {
        const __m512 t = _mm512_loadu_ps(xg + j);
        sum = _mm512_add_ps(sum, t);
        amax = _mm512_max_ps(_mm512_and_ps(t, absmask), amax);  // a NaN is passed over, as std::max does
      }
      v.xs[m * G + g] = _mm512_reduce_add_ps(sum);
      const float am = _mm512_reduce_max_ps(amax);
      const float d = am > 0 ? am / float(XQ) : 1.0f, inv = 1.0f / d;
      v.xd[m * G + g] = d;
      const __m512 iv = _mm512_set1_ps(inv);
      for (int64_t j = 0; j < gs; j += 16) {
        __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + j), iv));
        i = _mm512_min_epi32(lim, _mm512_max_epi32(_mm512_sub_epi32(_mm512_setzero_si512(), lim), i));
        const __m512i lo = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(i, c128), c255), c128);
        __m512i hi = _mm512_srai_epi32(_mm512_sub_epi32(i, lo), 8);
        const int64_t k = g * gs + j;
        if (bits == 4) {
          const __m128i h8 = _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(evens_odds, hi));
          const __m128i l8 = _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(evens_odds, lo));
          const int64_t at = m * Kp + k / CH * CH + k % CH / 2;  // evens here, odds CH / 2 further
          _mm_storel_epi64(reinterpret_cast<__m128i*>(v.xh + at), h8);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(v.xh + at + CH / 2), _mm_unpackhi_epi64(h8, h8));
          _mm_storel_epi64(reinterpret_cast<__m128i*>(v.xl + at), l8);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(v.xl + at + CH / 2), _mm_unpackhi_epi64(l8, l8));
        } else {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(v.xh + m * Kp + k), _mm512_cvtepi32_epi8(hi));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(v.xl + m * Kp + k), _mm512_cvtepi32_epi8(lo));
        }
      }
    }
  }
}

// Up to 16 scales or biases from i on (mask k) as float32, converted in registers from the stored dtype.
static inline __m512 load_sb16(const void* p, SB t, int64_t i, __mmask16 k) {
  if (t == SB::f32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p) + i);
  if (t == SB::bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// Per row n of W: f[m][g] = scale[g] * x's quantization step, and the bias term Σ_g bias[g] * Σ x over
// group g, sixteen groups per instruction, read straight from the stored scales and biases.
template <int M>
static inline void row_factors(const QW& q, int64_t n, const IntX& v, int64_t G, float (*f)[1024 + 16],
                               float* bias) {
  __m512 bs[M];
  for (int m = 0; m < M; ++m) bs[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 k = G - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (G - g)) - 1);
    const __m512 sv = load_sb16(q.s, q.sbt, n * G + g, k), bv = load_sb16(q.b, q.sbt, n * G + g, k);
    for (int m = 0; m < M; ++m) {
      _mm512_mask_storeu_ps(&f[m][g], k, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(k, v.xd + m * G + g)));
      bs[m] = _mm512_fmadd_ps(bv, _mm512_maskz_loadu_ps(k, v.xs + m * G + g), bs[m]);
    }
  }
  for (int m = 0; m < M; ++m) bias[m] = _mm512_reduce_add_ps(bs[m]);
}

// One 64-byte chunk of packed weights per step. 4 bits: 128 values, the low nibbles pair with the even
// values of x's reordered chunk, the high ones with the odd; lane j of a product covers values 8j..8j+7.
// 8 bits: the bytes are the unsigned values themselves, 64 of them; lane j covers values 4j..4j+3.
// A chunk spans half a group to four groups.
// R rows of W at a time share each load of x (the loads, not the multiplies, bound this loop); every row's
// arithmetic is the same whatever R and M are, so a row's result does not depend on its neighbours.
template <int M, int R, int BITS>
static void gemv_int(const QW& q, const IntX& v, float* y, int64_t n0, int64_t n1) {
  constexpr int64_t VPC = 512 / BITS;  // values per chunk
  const int64_t K = q.K, G = K / q.gs, Kp = padded(K), chunks = (K + VPC - 1) / VPC, tail = (K % VPC) * BITS / 8;
  const __m512i m4 = _mm512_set1_epi8(15);
  alignas(64) int32_t lane_group[16];  // each lane's group within its chunk
  for (int j = 0; j < 16; ++j) lane_group[j] = int32_t(VPC / 16 * j / q.gs);
  const __m512i lg = _mm512_load_si512(lane_group);
  const int shift = __builtin_ctz(unsigned(q.gs));  // the group of value k is k >> shift: no division in the loop
  // per row of W and of x: scale * quantization step, per group (+16 for the last load)
  alignas(64) float f[R][M][1024 + 16];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) std::fill(f[r][m] + G, f[r][m] + G + 16, 0.0f);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    float bias[R][M];
    const uint8_t* row[R];
    for (int r = 0; r < R; ++r) {
      row_factors<M>(q, n + r, v, G, f[r], bias[r]);
      row[r] = q.w + (n + r) * q.row_bytes;
    }
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t g0 = (c * VPC) >> shift;
      __m512i w[R];
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(row[r] + c * 64) + QK_PF, _MM_HINT_T0);
        w[r] = (c + 1 < chunks || tail == 0)
                   ? _mm512_loadu_si512(row[r] + c * 64)
                   : _mm512_maskz_loadu_epi8((__mmask64)((uint64_t(1) << tail) - 1), row[r] + c * 64);
      }
      for (int m = 0; m < M; ++m) {
        const int8_t* xh = v.xh + m * Kp + c * VPC;
        const int8_t* xl = v.xl + m * Kp + c * VPC;
        const __m512i h0 = _mm512_loadu_si512(xh), l0 = _mm512_loadu_si512(xl);
        __m512i h1, l1;
        if constexpr (BITS == 4) h1 = _mm512_loadu_si512(xh + 64), l1 = _mm512_loadu_si512(xl + 64);
        for (int r = 0; r < R; ++r) {
          // Σ (256 * hi + lo) * q: the high half's sum shifted, then the low half's products added to it
          __m512i t;
          if constexpr (BITS == 4) {
            const __m512i lo = _mm512_and_si512(w[r], m4), hi = _mm512_and_si512(_mm512_srli_epi16(w[r], 4), m4);
            t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, h0);
            t = _mm512_slli_epi32(_mm512_dpbusd_epi32(t, hi, h1), 8);
            t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(t, lo, l0), hi, l1);
          } else {
            t = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r], h0), 8);
            t = _mm512_dpbusd_epi32(t, w[r], l0);
          }
          const __m512 fv = _mm512_permutexvar_ps(lg, _mm512_loadu_ps(&f[r][m][g0]));
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), fv, acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * q.N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + bias[r][m];
  }
  if constexpr (R > 1)
    if (n < n1) gemv_int<M, 1, BITS>(q, v, y, n, n1);
}

template <int BITS>
static void gemv_int_rows(const QW& q, const IntX& v, int64_t M, float* y, int64_t n0, int64_t n1) {
  switch (M) {
    case 1:
      return gemv_int<1, QK_ROWS, BITS>(q, v, y, n0, n1);
    case 2:
      return gemv_int<2, QK_ROWS, BITS>(q, v, y, n0, n1);
    case 3:
      return gemv_int<3, QK_ROWS, BITS>(q, v, y, n0, n1);
    default:
      return gemv_int<4, QK_ROWS, BITS>(q, v, y, n0, n1);
  }
}

static void gemv_vnni(const QW& q, const void* buf, int64_t M, float* y, int64_t n0, int64_t n1) {
  if (!int_path(q.bits)) return gemv_f(q, buf, M, y, n0, n1);
  IntX v = int_view(const_cast<void*>(buf), M, q.K, q.gs);
  return q.bits == 8 ? gemv_int_rows<8>(q, v, M, y, n0, n1) : gemv_int_rows<4>(q, v, M, y, n0, n1);
}
#define QK_PREP_BYTES prep_bytes_vnni
#define QK_PREP prep_x_vnni
#define QK_GEMV gemv_vnni
#elif defined(__AVX2__)
// Integer path for 4- and 8-bit weights without VNNI (the AVX2 build, and the AVX-512 one without VNNI).
// x is rounded per group to the VNNI path's 15-bit integers (x ≈ d_g · i, |i| <= XQ), kept whole as
// int16; vpmaddwd multiplies 16 of them by 16 weights widened to int16 and adds pairs into int32, exactly.
// A chunk of 32 values lies in one group (group sizes 32, 64, 128), so a group's products add up in
// int32 and are scaled once. 4 bits: per chunk x holds its 16 even values, then its 16 odd ones (the low
// and the high nibbles of the chunk's 16 bytes).
struct I16X {
  float *xs, *xd;  // M x G: group sums (the bias term), quantization steps
  int16_t* xi;     // M x K
};
static I16X i16_view(void* buf, int64_t M, int64_t K, int gs) {
  I16X v;
  v.xs = static_cast<float*>(buf);
  v.xd = v.xs + M * (K / gs);
  v.xi = reinterpret_cast<int16_t*>(v.xd + M * (K / gs));
  return v;
}
static size_t prep_bytes_i16(int64_t M, int64_t K, int bits, int gs) {
  if (!int_path(bits)) return prep_bytes_f(M, K, bits, gs);
  return sizeof(float) * 2 * M * (K / gs) + sizeof(int16_t) * M * K;
}
static void prep_x_i16(const float* x, int64_t M, int64_t K, int bits, int gs, void* buf) {
  if (!int_path(bits)) return prep_x_f(x, M, K, bits, gs, buf);
  const int64_t G = K / gs;
  I16X v = i16_view(buf, M, K, gs);
  group_sums(x, M, K, gs, v.xs);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int16_t* xi = v.xi + m * K;
    for (int64_t g = 0; g < G; ++g) {
      float amax = 0;
      for (int64_t j = 0; j < gs; ++j) amax = std::max(amax, std::fabs(xr[g * gs + j]));
      const float d = amax > 0 ? amax / float(XQ) : 1.0f, inv = 1.0f / d;  // as the VNNI path
      v.xd[m * G + g] = d;
      for (int64_t j = 0; j < gs; ++j) {
        const int64_t k = g * gs + j;
        const int64_t at = bits == 4 ? (k & ~int64_t(31)) + (k & 1) * 16 + (k & 31) / 2 : k;
        const int32_t i = int32_t(std::nearbyint(xr[k] * inv));
        xi[at] = int16_t(std::min(XQ, std::max(-XQ, i)));
      }
    }
  }
}
static inline float hsum256(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_shuffle_ps(a, a, 1)));
}
template <int M, int BITS>
static void gemv_i16(const QW& q, const I16X& v, float* y, int64_t n0, int64_t n1) {
  const int64_t K = q.K, gs = q.gs, G = K / gs;
  float sbuf[1024], bbuf[1024];
  const __m128i m4 = _mm_set1_epi8(15);
  for (int64_t n = n0; n < n1; ++n) {
    const auto [s, b] = row_sb_fast(q, n, sbuf, bbuf);
    const uint8_t* row = q.w + n * q.row_bytes;
    __m256 acc[M];
    float bias[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), bias[m] = 0;
    for (int64_t g = 0; g < G; ++g) {
      __m256i is[M];
      for (int m = 0; m < M; ++m) is[m] = _mm256_setzero_si256();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
        const uint8_t* wp = row + k * BITS / 8;
        _mm_prefetch(reinterpret_cast<const char*>(wp) + QK_PF, _MM_HINT_T0);
        __m256i w0, w1;
        if constexpr (BITS == 4) {
          const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp));
          w0 = _mm256_cvtepu8_epi16(_mm_and_si128(w, m4));
          w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(w, 4), m4));
        } else {
          w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp)));
          w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + 16)));
        }
        for (int m = 0; m < M; ++m) {
          const int16_t* xp = v.xi + m * K + k;
          const __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp)));
          const __m256i p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 16)));
          is[m] = _mm256_add_epi32(is[m], _mm256_add_epi32(p0, p1));
        }
      }
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[m]), _mm256_set1_ps(s[g] * v.xd[m * G + g]), acc[m]);
        bias[m] += b[g] * v.xs[m * G + g];
      }
    }
    for (int m = 0; m < M; ++m) y[m * q.N + n] = hsum256(acc[m]) + bias[m];
  }
}
template <int BITS>
static void gemv_i16_rows(const QW& q, const I16X& v, int64_t M, float* y, int64_t n0, int64_t n1) {
  switch (M) {
    case 1:
      return gemv_i16<1, BITS>(q, v, y, n0, n1);
    case 2:
      return gemv_i16<2, BITS>(q, v, y, n0, n1);
    case 3:
      return gemv_i16<3, BITS>(q, v, y, n0, n1);
    default:
      return gemv_i16<4, BITS>(q, v, y, n0, n1);
  }
}
static void gemv_avx2(const QW& q, const void* buf, int64_t M, float* y, int64_t n0, int64_t n1) {
  if (!int_path(q.bits)) return gemv_f(q, buf, M, y, n0, n1);
  const I16X v = i16_view(const_cast<void*>(buf), M, q.K, q.gs);
  return q.bits == 8 ? gemv_i16_rows<8>(q, v, M, y, n0, n1) : gemv_i16_rows<4>(q, v, M, y, n0, n1);
}
#define QK_PREP_BYTES prep_bytes_i16
#define QK_PREP prep_x_i16
#define QK_GEMV gemv_avx2
#else
#define QK_PREP_BYTES prep_bytes_f
#define QK_PREP prep_x_f
#define QK_GEMV gemv_f
#endif

// Dequantize values [k0, k0 + n) of row r (n <= a group, not crossing one) into out.
static inline void deq_span(const QW& q, const uint8_t* row, float s, float b, int64_t k0, int64_t n, float* out) {
  if (q.bits == 8) {
    for (int64_t j = 0; j < n; j += VW) storef(out + j, tof(loadw((row + k0 + j))) * s + b);
  } else if (q.bits == 4) {
    for (int64_t j = 0; j < n; j += 2 * VW) {
      vi v = loadw((row + (k0 + j) / 2));
      vf lo = tof(v & 15) * s + b, hi = tof(v >> 4) * s + b;
      for (int i = 0; i < VW; ++i) {
        out[j + 2 * i] = lo[i];
        out[j + 2 * i + 1] = hi[i];
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = float(unpack_at(row, q.bits, k0 + j)) * s + b;
  }
}

static void pack_t(const QW& q, int64_t n0, int64_t l0, int64_t L, float* P) {
  // l0 and L are multiples of the group size.
  alignas(64) float tmp[128];
  float sbuf[1024], bbuf[1024];
  for (int r = 0; r < NR; ++r) {
    const int64_t n = n0 + r;
    if (n >= q.N) {
      for (int64_t l = 0; l < L; ++l) P[l * NR + r] = 0.0f;
      continue;
    }
    const uint8_t* row = q.w + n * q.row_bytes;
    const auto [s, b] = row_sb_fast(q, n, sbuf, bbuf);
    for (int64_t k = l0; k < l0 + L; k += q.gs) {
      const int64_t g = k / q.gs;
      deq_span(q, row, s[g], b[g], k, q.gs, tmp);
      for (int64_t j = 0; j < q.gs; ++j) P[(k - l0 + j) * NR + r] = tmp[j];
    }
  }
}

static void pack_n(const QW& q, int64_t k0, int64_t l0, int64_t L, float* P) {
  // NR columns [k0, k0 + NR) lie in one group (NR divides the group size, which divides K).
  const int64_t G = q.K / q.gs;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t n = l0 + l, g = n * G + k0 / q.gs;
    deq_span(q, q.w + n * q.row_bytes, sb_at(q.s, q.sbt, g), sb_at(q.b, q.sbt, g), k0, NR, P + l * NR);
  }
}

template <int R>
static inline void micro(const float* A, int64_t lda, const float* P, int64_t L, float* C, int64_t ldc, int nc,
                         bool add) {
  vf c0[R], c1[R];
  for (int i = 0; i < R; ++i) c0[i] = vf{}, c1[i] = vf{};
  for (int64_t l = 0; l < L; ++l) {
    const vf p0 = loadf(P + l * NR), p1 = loadf(P + l * NR + VW);
    for (int i = 0; i < R; ++i) {
      const vf a = splat(A[i * lda + l]);
      c0[i] += a * p0;
      c1[i] += a * p1;
    }
  }
  for (int i = 0; i < R; ++i) {
    float* c = C + i * ldc;
    if (nc == NR) {
      if (add) {
        c0[i] += loadf(c);
        c1[i] += loadf(c + VW);
      }
      storef(c, c0[i]);
      storef(c + VW, c1[i]);
    } else {
      alignas(64) float t[NR];
      storef(t, c0[i]);
      storef(t + VW, c1[i]);
      for (int j = 0; j < nc; ++j) c[j] = add ? c[j] + t[j] : t[j];
    }
  }
}

static void gemm(const float* A, int64_t lda, int64_t M, const float* P, int64_t L, float* C, int64_t ldc, int nc,
                 bool add) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) micro<MR>(A + m * lda, lda, P, L, C + m * ldc, ldc, nc, add);
  switch (M - m) {
    case 5:
      return micro<5>(A + m * lda, lda, P, L, C + m * ldc, ldc, nc, add);
    case 4:
      return micro<4>(A + m * lda, lda, P, L, C + m * ldc, ldc, nc, add);
    case 3:
      return micro<3>(A + m * lda, lda, P, L, C + m * ldc, ldc, nc, add);
    case 2:
      return micro<2>(A + m * lda, lda, P, L, C + m * ldc, ldc, nc, add);
    case 1:
      return micro<1>(A + m * lda, lda, P, L, C + m * ldc, ldc, nc, add);
    default:
      return;
  }
}

#if defined(__AVX512F__)
// P[l][c] = B[c][l] for a 16 x 16 block: rows r[c] (16 values of l each) in, columns out to P (stride NR).
static inline void transpose16(const float* B, int64_t sn, float* P) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(B + i * sn);
  for (int k = 0; k < 8; ++k) {  // pairs of rows interleaved within 128-bit lanes
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // lane q of r[4k + e]: rows 4k..4k+3 of value 4q + e
    r[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    r[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    r[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    r[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  for (int e = 0; e < 4; ++e) {  // the 4 x 4 matrix of 128-bit lanes transposed: value 4q + e of all 16 rows
    const __m512 a0 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x44), a1 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xEE);
    const __m512 a2 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x44),
                 a3 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xEE);
    _mm512_storeu_ps(P + (0 + e) * NR, _mm512_shuffle_f32x4(a0, a2, 0x88));
    _mm512_storeu_ps(P + (4 + e) * NR, _mm512_shuffle_f32x4(a0, a2, 0xDD));
    _mm512_storeu_ps(P + (8 + e) * NR, _mm512_shuffle_f32x4(a1, a3, 0x88));
    _mm512_storeu_ps(P + (12 + e) * NR, _mm512_shuffle_f32x4(a1, a3, 0xDD));
  }
}
#endif

static void pack_f(const float* B, int64_t sk, int64_t sn, int64_t N, int64_t c0, int64_t l0, int64_t L,
                   float* P) {
  const int64_t nc = std::min<int64_t>(NR, N - c0);
#if defined(__AVX512F__)
  if (sk == 1 && nc == NR && L % 16 == 0) {  // attention's keys: rows of B along l, transposed in registers
    for (int64_t l = 0; l < L; l += 16)
      for (int64_t c = 0; c < NR; c += 16) transpose16(B + l0 + l + (c0 + c) * sn, sn, P + l * NR + c);
    return;
  }
#endif
  for (int64_t l = 0; l < L; ++l) {
    const float* row = B + (l0 + l) * sk + c0 * sn;
    float* p = P + l * NR;
    if (sn == 1 && nc == NR) {  // in registers: a memcpy call per 32 values was 14% of long attention
      storef(p, loadf(row));
      storef(p + VW, loadf(row + VW));
      continue;
    }
    if (sn == 1) {
      std::memcpy(p, row, sizeof(float) * nc);
    } else {
      for (int64_t c = 0; c < nc; ++c) p[c] = row[c * sn];
    }
    for (int64_t c = nc; c < NR; ++c) p[c] = 0.0f;
  }
}

// exp(x) for a vector: 2^n * p(r), n = round(x / ln 2), r = x - n ln 2, p a degree-6 polynomial
// (Cephes' expf coefficients; ~1 ulp). MLX's CPU exp on x86-64 is scalar with a libm fma per step.
static inline vf vexp(vf x) {
  const vf hi = splat(88.3762626647949f), lo = splat(-87.3365447504f);
  x = x > hi ? hi : x;  // vector ?: selects per lane
  x = x < lo ? lo : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const vf t = x * 1.44269504088896341f + magic;
  const vf n = t - magic;
  const vf r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vf p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  const vi e = ((vi)t - (vi)magic) << 23;
  return (vf)((vi)p + e);
}

static void softmax_row(const float* x, float* y, int64_t n, int64_t valid, float scale) {
  float m = -INFINITY;
  for (int64_t j = 0; j < valid; ++j) m = std::max(m, x[j] * scale);
  vf sum = vf{};
  float tail = 0;
  int64_t j = 0;
  for (; j + VW <= valid; j += VW) {
    const vf e = vexp(loadf(x + j) * scale - m);
    storef(y + j, e);
    sum += e;
  }
  for (; j < valid; ++j) {
    alignas(64) float t[VW] = {};
    t[0] = x[j] * scale - m;
    vf e = vexp(loadf(t));
    y[j] = e[0];
    tail += e[0];
  }
  const float inv = 1.0f / (hsum(sum) + tail);
  for (j = 0; j < valid; ++j) y[j] *= inv;
  for (; j < n; ++j) y[j] = 0.0f;
}

static void log_softmax_row(const float* x, float* y, int64_t n) {
  vf mv = splat(-INFINITY);
  int64_t j = 0;
  for (; j + VW <= n; j += VW) {
    const vf v = loadf(x + j);
    mv = v > mv ? v : mv;
  }
  float m = -INFINITY;
  for (int i = 0; i < VW; ++i) m = std::max(m, mv[i]);
  for (; j < n; ++j) m = std::max(m, x[j]);
  if (!std::isfinite(m)) {  // all -inf (nothing possible) or a +inf / NaN logit: what the formula gives
    for (j = 0; j < n; ++j) y[j] = x[j] - m;
    return;
  }
  vf sum = vf{};
  float tail = 0;
  for (j = 0; j + VW <= n; j += VW) sum += vexp(loadf(x + j) - m);
  for (; j < n; ++j) tail += std::exp(x[j] - m);
  const float lse = m + std::log(hsum(sum) + tail);
  for (j = 0; j + VW <= n; j += VW) storef(y + j, loadf(x + j) - lse);
  for (; j < n; ++j) y[j] = x[j] - lse;
}

static void dequant_row(const QW& q, int64_t n, float* out) {
  float sbuf[1024], bbuf[1024];
  const auto [s, b] = row_sb_fast(q, n, sbuf, bbuf);
  const uint8_t* row = q.w + n * q.row_bytes;
  for (int64_t k = 0, g = 0; k < q.K; k += q.gs, ++g) deq_span(q, row, s[g], b[g], k, q.gs, out + k);
}

static void silu_mul(const float* g, const float* u, float* y, int64_t n) {
  int64_t j = 0;
  for (; j + VW <= n; j += VW) {
    const vf a = loadf(g + j);
    storef(y + j, a * loadf(u + j) / (1.0f + vexp(-a)));
  }
  for (; j < n; ++j) y[j] = g[j] * u[j] / (1.0f + std::exp(-g[j]));
}

}  // namespace isa_

const Kernels& QK_CAT(kernels_, QK_ISA)() {
  using namespace QK_CAT(isa_, QK_ISA);
  static const Kernels k{QK_STR(QK_ISA), NR, QK_PREP_BYTES, QK_PREP, QK_GEMV, pack_t, pack_n, pack_f, softmax_row,
                         log_softmax_row, dequant_row, silu_mul, gemm};
  return k;
}

}  // namespace qk
