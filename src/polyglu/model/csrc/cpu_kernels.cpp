// polyglu's CPU kernels. Training (below the inference kernels; polyglu/model/fused_native.py):
//   mix_forward / mix_backward: the mixed activation's forward and one-pass backward;
//   causal_pool / routing_head (and their backwards): causal pooling and the routing network.
// Small inference calls, float32:
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
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// The vector loops' helpers are inlined whatever the compiler's budget (with AVX2 the backward took
// ~5% less time than with GCC's own choices).
#if defined(__GNUC__)
#define POLYGLU_INLINE inline __attribute__((always_inline))
#else
#define POLYGLU_INLINE inline
#endif

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

// torch's OpenMP runtime, as this process loaded it. Not at::parallel_for: in a torch built with
// OpenMP that is a `#pragma omp parallel` compiled into this library, which is built without OpenMP
// (a compiler's own runtime could be another copy than torch's), so it ran everything on the calling
// thread. GOMP_parallel is the entry point such a pragma compiles to (libgomp's ABI; LLVM's libomp
// and Intel's libiomp5 export it too): called here through the runtime torch loaded, the rows run on
// torch's own worker threads. Threads of our own instead (the fallback below) compete for the cores
// with those workers, which spin for a while after each parallel op: on 2 cores a 0.3 ms kernel
// then took several ms, and a training step 1.2x SwiGLU's where one thread gave 1.05x.
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*thread_num)() = nullptr;
  int (*num_threads)() = nullptr;
};

const OpenMP& openmp() {
  static const OpenMP runtime = [] {
    OpenMP found;
#if AT_PARALLEL_OPENMP
    // torch loads its runtime into the global scope (libtorch_global_deps); else look for it by name
    const auto take = [&found](void* handle) {
      void* parallel = dlsym(handle, "GOMP_parallel");
      void* thread_num = dlsym(handle, "omp_get_thread_num");
      void* num_threads = dlsym(handle, "omp_get_num_threads");
      if (parallel == nullptr || thread_num == nullptr || num_threads == nullptr) return false;
      found.parallel = reinterpret_cast<decltype(found.parallel)>(parallel);
      found.thread_num = reinterpret_cast<decltype(found.thread_num)>(thread_num);
      found.num_threads = reinterpret_cast<decltype(found.num_threads)>(num_threads);
      return true;
    };
    if (!take(RTLD_DEFAULT)) {
      for (const char* name : {"libgomp.so.1", "libiomp5.so", "libomp.so"}) {
        void* handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);  // only a runtime already loaded
        if (handle != nullptr && take(handle)) break;
      }
    }
#endif
    return found;
  }();
  return runtime;
}

// Runs body(begin, end, task) over [0, n) in up to at::get_num_threads() contiguous ranges of at least
// `grain` (task = 0, 1, ...: the range's index, for per-task buffers): on torch's OpenMP threads
// (`openmp`), else with torch's own at::parallel_for where torch is not built with OpenMP (its
// native pool is a library call), else the first range on the calling thread and the others on
// threads of their own (a thread start costs ~20 us, against a few ms of work per call).
template <typename Body>
void parallel_rows(int64_t n, int64_t grain, const Body& body) {
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1)));
  if (tasks == 1) {
    if (n > 0) body(int64_t{0}, n, int64_t{0});
    return;
  }
  const int64_t step = (n + tasks - 1) / tasks;
  const auto run = [&](int64_t task) {
    const int64_t begin = task * step, end = std::min(n, begin + step);
    if (begin < end) body(begin, end, task);
  };
  const OpenMP& omp = openmp();
  if (omp.parallel != nullptr) {
    struct Shared {
      const decltype(run)* body;
      int64_t tasks;
      const OpenMP* omp;
      std::mutex lock;
      std::exception_ptr error;
    } shared{&run, tasks, &omp, {}, nullptr};
    // a team smaller than asked for (a nested region: one thread) takes every task in turn
    omp.parallel([](void* data) {
      Shared& s = *static_cast<Shared*>(data);
      const int64_t threads = std::max(1, s.omp->num_threads());
      for (int64_t task = s.omp->thread_num(); task < s.tasks; task += threads) {
        try {
          (*s.body)(task);
        } catch (...) {
          std::lock_guard<std::mutex> guard(s.lock);
          if (!s.error) s.error = std::current_exception();
        }
      }
    }, &shared, static_cast<unsigned>(tasks), 0);
    if (shared.error) std::rethrow_exception(shared.error);
    return;
  }
#if !AT_PARALLEL_OPENMP
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) run(task);
  });
  return;
#endif
  std::vector<std::thread> workers;
  workers.reserve(tasks - 1);
  struct Join {
    std::vector<std::thread>& threads;
    ~Join() {
      for (auto& t : threads) t.join();
    }
  } join{workers};
  for (int64_t t = 1; t < tasks; ++t) workers.emplace_back([&run, t] { run(t); });
  run(0);
}

// The number of tasks `parallel_rows` may use: the size of per-task buffers.
inline int64_t max_tasks() { return std::max<int64_t>(1, at::get_num_threads()); }

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

// Whether any of the activations reads e = exp(-z) (`activate`).
bool needs_exp(at::IntArrayRef activations) {
  for (int64_t code : activations)
    if (code == kTanh || code == kSilu || code == kSigmoid) return true;
  return false;
}

// Rows in parallel, ~32K units a task.
inline int64_t row_grain(int64_t F) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(F, 1)); }

// The activations of a call: known at compile time for the default set (the loops over k unroll and
// keep every per-activation vector in a register), or read at run time for any other.
template <int64_t... Codes>
struct FixedActivations {
  static constexpr int64_t K = sizeof...(Codes);
  static constexpr int64_t size() { return K; }
  static constexpr int64_t code(int64_t k) {
    constexpr int64_t codes[] = {Codes...};
    return codes[k];
  }
};

using DefaultActivations = FixedActivations<kRelu, kTanh, kSilu, kGelu>;

struct RuntimeActivations {
  int64_t K = 0;
  int64_t codes[kMaxActivations] = {};
  int64_t size() const { return K; }
  int64_t code(int64_t k) const { return codes[k]; }
};

// Calls `body(acts)` with the activations of `activations` as a FixedActivations when they are the
// default (relu, tanh, silu, gelu), else as a RuntimeActivations.
template <typename Body>
void with_activations(at::IntArrayRef activations, Body body) {
  if (activations.size() == 4 && activations[0] == kRelu && activations[1] == kTanh && activations[2] == kSilu
      && activations[3] == kGelu) {
    body(DefaultActivations());
    return;
  }
  RuntimeActivations acts;
  acts.K = static_cast<int64_t>(activations.size());
  for (int64_t k = 0; k < acts.K; ++k) acts.codes[k] = activations[k];
  body(acts);
}

