// qmlx's quantized matmul as an MLX Primitive: y = x · dequantize(W)ᵀ (transpose) or x · dequantize(W),
// for MLX's affine group format as checkpoints store it. CPU only; the Python side never builds it on Metal.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "arrays.h"
#include "fused.h"
#include "kernels.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "mlx/version.h"
#include "threads.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace qk {

const Kernels& best_kernels() {
  static const Kernels* k = [] {
    const char* force = std::getenv("QMLX_KERNELS_ISA");
    std::string want = force ? force : "";
#if defined(QK_HAVE_AVX512)
    __builtin_cpu_init();
    bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if ((want.empty() || want == "avx512vnni") && has512 && __builtin_cpu_supports("avx512vnni"))
      return &kernels_avx512vnni();
    if ((want.empty() || want == "avx512" || want == "avx512vnni") && has512) return &kernels_avx512();
#endif
#if defined(QK_HAVE_AVX2)
    bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if ((want.empty() || want != "generic") && has2) return &kernels_avx2();
#endif
    return &kernels_generic();
  }();
  return *k;
}

namespace {

// Rows of x up to which the weight-streaming GEMV runs; above it the blocked GEMM (dequantize a panel, reuse
// it for every row). The GEMV kernels take at most GEMV_BLOCK rows; more (a batch of decoding requests) run
// block after block over the same ~32 KB of weights, which the first block left in the cache, so the weights
// still stream from memory once. Measured on the 4-bit 0.5B model, one decode step of B rows (docs/kernels.md):
// through the GEMM B = 5 cost 7x B = 4; blocked GEMV rows stay below the GEMM up to 16 rows and beyond.
// QMLX_GEMV_MAX_ROWS lowers it (0 sends every product to the GEMM).
constexpr int64_t GEMV_BLOCK = 4;
int64_t gemv_max_rows() {
  static int64_t v = [] {
    const char* e = std::getenv("QMLX_GEMV_MAX_ROWS");
    return e ? std::clamp<int64_t>(std::atoll(e), 0, 32) : int64_t(32);
  }();
  return v;
}

SB sb_type(mx::Dtype t) {
  if (t == mx::float32) return SB::f32;
  if (t == mx::bfloat16) return SB::bf16;
  if (t == mx::float16) return SB::f16;
  throw std::invalid_argument("qmlx quantized matmul: scales and biases must be float32, bfloat16 or float16");
}

// A float32 row-major copy or view of x (converted when it is bf16/f16).
const float* as_f32(const mx::array& a, std::vector<float>& tmp, std::vector<char>& bytes) {
  const void* data = row_major(a, bytes);
  if (a.dtype() == mx::float32) return static_cast<const float*>(data);
  tmp.resize(a.size());
  for (size_t i = 0; i < a.size(); ++i) tmp[i] = load(data, a.dtype(), int64_t(i));
  return tmp.data();
}

void store_out(const float* y, mx::array& out) {
  for (size_t i = 0; i < out.size(); ++i) store(out.data<void>(), out.dtype(), int64_t(i), y[i]);
}

// Panels of a blocked product are dequantized KC rows of the reduction at a time (a KC x nr float panel
// stays in L2 while every row of x passes over it).
constexpr int64_t KC = 512;

// The packed weight, scales and biases as the kernels read them (row-major; copies kept in the tmps).
QW packed(const mx::array& w, const mx::array& s, const mx::array& b, int gs, int bits, std::vector<char>& wtmp,
          std::vector<char>& stmp, std::vector<char>& btmp) {
  QW q;
  q.w = static_cast<const uint8_t*>(row_major(w, wtmp));
  q.s = row_major(s, stmp);
  q.b = row_major(b, btmp);
  q.sbt = sb_type(s.dtype());
  q.bits = bits;
  q.gs = gs;
  q.N = w.shape(0);
  q.row_bytes = int64_t(w.shape(1)) * 4;
  q.K = q.row_bytes * 8 / bits;
  return q;
}

// y += bias along the last axis (the layer's bias, added before y is rounded to its dtype).
void add_bias(float* y, int64_t M, int64_t N, const mx::array& bias) {
  std::vector<float> tmp;
  std::vector<char> bytes;
  const float* bp = as_f32(bias, tmp, bytes);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) y[m * N + n] += bp[n];
}

