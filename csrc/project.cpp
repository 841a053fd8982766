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
// Memory passes per module: V is read from memory once (c = V g, |g|^2 in the same pass; up to 12
// rows per pass on the float32 path), then the rows with phi != 0 are read again from L1/L2 (a
// module's block is at most k x r x 4 bytes: 123 KB at k = 12, r = 2560) in the apply, which also
// computes |g'|^2 and stores g'. A float32 gradient is worked on in place; other dtypes are
// staged in a per-worker float buffer. Each worker claims its next module before finishing the
// current one and prefetches its first lines, so memory stays busy across module boundaries.
// The two phases are separate functions so that a sharded projection (partial coefficients,
// all-reduce, apply) can reuse them.
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

// The hot loops handle up to kGroup rows of V per pass over g (one vector accumulator per row:
// with 8 rows, 8 independent FMA chains keep both FMA ports busy), so k <= 8 reads g once per
// phase and k = 12 twice.
constexpr int kGroup = 8;

// c[j] = V_j . g for the N rows at v[0..N), and (when gsq != nullptr) gsq = |g|^2 in the same pass.
template <int N, typename acc_t, typename v_t>
VHACK_INLINE void dot_rows(const acc_t* g, const v_t* const* v, int64_t r, acc_t* c, acc_t* gsq) {
  static_assert(N >= 1 && N <= kGroup, "1..8 rows per pass");
  const v_t* v0 = v[0];
  const v_t* v1 = N > 1 ? v[1] : v0;
  const v_t* v2 = N > 2 ? v[2] : v0;
  const v_t* v3 = N > 3 ? v[3] : v0;
  const v_t* v4 = N > 4 ? v[4] : v0;
  const v_t* v5 = N > 5 ? v[5] : v0;
  const v_t* v6 = N > 6 ? v[6] : v0;
  const v_t* v7 = N > 7 ? v[7] : v0;
  acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0, s = 0;
  const bool with_sq = gsq != nullptr;
  if (with_sq) {
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7, s)
    for (int64_t i = 0; i < r; ++i) {
      const acc_t gi = g[i];
      s += gi * gi;
      a0 += static_cast<acc_t>(v0[i]) * gi;
      if constexpr (N > 1) a1 += static_cast<acc_t>(v1[i]) * gi;
      if constexpr (N > 2) a2 += static_cast<acc_t>(v2[i]) * gi;
      if constexpr (N > 3) a3 += static_cast<acc_t>(v3[i]) * gi;
      if constexpr (N > 4) a4 += static_cast<acc_t>(v4[i]) * gi;
      if constexpr (N > 5) a5 += static_cast<acc_t>(v5[i]) * gi;
      if constexpr (N > 6) a6 += static_cast<acc_t>(v6[i]) * gi;
      if constexpr (N > 7) a7 += static_cast<acc_t>(v7[i]) * gi;
    }
    *gsq = s;
  } else {
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
    for (int64_t i = 0; i < r; ++i) {
      const acc_t gi = g[i];
      a0 += static_cast<acc_t>(v0[i]) * gi;
      if constexpr (N > 1) a1 += static_cast<acc_t>(v1[i]) * gi;
      if constexpr (N > 2) a2 += static_cast<acc_t>(v2[i]) * gi;
      if constexpr (N > 3) a3 += static_cast<acc_t>(v3[i]) * gi;
      if constexpr (N > 4) a4 += static_cast<acc_t>(v4[i]) * gi;
      if constexpr (N > 5) a5 += static_cast<acc_t>(v5[i]) * gi;
      if constexpr (N > 6) a6 += static_cast<acc_t>(v6[i]) * gi;
      if constexpr (N > 7) a7 += static_cast<acc_t>(v7[i]) * gi;
    }
  }
  const acc_t a[kGroup] = {a0, a1, a2, a3, a4, a5, a6, a7};
  for (int j = 0; j < N; ++j) c[j] = a[j];
}