// out[r, :] = up[r, :] * sum_k g_k act_k(gate[r, :]) for the rows r of (rows, F) float32 buffers,
// g = softmax((alpha + dynamic[r]) / tau) over k: the reference's additions, its division and an
// exact softmax per unit (no underflow whatever the logits). dynamic_of(r) points at row r's K logits.
template <typename DynamicOf>
void mix_rows(const float* gate, const float* up, float* out, int64_t rows, int64_t F, const float* alpha_t,
              DynamicOf dynamic_of, double tau, at::IntArrayRef activations) {
  with_activations(activations, [&](const auto& acts) {
    const int64_t K = acts.size();
    const bool with_exp = needs_exp(activations);
    const bool divide = tau != 1.0;  // dividing by 1 changes nothing: skip it
    const Vec inverse_tau(static_cast<float>(1.0 / tau));
    const int64_t width = Vec::size();
    // rows in parallel when there are enough of them, else all in this thread
    parallel_rows(rows, row_grain(F), [&](int64_t begin, int64_t end, int64_t) {
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
            if (divide) logit[k] = logit[k] * inverse_tau;
            top = k == 0 ? logit[k] : at::vec::maximum(top, logit[k]);
          }
          const Vec e = with_exp ? z.neg().exp() : Vec(0.f);
          Vec total(0.f), mixed(0.f);
          for (int64_t k = 0; k < K; ++k) {
            // exp_u20 (20 ulp): exactly 1 at 0 and 0 below float's range, so routing saturated on one
            // activation (a Qwen3 upcycled to PolyGLU) gives that activation exactly
            const Vec w = (logit[k] - top).exp_u20();
            total = total + w;
            mixed = at::vec::fmadd(w, activate(acts.code(k), z, e), mixed);
          }
          (mixed / total * Vec::loadu(ur + f, n)).store(orow + f, n);
        }
      }
    });
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
// x (B, 1, D); w1 (H, D) and w2 (K, H) any strides (the decode layout stores them column-major);
// total (B, H) contiguous (updated); keep, count (B, 1).
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
  const at::Tensor x = x_in.contiguous(), b1 = b1_in.contiguous(), b2 = b2_in.contiguous(),
                   beta = beta_in.contiguous(), keep = keep_in.contiguous(), count = count_in.contiguous();
  const float* w = w1.data_ptr<float>();
  const int64_t s0 = w1.stride(0), s1 = w1.stride(1);
  const float *b1p = b1.data_ptr<float>(), *w2p = w2_in.data_ptr<float>(), *b2p = b2.data_ptr<float>(),
              *betap = beta.data_ptr<float>();
  const int64_t t0 = w2_in.stride(0), t1 = w2_in.stride(1);
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
      for (int64_t h = 0; h < H; ++h) acc += w2p[k * t0 + h * t1] * hidden[h];
      dynamic[b * K + k] = (acc + b2p[k]) * betap[k];
    }
  }
}

// A PolyGLU layer's hidden activations for one decoded token per row, routing included: the routing
// step above, then the mixed activation, in one call. gate, up (B, 1, F) -> (B, 1, F).
at::Tensor decode_hidden(const at::Tensor& x, const at::Tensor& gate_in, const at::Tensor& up_in,
                         const at::Tensor& w1, const at::Tensor& b1, at::Tensor total, const at::Tensor& keep,
                         const at::Tensor& count, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& beta,
                         const at::Tensor& alpha, const at::Tensor& tau, at::IntArrayRef activations) {
  for (const at::Tensor* t : {&gate_in, &up_in, &alpha, &tau}) check_float_cpu(*t);
  TORCH_CHECK(tau.numel() == 1, "polyglu native kernels: tau must hold one value, got ", tau.numel());
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
           [=](int64_t r) { return d + r * K; }, *tau.data_ptr<float>(), activations);
  return out;
}


// ---------------------------------------------------------------------------------------------
// Training: the mixed activation's forward and a one-pass backward (the "native" kernel of
// polyglu/model/fused_native.py), soft routing with one K-vector of dynamic logits per token (or per
// row), optional Gumbel noise, gate/up in float32 or bfloat16, math in float32.
//
// Per-token routing weights factorise: exp(l_k / tau) = A_k D_k with A = exp((alpha + noise)/tau - max)
// per (row, unit) and D = exp(dynamic/tau - max) per token, so no exponential is taken per hidden
// unit and activation; a token whose sum could underflow (extreme logits over a small tau) takes the
// exact softmax of the reference's logits, ((alpha + dynamic) + noise) / tau, for each of its units.
// The backward computes, in one pass over the units, d gate, d up, d dynamic (summed over the
// units of each token) and d alpha (summed over tokens, in a buffer per thread): the compiled kernel
// needs two passes for the two reductions, each recomputing the activations.

constexpr float kTinySum = 1e-30f;  // polyglu/model/fused_dense.py _TINY

struct MixTables {
  int64_t B = 0, T = 0, Td = 0, F = 0, K = 0;
  float tau = 1.f;
  bool noisy = false;
  std::vector<float> alpha_t;   // (K, F)
  std::vector<float> noise_t;   // (B, K, F), empty without noise
  std::vector<float> dynamic;   // (B * Td, K) as given
  std::vector<float> a;         // (B or 1, K, F): exp((alpha + noise) / tau - max over k)
  std::vector<float> d;         // (B * Td, K): exp(dynamic / tau - max over k)
  std::vector<uint8_t> exact;   // (B * Td): 1 where the factored sum could underflow

  const float* a_row(int64_t b) const { return a.data() + (noisy ? b : 0) * K * F; }
};

MixTables mix_tables(const at::Tensor& alpha_in, const at::Tensor& dynamic_in, const std::optional<at::Tensor>& noise_in,
                     double tau, int64_t B, int64_t T, int64_t F, int64_t K) {
  MixTables m;
  m.B = B; m.T = T; m.F = F; m.K = K; m.tau = static_cast<float>(tau);
  m.Td = dynamic_in.size(1);
  m.noisy = noise_in.has_value() && noise_in->defined();
  const at::Tensor alpha = alpha_in.contiguous(), dynamic = dynamic_in.contiguous();
  m.alpha_t.resize(K * F);
  const float* ap = alpha.data_ptr<float>();
  for (int64_t f = 0; f < F; ++f)
    for (int64_t k = 0; k < K; ++k) m.alpha_t[k * F + f] = ap[f * K + k];
  m.dynamic.assign(dynamic.data_ptr<float>(), dynamic.data_ptr<float>() + B * m.Td * K);
  const int64_t rows_a = m.noisy ? B : 1;
  if (m.noisy) {
    const at::Tensor noise = noise_in->contiguous();
    const float* np = noise.data_ptr<float>();
    m.noise_t.resize(B * K * F);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t f = 0; f < F; ++f)
        for (int64_t k = 0; k < K; ++k) m.noise_t[(b * K + k) * F + f] = np[(b * F + f) * K + k];
  }
  m.a.resize(rows_a * K * F);
  std::vector<float> lowest(rows_a * K);  // each A_k at its smallest over the units
  const int64_t width = Vec::size();
  for (int64_t b = 0; b < rows_a; ++b) {
    for (int64_t f = 0; f < F; f += width) {  // B x F x K exponentials a call: vectorised
      const int64_t n = std::min(width, F - f);
      Vec s[kMaxActivations], top;
      for (int64_t k = 0; k < K; ++k) {
        s[k] = Vec::loadu(m.alpha_t.data() + k * F + f, n);
        if (m.noisy) s[k] = s[k] + Vec::loadu(m.noise_t.data() + (b * K + k) * F + f, n);
        s[k] = s[k] / Vec(m.tau);
        top = k == 0 ? s[k] : at::vec::maximum(top, s[k]);
      }
      for (int64_t k = 0; k < K; ++k) (s[k] - top).exp().store(m.a.data() + (b * K + k) * F + f, n);
    }
    for (int64_t k = 0; k < K; ++k) {
      const float* row = m.a.data() + (b * K + k) * F;
      lowest[b * K + k] = *std::min_element(row, row + F);
    }
  }
  m.d.resize(B * m.Td * K);
  m.exact.resize(B * m.Td);
  for (int64_t r = 0; r < B * m.Td; ++r) {
    float s[kMaxActivations], top = -INFINITY;
    for (int64_t k = 0; k < K; ++k) {
      s[k] = m.dynamic[r * K + k] / m.tau;
      top = std::max(top, s[k]);
    }
    const int64_t b = r / m.Td;
    float bound = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      m.d[r * K + k] = std::exp(s[k] - top);
      bound += m.d[r * K + k] * lowest[(m.noisy ? b : 0) * K + k];
    }
    // NaN logits take the exact path too, which carries the NaN as the reference does
    m.exact[r] = !(bound >= kTinySum);
  }
  return m;
}

