// vhack_cpp::project_ : the fused projection of vhack.ops.project_ for CPU tensors.
//
// One parallel pass over the packed gradient: every module m (its slice g = grad[offsets[m]:
// offsets[m+1]] of length r, and the first ks[m] rows V [k, r] of its row-major block at
// basis[basis_offsets[m]:]) is handled by one task, largest modules first, pulled from a shared
// counter by the workers of torch's intra-op thread pool (dynamic scheduling: one r = 9728 module
// and many r = 64 modules balance). Per module, with c = V g (accumulated in float32, float64
// for float64 gradients):
//   hackward  g' = g - alpha V^T relu(c)     both  g' = g - alpha V^T c
//   reverse   g' = g - 2 alpha V^T c         measure  g' = g
// g is written back in place; stats [M, 4] float32 (allocated by the caller, so tests can poison
// it) gets, per module, |c|, |relu(c)|, |g|, |g'| (|g'| measured on the values
// written, before rounding to the gradient's dtype). Modules with k = 0, or whose |g| or c is not
// finite, are left untouched (stats[m, 3] = |g|). preserve_magnitude rescales g' to |g|
// (unless |g'| <= 1e-5 |g|).
//
// The module's gradient is staged in a small per-worker buffer (r values, L1/L2-resident), so V is
// streamed from memory twice per module at most (coefficients, then apply; rows with phi = 0 are
// skipped in the apply) and g is read and written once. The two phases are separate functions so
// that a sharded projection (partial coefficients, all-reduce, apply) can reuse them.
//
// Registered with torch.library under the namespace "vhack_cpp" (Python custom ops live under
// "vhack"); importing vhack._C loads this library and registers the op.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

// The hot loops are written once as always-inline templates; the float32 entry points are compiled
// twice with GCC/clang function multi-versioning (an AVX2+FMA clone and a baseline clone, picked
// at load time by the CPU), so one portable binary runs at full vector width on current x86.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define VHACK_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VHACK_CLONES
#endif
#if defined(__GNUC__)
#define VHACK_INLINE __attribute__((always_inline)) inline
#else
#define VHACK_INLINE inline
#endif