// Tasks of rows whose packed bytes are ~128 KB: enough of them to balance, few enough to be cheap; a
// matrix below that (a 4-bit k_proj of Qwen2.5-0.5B, 57 KB) runs on the calling thread alone, without the
// ~8 us hand-off to a worker. A multiple of 4: the GEMV takes W's rows four at a time. (A 4-bit decode
// step's matmuls, same build, 3 rounds: 32 KB 13.1-14.9 ms, 128 KB 11.5-12.6 ms; 256 and 512 KB no better.)
int64_t gemv_task_rows(const QW& q) {
  return (std::max<int64_t>(8, (128 << 10) / std::max<int64_t>(q.row_bytes, 1)) + 3) / 4 * 4;
}

// x (M <= gemv_max_rows rows of q.K) prepared for the GEMV, GEMV_BLOCK rows per block of `words` words.
struct PreparedX {
  std::vector<uint64_t> buf;
  size_t words = 0;
  int64_t M = 0, blocks = 0;
  PreparedX(const Kernels& k, const QW& q, const float* xf, int64_t M_) : M(M_) {
    blocks = (M + GEMV_BLOCK - 1) / GEMV_BLOCK;
    words = (k.prep_bytes(GEMV_BLOCK, q.K, q.bits, q.gs) + 7) / 8;
    buf.resize(words * blocks);
    for (int64_t b = 0; b < blocks; ++b)
      k.prep_x(xf + b * GEMV_BLOCK * q.K, std::min(GEMV_BLOCK, M - b * GEMV_BLOCK), q.K, q.bits, q.gs,
               buf.data() + b * words);
  }
  // y rows (M x q.N) for W's rows n0..n1; each row's result is the same whatever M is.
  void gemv(const Kernels& k, const QW& q, float* y, int64_t n0, int64_t n1) const {
    for (int64_t b = 0; b < blocks; ++b)
      k.gemv(q, buf.data() + b * words, std::min(GEMV_BLOCK, M - b * GEMV_BLOCK), y + b * GEMV_BLOCK * q.N, n0, n1);
  }
};

// y = x · Wᵀ (transpose) or x · W through the blocked GEMM: dequantize a panel, reuse it for every row.
void gemm_product(const Kernels& k, const QW& q, const float* xf, int64_t M, float* y, bool transpose) {
  const int nr = k.nr;
  // transpose: y (M x N) = x (M x K) · Wᵀ, panels over W's rows, reduction over K.
  // plain:     y (M x K) = x (M x N) · W,  panels over W's columns, reduction over N.
  const int64_t cols = transpose ? q.N : q.K, red = transpose ? q.K : q.N;
  const int64_t panels = (cols + nr - 1) / nr;
  // Reduction blocks: a multiple of the group size (transpose packs whole groups).
  const int64_t kc = transpose ? std::max<int64_t>(q.gs, KC / q.gs * q.gs) : KC;
  parallel_for(panels, [&](int64_t p) {
    thread_local std::vector<float> panel;
    panel.resize(size_t(kc) * nr);
    const int64_t c0 = p * nr;
    const int nc = int(std::min<int64_t>(nr, cols - c0));
    for (int64_t l0 = 0; l0 < red; l0 += kc) {
      const int64_t L = std::min(kc, red - l0);
      if (transpose)
        k.pack_t(q, c0, l0, L, panel.data());
      else
        k.pack_n(q, c0, l0, L, panel.data());
      k.gemm(xf + l0, red, M, panel.data(), L, y + c0, cols, nc, l0 > 0);
    }
  });
}