// One token's factored routing, read once per row: the table row A (K, F) and the token's factors
// D_k as vectors, held in registers over the row's vector loop (read through `m` at every vector,
// the compiler reloaded them after each of the loop's stores, which may alias anything). a is null
// where the token takes the exact softmax.
struct RowRouting {
  const float* a = nullptr;
  Vec d[kMaxActivations];
};

template <typename Acts>
POLYGLU_INLINE RowRouting row_routing(const MixTables& m, const Acts& acts, int64_t b, int64_t td) {
  const int64_t K = acts.size(), row = b * m.Td + td;
  RowRouting routing;
  if (!m.exact[row]) {
    routing.a = m.a_row(b);
    for (int64_t k = 0; k < K; ++k) routing.d[k] = Vec(m.d[row * K + k]);
  }
  return routing;
}

// The routing weights of one vector of units of token (b, t') at unit offset f, unnormalised:
// sets w_k and returns their sum (g_k = w_k / sum): w_k = A_k D_k (factored), or exp(l_k - max l)
// with l = ((alpha + dynamic) + noise) / tau (the exact softmax, for tokens whose factored sum could
// underflow; the sum is then >= 1).
template <typename Acts>
POLYGLU_INLINE Vec routing_vector(const MixTables& m, const Acts& acts, const RowRouting& token, int64_t F,
                                  int64_t b, int64_t td, int64_t f, int64_t n, Vec* w) {
  const int64_t K = acts.size(), row = b * m.Td + td;
  Vec total(0.f);
  if (token.a != nullptr) {
    for (int64_t k = 0; k < K; ++k) {
      w[k] = Vec::loadu(token.a + k * F + f, n) * token.d[k];
      total = total + w[k];
    }
    return total;
  }
  const float* dyn = m.dynamic.data() + row * K;
  const Vec inverse_tau(1.f / m.tau);
  Vec top;
  for (int64_t k = 0; k < K; ++k) {
    Vec l = Vec::loadu(m.alpha_t.data() + k * m.F + f, n) + Vec(dyn[k]);
    if (m.noisy) l = l + Vec::loadu(m.noise_t.data() + (b * K + k) * m.F + f, n);
    w[k] = l * inverse_tau;
    top = k == 0 ? w[k] : at::vec::maximum(top, w[k]);
  }
  for (int64_t k = 0; k < K; ++k) {
    w[k] = (w[k] - top).exp();
    total = total + w[k];
  }
  return total;
}

// exp for the default activations: ATen's exp_u20, or with `kBf16Grade` its cheaper fexp_u20 where
// this torch has it (else exp_u20 again).
template <typename V>
POLYGLU_INLINE auto cheapest_exp(const V& x, int) -> decltype(x.fexp_u20()) { return x.fexp_u20(); }
template <typename V>
POLYGLU_INLINE V cheapest_exp(const V& x, long) { return x.exp_u20(); }

template <bool kBf16Grade>
POLYGLU_INLINE Vec exponential(const Vec& x) {
  if constexpr (kBf16Grade) {
    return cheapest_exp(x, 0);
  } else {
    return x.exp_u20();
  }
}

// The default set's activations (and with `kSlopes` their derivatives) for one vector: relu;
// tanh = 2 / (1 + e^2) - 1 and silu = z / (1 + e) with e = exp(-z); GELU through `normal_cdf`'s
// formula. Their three reciprocals (of 1 + e, 1 + e^2 and erf's 1 + p|z|/sqrt 2) take one division
// where every lane has -20 <= z <= 1e30 (their product then stays finite: < 1e27), three elsewhere
// (large negative z, inf, NaN); a few float32 roundings more: < 1e-6 relative. Both exponentials
// are ATen's exp_u20 (a degree-5 polynomial, relative error < 3e-6; Sleef's exp, < 1.2e-7, took 20%
// longer over the whole kernel): training-grade float32, far below bf16's rounding. (The routing
// weights keep their own division: a softmax whose weights sum to 1 - 4 ulp would turn the
// activations' size, divided by a small tau, into routing gradient.)
//
// The forward (no slopes) passes the routing weights' sum `total` (1e-30 <= total <= K) and gets
// 1 / total from the same division (`inverse_total`): its rounding only scales the mix by < 1e-6
// there, where the backward needs weights that sum to 1.
//
// `kBf16Grade` (bf16 gate and up: autocast, whose eager kernel rounds every activation to bf16,
// 4e-3 relative): both exponentials are ATen's fexp_u20 (a degree-3 polynomial) and erf is
// Abramowitz & Stegun 7.1.25 (three terms, |error| < 2.5e-5), ~1e-4 at worst: the kernels took 10%
// less time (bf16, AVX-512), and their results round to bf16 all the same.
template <bool kSlopes, bool kBf16Grade = false>
POLYGLU_INLINE void default_activations(const Vec& z, Vec* a, Vec* slope, const Vec* total = nullptr,
                                Vec* inverse_total = nullptr) {
  const Vec one(1.f);
  const Vec e = exponential<kBf16Grade>(z.neg());
  const Vec p = one + e, q = one + e * e;
  const Vec w = at::vec::fmadd(Vec(kBf16Grade ? 0.47047f : 0.3275911f), z.abs() * Vec(static_cast<float>(M_SQRT1_2)),
                               one);
  Vec inverse_p, inverse_q, t;
  const Vec in_range = (z >= Vec(-20.f)) & (z <= Vec(1e30f));
  if (in_range.zero_mask() == 0) {
    const Vec pq = p * q, qw = q * w;
    if (total != nullptr) {
      const Vec pqw = pq * w;
      const Vec r = one / (pqw * *total);
      *inverse_total = pqw * r;
      const Vec rt = r * *total;
      inverse_p = qw * rt;
      inverse_q = p * w * rt;
      t = pq * rt;
    } else {
      const Vec r = one / (pq * w);
      inverse_p = qw * r;
      inverse_q = p * w * r;
      t = pq * r;
    }
  } else {
    inverse_p = one / p;
    inverse_q = one / q;
    t = one / w;
    if (total != nullptr) *inverse_total = one / *total;
  }
  Vec poly;
  if constexpr (kBf16Grade) {
    poly = at::vec::fmadd(at::vec::fmadd(Vec(0.7478556f), t, Vec(-0.0958798f)), t, Vec(0.3480242f));
  } else {
    poly = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
    poly = at::vec::fmadd(poly, t, Vec(1.421413741f));
    poly = at::vec::fmadd(poly, t, Vec(-0.284496736f));
    poly = at::vec::fmadd(poly, t, Vec(0.254829592f));
  }
  const Vec gauss = exponential<kBf16Grade>(z * z * Vec(-0.5f));
  const Vec tail = Vec(0.5f) * poly * t * gauss;
  const Vec cdf = Vec::blendv(one - tail, tail, z < Vec(0.f));
  a[0] = at::vec::clamp_min(z, Vec(0.f));
  a[1] = Vec(2.f) * inverse_q - one;
  a[2] = z * inverse_p;
  a[3] = z * cdf;
  if (kSlopes) {
    slope[0] = Vec::blendv(Vec(0.f), one, z > Vec(0.f));
    slope[1] = one - a[1] * a[1];
    slope[2] = inverse_p * (one + z * (one - inverse_p));
    slope[3] = cdf + z * gauss * Vec(static_cast<float>(0.5 * M_2_SQRTPI * M_SQRT1_2));
  }
}