// out[i] = g[i] - sum_j p[j] v[j][i] for the N rows at v[0..N); returns |out|^2 (accumulated before
// out's rounding to out_t). out may alias g (in place).
template <int N, typename acc_t, typename v_t, typename out_t>
VHACK_INLINE acc_t axpy_rows(const acc_t* g, const v_t* const* v, const acc_t* p, int64_t r,
                             out_t* out) {
  static_assert(N >= 1 && N <= kGroup, "1..8 rows per pass");
  const v_t* v0 = v[0];
  const v_t* v1 = N > 1 ? v[1] : v0;
  const v_t* v2 = N > 2 ? v[2] : v0;
  const v_t* v3 = N > 3 ? v[3] : v0;
  const v_t* v4 = N > 4 ? v[4] : v0;
  const v_t* v5 = N > 5 ? v[5] : v0;
  const v_t* v6 = N > 6 ? v[6] : v0;
  const v_t* v7 = N > 7 ? v[7] : v0;
  const acc_t p0 = p[0], p1 = N > 1 ? p[1] : 0, p2 = N > 2 ? p[2] : 0, p3 = N > 3 ? p[3] : 0;
  const acc_t p4 = N > 4 ? p[4] : 0, p5 = N > 5 ? p[5] : 0, p6 = N > 6 ? p[6] : 0;
  const acc_t p7 = N > 7 ? p[7] : 0;
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < r; ++i) {
    acc_t d = p0 * static_cast<acc_t>(v0[i]);
    if constexpr (N > 1) d += p1 * static_cast<acc_t>(v1[i]);
    if constexpr (N > 2) d += p2 * static_cast<acc_t>(v2[i]);
    if constexpr (N > 3) d += p3 * static_cast<acc_t>(v3[i]);
    if constexpr (N > 4) d += p4 * static_cast<acc_t>(v4[i]);
    if constexpr (N > 5) d += p5 * static_cast<acc_t>(v5[i]);
    if constexpr (N > 6) d += p6 * static_cast<acc_t>(v6[i]);
    if constexpr (N > 7) d += p7 * static_cast<acc_t>(v7[i]);
    const acc_t x = g[i] - d;
    s += x * x;
    out[i] = static_cast<out_t>(x);
  }
  return s;
}

template <typename acc_t>
VHACK_INLINE acc_t sum_squares(const acc_t* x, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}

// Elements ahead of the one being read at which the lines of the same rows are prefetched
// (2 KiB per row: a few hundred ns of memory latency at this core's share of the bandwidth).
constexpr int64_t kPrefetchAhead = 512;

// Where this worker's next module starts: its basis rows and its gradient, prefetched while the
// current module is finished so that memory stays busy across module boundaries (no hardware
// prefetcher follows a jump to another module, and each one restarts at every 4 KiB page).
constexpr int kMaxStreams = 17;  // up to 16 basis rows and the gradient
struct NextModule {
  const char* start[kMaxStreams];
  int64_t elem_bytes[kMaxStreams];
  int n = 0;
  int64_t r = 0;
};

// Prefetch one cache line of every stream of `next` at element offset pos (nothing past its end).
VHACK_INLINE void prefetch_next(const NextModule* next, int64_t pos) {
#if defined(__GNUC__)
  if (next == nullptr || pos >= next->r) return;
  for (int s = 0; s < next->n; ++s) __builtin_prefetch(next->start[s] + next->elem_bytes[s] * pos);
#else
  (void)next;
  (void)pos;
#endif
}

#if defined(__GNUC__)
#define VHACK_VECTOR_PATH 1
// Eight floats as one value (GCC/clang vector extension): one AVX register in the x86-64-v3 clone,
// two SSE registers in the baseline one. Loads and stores go through memcpy: no alignment assumed.
typedef float vf8 __attribute__((vector_size(32)));
VHACK_INLINE vf8 load8(const float* p) {
  vf8 x;
  __builtin_memcpy(&x, p, sizeof(x));
  return x;
}
VHACK_INLINE float hsum8(vf8 x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}
constexpr int kGroupF32 = 12;  // 12 accumulators + g + a temporary: 14 of the 16 AVX registers