void compute(const mx::array& x, const mx::array& w, const mx::array& s, const mx::array& b, const mx::array* bias,
             mx::array& out, bool transpose, int gs, int bits) {
  const Kernels& k = best_kernels();
  const int64_t Kx = x.shape(-1), M = Kx ? int64_t(x.size()) / Kx : 0;
  std::vector<char> wtmp, stmp, btmp, xbytes;
  const QW q = packed(w, s, b, gs, bits, wtmp, stmp, btmp);
  if (M == 0 || out.size() == 0) return;

  std::vector<float> xtmp, ytmp;
  const float* xf = as_f32(x, xtmp, xbytes);
  float* y;
  if (out.dtype() == mx::float32) {
    y = out.data<float>();
  } else {
    ytmp.resize(out.size());
    y = ytmp.data();
  }

  if (transpose && M <= gemv_max_rows()) {
    const PreparedX px(k, q, xf, M);
    const int64_t rows = gemv_task_rows(q), tasks = (q.N + rows - 1) / rows;
    parallel_for(tasks, [&](int64_t t) { px.gemv(k, q, y, t * rows, std::min(q.N, t * rows + rows)); });
  } else {
    gemm_product(k, q, xf, M, y, transpose);
  }
  if (bias) add_bias(y, M, q.N, *bias);
  if (out.dtype() != mx::float32) store_out(y, out);
}

int64_t index_at(const void* p, mx::Dtype t, int64_t i) {
  if (t == mx::int64 || t == mx::uint64) return static_cast<const int64_t*>(p)[i];
  if (t == mx::int32) return static_cast<const int32_t*>(p)[i];
  return static_cast<const uint32_t*>(p)[i];
}