// The standard normal distribution at z: returns Phi(z) and sets `density` to phi(z). Phi is the
// erf formula of ATen's vectorised CPU erf (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7) written
// as 1 - q or q, q = t P(t) exp(-z^2 / 2) / 2, so that phi shares its exponential (GELU's backward
// takes one exponential where erf and phi took two).
inline Vec normal_cdf(const Vec& z, Vec& density) {
  const Vec x = z.abs() * Vec(static_cast<float>(M_SQRT1_2));
  const Vec t = Vec(1.f) / at::vec::fmadd(Vec(0.3275911f), x, Vec(1.f));
  Vec poly = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  poly = at::vec::fmadd(poly, t, Vec(1.421413741f));
  poly = at::vec::fmadd(poly, t, Vec(-0.284496736f));
  poly = at::vec::fmadd(poly, t, Vec(0.254829592f));
  const Vec gauss = (z * z * Vec(-0.5f)).exp();
  density = gauss * Vec(static_cast<float>(0.5 * M_2_SQRTPI * M_SQRT1_2));
  const Vec q = Vec(0.5f) * poly * t * gauss;
  return Vec::blendv(Vec(1.f) - q, q, z < Vec(0.f));
}

// act(z) and act'(z), `e` = exp(-z) as in `activate`.
inline void activate_with_slope(int64_t code, const Vec& z, const Vec& e, Vec& a, Vec& slope) {
  switch (code) {
    case kRelu:
      a = at::vec::clamp_min(z, Vec(0.f));
      slope = Vec::blendv(Vec(0.f), Vec(1.f), z > Vec(0.f));
      return;
    case kTanh:
      a = Vec(2.f) / (Vec(1.f) + e * e) - Vec(1.f);
      slope = Vec(1.f) - a * a;
      return;
    case kSilu: {
      const Vec s = Vec(1.f) / (Vec(1.f) + e);
      a = z * s;
      slope = s * (Vec(1.f) + z * (Vec(1.f) - s));
      return;
    }
    case kGelu: {
      Vec density;
      const Vec cdf = normal_cdf(z, density);
      a = z * cdf;
      slope = cdf + z * density;
      return;
    }
    case kIdentity:
      a = z;
      slope = Vec(1.f);
      return;
    default: {  // kSigmoid
      a = Vec(1.f) / (Vec(1.f) + e);
      slope = a * (Vec(1.f) - a);
      return;
    }
  }
}

// `n` <= Vec::size() values at p as one float32 vector. bf16 -> float32 is exact (the 16 bits
// shifted up); a full vector is widened in registers (ATen's generic convert is a scalar loop, and
// widening whole rows into scratch first cost the bf16 kernels ~20% over float32).
POLYGLU_INLINE Vec load_float(const float* p, int64_t n) { return Vec::loadu(p, n); }

POLYGLU_INLINE Vec load_float(const at::BFloat16* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if (n == Vec::size())
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(p))), 16));
#elif defined(CPU_CAPABILITY_AVX2)
  if (n == Vec::size())
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(p))), 16));
#endif
  float buffer[Vec::size()];
  for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(p[i]);
  return Vec::loadu(buffer, n);
}

// Stores the first `n` lanes of v at p: float32, or bf16 rounded to nearest even (NaN stays NaN),
// as torch's float -> bf16 conversion rounds; with the AVX-512 BF16 instructions (built with
// -mavx512bf16 where the CPU has them: polyglu/model/native.py) in one instruction instead of eight,
// 6% off the forward and 10% off the backward, which flushes values below bf16's smallest normal
// (1.2e-38) to 0.
POLYGLU_INLINE void store_float(const Vec& v, float* p, int64_t n) { v.store(p, n); }

POLYGLU_INLINE void store_float(const Vec& v, at::BFloat16* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if (n == Vec::size()) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(__m512(v))));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX512)
  if (n == Vec::size()) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (n == Vec::size()) {
    const __m256 x = v;
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, lsb), _mm256_set1_epi32(0x7fff)), 16);
    rounded = _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), rounded,
                                 _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_ORD_Q)));  // NaN -> 0xffff
    // 8 x 32 -> 8 x 16 bits: packus works within 128-bit lanes; the permute gathers both halves
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xd8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    return;
  }
#endif
  float buffer[Vec::size()];
  v.store(buffer, n);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<at::BFloat16>(buffer[i]);
}

void check_mix_inputs(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& alpha, const at::Tensor& dynamic,
                      const std::optional<at::Tensor>& noise, at::IntArrayRef activations) {
  check_activations(activations);
  const int64_t K = static_cast<int64_t>(activations.size());
  TORCH_CHECK(gate.device().is_cpu() && (gate.scalar_type() == at::kFloat || gate.scalar_type() == at::kBFloat16),
              "polyglu native training kernels take float32 or bfloat16 CPU tensors, got ", gate.scalar_type());
  TORCH_CHECK(gate.dim() == 3 && up.sizes() == gate.sizes() && up.scalar_type() == gate.scalar_type(),
              "polyglu native kernels: gate and up must be (B, T, F) alike");
  const int64_t B = gate.size(0), T = gate.size(1), F = gate.size(2);
  check_float_cpu(alpha);
  check_float_cpu(dynamic);
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(0) == F && alpha.size(1) == K, "polyglu native kernels: alpha must be (F, K)");
  TORCH_CHECK(dynamic.dim() == 3 && dynamic.size(0) == B && (dynamic.size(1) == 1 || dynamic.size(1) == T)
              && dynamic.size(2) == K, "polyglu native kernels: dynamic must be (B, 1 or T, K)");
  if (noise.has_value() && noise->defined()) {
    check_float_cpu(*noise);
    TORCH_CHECK(noise->dim() == 3 && noise->size(0) == B && noise->size(1) == F && noise->size(2) == K,
                "polyglu native kernels: noise must be (B, F, K)");
  }
}


// The row stride of a (B, T, F) tensor whose B * T rows of F units lie at even steps with the units
// side by side: a contiguous tensor (F), or a column slice of a wider buffer, as the gate comes in the
// first F columns of the projection PolyGLU computes together with its routing network's (fused_native
// `projected_mix`); -1 for any other layout.
int64_t row_stride(const at::Tensor& t) {
  const int64_t B = t.size(0), T = t.size(1), F = t.size(2);
  if (F > 1 && t.stride(2) != 1) return -1;
  const int64_t ld = T > 1 ? t.stride(1) : (B > 1 ? t.stride(0) : F);
  if (ld < F || (B > 1 && T > 1 && t.stride(0) != T * ld)) return -1;
  return ld;
}

// `t` as rows the kernels read at steps of `ld` units: itself where `row_stride` allows, else a
// contiguous copy (ld = F).
at::Tensor strided_rows(const at::Tensor& t, int64_t& ld) {
  ld = row_stride(t);
  if (ld >= 0) return t;
  ld = t.size(2);
  return t.contiguous();
}