// c[j] = V_j . g for N <= 12 rows (and gsq = |g|^2 when WITH_SQ), 16 floats (a cache line per
// row) per step; lines kPrefetchAhead elements ahead are requested, and past the end of the
// rows the next module's first lines.
template <int N, bool WITH_SQ>
VHACK_INLINE void dot_rows_f32(const float* g, const float* const* v, int64_t r, float* c,
                               float* gsq, const NextModule* next) {
  static_assert(N >= 1 && N <= kGroupF32, "1..12 rows per pass");
  const float* vv[N];
#pragma GCC unroll 12
  for (int j = 0; j < N; ++j) vv[j] = v[j];
  vf8 a[N];
#pragma GCC unroll 12
  for (int j = 0; j < N; ++j) a[j] = vf8{};
  vf8 s = {};
  const int64_t ahead = kPrefetchAhead;
  int64_t i = 0;
  for (; i + 16 <= r; i += 16) {
    const int64_t pf = i + ahead;
    if (pf < r) {
#pragma GCC unroll 12
      for (int j = 0; j < N; ++j) __builtin_prefetch(vv[j] + pf);
      __builtin_prefetch(g + pf);
    } else {
      prefetch_next(next, pf - r);
    }
    const vf8 g0 = load8(g + i), g1 = load8(g + i + 8);
    if constexpr (WITH_SQ) s += g0 * g0 + g1 * g1;
#pragma GCC unroll 12
    for (int j = 0; j < N; ++j) a[j] += load8(vv[j] + i) * g0 + load8(vv[j] + i + 8) * g1;
  }
  float tail[N] = {};
  float tail_sq = 0;
  for (; i < r; ++i) {
    tail_sq += g[i] * g[i];
    for (int j = 0; j < N; ++j) tail[j] += vv[j][i] * g[i];
  }
  for (int j = 0; j < N; ++j) c[j] = hsum8(a[j]) + tail[j];
  if constexpr (WITH_SQ) *gsq = hsum8(s) + tail_sq;
}

// out = g - sum_j p[j] V_j over N <= 12 rows; returns |out|^2 (before out's rounding). out may
// alias g. While it runs (from cache), the next module's lines are requested.
template <int N, typename out_t>
VHACK_INLINE float axpy_rows_f32(const float* g, const float* const* v, const float* p,
                                 int64_t r, out_t* out, const NextModule* next) {
  static_assert(N >= 1 && N <= kGroupF32, "1..12 rows per pass");
  const float* vv[N];
  float pp[N];
#pragma GCC unroll 12
  for (int j = 0; j < N; ++j) {
    vv[j] = v[j];
    pp[j] = p[j];
  }
  vf8 s = {};
  const int64_t ahead = kPrefetchAhead;
  int64_t i = 0;
  for (; i + 8 <= r; i += 8) {
    if ((i & 15) == 0) prefetch_next(next, ahead + i);
    vf8 d = pp[0] * load8(vv[0] + i);
#pragma GCC unroll 12
    for (int j = 1; j < N; ++j) d += pp[j] * load8(vv[j] + i);
    const vf8 x = load8(g + i) - d;
    s += x * x;
    if constexpr (std::is_same_v<out_t, float>) {
      __builtin_memcpy(out + i, &x, sizeof(x));
    } else {
      for (int l = 0; l < 8; ++l) out[i + l] = static_cast<out_t>(x[l]);
    }
  }
  float tail_sq = 0;
  for (; i < r; ++i) {
    float d = 0;
    for (int j = 0; j < N; ++j) d += pp[j] * vv[j][i];
    const float x = g[i] - d;
    tail_sq += x * x;
    out[i] = static_cast<out_t>(x);
  }
  return hsum8(s) + tail_sq;
}
#endif

// Rows per pass: 12 on the float32 vector path, 8 on the generic one.
template <typename acc_t, typename v_t>
constexpr int group_size() {
#if defined(VHACK_VECTOR_PATH)
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<v_t, float>) return kGroupF32;
#endif
  return kGroup;
}

#define VHACK_CASES_8(CALL) \
  case 1: CALL(1); case 2: CALL(2); case 3: CALL(3); case 4: CALL(4); \
  case 5: CALL(5); case 6: CALL(6); case 7: CALL(7); default: CALL(8);
#define VHACK_CASES_12(CALL) \
  case 1: CALL(1); case 2: CALL(2); case 3: CALL(3); case 4: CALL(4); case 5: CALL(5); \
  case 6: CALL(6); case 7: CALL(7); case 8: CALL(8); case 9: CALL(9); case 10: CALL(10); \
  case 11: CALL(11); default: CALL(12);

// Runtime row count (1..group_size) -> the templates above. next: the module to prefetch, or null.
template <typename acc_t, typename v_t>
VHACK_INLINE void dot_group(int n, const acc_t* g, const v_t* const* v, int64_t r, acc_t* c,
                            acc_t* gsq, const NextModule* next) {
#if defined(VHACK_VECTOR_PATH)
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<v_t, float>) {
#define VHACK_DOT(N)                                                   \
  return gsq ? dot_rows_f32<N, true>(g, v, r, c, gsq, next) \
             : dot_rows_f32<N, false>(g, v, r, c, gsq, next)
    switch (n) { VHACK_CASES_12(VHACK_DOT) }
#undef VHACK_DOT
  }