// Stacked experts: out[t, j] = x[t] · dequantize(W[idx[t, j]])ᵀ (transpose) or x[t] · dequantize(W[idx[t, j]]).
// The (token, choice) pairs are grouped by expert, so each chosen expert's weights stream once per call and
// the others are never read; decode-sized groups share one pass of the thread pool. An expert number outside
// the stack gives zeros.
void gather_compute(const mx::array& x, const mx::array& w, const mx::array& s, const mx::array& b,
                    const mx::array& idx, mx::array& out, bool transpose, int gs, int bits) {
  const Kernels& k = best_kernels();
  const int64_t E = w.shape(0), T = idx.shape(0), J = idx.shape(1), P = T * J;
  std::vector<char> wtmp, stmp, btmp, xbytes, itmp;
  const auto* wp = static_cast<const uint8_t*>(row_major(w, wtmp));
  const auto* sp = static_cast<const char*>(row_major(s, stmp));
  const auto* bp = static_cast<const char*>(row_major(b, btmp));
  QW base;
  base.sbt = sb_type(s.dtype());
  base.bits = bits;
  base.gs = gs;
  base.N = w.shape(1);
  base.row_bytes = int64_t(w.shape(2)) * 4;
  base.K = base.row_bytes * 8 / bits;
  const int64_t groups_bytes = base.N * (base.K / gs) * int64_t(s.itemsize());
  auto expert = [&](int64_t e) {
    QW q = base;
    q.w = wp + e * base.N * base.row_bytes;
    q.s = sp + e * groups_bytes;
    q.b = bp + e * groups_bytes;
    return q;
  };
  const int64_t Kx = transpose ? base.K : base.N, Ko = transpose ? base.N : base.K;
  std::vector<float> xtmp;
  const float* xf = as_f32(x, xtmp, xbytes);
  const void* ip = row_major(idx, itmp);
  std::vector<std::vector<int64_t>> pairs(E);  // pair p = t·J + j, by expert
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = index_at(ip, idx.dtype(), p);
    if (e >= 0 && e < E) pairs[e].push_back(p);
  }
  struct Group {
    QW q;
    const std::vector<int64_t>* pairs;
    std::vector<float> x, y;
    std::unique_ptr<PreparedX> px;
    int64_t tasks = 0;
  };
  std::vector<Group> gemv, gemm;
  for (int64_t e = 0; e < E; ++e) {
    if (pairs[e].empty()) continue;
    const int64_t c = int64_t(pairs[e].size());
    Group g{expert(e), &pairs[e], std::vector<float>(size_t(c * Kx)), std::vector<float>(size_t(c * Ko)), nullptr, 0};
    for (int64_t r = 0; r < c; ++r)
      std::copy_n(xf + (pairs[e][r] / J) * Kx, Kx, g.x.data() + r * Kx);
    const bool small = transpose && c <= gemv_max_rows();
    if (small) {
      g.px = std::make_unique<PreparedX>(k, g.q, g.x.data(), c);
      g.tasks = (g.q.N + gemv_task_rows(g.q) - 1) / gemv_task_rows(g.q);
    }
    (small ? gemv : gemm).push_back(std::move(g));
  }
  if (!gemv.empty()) {
    std::vector<std::pair<int, int64_t>> tasks;  // (group, first row)
    for (size_t i = 0; i < gemv.size(); ++i)
      for (int64_t t = 0; t < gemv[i].tasks; ++t) tasks.emplace_back(int(i), t * gemv_task_rows(gemv[i].q));
    parallel_for(int64_t(tasks.size()), [&](int64_t t) {
      Group& g = gemv[tasks[t].first];
      const int64_t n0 = tasks[t].second;
      g.px->gemv(k, g.q, g.y.data(), n0, std::min(g.q.N, n0 + gemv_task_rows(g.q)));
    });
  }
  for (Group& g : gemm) gemm_product(k, g.q, g.x.data(), int64_t(g.pairs->size()), g.y.data(), transpose);
  const bool f32 = out.dtype() == mx::float32;
  char* o = static_cast<char*>(out.data<void>());
  std::vector<bool> written(size_t(P), false);
  for (auto* list : {&gemv, &gemm})
    for (Group& g : *list)
      for (size_t r = 0; r < g.pairs->size(); ++r) {
        const int64_t p = (*g.pairs)[r];
        written[p] = true;
        const float* row = g.y.data() + int64_t(r) * Ko;
        if (f32)
          std::copy_n(row, Ko, reinterpret_cast<float*>(o) + p * Ko);
        else
          for (int64_t j = 0; j < Ko; ++j) store(o, out.dtype(), p * Ko + j, row[j]);
      }
  for (int64_t p = 0; p < P; ++p)
    if (!written[p])
      for (int64_t j = 0; j < Ko; ++j) store(o, out.dtype(), p * Ko + j, 0.0f);
}

// What the quantized-product primitives share: their settings, equivalence, and running on the CPU stream.
class QuantizedOp : public mx::UnaryPrimitive {
 public:
  QuantizedOp(mx::Stream s, int group_size, int bits, bool transpose)
      : mx::UnaryPrimitive(s), gs_(group_size), bits_(bits), transpose_(transpose) {}
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU only (on Metal qmlx uses MLX's kernels)");
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    if (std::string(name()) != other.name()) return false;
    auto& o = static_cast<const QuantizedOp&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_ && transpose_ == o.transpose_;
  }

 protected:
  // Allocate `out` and return the CPU stream's encoder, set to run after the inputs. The caller's task takes
  // a weak copy of `out` made after this (the copy must see the allocated buffer).
  mx::cpu::CommandEncoder& prepare(const std::vector<mx::array>& inputs, mx::array& out) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(out);
    return enc;
  }
  int gs_, bits_;
  bool transpose_;
};