template <typename scalar_t, typename Acts>
void mix_forward_rows(const MixTables& m, const scalar_t* gate, int64_t gate_ld, const scalar_t* up, scalar_t* out,
                      const Acts& acts, bool with_exp) {
  const int64_t K = acts.size(), F = m.F, T = m.T, width = Vec::size();
  parallel_rows(m.B * T, row_grain(F), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, td = m.Td == 1 ? 0 : r % T;
      const scalar_t* z_row = gate + r * gate_ld;
      const scalar_t* u_row = up + r * F;
      scalar_t* o_row = out + r * F;
      const RowRouting token = row_routing(m, acts, b, td);
      for (int64_t f = 0; f < F; f += width) {
        const int64_t n = std::min(width, F - f);
        Vec w[kMaxActivations];
        const Vec total = routing_vector(m, acts, token, F, b, td, f, n, w);
        const Vec z = load_float(z_row + f, n);
        Vec mixed(0.f);
        if constexpr (std::is_same_v<Acts, DefaultActivations>) {
          Vec a[4], inverse_total;
          default_activations<false, std::is_same_v<scalar_t, at::BFloat16>>(z, a, nullptr, &total, &inverse_total);
          for (int64_t k = 0; k < 4; ++k) mixed = at::vec::fmadd(w[k], a[k], mixed);
          mixed = mixed * inverse_total;
        } else {
          const Vec e = with_exp ? z.neg().exp() : Vec(0.f);
          for (int64_t k = 0; k < K; ++k) mixed = at::vec::fmadd(w[k], activate(acts.code(k), z, e), mixed);
          mixed = mixed / total;
        }
        store_float(mixed * load_float(u_row + f, n), o_row + f, n);
      }
    }
  });
}

// gate, up (B, T, F) float32 or bfloat16; alpha (F, K), dynamic (B, 1 or T, K), noise (B, F, K) or
// None, all float32 -> h (B, T, F) in gate's dtype.
at::Tensor mix_forward(const at::Tensor& gate_in, const at::Tensor& up_in, const at::Tensor& alpha,
                       const at::Tensor& dynamic, const std::optional<at::Tensor>& noise, double tau,
                       at::IntArrayRef activations) {
  check_mix_inputs(gate_in, up_in, alpha, dynamic, noise, activations);
  int64_t gate_ld;  // the gate may be a column slice of a wider buffer
  const at::Tensor gate = strided_rows(gate_in, gate_ld), up = up_in.contiguous();
  const int64_t B = gate.size(0), T = gate.size(1), F = gate.size(2), K = static_cast<int64_t>(activations.size());
  const MixTables m = mix_tables(alpha, dynamic, noise, tau, B, T, F, K);
  at::Tensor out = at::empty({B, T, F}, up.options());
  const bool with_exp = needs_exp(activations);
  with_activations(activations, [&](const auto& acts) {
    if (gate.scalar_type() == at::kFloat) {
      mix_forward_rows(m, gate.data_ptr<float>(), gate_ld, up.data_ptr<float>(), out.data_ptr<float>(), acts,
                       with_exp);
    } else {
      mix_forward_rows(m, gate.data_ptr<at::BFloat16>(), gate_ld, up.data_ptr<at::BFloat16>(),
                       out.data_ptr<at::BFloat16>(), acts, with_exp);
    }
  });
  return out;
}

// Row r of the backward, vector by vector over the units. Written as a function of the row with
// indices from the base pointers, it took ~20% less time on AVX-512 than the same loop inline over
// row pointers; two rows at a time, sharing d alpha's load and store, spilled registers and took
// 10-15% longer.
template <typename scalar_t, typename Acts>
POLYGLU_INLINE void backward_row(const MixTables& m, const Acts& acts, bool with_exp, int64_t r, const scalar_t* grad,
                         const scalar_t* gate, int64_t gate_ld, const scalar_t* up, scalar_t* d_gate,
                         int64_t d_gate_ld, scalar_t* d_up, float* d_alpha, float* d_dynamic_tokens) {
  const int64_t K = acts.size(), F = m.F, T = m.T, width = Vec::size();
  const int64_t b = r / T, td = m.Td == 1 ? 0 : r % T;
  const bool routing = d_alpha != nullptr;
  const RowRouting token = row_routing(m, acts, b, td);
  Vec row_sum[kMaxActivations];
  for (int64_t k = 0; k < K; ++k) row_sum[k] = Vec(0.f);
  for (int64_t f = 0; f < F; f += width) {
    const int64_t n = std::min(width, F - f), i = r * F + f;
    Vec g[kMaxActivations], a[kMaxActivations], slope[kMaxActivations];
    const Vec total = routing_vector(m, acts, token, F, b, td, f, n, g);
    const Vec z = load_float(gate + r * gate_ld + f, n), dh = load_float(grad + i, n);
    if constexpr (std::is_same_v<Acts, DefaultActivations>) {
      default_activations<true, std::is_same_v<scalar_t, at::BFloat16>>(z, a, slope);
    } else {
      const Vec e = with_exp ? z.neg().exp() : Vec(0.f);
      for (int64_t k = 0; k < K; ++k) activate_with_slope(acts.code(k), z, e, a[k], slope[k]);
    }
    const Vec inverse_total = Vec(1.f) / total;
    Vec mixed(0.f), slope_mix(0.f);
    for (int64_t k = 0; k < K; ++k) {
      g[k] = g[k] * inverse_total;
      mixed = at::vec::fmadd(g[k], a[k], mixed);
      slope_mix = at::vec::fmadd(g[k], slope[k], slope_mix);
    }
    const Vec dm = dh * load_float(up + i, n);
    store_float(dm * slope_mix, d_gate + r * d_gate_ld + f, n);
    store_float(dh * mixed, d_up + i, n);
    if (routing) {
      for (int64_t k = 0; k < K; ++k) {
        const Vec term = dm * g[k] * (a[k] - mixed);  // d l_k * tau
        // past the row's end the lanes hold 0 * (0 / 0): only the first n enter the sum
        row_sum[k] = row_sum[k] + (n == width ? term : Vec::set(Vec(0.f), term, n));
        (Vec::loadu(d_alpha + k * F + f, n) + term).store(d_alpha + k * F + f, n);
      }
    }
  }
  if (routing) {
    for (int64_t k = 0; k < K; ++k)
      d_dynamic_tokens[r * K + k] = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, row_sum[k]) / m.tau;
  }
}

template <typename scalar_t, typename Acts>
void mix_backward_rows(const MixTables& m, const scalar_t* grad, const scalar_t* gate, int64_t gate_ld,
                       const scalar_t* up, scalar_t* d_gate, int64_t d_gate_ld, scalar_t* d_up,
                       float* d_dynamic_tokens, float* d_alpha_threads, const Acts& acts, bool with_exp) {
  const int64_t K = acts.size(), F = m.F;
  const bool routing = d_dynamic_tokens != nullptr;
  parallel_rows(m.B * m.T, row_grain(F), [&](int64_t begin, int64_t end, int64_t task) {
    float* d_alpha = routing ? d_alpha_threads + task * K * F : nullptr;  // (K, F)
    for (int64_t r = begin; r < end; ++r)
      backward_row(m, acts, with_exp, r, grad, gate, gate_ld, up, d_gate, d_gate_ld, d_up, d_alpha, d_dynamic_tokens);
  });
}