#endif
  (void)next;
#define VHACK_DOT(N) return dot_rows<N>(g, v, r, c, gsq)
  switch (n) { VHACK_CASES_8(VHACK_DOT) }
#undef VHACK_DOT
}

template <typename acc_t, typename v_t, typename out_t>
VHACK_INLINE acc_t axpy_group(int n, const acc_t* g, const v_t* const* v, const acc_t* p,
                              int64_t r, out_t* out, const NextModule* next) {
#if defined(VHACK_VECTOR_PATH)
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<v_t, float>) {
#define VHACK_AXPY(N) return axpy_rows_f32<N>(g, v, p, r, out, next)
    switch (n) { VHACK_CASES_12(VHACK_AXPY) }
#undef VHACK_AXPY
  }
#endif
  (void)next;
#define VHACK_AXPY(N) return axpy_rows<N>(g, v, p, r, out)
  switch (n) { VHACK_CASES_8(VHACK_AXPY) }
#undef VHACK_AXPY
}

// c = V g for the k rows of V [k, r], group_size rows per pass; returns |g|^2, computed in the
// first pass. The last pass prefetches the start of `next`. rows: scratch [k].
template <typename acc_t, typename v_t>
VHACK_INLINE acc_t coefficients(const acc_t* g, const v_t* V, int64_t r, int64_t k, acc_t* c,
                                const v_t** rows, const NextModule* next) {
  constexpr int G = group_size<acc_t, v_t>();
  if (k == 0) return sum_squares(g, r);
  for (int64_t j = 0; j < k; ++j) rows[j] = V + j * r;
  acc_t gsq = 0;
  for (int64_t j = 0; j < k; j += G) {
    const int n = static_cast<int>(std::min<int64_t>(G, k - j));
    dot_group(n, g, rows + j, r, c + j, j == 0 ? &gsq : nullptr, j + n == k ? next : nullptr);
  }
  return gsq;
}

// Project one module in place and write its four statistics. buf: scratch [r] (unused for
// gradients already in acc_t); c, phi, rows: scratch [k].
//
// Passes over the module: (1, bf16/fp16/fp64-basis only) g -> buf; (2) c = V g and |g|^2 together,
// V streamed from memory; (3) g' = g - V^T phi over the rows with phi != 0 (V again, now from
// L1/L2: a module's block is at most k x r x 4 bytes), |g'|^2 and the store to grad fused.
template <typename g_t, typename v_t, typename acc_t>
VHACK_INLINE void project_module(g_t* grad, const v_t* V, int64_t r, int64_t k, Mode mode,
                                 acc_t alpha, bool preserve_magnitude, acc_t* buf, acc_t* c,
                                 acc_t* phi, const v_t** rows, float* stats,
                                 const NextModule* next) {
  constexpr bool in_place = std::is_same_v<g_t, acc_t>;  // work on grad itself, no staging copy
  acc_t* g;
  if constexpr (in_place) {
    g = grad;
  } else {
    for (int64_t i = 0; i < r; ++i) buf[i] = static_cast<acc_t>(grad[i]);
    g = buf;
  }
  const acc_t gsq = coefficients(g, V, r, k, c, rows, next);
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
  // The rows that move g (phi != 0; in hackward mode about half of a random gradient's).
  int64_t n_rows = 0;
  for (int64_t j = 0; j < k; ++j) {
    const acc_t cj = c[j];
    const acc_t p = alpha * (mode == Mode::kHackward ? (cj > 0 ? cj : acc_t(0))
                             : mode == Mode::kBoth   ? cj
                                                     : acc_t(2) * cj);
    if (p != 0) {
      rows[n_rows] = V + j * r;
      phi[n_rows++] = p;
    }
  }
  if (n_rows == 0) {  // g' = g: nothing to write
    stats[3] = static_cast<float>(norm_before);
    return;
  }
  // All groups but the last update g in place; the last one writes g' to grad (rounded to its
  // dtype) unless preserve_magnitude still has to rescale it.
  constexpr int G = group_size<acc_t, v_t>();
  int64_t j = 0;
  for (; j + G < n_rows; j += G) axpy_group(G, g, rows + j, phi + j, r, g, nullptr);
  const int last = static_cast<int>(n_rows - j);
  acc_t nsq;
  if (!preserve_magnitude) {
    nsq = axpy_group(last, g, rows + j, phi + j, r, grad, next);
  } else {
    nsq = axpy_group(last, g, rows + j, phi + j, r, g, next);
    // Rescale unless g lay in span(V) up to rounding (|g'| <= 1e-5 |g|, PRESERVE_MIN_RATIO of
    // vhack.reference): stretching that residue to |g| would only amplify rounding noise.
    if (nsq > acc_t(1e-10) * gsq) {
      const acc_t scale = norm_before / std::sqrt(nsq);
      for (int64_t i = 0; i < r; ++i) g[i] *= scale;
      nsq = sum_squares(g, r);
    }
    if constexpr (!in_place)
      for (int64_t i = 0; i < r; ++i) grad[i] = static_cast<g_t>(g[i]);
  }
  stats[3] = static_cast<float>(std::sqrt(nsq));
}