class QuantizedMatmul : public QuantizedOp {
 public:
  using QuantizedOp::QuantizedOp;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    std::optional<mx::array> bias;
    if (inputs.size() > 4) bias = inputs[4];
    auto& enc = prepare(inputs, out);
    enc.dispatch([x = inputs[0], w = inputs[1], s = inputs[2], b = inputs[3], bias, out = mx::array::unsafe_weak_copy(out),
                  t = transpose_, gs = gs_, bits = bits_]() mutable {
      compute(x, w, s, b, bias ? &*bias : nullptr, out, t, gs, bits);
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override;
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;

  const char* name() const override { return "QmlxQuantizedMatmul"; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {out_shape(inputs[0], inputs[1], transpose_, bits_)};
  }

  static mx::Shape out_shape(const mx::array& x, const mx::array& w, bool transpose, int bits) {
    mx::Shape sh = x.shape();
    sh.back() = transpose ? w.shape(0) : int(int64_t(w.shape(1)) * 32 / bits);
    return sh;
  }
};

// What is wrong with a packed weight (empty when nothing): the format checks both ops make.
std::string packed_error(const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
                         int bits) {
  std::ostringstream err;
  if (bits < 2 || bits > 8 || bits == 7) err << "bits must be 2, 3, 4, 5, 6 or 8 (got " << bits << ")";
  else if (group_size != 32 && group_size != 64 && group_size != 128)
    err << "group_size must be 32, 64 or 128 (got " << group_size << ")";
  else if (w.ndim() != 2 || w.dtype() != mx::uint32) err << "the packed weight must be a 2-D uint32 array";
  else if ((int64_t(w.shape(1)) * 32) % bits) err << "the packed weight's width does not hold whole values";
  if (!err.str().empty()) return err.str();
  const int64_t K = int64_t(w.shape(1)) * 32 / bits, N = w.shape(0);
  if (K % group_size) err << "the unpacked width " << K << " is not a multiple of group_size " << group_size;
  else if (K / group_size > 1024) err << "more than 1024 groups per row are not supported";
  else if (scales.shape() != mx::Shape{int(N), int(K / group_size)} || biases.shape() != scales.shape())
    err << "scales and biases must have shape (" << N << ", " << K / group_size << ")";
  else if (scales.dtype() != biases.dtype()) err << "scales and biases must have the same dtype";
  else if (!is_float(scales)) err << "scales and biases must be float32, bfloat16 or float16";
  return err.str();
}

mx::array qmm(const mx::array& x_in, const mx::array& w, const mx::array& scales, const mx::array& biases,
              bool transpose, int group_size, int bits, const std::optional<mx::array>& bias = std::nullopt) {
  std::ostringstream err;
  err << packed_error(w, scales, biases, group_size, bits);
  if (err.str().empty()) {
    const int64_t K = int64_t(w.shape(1)) * 32 / bits, N = w.shape(0);
    if (x_in.ndim() < 1) err << "x must have at least one dimension";
    else if (!is_float(x_in)) err << "x must be float32, bfloat16 or float16";
    else if (x_in.shape(-1) != (transpose ? K : N))
      err << "x's last dimension is " << x_in.shape(-1) << ", the weight needs " << (transpose ? K : N);
    else if (bias && !transpose) err << "a bias goes with the transposed product (x · Wᵀ) only";
    else if (bias && (bias->ndim() != 1 || bias->shape(0) != N))
      err << "the bias must be 1-D with the weight's " << N << " rows";
    else if (bias && !is_float(*bias)) err << "the bias must be float32, bfloat16 or float16";
  }
  if (!err.str().empty()) throw std::invalid_argument("qmlx quantized matmul: " + err.str());

  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs{x_in, w, scales, biases};
  if (bias) inputs.push_back(*bias);
  // with a bias, the dtype of x·Wᵀ + bias
  const mx::Dtype dt = bias ? mx::promote_types(x_in.dtype(), bias->dtype()) : x_in.dtype();
  return mx::array(QuantizedMatmul::out_shape(x_in, w, transpose, bits), dt,
                   std::make_shared<QuantizedMatmul>(s, group_size, bits, transpose), std::move(inputs));
}

std::vector<mx::array> QuantizedMatmul::vjp(const std::vector<mx::array>& primals,
                                            const std::vector<mx::array>& cotangents,
                                            const std::vector<int>& argnums, const std::vector<mx::array>&) {
  std::vector<mx::array> grads;
  for (int a : argnums) {
    if (a == 0) {
      grads.push_back(qmm(cotangents[0], primals[1], primals[2], primals[3], !transpose_, gs_, bits_));
    } else if (a == 4) {  // the bias: the cotangent summed over every row
      const auto& c = cotangents[0];
      grads.push_back(mx::astype(mx::sum(mx::reshape(c, {-1, c.shape(-1)}), 0), primals[4].dtype()));
    } else  // the packed weights are frozen (adapters wrap them): their cotangents are zeros nothing reads
      grads.push_back(mx::zeros_like(primals[a], stream()));
  }
  return grads;
}

std::vector<mx::array> QuantizedMatmul::jvp(const std::vector<mx::array>& primals,
                                            const std::vector<mx::array>& tangents, const std::vector<int>& argnums) {
  std::optional<mx::array> out;
  for (size_t i = 0; i < argnums.size(); ++i) {
    mx::array t = [&] {
      if (argnums[i] == 0) return qmm(tangents[i], primals[1], primals[2], primals[3], transpose_, gs_, bits_);
      if (argnums[i] == 4) return tangents[i];  // broadcast over the rows by the sum below
      throw std::invalid_argument("qmlx quantized matmul: no derivative for the packed weights");
    }();
    out = out ? mx::add(*out, t) : t;
  }
  if (argnums.size() == 1 && argnums[0] == 4)
    out = mx::broadcast_to(*out, QuantizedMatmul::out_shape(primals[0], primals[1], transpose_, bits_));
  return {*out};
}

mx::array gather_qmm(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                     const mx::array& indices, bool transpose, int group_size, int bits);

class GatherQuantizedMatmul : public QuantizedOp {
 public:
  using QuantizedOp::QuantizedOp;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = prepare(inputs, out);
    enc.dispatch([x = inputs[0], w = inputs[1], s = inputs[2], b = inputs[3], idx = inputs[4],
                  out = mx::array::unsafe_weak_copy(out), t = transpose_, gs = gs_, bits = bits_]() mutable {
      gather_compute(x, w, s, b, idx, out, t, gs, bits);
    });
  }
  // d/dx: out[t, j] is linear in x[t], so dx[t] = sum_j cot[t, j] · W[idx[t, j]] (the other product).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    std::vector<mx::array> grads;
    const auto& idx = primals[4];
    const int T = idx.shape(0), J = idx.shape(1);
    for (int a : argnums) {
      if (a == 0) {
        const auto& c = cotangents[0];
        auto per_pair = gather_qmm(mx::reshape(c, {T * J, c.shape(-1)}), primals[1], primals[2], primals[3],
                                   mx::reshape(idx, {T * J, 1}), !transpose_, gs_, bits_);
        grads.push_back(mx::sum(mx::reshape(per_pair, {T, J, per_pair.shape(-1)}), 1));
      } else  // packed weights are frozen, expert numbers are not differentiable: zeros nothing reads
        grads.push_back(mx::zeros_like(primals[a], stream()));
    }
    return grads;
  }
  const char* name() const override { return "QmlxGatherQuantizedMatmul"; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {out_shape(inputs[1], inputs[4], transpose_, bits_)};
  }
  static mx::Shape out_shape(const mx::array& w, const mx::array& idx, bool transpose, int bits) {
    return {idx.shape(0), idx.shape(1), transpose ? w.shape(1) : int(int64_t(w.shape(2)) * 32 / bits)};
  }
};