// -> (d gate, d up) in gate's dtype, and with `routing_grads` d alpha (F, K) and d dynamic (B, 1 or
// T, K) in float32 (else empty tensors). The gate may be a column slice of a wider buffer (`row_stride`);
// with `d_gate_out` (B, T, F), laid out so too, d gate is written there and comes back empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mix_backward(
    const at::Tensor& grad_in, const at::Tensor& gate_in, const at::Tensor& up_in, const at::Tensor& alpha,
    const at::Tensor& dynamic, const std::optional<at::Tensor>& noise, double tau, at::IntArrayRef activations,
    bool routing_grads, const std::optional<at::Tensor>& d_gate_out) {
  check_mix_inputs(gate_in, up_in, alpha, dynamic, noise, activations);
  TORCH_CHECK(grad_in.sizes() == gate_in.sizes() && grad_in.scalar_type() == gate_in.scalar_type(),
              "polyglu native kernels: the gradient must be shaped and typed like gate");
  int64_t gate_ld;
  const at::Tensor grad = grad_in.contiguous(), gate = strided_rows(gate_in, gate_ld), up = up_in.contiguous();
  const int64_t B = gate.size(0), T = gate.size(1), F = gate.size(2), K = static_cast<int64_t>(activations.size());
  const MixTables m = mix_tables(alpha, dynamic, noise, tau, B, T, F, K);
  const bool into = d_gate_out.has_value() && d_gate_out->defined();
  if (into) {
    TORCH_CHECK(d_gate_out->sizes() == gate.sizes() && d_gate_out->scalar_type() == gate.scalar_type()
                && d_gate_out->device().is_cpu() && row_stride(*d_gate_out) >= 0,
                "polyglu native kernels: d_gate_out must be (B, T, F) like gate, its rows evenly strided");
  }
  at::Tensor d_gate = into ? *d_gate_out : at::empty({B, T, F}, up.options());
  const int64_t d_gate_ld = into ? row_stride(d_gate) : F;
  at::Tensor d_up = at::empty({B, T, F}, up.options());
  const auto f32 = alpha.options();
  at::Tensor d_tokens = routing_grads ? at::empty({B, T, K}, f32) : at::Tensor();
  const int64_t threads = max_tasks();
  std::vector<float> d_alpha_threads(routing_grads ? threads * K * F : 0, 0.f);
  float* dt = routing_grads ? d_tokens.data_ptr<float>() : nullptr;
  const bool with_exp = needs_exp(activations);
  with_activations(activations, [&](const auto& acts) {
    if (gate.scalar_type() == at::kFloat) {
      mix_backward_rows(m, grad.data_ptr<float>(), gate.data_ptr<float>(), gate_ld, up.data_ptr<float>(),
                        d_gate.data_ptr<float>(), d_gate_ld, d_up.data_ptr<float>(), dt, d_alpha_threads.data(), acts,
                        with_exp);
    } else {
      using bf16 = at::BFloat16;
      mix_backward_rows(m, grad.data_ptr<bf16>(), gate.data_ptr<bf16>(), gate_ld, up.data_ptr<bf16>(),
                        d_gate.data_ptr<bf16>(), d_gate_ld, d_up.data_ptr<bf16>(), dt, d_alpha_threads.data(), acts,
                        with_exp);
    }
  });
  if (into) d_gate = at::Tensor();  // written into d_gate_out: no alias of an argument comes back
  if (!routing_grads) return {d_gate, d_up, at::Tensor(), at::Tensor()};
  at::Tensor d_alpha = at::empty({F, K}, f32);
  float* da = d_alpha.data_ptr<float>();
  for (int64_t f = 0; f < F; ++f)
    for (int64_t k = 0; k < K; ++k) {
      float total = 0.f;
      for (int64_t i = 0; i < threads; ++i) total += d_alpha_threads[(i * K + k) * F + f];
      da[f * K + k] = total / m.tau;
    }
  at::Tensor d_dynamic = m.Td == 1 ? d_tokens.sum(1, true) : d_tokens;
  return {d_gate, d_up, d_alpha, d_dynamic};
}

// ---------------------------------------------------------------------------------------------
// Causal pooling for training (polyglu/model/polyglu.py _causal_mean without a cache): the mean of
// proj over the positions <= t of t's document, mean[b, t] = (C[t] - C[start - 1]) / (positions[t] + 1)
// with C the running sum over the row (accumulated in double and rounded to float32 per position,
// as torch's CPU cumsum) and start = t - positions[t] (no subtraction when start <= 0). Its backward
// is the same computation's gradient: g / (position + 1), less what each document start took away,
// summed from the row's end. One pass each way over (B, T, H) instead of ~10 eager ops.

template <typename scalar_t>
void causal_pool_rows(const scalar_t* proj, const int64_t* positions, float* out, int64_t B, int64_t T, int64_t H) {
  parallel_rows(B, 1, [&](int64_t begin, int64_t end, int64_t) {
    std::vector<double> running(H);
    std::vector<float> sums(T * H);  // C[t] rounded to float32
    for (int64_t b = begin; b < end; ++b) {
      std::fill(running.begin(), running.end(), 0.0);
      const scalar_t* p = proj + b * T * H;
      for (int64_t t = 0; t < T; ++t) {
        float* c = sums.data() + t * H;
        for (int64_t h = 0; h < H; ++h) {
          running[h] += static_cast<double>(static_cast<float>(p[t * H + h]));
          c[h] = static_cast<float>(running[h]);
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t position = positions ? positions[b * T + t] : t;
        const int64_t start = t - position;
        const float count = static_cast<float>(position + 1);
        const float* c = sums.data() + t * H;
        const float* before = start > 0 ? sums.data() + (start - 1) * H : nullptr;
        float* o = out + (b * T + t) * H;
        for (int64_t h = 0; h < H; ++h) o[h] = (before ? c[h] - before[h] : c[h]) / count;
      }
    }
  });
}

// positions (B, T) int64, contiguous; an undefined tensor for None (one document per row)
at::Tensor checked_positions(const std::optional<at::Tensor>& positions_in, int64_t B, int64_t T) {
  if (!positions_in.has_value() || !positions_in->defined()) return at::Tensor();
  const at::Tensor positions = positions_in->contiguous();
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 2 && positions.size(0) == B
              && positions.size(1) == T, "polyglu native kernels: positions must be (B, T) int64");
  return positions;
}

// proj (B, T, H) float32 or bfloat16, positions (B, T) int64 or None (one document per row) -> (B, T, H) float32
at::Tensor causal_pool(const at::Tensor& proj_in, const std::optional<at::Tensor>& positions_in) {
  TORCH_CHECK(proj_in.device().is_cpu() && proj_in.dim() == 3
              && (proj_in.scalar_type() == at::kFloat || proj_in.scalar_type() == at::kBFloat16),
              "polyglu native kernels: causal_pool takes a (B, T, H) float32 or bfloat16 CPU tensor");
  const at::Tensor proj = proj_in.contiguous();
  const int64_t B = proj.size(0), T = proj.size(1), H = proj.size(2);
  const at::Tensor positions = checked_positions(positions_in, B, T);
  at::Tensor out = at::empty({B, T, H}, proj.options().dtype(at::kFloat));
  const int64_t* pos = positions.defined() ? positions.data_ptr<int64_t>() : nullptr;
  if (proj.scalar_type() == at::kFloat) {
    causal_pool_rows(proj.data_ptr<float>(), pos, out.data_ptr<float>(), B, T, H);
  } else {
    causal_pool_rows(proj.data_ptr<at::BFloat16>(), pos, out.data_ptr<float>(), B, T, H);
  }
  return out;
}