namespace vhack_cpp {
namespace {

enum class Mode { kHackward, kBoth, kReverse, kMeasure };

Mode parse_mode(const std::string& mode) {
  if (mode == "hackward") return Mode::kHackward;
  if (mode == "both") return Mode::kBoth;
  if (mode == "reverse") return Mode::kReverse;
  if (mode == "measure") return Mode::kMeasure;
  TORCH_CHECK_VALUE(false, "mode must be one of hackward, both, reverse, measure; got '", mode, "'");
}

// c[j] = V_j . g for j < k, four rows at a time (four independent vector accumulators).
template <typename acc_t, typename v_t>
VHACK_INLINE void coefficients(const acc_t* g, const v_t* V, int64_t r, int64_t k, acc_t* c) {
  int64_t j = 0;
  for (; j + 4 <= k; j += 4) {
    const v_t* v0 = V + j * r;
    const v_t* v1 = v0 + r;
    const v_t* v2 = v1 + r;
    const v_t* v3 = v2 + r;
    acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t i = 0; i < r; ++i) {
      const acc_t gi = g[i];
      a0 += static_cast<acc_t>(v0[i]) * gi;
      a1 += static_cast<acc_t>(v1[i]) * gi;
      a2 += static_cast<acc_t>(v2[i]) * gi;
      a3 += static_cast<acc_t>(v3[i]) * gi;
    }
    c[j] = a0;
    c[j + 1] = a1;
    c[j + 2] = a2;
    c[j + 3] = a3;
  }
  for (; j < k; ++j) {
    const v_t* v0 = V + j * r;
    acc_t a0 = 0;
#pragma omp simd reduction(+ : a0)
    for (int64_t i = 0; i < r; ++i) a0 += static_cast<acc_t>(v0[i]) * g[i];
    c[j] = a0;
  }
}

// g -= sum_j phi[j] V_j, four rows at a time; rows with phi = 0 are not read. rows: scratch [k].
template <typename acc_t, typename v_t>
VHACK_INLINE void apply(acc_t* g, const v_t* V, int64_t r, int64_t k, const acc_t* phi,
                        int64_t* rows) {
  int64_t n_rows = 0;
  for (int64_t j = 0; j < k; ++j)
    if (phi[j] != 0) rows[n_rows++] = j;
  int64_t j = 0;
  for (; j + 4 <= n_rows; j += 4) {
    const v_t* v0 = V + rows[j] * r;
    const v_t* v1 = V + rows[j + 1] * r;
    const v_t* v2 = V + rows[j + 2] * r;
    const v_t* v3 = V + rows[j + 3] * r;
    const acc_t p0 = phi[rows[j]], p1 = phi[rows[j + 1]];
    const acc_t p2 = phi[rows[j + 2]], p3 = phi[rows[j + 3]];
#pragma omp simd
    for (int64_t i = 0; i < r; ++i)
      g[i] -= p0 * static_cast<acc_t>(v0[i]) + p1 * static_cast<acc_t>(v1[i]) +
              p2 * static_cast<acc_t>(v2[i]) + p3 * static_cast<acc_t>(v3[i]);
  }
  for (; j < n_rows; ++j) {
    const v_t* v0 = V + rows[j] * r;
    const acc_t p0 = phi[rows[j]];
#pragma omp simd
    for (int64_t i = 0; i < r; ++i) g[i] -= p0 * static_cast<acc_t>(v0[i]);
  }
}

template <typename acc_t>
VHACK_INLINE acc_t sum_squares(const acc_t* x, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}

// Project one module in place and write its four statistics. buf: scratch [r]; c, rows: [k].
template <typename g_t, typename v_t, typename acc_t>
VHACK_INLINE void project_module(g_t* grad, const v_t* V, int64_t r, int64_t k, Mode mode,
                                 acc_t alpha, bool preserve_magnitude, acc_t* buf, acc_t* c,
                                 int64_t* rows, float* stats) {
  for (int64_t i = 0; i < r; ++i) buf[i] = static_cast<acc_t>(grad[i]);
  const acc_t gsq = sum_squares(buf, r);
  coefficients(buf, V, r, k, c);
  acc_t csq = 0, rsq = 0;
  for (int64_t j = 0; j < k; ++j) {
    csq += c[j] * c[j];
    rsq += c[j] < 0 ? acc_t(0) : c[j] * c[j];  // relu keeps a NaN, as torch.relu does
  }
  const acc_t norm_before = std::sqrt(gsq);
  stats[0] = static_cast<float>(std::sqrt(csq));
  stats[1] = static_cast<float>(std::sqrt(rsq));
  stats[2] = static_cast<float>(norm_before);
  if (mode == Mode::kMeasure || k == 0 || !std::isfinite(gsq) || !std::isfinite(csq)) {
    stats[3] = static_cast<float>(norm_before);
    return;
  }
  // phi overwrites c: coefficients are not needed once phi is known.
  for (int64_t j = 0; j < k; ++j) {
    const acc_t cj = c[j];
    c[j] = alpha * (mode == Mode::kHackward ? (cj > 0 ? cj : acc_t(0))
                    : mode == Mode::kBoth   ? cj
                                            : acc_t(2) * cj);
  }
  apply(buf, V, r, k, c, rows);
  acc_t nsq = sum_squares(buf, r);
  // Rescale unless g lay in span(V) up to rounding (|g'| <= 1e-5 |g|, PRESERVE_MIN_RATIO of
  // vhack.reference): stretching that residue to |g| would only amplify rounding noise.
  if (preserve_magnitude && nsq > acc_t(1e-10) * gsq) {
    const acc_t scale = norm_before / std::sqrt(nsq);
    for (int64_t i = 0; i < r; ++i) buf[i] *= scale;
    nsq = sum_squares(buf, r);
  }
  for (int64_t i = 0; i < r; ++i) grad[i] = static_cast<g_t>(buf[i]);
  stats[3] = static_cast<float>(std::sqrt(nsq));
}

// Multi-versioned entry points for a float32 basis (the packed layout of vhack): one per gradient
// dtype, each the template above compiled for the clone's instruction set.
#define VHACK_FLOAT_ENTRY(G)                                                                   \
  VHACK_CLONES void project_module_f32(G* grad, const float* V, int64_t r, int64_t k, Mode mode, \
                                       float alpha, bool preserve, float* buf, float* c,       \
                                       int64_t* rows, float* stats) {                          \
    project_module<G, float, float>(grad, V, r, k, mode, alpha, preserve, buf, c, rows, stats); \
  }
VHACK_FLOAT_ENTRY(float)
VHACK_FLOAT_ENTRY(c10::BFloat16)
VHACK_FLOAT_ENTRY(c10::Half)
#undef VHACK_FLOAT_ENTRY

template <typename g_t, typename v_t, typename acc_t>
void project_one(g_t* grad, const v_t* V, int64_t r, int64_t k, Mode mode, acc_t alpha,
                 bool preserve, acc_t* buf, acc_t* c, int64_t* rows, float* stats) {
  if constexpr (std::is_same_v<v_t, float> && std::is_same_v<acc_t, float>) {
    project_module_f32(grad, V, r, k, mode, alpha, preserve, buf, c, rows, stats);
  } else {
    project_module<g_t, v_t, acc_t>(grad, V, r, k, mode, alpha, preserve, buf, c, rows, stats);
  }
}

void check_index(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == n, name, " must be 1-D with ", n,
                    " entries, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
}

}  // namespace