mx::array gather_qmm(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                     const mx::array& indices, bool transpose, int group_size, int bits) {
  std::ostringstream err;
  if (bits < 2 || bits > 8 || bits == 7) err << "bits must be 2, 3, 4, 5, 6 or 8 (got " << bits << ")";
  else if (group_size != 32 && group_size != 64 && group_size != 128)
    err << "group_size must be 32, 64 or 128 (got " << group_size << ")";
  else if (w.ndim() != 3 || w.dtype() != mx::uint32) err << "the packed experts must be a 3-D uint32 array";
  else if ((int64_t(w.shape(2)) * 32) % bits) err << "the packed weight's width does not hold whole values";
  if (err.str().empty()) {
    const int64_t K = int64_t(w.shape(2)) * 32 / bits, N = w.shape(1), E = w.shape(0);
    if (K % group_size) err << "the unpacked width " << K << " is not a multiple of group_size " << group_size;
    else if (K / group_size > 1024) err << "more than 1024 groups per row are not supported";
    else if (scales.shape() != mx::Shape{int(E), int(N), int(K / group_size)} || biases.shape() != scales.shape())
      err << "scales and biases must have shape (" << E << ", " << N << ", " << K / group_size << ")";
    else if (scales.dtype() != biases.dtype() || !is_float(scales))
      err << "scales and biases must both be float32, bfloat16 or float16";
    else if (x.ndim() != 2 || !is_float(x)) err << "x must be a 2-D float32, bfloat16 or float16 array";
    else if (x.shape(1) != (transpose ? K : N))
      err << "x's last dimension is " << x.shape(1) << ", the experts need " << (transpose ? K : N);
    else if (indices.ndim() != 2 || indices.shape(0) != x.shape(0))
      err << "indices must be 2-D with x's " << x.shape(0) << " rows";
    else if (indices.dtype() != mx::int32 && indices.dtype() != mx::uint32 && indices.dtype() != mx::int64 &&
             indices.dtype() != mx::uint64)
      err << "indices must be an integer array";
  }
  if (!err.str().empty()) throw std::invalid_argument("qmlx gather_quantized_matmul: " + err.str());
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(GatherQuantizedMatmul::out_shape(w, indices, transpose, bits), x.dtype(),
                   std::make_shared<GatherQuantizedMatmul>(s, group_size, bits, transpose),
                   {x, w, scales, biases, mx::stop_gradient(indices)});
}

