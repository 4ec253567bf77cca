// polyglu's CPU kernels for small inference calls, float32:
//   mixed_activation: sum_k g_k act_k(gate) * up with soft, noise-free routing (a short prefill, a
//     batched decode step: the "native" path of polyglu/model/small_inference.py);
//   decode_hidden: a PolyGLU layer's hidden activations for one decoded token per row, the causal
//     routing network included (its "native-decode" path, small_inference.decode_hidden).
// One call each where eager torch takes ~20 ops a layer. The same math as the reference
// (polyglu/model/activations.py), which tests/test_native.py compares them with. Built on first use by polyglu/model/native.py with the
// system's C++ compiler against the installed torch, vectorised with ATen's Vectorized for the CPU
// capability torch itself runs with.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// activation codes: polyglu/model/native.py NATIVE_ACTIVATIONS lists them in this order
enum Activation : int64_t { kRelu = 0, kTanh = 1, kSilu = 2, kGelu = 3, kIdentity = 4, kSigmoid = 5, kCount = 6 };

// The activations of one vector of units. `e` = exp(-z), shared by silu, sigmoid and tanh. silu and
// sigmoid are the formulas of torch's vectorised CPU kernels (equal to them bit for bit on full
// vectors; torch takes a scalar exp for the elements after its last full vector); tanh is
// 2 sigmoid(2z) - 1 (|error| < 2e-7, the eager kernel's spelling); GELU the exact (erf) form.
inline Vec activate(int64_t code, const Vec& z, const Vec& e) {
  switch (code) {
    case kRelu: return at::vec::clamp_min(z, Vec(0.f));
    case kTanh: return Vec(2.f) / (Vec(1.f) + e * e) - Vec(1.f);
    case kSilu: return z / (Vec(1.f) + e);
    case kGelu: return z * Vec(0.5f) * (Vec(1.f) + (z * Vec(static_cast<float>(M_SQRT1_2))).erf());
    case kIdentity: return z;
    default: return Vec(1.f) / (Vec(1.f) + e);  // kSigmoid
  }
}

constexpr int64_t kMaxActivations = 8;

void check_float_cpu(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
              "polyglu native kernels take float32 CPU tensors, got ", t.scalar_type(), " on ", t.device());
}

// The alpha logits as (K, F) rows: polyglu's decode layout stores alpha (F, K) column-major, so they
// are; any other layout is transposed into `buffer` by a plain loop (at::contiguous takes ~8 us for
// 1536 x 4).
const float* alpha_rows(const at::Tensor& alpha, int64_t F, int64_t K, std::vector<float>& buffer) {
  const float* a = alpha.data_ptr<float>();
  if (alpha.stride(0) == 1 && alpha.stride(1) == F && F > 1) return a;
  buffer.resize(F * K);
  const int64_t s0 = alpha.stride(0), s1 = alpha.stride(1);
  for (int64_t f = 0; f < F; ++f)
    for (int64_t k = 0; k < K; ++k) buffer[k * F + f] = a[f * s0 + k * s1];
  return buffer.data();
}

// out[r, :] = up[r, :] * sum_k g_k act_k(gate[r, :]) for the rows r of (rows, F) float32 buffers,
// g = softmax((alpha + dynamic[r]) / tau) over k: the reference's additions, its division and an
// exact softmax per unit (no underflow whatever the logits). dynamic_of(r) points at row r's K logits.
template <typename DynamicOf>
void mix_rows(const float* gate, const float* up, float* out, int64_t rows, int64_t F, const float* alpha_t,
              DynamicOf dynamic_of, double tau, at::IntArrayRef activations) {
  const int64_t K = static_cast<int64_t>(activations.size());
  bool needs_exp = false;
  for (int64_t code : activations) needs_exp = needs_exp || code == kTanh || code == kSilu || code == kSigmoid;
  const bool divide = tau != 1.0;  // dividing by 1 changes nothing: skip it
  const Vec tau_v(static_cast<float>(tau));
  const int64_t width = Vec::size();
  // rows in parallel when there are enough of them (~32K values a task), else all in this thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(F, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* dyn = dynamic_of(r);
      const float* gr = gate + r * F;
      const float* ur = up + r * F;
      float* orow = out + r * F;
      Vec dv[kMaxActivations];
      for (int64_t k = 0; k < K; ++k) dv[k] = Vec(dyn[k]);
      for (int64_t f = 0; f < F; f += width) {
        const int64_t n = std::min(width, F - f);
        const Vec z = Vec::loadu(gr + f, n);
        Vec logit[kMaxActivations];
        Vec top;
        for (int64_t k = 0; k < K; ++k) {
          logit[k] = Vec::loadu(alpha_t + k * F + f, n) + dv[k];
          if (divide) logit[k] = logit[k] / tau_v;
          top = k == 0 ? logit[k] : at::vec::maximum(top, logit[k]);
        }
        const Vec e = needs_exp ? z.neg().exp() : Vec(0.f);
        Vec total(0.f), mixed(0.f);
        for (int64_t k = 0; k < K; ++k) {
          const Vec w = (logit[k] - top).exp();
          total = total + w;
          mixed = at::vec::fmadd(w, activate(activations[k], z, e), mixed);
        }
        (mixed / total * Vec::loadu(ur + f, n)).store(orow + f, n);
      }
    }
  });
}