// grad (B, T, H) float32 -> d proj (B, T, H) float32
at::Tensor causal_pool_backward(const at::Tensor& grad_in, const std::optional<at::Tensor>& positions_in) {
  TORCH_CHECK(grad_in.device().is_cpu() && grad_in.dim() == 3 && grad_in.scalar_type() == at::kFloat,
              "polyglu native kernels: causal_pool_backward takes a (B, T, H) float32 CPU gradient");
  const at::Tensor grad = grad_in.contiguous();
  const int64_t B = grad.size(0), T = grad.size(1), H = grad.size(2);
  const at::Tensor positions = checked_positions(positions_in, B, T);
  const int64_t* pos = positions.defined() ? positions.data_ptr<int64_t>() : nullptr;
  at::Tensor out = at::empty({B, T, H}, grad.options());
  const float* g = grad.data_ptr<float>();
  float* o = out.data_ptr<float>();
  parallel_rows(B, 1, [&](int64_t begin, int64_t end, int64_t) {
    std::vector<float> d_sums(T * H);  // the gradient of C[t]
    std::vector<double> running(H);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(d_sums.begin(), d_sums.end(), 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t position = pos ? pos[b * T + t] : t;
        const int64_t start = t - position;
        const float count = static_cast<float>(position + 1);
        const float* gt = g + (b * T + t) * H;
        float* dc = d_sums.data() + t * H;
        for (int64_t h = 0; h < H; ++h) dc[h] += gt[h] / count;
        if (start > 0) {
          float* db = d_sums.data() + (start - 1) * H;
          for (int64_t h = 0; h < H; ++h) db[h] -= gt[h] / count;
        }
      }
      std::fill(running.begin(), running.end(), 0.0);
      for (int64_t t = T - 1; t >= 0; --t) {
        const float* dc = d_sums.data() + t * H;
        float* ot = o + (b * T + t) * H;
        for (int64_t h = 0; h < H; ++h) {
          running[h] += static_cast<double>(dc[h]);
          ot[h] = static_cast<float>(running[h]);
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The layer-scope routing network after its first projection, for training: causal pooling, then
// dynamic = beta * (W2 relu(pooled + b1) + b2), one call each way where eager torch takes ~15 small
// ops. Float32 math; the hidden layer relu(pooled + b1) (B, T, H) is kept for the backward.

inline float dot(const float* x, const float* y, int64_t n) {
  return at::vec::map2_reduce_all<float>([](Vec p, Vec q) { return p * q; }, [](Vec p, Vec q) { return p + q; }, x, y, n);
}

void check_head(const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& beta, int64_t H) {
  for (const at::Tensor* t : {&b1, &w2, &b2, &beta}) check_float_cpu(*t);
  const int64_t K = w2.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == H && b1.numel() == H && b2.numel() == K && beta.numel() == K
              && K <= kMaxActivations,
              "polyglu native kernels: routing head shapes disagree (b1 (H), w2 (K, H), b2 (K), beta (K))");
}

// proj (B, T, H) float32 or bfloat16, positions (B, T) int64 or None -> (dynamic (B, T, K), hidden (B, T, H)), float32
std::tuple<at::Tensor, at::Tensor> routing_head(const at::Tensor& proj, const std::optional<at::Tensor>& positions,
                                                const at::Tensor& b1_in, const at::Tensor& w2_in,
                                                const at::Tensor& b2_in, const at::Tensor& beta_in) {
  at::Tensor hidden = causal_pool(proj, positions);  // the pooled mean, turned into the hidden layer in place
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  check_head(b1_in, w2_in, b2_in, beta_in, H);
  const at::Tensor b1 = b1_in.contiguous(), w2 = w2_in.contiguous(), b2 = b2_in.contiguous(), beta = beta_in.contiguous();
  const int64_t K = w2.size(0);
  at::Tensor dynamic = at::empty({B, T, K}, hidden.options());
  float* hp = hidden.data_ptr<float>();
  float* dp = dynamic.data_ptr<float>();
  const float *b1p = b1.data_ptr<float>(), *w2p = w2.data_ptr<float>(), *b2p = b2.data_ptr<float>(),
              *betap = beta.data_ptr<float>();
  parallel_rows(B * T, 256, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
      float* h = hp + r * H;
      for (int64_t j = 0; j < H; ++j) h[j] = std::max(h[j] + b1p[j], 0.f);
      for (int64_t k = 0; k < K; ++k) dp[r * K + k] = betap[k] * (dot(w2p + k * H, h, H) + b2p[k]);
    }
  });
  return {dynamic, hidden};
}

// grad (B, T, K) float32, hidden (B, T, H) from `routing_head` -> (d proj (B, T, H) float32, d b1 (H),
// d w2 (K, H), d b2 (K), d beta (K))
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_head_backward(
    const at::Tensor& grad_in, const at::Tensor& hidden, const std::optional<at::Tensor>& positions,
    const at::Tensor& w2_in, const at::Tensor& b2_in, const at::Tensor& beta_in) {
  check_float_cpu(grad_in);
  check_float_cpu(hidden);
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2), K = w2_in.size(0);
  TORCH_CHECK(hidden.is_contiguous() && grad_in.dim() == 3 && grad_in.size(0) == B && grad_in.size(1) == T
              && grad_in.size(2) == K, "polyglu native kernels: the routing head's gradient must be (B, T, K)");
  const at::Tensor grad = grad_in.contiguous(), w2 = w2_in.contiguous(), b2 = b2_in.contiguous(), beta = beta_in.contiguous();
  const float *gp = grad.data_ptr<float>(), *hp = hidden.data_ptr<float>(), *w2p = w2.data_ptr<float>(),
              *b2p = b2.data_ptr<float>(), *betap = beta.data_ptr<float>();
  at::Tensor d_pre = at::empty({B, T, H}, hidden.options());
  float* dpre = d_pre.data_ptr<float>();
  const int64_t threads = max_tasks(), width = H + K * H + 2 * K;  // d b1, d w2, d b2, d beta
  std::vector<float> partial(threads * width, 0.f);
  parallel_rows(B * T, 256, [&](int64_t begin, int64_t end, int64_t task) {
    float* acc = partial.data() + task * width;
    float *d_b1 = acc, *d_w2 = acc + H, *d_b2 = acc + H + K * H, *d_beta = d_b2 + K;
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict h = hp + r * H;
      float* __restrict d = dpre + r * H;
      std::fill(d, d + H, 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const float g = gp[r * K + k];
        d_beta[k] += g * (dot(w2p + k * H, h, H) + b2p[k]);
        const float d_out = g * betap[k];
        d_b2[k] += d_out;
        float* __restrict dw = d_w2 + k * H;
        const float* __restrict w = w2p + k * H;
        for (int64_t j = 0; j < H; ++j) {
          dw[j] += d_out * h[j];
          d[j] += w[j] * d_out;
        }
      }
      for (int64_t j = 0; j < H; ++j) {
        d[j] = h[j] > 0.f ? d[j] : 0.f;
        d_b1[j] += d[j];
      }
    }
  });
  at::Tensor sums = at::zeros({width}, hidden.options());
  float* sp = sums.data_ptr<float>();
  for (int64_t i = 0; i < threads; ++i)
    for (int64_t j = 0; j < width; ++j) sp[j] += partial[i * width + j];
  at::Tensor d_proj = causal_pool_backward(d_pre, positions);
  return {d_proj, sums.slice(0, 0, H).clone(), sums.slice(0, H, H + K * H).view({K, H}).clone(),
          sums.slice(0, H + K * H, H + K * H + K).clone(), sums.slice(0, H + K * H + K, width).clone()};
}