// Rows `ids` of a quantized table, dequantized (an embedding lookup): one op instead of three gathers and
// MLX's CPU dequantize (~45 small ops per decode step).
class DequantizeRows : public mx::UnaryPrimitive {
 public:
  DequantizeRows(mx::Stream s, int group_size, int bits) : mx::UnaryPrimitive(s), gs_(group_size), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([w = in[0], s = in[1], b = in[2], ids = in[3], out = mx::array::unsafe_weak_copy(out), gs = gs_,
                  bits = bits_]() mutable {
      const Kernels& k = best_kernels();
      std::vector<char> wtmp, stmp, btmp, itmp;
      const QW q = packed(w, s, b, gs, bits, wtmp, stmp, btmp);
      const void* ip = row_major(ids, itmp);
      const bool f32 = out.dtype() == mx::float32;
      std::vector<float> tmp(f32 ? 0 : size_t(q.K));  // a row before its rounding to a 16-bit dtype
      for (size_t i = 0; i < ids.size(); ++i) {
        int64_t n;
        if (ids.dtype() == mx::int64 || ids.dtype() == mx::uint64)
          n = static_cast<const int64_t*>(ip)[i];
        else if (ids.dtype() == mx::int32)
          n = static_cast<const int32_t*>(ip)[i];
        else
          n = static_cast<const uint32_t*>(ip)[i];
        void* o = static_cast<char*>(out.data<void>()) + int64_t(i) * q.K * int64_t(out.itemsize());
        float* row = f32 ? static_cast<float*>(o) : tmp.data();
        // An id outside the table (MLX's gather has no defined result there) gives a row of zeros: the
        // lookup never reads past W.
        if (n < 0 || n >= q.N)
          std::fill(row, row + q.K, 0.0f);
        else
          k.dequant_row(q, n, row);
        if (!f32)
          for (int64_t j = 0; j < q.K; ++j) store(o, out.dtype(), j, row[j]);
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("qmlx's dequantize_rows runs on the CPU only");
  }
  const char* name() const override { return "QmlxDequantizeRows"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DequantizeRows&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    mx::Shape sh = in[3].shape();
    sh.push_back(int(int64_t(in[0].shape(1)) * 32 / bits_));
    return {sh};
  }

 private:
  int gs_, bits_;
};

mx::array dequantize_rows(const mx::array& w, const mx::array& scales, const mx::array& biases, const mx::array& ids,
                          int group_size, int bits, bool float32_out) {
  const std::string err = packed_error(w, scales, biases, group_size, bits);
  if (!err.empty()) throw std::invalid_argument("qmlx dequantize_rows: " + err);
  if (ids.dtype() != mx::int32 && ids.dtype() != mx::uint32 && ids.dtype() != mx::int64 && ids.dtype() != mx::uint64)
    throw std::invalid_argument("qmlx dequantize_rows: ids must be an integer array");
  auto s = mx::default_stream(mx::Device::cpu);
  mx::Shape sh = ids.shape();
  sh.push_back(int(int64_t(w.shape(1)) * 32 / bits));
  // float32_out: 16-bit scales under a float32 model; the rows are computed in float32 either way.
  return mx::array(sh, float32_out ? mx::float32 : scales.dtype(), std::make_shared<DequantizeRows>(s, group_size, bits),
                   {w, scales, biases, ids});
}

}  // namespace
}  // namespace qk