void project_cpu(at::Tensor grad, const at::Tensor& offsets, const at::Tensor& basis,
                 const at::Tensor& basis_offsets, const at::Tensor& ks, at::Tensor stats,
                 const std::string& mode_name, double alpha, bool preserve_magnitude) {
  const Mode mode = parse_mode(mode_name);
  TORCH_CHECK_VALUE(grad.device().is_cpu() && basis.device().is_cpu(),
                    "vhack_cpp::project_ takes CPU tensors");
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.is_contiguous(), "grad must be 1-D and contiguous");
  TORCH_CHECK_VALUE(basis.dim() == 1 && basis.is_contiguous(), "basis must be 1-D and contiguous");
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), "grad must be a float tensor");
  TORCH_CHECK_TYPE(basis.scalar_type() == at::kFloat || basis.scalar_type() == at::kDouble,
                   "basis must be float32 or float64, got ", basis.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1, "offsets must be [M + 1]");
  const int64_t M = offsets.numel() - 1;
  check_index(offsets, "offsets", M + 1);
  check_index(basis_offsets, "basis_offsets", M + 1);
  check_index(ks, "ks", M);
  const at::Tensor off_c = offsets.contiguous(), boff_c = basis_offsets.contiguous();
  const at::Tensor ks_c = ks.contiguous();
  const int64_t* off = off_c.data_ptr<int64_t>();
  const int64_t* boff = boff_c.data_ptr<int64_t>();
  const int64_t* kk = ks_c.data_ptr<int64_t>();

  // Layout checks (host reads of CPU tensors: free) and the largest-first order.
  std::vector<int64_t> order(M), cost(M);
  int64_t max_r = 0, max_k = 0;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r = off[m + 1] - off[m];
    TORCH_CHECK_VALUE(off[m] >= 0 && r >= 0 && off[m + 1] <= grad.numel(),
                      "offsets must be nondecreasing within [0, grad.numel()]; module ", m,
                      " spans [", off[m], ", ", off[m + 1], ")");
    TORCH_CHECK_VALUE(kk[m] >= 0, "ks[", m, "] = ", kk[m], " is negative");
    TORCH_CHECK_VALUE(boff[m] >= 0 && boff[m] <= boff[m + 1] && boff[m + 1] <= basis.numel(),
                      "basis_offsets must be nondecreasing within [0, basis.numel()]");
    TORCH_CHECK_VALUE(kk[m] * r <= boff[m + 1] - boff[m], "module ", m, " uses ks = ", kk[m],
                      " rows of length ", r, " but its basis block holds only ",
                      boff[m + 1] - boff[m], " values");
    order[m] = m;
    cost[m] = (kk[m] + 2) * r;
    max_r = std::max(max_r, r);
    max_k = std::max(max_k, kk[m]);
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  const int64_t total = std::accumulate(cost.begin(), cost.end(), int64_t(0));

  TORCH_CHECK_VALUE(stats.device().is_cpu() && stats.scalar_type() == at::kFloat &&
                        stats.dim() == 2 && stats.size(0) == M && stats.size(1) == 4 &&
                        stats.is_contiguous(),
                    "stats must be a contiguous float32 CPU tensor [", M, ", 4]");
  float* st = stats.data_ptr<float>();
  // Below ~64k multiply-adds a second thread costs more than it saves.
  const int64_t workers =
      std::max<int64_t>(1, std::min<int64_t>({(int64_t)at::get_num_threads(), M,
                                              total / 65536 + 1}));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "project_", [&] {
    using g_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<g_t, double>, double, float>;
    g_t* g = grad.data_ptr<g_t>();
    auto run = [&](auto* V) {
      std::atomic<int64_t> next{0};
      auto worker = [&] {
        std::vector<acc_t> buf(std::max<int64_t>(max_r, 1)), c(std::max<int64_t>(max_k, 1));
        std::vector<int64_t> rows(std::max<int64_t>(max_k, 1));
        for (int64_t i = next++; i < M; i = next++) {
          const int64_t m = order[i];
          project_one(g + off[m], V + boff[m], off[m + 1] - off[m], kk[m], mode,
                      static_cast<acc_t>(alpha), preserve_magnitude, buf.data(), c.data(),
                      rows.data(), st + 4 * m);
        }
      };
      if (workers == 1) {
        worker();
      } else {
        at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
          for (int64_t w = begin; w < end; ++w) worker();
        });
      }
    };
    if (basis.scalar_type() == at::kDouble) {
      run(basis.data_ptr<double>());
    } else {
      run(basis.data_ptr<float>());
    }
  });
}

TORCH_LIBRARY(vhack_cpp, m) {
  m.def(
      "project_(Tensor(a!) grad, Tensor offsets, Tensor basis, Tensor basis_offsets, Tensor ks, "
      "Tensor(b!) stats, str mode, float alpha, bool preserve_magnitude) -> ()");
}

TORCH_LIBRARY_IMPL(vhack_cpp, CPU, m) { m.impl("project_", &project_cpu); }

}  // namespace vhack_cpp

// A plain Python module: importing vhack._C loads this library, whose static initialisers above
// register the op with torch.library (torch must be imported first, as vhack does).
static struct PyModuleDef vhack_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                            "vhack C++ CPU kernels (torch.ops.vhack_cpp)", -1,
                                            nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&vhack_c_module); }
