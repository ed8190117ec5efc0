// Helpers over mx::array shared by the ops (qmm.cpp, fused.cpp): element offsets through strides,
// scalar loads/stores in float32/bfloat16/float16, a row-major view or copy.
#pragma once
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "mlx/array.h"

namespace qk {
namespace mx = mlx::core;

// Element offsets of every position of a's leading axes (all but the last `inner` ones), row-major.
inline std::vector<int64_t> leading_offsets(const mx::array& a, int inner) {
  const int lead = std::max(int(a.ndim()) - inner, 0);
  int64_t count = 1;
  for (int d = 0; d < lead; ++d) count *= a.shape(d);
  std::vector<int64_t> out(count);
  std::vector<int64_t> idx(lead, 0);
  int64_t off = 0;
  for (int64_t i = 0; i < count; ++i) {
    out[i] = off;
    for (int d = lead - 1; d >= 0; --d) {  // odometer
      off += a.strides()[d];
      if (++idx[d] < a.shape(d)) break;
      off -= a.strides()[d] * a.shape(d);
      idx[d] = 0;
    }
  }
  return out;
}
// Offsets of every row (all but the last axis) and of every matrix (all but the last two).
inline std::vector<int64_t> row_offsets(const mx::array& a) { return leading_offsets(a, 1); }
inline std::vector<int64_t> matrix_offsets(const mx::array& a) { return leading_offsets(a, 2); }

// The float dtypes the kernels read and write.
inline bool is_float(const mx::array& a) {
  return a.dtype() == mx::float32 || a.dtype() == mx::bfloat16 || a.dtype() == mx::float16;
}

inline float load(const void* p, mx::Dtype t, int64_t i) {
  if (t == mx::float32) return static_cast<const float*>(p)[i];
  if (t == mx::bfloat16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}
inline void store(void* p, mx::Dtype t, int64_t i, float v) {
  if (t == mx::float32)
    static_cast<float*>(p)[i] = v;
  else if (t == mx::bfloat16)
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  else
    static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
}

// The bytes of an array in row-major order: its own buffer when it is row-contiguous, else a copy
// (transposed or sliced views reach the ops as they are, so the graph needs no Contiguous node per call).
inline const void* row_major(const mx::array& a, std::vector<char>& tmp) {
  if (a.flags().row_contiguous) return a.data<void>();
  const int64_t item = a.itemsize(), D = a.ndim() ? a.shape(-1) : 1, st = a.ndim() ? a.strides().back() : 1;
  const auto rows = row_offsets(a);
  tmp.resize(a.size() * item);
  const char* src = static_cast<const char*>(a.data<void>());
  for (size_t r = 0; r < rows.size(); ++r)
    for (int64_t j = 0; j < D; ++j)
      std::memcpy(tmp.data() + (int64_t(r) * D + j) * item, src + (rows[r] + j * st) * item, item);
  return tmp.data();
}

}  // namespace qk