NB_MODULE(_qmm, m) {
  m.doc() = "qmlx's CPU kernels for MLX's affine quantized matmul";
  m.def("quantized_matmul", &qk::qmm, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("transpose") = true, nb::arg("group_size") = 64, nb::arg("bits") = 4,
        nb::arg("bias") = nb::none(),
        "x · dequantize(w)ᵀ (+ bias) (transpose) or x · dequantize(w), on the CPU, as an MLX lazy op");
  m.def("gather_quantized_matmul", &qk::gather_qmm, nb::arg("x"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("indices"), nb::arg("transpose") = true, nb::arg("group_size") = 64,
        nb::arg("bits") = 4,
        "out[t, j] = x[t] · dequantize(w[indices[t, j]])ᵀ for stacked experts w (E, N, packed), on the CPU; only "
        "the chosen experts are read");
  m.def("dequantize_rows", &qk::dequantize_rows, nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::arg("ids"),
        nb::arg("group_size") = 64, nb::arg("bits") = 4, nb::arg("float32_out") = false,
        "dequantize(w)[ids] without dequantizing the rest (an embedding lookup), as one CPU op; in the scales' "
        "dtype, or float32 with float32_out");
  m.def("log_softmax", &qk::log_softmax, nb::arg("x"), "x - logsumexp(x) over the last axis, float32, one CPU op");
  m.def("rms_norm", &qk::rms_norm, nb::arg("x"), nb::arg("weight"), nb::arg("eps"),
        "mx.fast.rms_norm as one CPU op");
  m.def("rope", &qk::rope, nb::arg("x"), nb::arg("dims"), nb::arg("base"), nb::arg("scale"), nb::arg("offsets"),
        nb::arg("freqs") = std::vector<float>{},
        "mx.fast.rope (traditional=False) as one CPU op; one offset, or one per index of x's first axis");
  m.def("attention_rows", &qk::attention_rows, nb::arg("q"), nb::arg("keys"), nb::arg("values"), nb::arg("scale"),
        "decode attention of a batch whose rows have keys/values of their own (CPU)");
  m.def("matmul", &qk::matmul, nb::arg("a"), nb::arg("b"), "a @ b on the kernels' own GEMM (CPU)");
  m.def("silu_mul", &qk::silu_mul, nb::arg("g"), nb::arg("u"), "silu(g) * u as one CPU op");
  m.def("softmax", &qk::softmax, nb::arg("x"), nb::arg("scale") = 1.0f, nb::arg("causal_rows") = 0,
        "softmax(scale * x) over the last axis, optionally causal, as one CPU op");
  m.def("isa", [] { return std::string(qk::best_kernels().name); }, "the instruction set of the kernels in use");
  m.def("threads", &qk::num_threads, "threads of the kernels' pool");
  m.attr("mlx_version") = std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." +
                          std::to_string(MLX_VERSION_PATCH);
}