// ---------------------------------------------------------------------------------------------
// PolyGLU's CPU training call from one projection gp = x [W_gate; W1]^T (B, T, F + H): the routing
// head on gp's last H columns, the mix on its first F (polyglu/model/fused_native.py
// `projected_mix`, which says where it applies), as one autograd function in C++. The same calls
// as the Python autograd.Function it replaces, without its Python each way (saving and unpacking
// ten tensors, an autocast guard, the argument plumbing): its backward node took 2.38 ms a layer
// where the Python one took 2.70 (bf16, the demo's shape, one thread, inside real steps).
// Its backward writes d gate and d proj into one buffer, the gradient of that projection.
class ProjectedMix : public torch::autograd::Function<ProjectedMix> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gp, const at::Tensor& up,
                            const at::Tensor& alpha_in, const at::Tensor& b1, const at::Tensor& w2,
                            const at::Tensor& b2, const at::Tensor& beta,
                            const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& noise_in,
                            double tau, at::IntArrayRef activations) {
    const int64_t F = up.size(-1);
    TORCH_CHECK(gp.dim() == 3 && up.dim() == 3 && gp.size(-1) > F,
                "polyglu native kernels: projected_mix takes gp (B, T, F + H) and up (B, T, F)");
    auto [dynamic, hidden] = routing_head(gp.narrow(-1, F, gp.size(-1) - F), positions, b1, w2, b2, beta);
    const at::Tensor alpha = alpha_in.to(at::kFloat);
    const at::Tensor noise = noise_in.has_value() && noise_in->defined() ? noise_in->to(at::kFloat) : at::Tensor();
    at::Tensor h = mix_forward(gp.narrow(-1, 0, F), up, alpha, dynamic, noise, tau, activations);
    if (ctx != nullptr) {
      const at::Tensor pos = positions.has_value() ? *positions : at::Tensor();
      ctx->save_for_backward({gp, up, alpha, dynamic, noise, hidden, pos, w2, b2, beta});
      ctx->saved_data["tau"] = tau;
      ctx->saved_data["activations"] = activations.vec();
      ctx->saved_data["dtypes"] = std::vector<int64_t>{static_cast<int64_t>(b1.scalar_type()),
                                                       static_cast<int64_t>(w2.scalar_type()),
                                                       static_cast<int64_t>(b2.scalar_type()),
                                                       static_cast<int64_t>(beta.scalar_type())};
    }
    return h;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "polyglu native kernels: projected_mix is differentiable once (no create_graph)");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &gp = saved[0], &up = saved[1], &alpha = saved[2], &dynamic = saved[3], &noise = saved[4],
                     &hidden = saved[5], &positions = saved[6], &w2 = saved[7], &b2 = saved[8], &beta = saved[9];
    const double tau = ctx->saved_data["tau"].toDouble();
    const std::vector<int64_t> activations = ctx->saved_data["activations"].toIntVector();
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    const int64_t F = up.size(-1);
    const at::Tensor grad = grads[0].scalar_type() == gp.scalar_type() ? grads[0] : grads[0].to(gp.scalar_type());
    at::Tensor d_gp = at::empty(gp.sizes(), gp.options().memory_format(at::MemoryFormat::Contiguous));
    auto [unused, d_up, d_alpha, d_dynamic] = mix_backward(
        grad, gp.narrow(-1, 0, F), up, alpha, dynamic, noise.defined() ? std::optional<at::Tensor>(noise) : std::nullopt,
        tau, activations, true, std::optional<at::Tensor>(d_gp.narrow(-1, 0, F)));
    auto [d_proj, d_b1, d_w2, d_b2, d_beta] = routing_head_backward(
        d_dynamic, hidden, positions.defined() ? std::optional<at::Tensor>(positions) : std::nullopt, w2, b2, beta);
    d_gp.narrow(-1, F, gp.size(-1) - F).copy_(d_proj);
    const auto as = [&](const at::Tensor& g, int i) { return g.to(static_cast<at::ScalarType>(dtypes[i])); };
    return {d_gp, d_up, d_alpha, as(d_b1, 0), as(d_w2, 1), as(d_b2, 2), as(d_beta, 3),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor projected_mix(const at::Tensor& gp, const at::Tensor& up, const at::Tensor& alpha, const at::Tensor& b1,
                         const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& beta,
                         const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& noise,
                         double tau, at::IntArrayRef activations) {
  return ProjectedMix::apply(gp, up, alpha, b1, w2, b2, beta, positions, noise, tau, activations);
}

// Below autograd (no input needs a gradient): the forward alone, nothing saved
at::Tensor projected_mix_forward_only(const at::Tensor& gp, const at::Tensor& up, const at::Tensor& alpha,
                                      const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                      const at::Tensor& beta, const std::optional<at::Tensor>& positions,
                                      const std::optional<at::Tensor>& noise, double tau, at::IntArrayRef activations) {
  return ProjectedMix::forward(nullptr, gp, up, alpha, b1, w2, b2, beta, positions, noise, tau, activations);
}
}  // namespace

// How `parallel_rows` runs its ranges: "openmp" (torch's OpenMP threads), "torch" (torch's native
// pool), "threads" (threads of its own: torch uses OpenMP, but its runtime was not found).
std::string threading() {
  if (openmp().parallel != nullptr) return "openmp";
  return AT_PARALLEL_OPENMP ? "threads" : "torch";
}

TORCH_LIBRARY(polyglu_cpu, m) {
  m.def("threading() -> str", &threading);
  m.def("mixed_activation(Tensor gate, Tensor up, Tensor alpha, Tensor dynamic, float tau, int[] activations) -> Tensor");
  m.def("decode_hidden(Tensor x, Tensor gate, Tensor up, Tensor w1, Tensor b1, Tensor(a!) total, Tensor keep, Tensor count, Tensor w2, Tensor b2, Tensor beta, Tensor alpha, Tensor tau, int[] activations) -> Tensor");
  m.impl("mixed_activation", c10::DispatchKey::CPU, &mixed_activation);
  m.impl("decode_hidden", c10::DispatchKey::CPU, &decode_hidden);
  m.def("mix_forward(Tensor gate, Tensor up, Tensor alpha, Tensor dynamic, Tensor? noise, float tau, int[] activations) -> Tensor");
  m.def("mix_backward(Tensor grad, Tensor gate, Tensor up, Tensor alpha, Tensor dynamic, Tensor? noise, float tau, int[] activations, bool routing_grads, Tensor(a!)? d_gate_out=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.impl("mix_forward", c10::DispatchKey::CPU, &mix_forward);
  m.impl("mix_backward", c10::DispatchKey::CPU, &mix_backward);
  m.def("causal_pool(Tensor proj, Tensor? positions) -> Tensor");
  m.def("causal_pool_backward(Tensor grad, Tensor? positions) -> Tensor");
  m.impl("causal_pool", c10::DispatchKey::CPU, &causal_pool);
  m.impl("causal_pool_backward", c10::DispatchKey::CPU, &causal_pool_backward);
  m.def("routing_head(Tensor proj, Tensor? positions, Tensor b1, Tensor w2, Tensor b2, Tensor beta) -> (Tensor, Tensor)");
  m.def("routing_head_backward(Tensor grad, Tensor hidden, Tensor? positions, Tensor w2, Tensor b2, Tensor beta) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.impl("routing_head", c10::DispatchKey::CPU, &routing_head);
  m.impl("routing_head_backward", c10::DispatchKey::CPU, &routing_head_backward);
  m.def("projected_mix(Tensor gp, Tensor up, Tensor alpha, Tensor b1, Tensor w2, Tensor b2, Tensor beta, Tensor? positions, Tensor? noise, float tau, int[] activations) -> Tensor");
  m.impl("projected_mix", c10::DispatchKey::Autograd, &projected_mix);
  m.impl("projected_mix", c10::DispatchKey::CPU, &projected_mix_forward_only);
}