void check_activations(at::IntArrayRef activations) {
  const int64_t K = static_cast<int64_t>(activations.size());
  TORCH_CHECK(K >= 1 && K <= kMaxActivations, "polyglu native kernels: 1..", kMaxActivations, " activations, got ", K);
  for (int64_t code : activations)
    TORCH_CHECK(code >= 0 && code < kCount, "polyglu native kernels: unknown activation code ", code);
}

// gate, up (B, T, F); alpha (F, K); dynamic (B, 1 or T, K) -> (B, T, F)
at::Tensor mixed_activation(const at::Tensor& gate_in, const at::Tensor& up_in, const at::Tensor& alpha,
                            const at::Tensor& dynamic_in, double tau, at::IntArrayRef activations) {
  for (const at::Tensor* t : {&gate_in, &up_in, &alpha, &dynamic_in}) check_float_cpu(*t);
  check_activations(activations);
  const int64_t K = static_cast<int64_t>(activations.size());
  TORCH_CHECK(gate_in.dim() == 3 && up_in.sizes() == gate_in.sizes(), "polyglu native kernels: gate and up must be (B, T, F) alike");
  const int64_t B = gate_in.size(0), T = gate_in.size(1), F = gate_in.size(2);
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(0) == F && alpha.size(1) == K, "polyglu native kernels: alpha must be (F, K)");
  TORCH_CHECK(dynamic_in.dim() == 3 && dynamic_in.size(0) == B && (dynamic_in.size(1) == 1 || dynamic_in.size(1) == T)
              && dynamic_in.size(2) == K, "polyglu native kernels: dynamic must be (B, 1 or T, K)");
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous(), dynamic = dynamic_in.contiguous();
  at::Tensor out = at::empty({B, T, F}, gate.options());
  std::vector<float> buffer;
  const float* alpha_t = alpha_rows(alpha, F, K, buffer);
  const float* d = dynamic.data_ptr<float>();
  const int64_t Td = dynamic.size(1);
  mix_rows(gate.data_ptr<float>(), up.data_ptr<float>(), out.data_ptr<float>(), B * T, F, alpha_t,
           [=](int64_t r) { return d + ((r / T) * Td + (Td == 1 ? 0 : r % T)) * K; }, tau, activations);
  return out;
}

