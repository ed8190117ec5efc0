// RMSNorm and RoPE as single CPU primitives. On MLX's CPU backend mx.fast.rms_norm and mx.fast.rope run
// as compositions of ~8 and ~25 small ops; a decode step of a 24-layer model has ~97 of these calls, and
// at a few microseconds per op that overhead rivals the matmuls. Gradients go through mx.fast's own ops.
#include "fused.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "arrays.h"
#include "kernels.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/transforms.h"
#include "threads.h"

namespace qk {
namespace {

void check_float(const mx::array& a, const char* what) {
  if (!is_float(a))
    throw std::invalid_argument(std::string("qmlx ") + what + ": arrays must be float32, bfloat16 or float16");
}

// Many short rows (decode) are not worth waking the pool for.
template <class F>
void for_rows(int64_t rows, int64_t work_per_row, F&& f) {
  const int64_t per_task = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(work_per_row, 1));
  const int64_t tasks = (rows + per_task - 1) / per_task;
  if (tasks <= 1) {
    for (int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
  parallel_for(tasks, [&](int64_t t) {
    for (int64_t r = t * per_task, e = std::min(rows, r + per_task); r < e; ++r) f(r);
  });
}

class RmsNorm : public mx::UnaryPrimitive {
 public:
  RmsNorm(mx::Stream s, float eps) : mx::UnaryPrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([x = in[0], w = in[1], out = mx::array::unsafe_weak_copy(out), eps = eps_]() mutable {
      const int64_t D = x.shape(-1);
      const auto offs = row_offsets(x);
      const char* xp = static_cast<const char*>(x.data<void>());
      const void* wp = w.data<void>();
      const int64_t ws = w.strides()[0];
      char* op = static_cast<char*>(out.data<void>());
      const int64_t xs = x.strides().back(), xi = x.itemsize(), oi = out.itemsize();
      for_rows(int64_t(offs.size()), D, [&](int64_t r) {
        const char* row = xp + offs[r] * xi;
        float ss = 0;
        for (int64_t d = 0; d < D; ++d) {
          const float v = load(row, x.dtype(), d * xs);
          ss += v * v;
        }
        const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
        void* o = op + r * D * oi;
        for (int64_t d = 0; d < D; ++d)
          store(o, out.dtype(), d, load(row, x.dtype(), d * xs) * inv * load(wp, w.dtype(), d * ws));
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("qmlx's rms_norm runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    float eps = eps_;
    auto f = [eps](const std::vector<mx::array>& a) {
      return std::vector<mx::array>{mx::fast::rms_norm(a[0], a[1], eps)};
    };
    auto grads = mx::vjp(f, primals, cot).second;
    std::vector<mx::array> out;
    for (int a : argnums) out.push_back(grads[a]);
    return out;
  }
  const char* name() const override { return "QmlxRmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  float eps_;
};

class Rope : public mx::UnaryPrimitive {
 public:
  // inv_freq: dims / 2 inverse frequencies (already including the position scale). offsets: the position of
  // the first of the L tokens, one for all of x or one per index of x's first axis (a batch of requests, each
  // at its own place in its own sequence).
  Rope(mx::Stream s, int dims, std::vector<int> offsets, std::vector<float> inv_freq)
      : mx::UnaryPrimitive(s), dims_(dims), offsets_(std::move(offsets)), inv_(std::move(inv_freq)) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([x = in[0], out = mx::array::unsafe_weak_copy(out), dims = dims_, offsets = offsets_,
                  inv = inv_]() mutable {
      const int64_t D = x.shape(-1), L = x.ndim() >= 2 ? x.shape(-2) : 1, h = dims / 2;
      const int64_t P = int64_t(offsets.size());  // 1, or x.shape(0)
      // cos/sin per (offset, position), as MLX computes them: float32 angle = position * inverse frequency
      std::vector<float> cs(size_t(P * L * h)), sn(size_t(P * L * h));
      for (int64_t p = 0; p < P; ++p)
        for (int64_t l = 0; l < L; ++l)
          for (int64_t i = 0; i < h; ++i) {
            const float th = float(offsets[p] + l) * inv[i];
            cs[(p * L + l) * h + i] = std::cos(th);
            sn[(p * L + l) * h + i] = std::sin(th);
          }
      const auto offs = row_offsets(x);
      const int64_t per_p = int64_t(offs.size()) / P;  // rows (of D values) under one index of the first axis
      const char* xp = static_cast<const char*>(x.data<void>());
      char* op = static_cast<char*>(out.data<void>());
      const int64_t xs = x.strides().back(), xi = x.itemsize(), oi = out.itemsize();
      const mx::Dtype t = x.dtype();
      for_rows(int64_t(offs.size()), D, [&](int64_t r) {
        const char* row = xp + offs[r] * xi;
        void* o = op + r * D * oi;
        const int64_t at = ((r / per_p) * L + r % L) * h;
        const float* c = cs.data() + at;
        const float* s = sn.data() + at;
        for (int64_t i = 0; i < h; ++i) {
          const float a = load(row, t, i * xs), b = load(row, t, (i + h) * xs);
          store(o, t, i, a * c[i] - b * s[i]);
          store(o, t, i + h, a * s[i] + b * c[i]);
        }
        for (int64_t d = dims; d < D; ++d) store(o, t, d, load(row, t, d * xs));
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("qmlx's rope runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    // RoPE is a rotation: its vjp rotates the cotangent back, i.e. RoPE with the angles negated.
    std::vector<float> neg(inv_.size());
    for (size_t i = 0; i < inv_.size(); ++i) neg[i] = -inv_[i];
    auto g = mx::array(primals[0].shape(), cot[0].dtype(),
                       std::make_shared<Rope>(stream(), dims_, offsets_, neg), {cot[0]});
    std::vector<mx::array> out;
    for (size_t i = 0; i < argnums.size(); ++i) out.push_back(g);
    return out;
  }
  const char* name() const override { return "QmlxRope"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rope&>(other);
    return dims_ == o.dims_ && offsets_ == o.offsets_ && inv_ == o.inv_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  int dims_;
  std::vector<int> offsets_;
  std::vector<float> inv_;
};

// A row of n values of a (at element offset `off`, last-axis stride `st`) as float32: the row itself when
// it is float32 and contiguous, else converted into tmp.
inline const float* row_f32(const mx::array& a, int64_t off, int64_t n, std::vector<float>& tmp) {
  const int64_t st = a.strides().back();
  const char* p = static_cast<const char*>(a.data<void>()) + off * int64_t(a.itemsize());
  if (a.dtype() == mx::float32 && st == 1) return reinterpret_cast<const float*>(p);
  tmp.resize(n);
  for (int64_t j = 0; j < n; ++j) tmp[j] = load(p, a.dtype(), j * st);
  return tmp.data();
}
inline void store_row(mx::array& out, int64_t r, int64_t n, const float* y) {
  void* o = static_cast<char*>(out.data<void>()) + r * n * int64_t(out.itemsize());
  if (out.dtype() == mx::float32) {
    if (o != y) std::memcpy(o, y, n * 4);
    return;
  }
  for (int64_t j = 0; j < n; ++j) store(o, out.dtype(), j, y[j]);
}

// silu(g) * u, the SwiGLU of the MLP: one op instead of sigmoid, two multiplies (and a scalar exp).
class SiluMul : public mx::UnaryPrimitive {
 public:
  explicit SiluMul(mx::Stream s) : mx::UnaryPrimitive(s) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([g = in[0], u = in[1], out = mx::array::unsafe_weak_copy(out)]() mutable {
      const Kernels& k = best_kernels();
      const int64_t D = g.shape(-1);
      const auto go = row_offsets(g), uo = row_offsets(u);
      for_rows(int64_t(go.size()), D, [&](int64_t r) {
        thread_local std::vector<float> tg, tu, ty;
        const float* a = row_f32(g, go[r], D, tg);
        const float* b = row_f32(u, uo[r], D, tu);
        float* y = out.dtype() == mx::float32 ? out.data<float>() + r * D : (ty.resize(D), ty.data());
        k.silu_mul(a, b, y, D);
        if (out.dtype() != mx::float32) store_row(out, r, D, y);
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("qmlx's silu_mul runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    auto f = [](const std::vector<mx::array>& a) {
      return std::vector<mx::array>{mx::multiply(mx::multiply(a[0], mx::sigmoid(a[0])), a[1])};
    };
    auto grads = mx::vjp(f, primals, cot).second;
    std::vector<mx::array> out;
    for (int a : argnums) out.push_back(grads[a]);
    return out;
  }
  const char* name() const override { return "QmlxSiluMul"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }
};

// softmax(scale * scores) over the last axis; causal: query row l of L (rows cycle through L) sees the
// first S - L + l + 1 keys, so the mask is never built as an array.
class Softmax : public mx::UnaryPrimitive {
 public:
  Softmax(mx::Stream s, float scale, int causal_rows) : mx::UnaryPrimitive(s), scale_(scale), L_(causal_rows) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([x = in[0], out = mx::array::unsafe_weak_copy(out), scale = scale_, L = L_]() mutable {
      const Kernels& k = best_kernels();
      const int64_t S = x.shape(-1);
      const auto xo = row_offsets(x);
      for_rows(int64_t(xo.size()), S, [&](int64_t r) {
        thread_local std::vector<float> tx, ty;
        const float* a = row_f32(x, xo[r], S, tx);
        float* y = out.dtype() == mx::float32 ? out.data<float>() + r * S : (ty.resize(S), ty.data());
        const int64_t valid = L > 0 ? std::min<int64_t>(S, S - L + (r % L) + 1) : S;
        k.softmax_row(a, y, S, valid, scale);
        if (out.dtype() != mx::float32) store_row(out, r, S, y);
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("qmlx's softmax runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>& cot,
                             const std::vector<int>&, const std::vector<mx::array>& outputs) override {
    // y = softmax(s x): dx = s * y * (dy - sum(dy * y)); masked entries have y = 0 and get 0.
    const auto& y = outputs[0];
    auto dy = mx::astype(cot[0], y.dtype());
    auto inner = mx::sum(mx::multiply(dy, y), -1, true);
    return {mx::multiply(mx::array(scale_, y.dtype()), mx::multiply(y, mx::subtract(dy, inner)))};
  }
  const char* name() const override { return "QmlxSoftmax"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Softmax&>(other);
    return scale_ == o.scale_ && L_ == o.L_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  float scale_;
  int L_;
};

// Log-probabilities from logits: one op with a vectorized exp (MLX's CPU logsumexp and the subtraction
// after it took ~3 ms of a 0.5B model's ~25 ms decode step over its 151,936-token vocabulary).
class LogSoftmax : public mx::UnaryPrimitive {
 public:
  explicit LogSoftmax(mx::Stream s) : mx::UnaryPrimitive(s) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([x = in[0], out = mx::array::unsafe_weak_copy(out)]() mutable {
      const Kernels& k = best_kernels();
      const int64_t V = x.shape(-1);
      const auto xo = row_offsets(x);
      for_rows(int64_t(xo.size()), V, [&](int64_t r) {
        thread_local std::vector<float> tx;
        k.log_softmax_row(row_f32(x, xo[r], V, tx), out.data<float>() + r * V, V);
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("qmlx's log_softmax runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                             const std::vector<int>&, const std::vector<mx::array>& outputs) override {
    // y = x - lse(x): dx = dy - softmax(x) * sum(dy) (softmax by the vectorized op, not MLX's scalar exp)
    auto dy = mx::astype(cot[0], mx::float32);
    auto p = mx::array(primals[0].shape(), mx::float32, std::make_shared<Softmax>(stream(), 1.0f, 0), {primals[0]});
    auto g = mx::subtract(dy, mx::multiply(p, mx::sum(dy, -1, true)));
    return {mx::astype(g, primals[0].dtype())};
  }
  const char* name() const override { return "QmlxLogSoftmax"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }
};

// a @ b for float arrays of equal batch shape (..., M, K) x (..., K, N), on the kernels' own GEMM: what
// attention needs (q·kᵀ, p·v) without a BLAS. b is read through its strides (kᵀ is a transposed view).
class Matmul : public mx::UnaryPrimitive {
 public:
  explicit Matmul(mx::Stream s) : mx::UnaryPrimitive(s) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([a = in[0], b = in[1], out = mx::array::unsafe_weak_copy(out)]() mutable {
      const Kernels& k = best_kernels();
      const int nd = int(a.ndim());
      const int64_t M = a.shape(-2), K = a.shape(-1), N = b.shape(-1), nr = k.nr;
      const auto ao = matrix_offsets(a), bo = matrix_offsets(b);
      const int64_t batches = int64_t(ao.size()), panels = (N + nr - 1) / nr;
      const int64_t sam = a.strides()[nd - 2], sal = a.strides()[nd - 1];
      const int64_t sk = b.strides()[nd - 2], sn = b.strides()[nd - 1];
      // b as float32 (converted once when it is not)
      std::vector<float> bconv;
      const float* bp = b.data<float>();
      int64_t bsk = sk, bsn = sn;
      std::vector<int64_t> boffs = bo;
      if (b.dtype() != mx::float32) {
        bconv.resize(size_t(batches) * K * N);
        const void* raw = b.data<void>();
        for (int64_t i = 0; i < batches; ++i)
          for (int64_t r = 0; r < K; ++r)
            for (int64_t c = 0; c < N; ++c) bconv[(i * K + r) * N + c] = load(raw, b.dtype(), bo[i] + r * sk + c * sn);
        bp = bconv.data();
        bsk = N, bsn = 1;
        for (int64_t i = 0; i < batches; ++i) boffs[i] = i * K * N;
      }
      const bool a_direct = a.dtype() == mx::float32 && sal == 1;
      float* y = out.dtype() == mx::float32 ? out.data<float>() : nullptr;
      std::vector<float> ybuf;
      if (!y) {
        ybuf.resize(out.size());
        y = ybuf.data();
      }
      constexpr int64_t KCF = 512;
      parallel_for(batches * panels, [&](int64_t t) {
        const int64_t i = t / panels, p = t % panels, c0 = p * nr;
        thread_local std::vector<float> panel, abuf;
        panel.resize(size_t(KCF) * nr);
        const float* A;
        int64_t lda;
        if (a_direct) {
          A = a.data<float>() + ao[i];
          lda = sam;
        } else {
          abuf.resize(size_t(M) * K);
          const void* raw = a.data<void>();
          for (int64_t r = 0; r < M; ++r)
            for (int64_t c = 0; c < K; ++c) abuf[r * K + c] = load(raw, a.dtype(), ao[i] + r * sam + c * sal);
          A = abuf.data();
          lda = K;
        }
        float* C = y + i * M * N + c0;
        const int nc = int(std::min<int64_t>(nr, N - c0));
        if (K == 0) {
          for (int64_t r = 0; r < M; ++r) std::fill(C + r * N, C + r * N + nc, 0.0f);
          return;
        }
        for (int64_t l0 = 0; l0 < K; l0 += KCF) {
          const int64_t L = std::min(KCF, K - l0);
          k.pack_f(bp + boffs[i], bsk, bsn, N, c0, l0, L, panel.data());
          k.gemm(A + l0, lda, M, panel.data(), L, C, N, nc, l0 > 0);
        }
      });
      if (out.dtype() != mx::float32) {
        void* o = out.data<void>();
        for (size_t j = 0; j < out.size(); ++j) store(o, out.dtype(), int64_t(j), y[j]);
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("qmlx's matmul runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cot,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    std::vector<mx::array> out;
    for (int a : argnums)  // d(a@b)/da = g @ bᵀ, d/db = aᵀ @ g (through MLX's matmul: not a hot path)
      out.push_back(a == 0 ? mx::matmul(cot[0], mx::swapaxes(primals[1], -1, -2))
                           : mx::matmul(mx::swapaxes(primals[0], -1, -2), cot[0]));
    return out;
  }
  const char* name() const override { return "QmlxMatmul"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    mx::Shape s = in[0].shape();
    s.back() = in[1].shape(-1);
    return {s};
  }
};

// Decode attention (one query token per row) for a batch whose row b attends over keys/values of its own,
// of any length: q (B, H, 1, D) and per row K_b (1, Hkv, S_b, D), V_b (1, Hkv, S_b, Dv), float32, read
// through their strides (a KV cache hands back views of its buffers). One op for what the per-row path
// builds from ~14 (slices, reshapes, two matmuls and a softmax per row, a concatenation). Per (row, KV head)
// it makes the very calls Matmul and Softmax make for that row alone (the same panels, reduction blocks
// and row softmax), so each row's result is bit for bit the single-row result.
class AttentionRows : public mx::UnaryPrimitive {
 public:
  AttentionRows(mx::Stream s, float scale) : mx::UnaryPrimitive(s), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([in, out = mx::array::unsafe_weak_copy(out), scale = scale_]() mutable {
      const Kernels& k = best_kernels();
      const mx::array& q = in[0];
      const int64_t B = q.shape(0), H = q.shape(1), D = q.shape(3), nr = k.nr;
      const int64_t Hkv = in[1].shape(1), rep = H / Hkv, Dv = in[1 + B].shape(3);
      constexpr int64_t KCF = 512;  // Matmul's reduction block
      float* y = out.data<float>();
      parallel_for(B * Hkv, [&](int64_t t) {
        const int64_t b = t / Hkv, h = t % Hkv;
        const mx::array &K = in[1 + b], &V = in[1 + B + b];
        const int64_t S = K.shape(2);
        thread_local std::vector<float> sc, pr, panel, abuf;
        panel.resize(size_t(KCF) * nr);
        sc.resize(size_t(rep * S));
        pr.resize(size_t(rep * S));
        // the rep query heads of KV head h: rows of A (rep x D)
        const float* A;
        int64_t lda;
        if (q.strides()[3] == 1) {
          A = q.data<float>() + b * q.strides()[0] + h * rep * q.strides()[1];
          lda = q.strides()[1];
        } else {
          abuf.resize(size_t(rep * D));
          for (int64_t r = 0; r < rep; ++r)
            for (int64_t d = 0; d < D; ++d)
              abuf[r * D + d] = q.data<float>()[b * q.strides()[0] + (h * rep + r) * q.strides()[1] + d * q.strides()[3]];
          A = abuf.data();
          lda = D;
        }
        // scores (rep x S) = A · Kᵀ: Kᵀ[d][s] = K[s][d]
        const float* Kp = K.data<float>() + h * K.strides()[1];
        for (int64_t c0 = 0; c0 < S; c0 += nr) {
          const int nc = int(std::min<int64_t>(nr, S - c0));
          for (int64_t l0 = 0; l0 < D; l0 += KCF) {
            const int64_t L = std::min(KCF, D - l0);
            k.pack_f(Kp, K.strides()[3], K.strides()[2], S, c0, l0, L, panel.data());
            k.gemm(A + l0, lda, rep, panel.data(), L, sc.data() + c0, S, nc, l0 > 0);
          }
        }
        for (int64_t r = 0; r < rep; ++r) k.softmax_row(sc.data() + r * S, pr.data() + r * S, S, S, scale);
        // out (rep x Dv) = P · V
        const float* Vp = V.data<float>() + h * V.strides()[1];
        float* C = y + (b * H + h * rep) * Dv;
        for (int64_t c0 = 0; c0 < Dv; c0 += nr) {
          const int nc = int(std::min<int64_t>(nr, Dv - c0));
          for (int64_t l0 = 0; l0 < S; l0 += KCF) {
            const int64_t L = std::min(KCF, S - l0);
            k.pack_f(Vp, V.strides()[2], V.strides()[3], Dv, c0, l0, L, panel.data());
            k.gemm(pr.data() + l0, S, rep, panel.data(), L, C + c0, Dv, nc, l0 > 0);
          }
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("qmlx's attention_rows runs on the CPU only");
  }
  const char* name() const override { return "QmlxAttentionRows"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const AttentionRows&>(other).scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    mx::Shape s = in[0].shape();
    s.back() = in[1 + in[0].shape(0)].shape(3);
    return {s};
  }

 private:
  float scale_;
};

}  // namespace

mx::array matmul(const mx::array& a, const mx::array& b) {
  check_float(a, "matmul");
  check_float(b, "matmul");
  if (a.ndim() < 2 || a.ndim() != b.ndim() || a.shape(-1) != b.shape(-2))
    throw std::invalid_argument("qmlx matmul: (..., M, K) @ (..., K, N) with the same number of axes");
  for (int d = 0; d + 2 < int(a.ndim()); ++d)
    if (a.shape(d) != b.shape(d)) throw std::invalid_argument("qmlx matmul: batch axes must be equal");
  mx::Shape s = a.shape();
  s.back() = b.shape(-1);
  auto st = mx::default_stream(mx::Device::cpu);
  return mx::array(s, mx::promote_types(a.dtype(), b.dtype()), std::make_shared<Matmul>(st), {a, b});
}

mx::array silu_mul(const mx::array& g, const mx::array& u) {
  check_float(g, "silu_mul");
  check_float(u, "silu_mul");
  if (g.shape() != u.shape()) throw std::invalid_argument("qmlx silu_mul: both arrays must have one shape");
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(g.shape(), mx::promote_types(g.dtype(), u.dtype()), std::make_shared<SiluMul>(s), {g, u});
}

mx::array softmax(const mx::array& x, float scale, int causal_rows) {
  check_float(x, "softmax");
  if (x.ndim() < 1 || causal_rows < 0 || (causal_rows > 0 && (x.ndim() < 2 || causal_rows > x.shape(-1))))
    throw std::invalid_argument("qmlx softmax: causal rows must be 0 or at most the number of keys");
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(x.shape(), x.dtype(), std::make_shared<Softmax>(s, scale, causal_rows), {x});
}

mx::array log_softmax(const mx::array& x) {
  check_float(x, "log_softmax");
  if (x.ndim() < 1 || x.shape(-1) == 0) throw std::invalid_argument("qmlx log_softmax: x needs a non-empty last axis");
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(x.shape(), mx::float32, std::make_shared<LogSoftmax>(s), {x});
}

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps) {
  check_float(x, "rms_norm");
  check_float(w, "rms_norm");
  if (x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1))
    throw std::invalid_argument("qmlx rms_norm: the weight must be 1-D with x's last dimension");
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(x.shape(), mx::promote_types(x.dtype(), w.dtype()), std::make_shared<RmsNorm>(s, eps), {x, w});
}

mx::array rope(const mx::array& x, int dims, float base, float scale, const std::vector<int>& offsets,
               const std::vector<float>& freqs) {
  check_float(x, "rope");
  if (x.ndim() < 2 || dims <= 0 || dims % 2 || dims > x.shape(-1))
    throw std::invalid_argument("qmlx rope: dims must be even and at most x's last dimension");
  if (offsets.empty() || (offsets.size() > 1 && int64_t(offsets.size()) != x.shape(0)))
    throw std::invalid_argument("qmlx rope: give one offset, or one per index of x's first axis");
  const int h = dims / 2;
  std::vector<float> inv(h);
  if (!freqs.empty()) {
    if (int(freqs.size()) != h) throw std::invalid_argument("qmlx rope: freqs must hold dims / 2 values");
    for (int i = 0; i < h; ++i) inv[i] = scale / freqs[i];
  } else {
    // MLX: inv_freq = exp(-i * log(base) / (dims / 2)) in float32
    const float step = -std::log(base) / float(h);
    for (int i = 0; i < h; ++i) inv[i] = scale * std::exp(float(i) * step);
  }
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(x.shape(), x.dtype(), std::make_shared<Rope>(s, dims, offsets, inv), {x});
}

mx::array attention_rows(const mx::array& q, const std::vector<mx::array>& keys, const std::vector<mx::array>& values,
                         float scale) {
  const int64_t B = q.ndim() == 4 ? q.shape(0) : -1;
  if (B < 1 || q.shape(2) != 1 || q.dtype() != mx::float32)
    throw std::invalid_argument("qmlx attention_rows: q must be float32 (B, H, 1, D)");
  if (int64_t(keys.size()) != B || int64_t(values.size()) != B)
    throw std::invalid_argument("qmlx attention_rows: one keys and one values array per row of q");
  std::vector<mx::array> in{q};
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t b = 0; b < B; ++b) {
      const mx::array& x = pass ? values[b] : keys[b];
      const mx::array& k0 = keys[b];
      if (x.ndim() != 4 || x.dtype() != mx::float32 || x.shape(0) != 1 || x.shape(1) != keys[0].shape(1) ||
          x.shape(2) != k0.shape(2) || x.shape(2) < 1 || q.shape(1) % x.shape(1) ||
          (!pass && x.shape(3) != q.shape(3)) || (pass && x.shape(3) != values[0].shape(3)))
        throw std::invalid_argument(
            "qmlx attention_rows: keys and values must be float32 (1, H_kv, S_b, D) with S_b >= 1, H_kv dividing H");
      in.push_back(x);
    }
  mx::Shape s = q.shape();
  s.back() = values[0].shape(3);
  auto st = mx::default_stream(mx::Device::cpu);
  return mx::array(s, mx::float32, std::make_shared<AttentionRows>(st, scale), in);
}

}  // namespace qk