// Multi-versioned entry points for a float32 basis (the packed layout of vhack): one per gradient
// dtype, each the template above compiled for the clone's instruction set.
#define VHACK_FLOAT_ENTRY(G)                                                                   \
  VHACK_CLONES void project_module_f32(G* grad, const float* V, int64_t r, int64_t k, Mode mode, \
                                       float alpha, bool preserve, float* buf, float* c,       \
                                       float* phi, const float** rows, float* stats,           \
                                       const NextModule* next) {                               \
    project_module<G, float, float>(grad, V, r, k, mode, alpha, preserve, buf, c, phi, rows,   \
                                    stats, next);                                              \
  }
VHACK_FLOAT_ENTRY(float)
VHACK_FLOAT_ENTRY(c10::BFloat16)
VHACK_FLOAT_ENTRY(c10::Half)
#undef VHACK_FLOAT_ENTRY

template <typename g_t, typename v_t, typename acc_t>
void project_one(g_t* grad, const v_t* V, int64_t r, int64_t k, Mode mode, acc_t alpha,
                 bool preserve, acc_t* buf, acc_t* c, acc_t* phi, const v_t** rows,
                 float* stats, const NextModule* next) {
  if constexpr (std::is_same_v<v_t, float> && std::is_same_v<acc_t, float>) {
    project_module_f32(grad, V, r, k, mode, alpha, preserve, buf, c, phi, rows, stats, next);
  } else {
    project_module<g_t, v_t, acc_t>(grad, V, r, k, mode, alpha, preserve, buf, c, phi, rows,
                                    stats, next);
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
        using v_t = std::remove_cv_t<std::remove_pointer_t<decltype(V)>>;
        // No staging buffer for gradients already in acc_t (worked on in place).
        std::vector<acc_t> buf(std::is_same_v<g_t, acc_t> ? 1 : std::max<int64_t>(max_r, 1));
        std::vector<acc_t> c(std::max<int64_t>(max_k, 1)), phi(std::max<int64_t>(max_k, 1));
        std::vector<const v_t*> rows(std::max<int64_t>(max_k, 1));
        // Each worker claims its next module before finishing the current one, so that the
        // current one's last pass can prefetch it.
        NextModule ahead;
        int64_t i = next++;
        while (i < M) {
          const int64_t i_next = next++;
          const NextModule* pf = nullptr;
          if (i_next < M) {
            const int64_t m = order[i_next];
            ahead.r = off[m + 1] - off[m];
            ahead.n = 0;
            ahead.start[ahead.n] = reinterpret_cast<const char*>(g + off[m]);
            ahead.elem_bytes[ahead.n++] = sizeof(g_t);
            for (int64_t j = 0; j < kk[m] && ahead.n < kMaxStreams; ++j) {
              ahead.start[ahead.n] = reinterpret_cast<const char*>(V + boff[m] + j * ahead.r);
              ahead.elem_bytes[ahead.n++] = sizeof(*V);
            }
            pf = &ahead;
          }
          const int64_t m = order[i];
          project_one(g + off[m], V + boff[m], off[m + 1] - off[m], kk[m], mode,
                      static_cast<acc_t>(alpha), preserve_magnitude, buf.data(), c.data(),
                      phi.data(), rows.data(), st + 4 * m, pf);
          i = i_next;
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