// One decoded token per row through the routing network with causal pooling, continuing the running
// sums in place (`_causal_step` in polyglu.py):
//   total = x W1^T + total * keep;  dynamic = beta * (W2 relu(b1 + total / count) + b2)
// x (B, 1, D); w1 (H, D) any strides; total (B, H) contiguous (updated); keep, count (B, 1); w2 (K, H).
// Writes dynamic (B, K) to `dynamic`.
void routing_step(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1_in, at::Tensor& total,
                  const at::Tensor& keep_in, const at::Tensor& count_in, const at::Tensor& w2_in,
                  const at::Tensor& b2_in, const at::Tensor& beta_in, float* dynamic) {
  for (const at::Tensor* t : {&x_in, &w1, &b1_in, static_cast<const at::Tensor*>(&total), &keep_in, &count_in,
                              &w2_in, &b2_in, &beta_in}) check_float_cpu(*t);
  TORCH_CHECK(total.is_contiguous() && total.dim() == 2, "polyglu native kernels: the pooling state must be contiguous (B, H)");
  const int64_t B = total.size(0), H = total.size(1), D = w1.size(1), K = w2_in.size(0);
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) == H && x_in.numel() == B * D && w2_in.dim() == 2 && w2_in.size(1) == H
              && b1_in.numel() == H && b2_in.numel() == K && beta_in.numel() == K
              && keep_in.numel() == B && count_in.numel() == B, "polyglu native kernels: inconsistent routing shapes");
  const at::Tensor x = x_in.contiguous(), b1 = b1_in.contiguous(), w2 = w2_in.contiguous(), b2 = b2_in.contiguous(),
                   beta = beta_in.contiguous(), keep = keep_in.contiguous(), count = count_in.contiguous();
  const float* w = w1.data_ptr<float>();
  const int64_t s0 = w1.stride(0), s1 = w1.stride(1);
  const float *b1p = b1.data_ptr<float>(), *w2p = w2.data_ptr<float>(), *b2p = b2.data_ptr<float>(),
              *betap = beta.data_ptr<float>();
  std::vector<float> proj(H), hidden(H);
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x.data_ptr<float>() + b * D;
    if (s0 == 1) {  // column-major (polyglu's decode layout): the columns summed in memory order
      std::fill(proj.begin(), proj.end(), 0.f);
      float* __restrict p = proj.data();
      for (int64_t i = 0; i < D; ++i) {
        const float xi = xb[i];
        const float* __restrict column = w + i * s1;
        for (int64_t h = 0; h < H; ++h) p[h] += xi * column[h];
      }
    } else if (s1 == 1) {  // row-major: one dot product per output
      for (int64_t h = 0; h < H; ++h)
        proj[h] = at::vec::map2_reduce_all<float>([](Vec p, Vec q) { return p * q; },
                                                  [](Vec p, Vec q) { return p + q; }, xb, w + h * s0, D);
    } else {
      for (int64_t h = 0; h < H; ++h) {
        float acc = 0.f;
        for (int64_t i = 0; i < D; ++i) acc += xb[i] * w[h * s0 + i * s1];
        proj[h] = acc;
      }
    }
    const float kb = keep.data_ptr<float>()[b], cb = count.data_ptr<float>()[b];
    float* tb = total.data_ptr<float>() + b * H;
    for (int64_t h = 0; h < H; ++h) {
      tb[h] = proj[h] + tb[h] * kb;
      hidden[h] = std::max(b1p[h] + tb[h] / cb, 0.f);
    }
    for (int64_t k = 0; k < K; ++k) {
      float acc = 0.f;
      for (int64_t h = 0; h < H; ++h) acc += w2p[k * H + h] * hidden[h];
      dynamic[b * K + k] = (acc + b2p[k]) * betap[k];
    }
  }
}

// A PolyGLU layer's hidden activations for one decoded token per row, routing included: the routing
// step above, then the mixed activation, in one call. gate, up (B, 1, F) -> (B, 1, F).
at::Tensor decode_hidden(const at::Tensor& x, const at::Tensor& gate_in, const at::Tensor& up_in,
                         const at::Tensor& w1, const at::Tensor& b1, at::Tensor total, const at::Tensor& keep,
                         const at::Tensor& count, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& beta,
                         const at::Tensor& alpha, double tau, at::IntArrayRef activations) {
  for (const at::Tensor* t : {&gate_in, &up_in, &alpha}) check_float_cpu(*t);
  check_activations(activations);
  const int64_t K = static_cast<int64_t>(activations.size());
  const int64_t B = total.size(0), F = gate_in.size(-1);
  TORCH_CHECK(gate_in.numel() == B * F && up_in.sizes() == gate_in.sizes() && w2.size(0) == K
              && alpha.dim() == 2 && alpha.size(0) == F && alpha.size(1) == K,
              "polyglu native kernels: inconsistent decode shapes");
  std::vector<float> dynamic(B * K);
  routing_step(x, w1, b1, total, keep, count, w2, b2, beta, dynamic.data());
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  std::vector<float> buffer;
  const float* alpha_t = alpha_rows(alpha, F, K, buffer);
  const float* d = dynamic.data();
  mix_rows(gate.data_ptr<float>(), up.data_ptr<float>(), out.data_ptr<float>(), B, F, alpha_t,
           [=](int64_t r) { return d + r * K; }, tau, activations);
  return out;
}

}  // namespace

TORCH_LIBRARY(polyglu_cpu, m) {
  m.def("mixed_activation(Tensor gate, Tensor up, Tensor alpha, Tensor dynamic, float tau, int[] activations) -> Tensor");
  m.def("decode_hidden(Tensor x, Tensor gate, Tensor up, Tensor w1, Tensor b1, Tensor(a!) total, Tensor keep, Tensor count, Tensor w2, Tensor b2, Tensor beta, Tensor alpha, float tau, int[] activations) -> Tensor");
  m.impl("mixed_activation", c10::DispatchKey::CPU, &mixed_activation);
  m.impl("decode_hidden", c10::DispatchKey::CPU, &decode_hidden);
}
