#pragma once
#include <vector>

#include "mlx/array.h"

namespace mx = mlx::core;

namespace qk {
// y = x * rsqrt(mean(x², axis=-1) + eps) * w (mx.fast.rms_norm), one CPU op.
mx::array rms_norm(const mx::array& x, const mx::array& w, float eps);
// Rotary embedding in the "rotate half" layout (mx.fast.rope with traditional=False) at positions
// offset + l along axis -2 (offsets: one, or one per index of x's first axis, e.g. a batch of requests each
// at its own position); freqs (wavelengths, dims / 2 of them) replace base when given.
mx::array rope(const mx::array& x, int dims, float base, float scale, const std::vector<int>& offsets,
               const std::vector<float>& freqs);
// a @ b, (..., M, K) x (..., K, N) with equal batch axes, on the kernels' GEMM (no BLAS).
mx::array matmul(const mx::array& a, const mx::array& b);
// silu(g) * u (SwiGLU), one CPU op.
mx::array silu_mul(const mx::array& g, const mx::array& u);
// softmax(scale * x) over the last axis; causal_rows = L > 0 masks row l (mod L) of L queries to the
// first S - L + l + 1 of S keys (queries are the last L positions).
mx::array softmax(const mx::array& x, float scale, int causal_rows);
// x - logsumexp(x) over the last axis, in float32 (log-probabilities from logits), one CPU op.
mx::array log_softmax(const mx::array& x);
// Decode attention of a batch whose rows each have their own keys/values (any lengths): q (B, H, 1, D),
// keys[b] (1, H_kv, S_b, D), values[b] (1, H_kv, S_b, Dv), float32; out (B, H, 1, Dv). Each row bit for bit
// as matmul + softmax + matmul give it alone.
mx::array attention_rows(const mx::array& q, const std::vector<mx::array>& keys, const std::vector<mx::array>& values,
                         float scale);
}  // namespace qk
