// graphpress sparse-activation linear kernel: y = x_hat Wt + b, reading only the rows of Wt whose
// activation is kept.
//
// Wt = W^T is stored (in, out), row-major, contiguous, so the contribution of input i is one
// contiguous row Wt[i, :]. With x_hat[b, i] = x[b, i] if keep(b, i) else 0 and
//     keep(b, i) = |x[b, i]| * score[i] > threshold[i]      (score 1, threshold t by default)
// the product only needs the rows i that some kept entry selects: at 50% sparsity half the weight
// bytes are never read. At batch 1 a dense matrix-vector product is memory-bound (about 2 FLOP
// per 4 weight bytes), so the bytes not read are the time saved.
//
// Layout of the work
// * The selection (row indices and their x values) is built once, serially: O(B * in).
// * Threads split the *output columns*: the chunk y[:, c0:c1) is computed from the slices
//   Wt[i, c0:c1) of the selected rows i, so no two threads write the same y and each streams
//   contiguous memory. One chunk per thread, a multiple of 16 floats (64-byte lines) and at
//   least kMinColsPerThread wide, so small layers run on one thread. Threads are OpenMP's, the
//   same pool (libgomp) torch's own CPU ops use: a separate pool measured slower, its threads
//   competing with torch's spinning OpenMP workers between ops.
// * Within a slice, y is processed in tiles of at most kTileFloats values (64 KB, L1/L2
//   resident); selected rows are taken 8 at a time, so each y vector is loaded and stored once
//   per 8 weight vectors and the hardware prefetcher sees 8 sequential streams. Explicit
//   software prefetching of the next rows was measured and did not help (see
//   docs/backends/sparse-kernel.md), so there is none.
// * Batch B > 1, "union" mode: a row is read once if any batch row keeps it; each weight vector
//   loaded is used for all B rows (zero x values where a row drops it). "per_row" mode runs the
//   batch-1 loop once per batch row (reads the sum of the rows' own counts). Auto picks by a
//   measured cost model (per row at high sparsity, see sparse_linear()).
// * Weights may be stored as bfloat16 (same layout): half the bytes, widened to fp32 in
//   registers; accumulation is always fp32.
//
// Two implementations of the inner update: AVX-512 intrinsics (when the compiler targets
// AVX-512F, i.e. -march=native on such a CPU) and portable loops the compiler vectorizes for
// whatever the target has. Both are compiled; `simd=false` selects the portable one (tests
// check both). No -ffast-math: the only reordering is the summation order of a dot product.

#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define GP_AVX512 1
#else
#define GP_AVX512 0
#endif

namespace {

constexpr int64_t kTileFloats = 16384;       // B * tile columns of y per thread tile (64 KB)
constexpr int64_t kMaxTileCols = 4096;
constexpr int64_t kMinTileCols = 256;
constexpr int64_t kMinColsPerThread = 256;   // below this a thread's slice is not worth a fork

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;  // bfloat16 is the high half of a float32
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Selected rows: idx[k] is a row of Wt, val[k * B + b] the kept x value of batch row b (0 if dropped).
struct Selection {
  std::vector<int32_t> idx;
  std::vector<float> val;
};

// y[b, c0:c1] += sum_g a[g * B + b] * rows[g][c0:c1]; ldy is the stride between batch rows of y.
template <typename W, int G>
void update_portable(float* y, int64_t ldy, int B, const W* const* rows, const float* a, int64_t c0, int64_t c1) {
  for (int b = 0; b < B; ++b) {
    float* __restrict yb = y + b * ldy;
    float ab[G];
    for (int g = 0; g < G; ++g) ab[g] = a[g * B + b];
    for (int64_t j = c0; j < c1; ++j) {
      float s = yb[j];
      for (int g = 0; g < G; ++g) s += ab[g] * widen(rows[g][j]);
      yb[j] = s;
    }
  }
}

#if GP_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename W, int G>
void update_avx512(float* y, int64_t ldy, int B, const W* const* rows, const float* a, int64_t c0, int64_t c1) {
  int64_t j = c0;
  if (B == 1) {
    __m512 av[G];
    for (int g = 0; g < G; ++g) av[g] = _mm512_set1_ps(a[g]);
    for (; j + 16 <= c1; j += 16) {
      __m512 acc = _mm512_loadu_ps(y + j);
      for (int g = 0; g < G; ++g) acc = _mm512_fmadd_ps(av[g], load16(rows[g] + j), acc);
      _mm512_storeu_ps(y + j, acc);
    }
  } else {
    // each weight vector is loaded once and used for every batch row
    for (; j + 16 <= c1; j += 16) {
      __m512 w[G];
      for (int g = 0; g < G; ++g) w[g] = load16(rows[g] + j);
      for (int b = 0; b < B; ++b) {
        float* yb = y + b * ldy + j;
        __m512 acc = _mm512_loadu_ps(yb);
        for (int g = 0; g < G; ++g) acc = _mm512_fmadd_ps(_mm512_set1_ps(a[g * B + b]), w[g], acc);
        _mm512_storeu_ps(yb, acc);
      }
    }
  }
  if (j < c1) update_portable<W, G>(y, ldy, B, rows, a, j, c1);  // the last < 16 columns
}
#endif

template <typename W, int G>
int64_t run_groups(const Selection& s, int64_t k, int B, const W* wt, int64_t out, float* y, int64_t ldy, int64_t c0,
                   int64_t c1, bool simd) {
  const int64_t nnz = static_cast<int64_t>(s.idx.size());
  const W* rows[G];
  for (; k + G <= nnz; k += G) {
    for (int g = 0; g < G; ++g) rows[g] = wt + int64_t(s.idx[k + g]) * out;
    const float* a = s.val.data() + k * B;
#if GP_AVX512
    if (simd) {
      update_avx512<W, G>(y, ldy, B, rows, a, c0, c1);
      continue;
    }
#endif
    update_portable<W, G>(y, ldy, B, rows, a, c0, c1);
  }
  return k;
}

// y[:, c0:c1] += x_hat[:, sel] Wt[sel, c0:c1], tile by tile.
template <typename W>
void accumulate(const Selection& s, int B, const W* wt, int64_t out, float* y, int64_t ldy, int64_t c0, int64_t c1,
                bool simd) {
  const int64_t tile = std::clamp<int64_t>(kTileFloats / B / 16 * 16, kMinTileCols, kMaxTileCols);
  for (int64_t t0 = c0; t0 < c1; t0 += tile) {
    const int64_t t1 = std::min(c1, t0 + tile);
    int64_t k = run_groups<W, 8>(s, 0, B, wt, out, y, ldy, t0, t1, simd);
    k = run_groups<W, 4>(s, k, B, wt, out, y, ldy, t0, t1, simd);
    run_groups<W, 1>(s, k, B, wt, out, y, ldy, t0, t1, simd);
  }
}

template <typename W>
void run(const std::vector<Selection>& sels, int B, bool union_rows, const W* wt, int64_t out, const float* bias,
         float* y, int64_t num_threads, bool simd) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads, out / kMinColsPerThread));
  // one chunk of output columns per thread: the longest contiguous row segments stream fastest
  // (measured: 1024-column chunks 7% slower than 4096 with weights from DRAM). Dynamic
  // scheduling: a thread that starts late finds the chunk taken and leaves.
  const int64_t chunk = ((out + nt - 1) / nt + 15) / 16 * 16;
  const int64_t n_chunks = (out + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t c0 = c * chunk, c1 = std::min(out, c0 + chunk);
    for (int b = 0; b < B; ++b)
      for (int64_t j = c0; j < c1; ++j) y[b * out + j] = bias ? bias[j] : 0.f;
    if (union_rows) {
      accumulate<W>(sels[0], B, wt, out, y, out, c0, c1, simd);
    } else {
      for (int b = 0; b < B; ++b) accumulate<W>(sels[b], 1, wt, out, y + b * out, out, c0, c1, simd);
    }
  }
}

torch::Tensor sparse_linear(const torch::Tensor& x, const torch::Tensor& wt, const c10::optional<torch::Tensor>& bias,
                            double threshold, const c10::optional<torch::Tensor>& thresholds,
                            const c10::optional<torch::Tensor>& scores, int64_t num_threads, int64_t batch_mode,
                            bool simd) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "sparse_linear kernel: x must be a contiguous float32 CPU (batch, in) matrix");
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous() && wt.device().is_cpu() &&
                  (wt.scalar_type() == torch::kFloat || wt.scalar_type() == torch::kBFloat16),
              "sparse_linear kernel: wt must be a contiguous float32/bfloat16 CPU (in, out) matrix");
  TORCH_CHECK(wt.size(0) == x.size(1), "sparse_linear kernel: x has ", x.size(1), " features, wt has ", wt.size(0),
              " rows");
  const int64_t B = x.size(0), in = x.size(1), out = wt.size(1);
  TORCH_CHECK(in < (int64_t(1) << 31), "sparse_linear kernel: more than 2^31 input features");
  auto vec_ptr = [&](const c10::optional<torch::Tensor>& t, int64_t n, const char* what) -> const float* {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->numel() == n,
                "sparse_linear kernel: ", what, " must be a contiguous float32 vector of ", n, " values");
    return t->data_ptr<float>();
  };
  const float* bp = vec_ptr(bias, out, "bias");
  const float* tp = vec_ptr(thresholds, in, "thresholds");
  const float* sp = vec_ptr(scores, in, "scores");
  const float thr = static_cast<float>(threshold);  // torch compares a float32 tensor with the scalar in float32
  const float* xp = x.data_ptr<float>();

  // keep(b, i): |x| * score > threshold; NaN entries are dropped (the comparison is false)
  std::vector<uint8_t> keep(static_cast<size_t>(B * in));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < in; ++i) {
      float v = std::fabs(xp[b * in + i]);
      if (sp) v *= sp[i];
      keep[b * in + i] = v > (tp ? tp[i] : thr);
    }

  // batch_mode 1: union, 2: per row, 0 (auto): a cost model in units of one row's memory time.
  // The union reads U rows, each costing 1 + B/8 (B multiply-adds per weight, most on zeros at
  // high sparsity, and B y-tile updates); per row reads S = sum of the rows' own counts at 1 + 1/8
  // each. Per row iff 9 S < (8 + B) U. Fitted at 4096^2: per row wins at S/U = 1.16 (B = 4) and
  // 1.96 (B = 16), the union at 1.58 and 2.13 (B = 4) and 4.8 (B = 16).
  bool union_rows = B == 1 || batch_mode == 1;
  if (B > 1 && batch_mode == 0) {
    int64_t total = 0, any_rows = 0;
    for (int64_t i = 0; i < in; ++i) {
      int64_t k = 0;
      for (int64_t b = 0; b < B; ++b) k += keep[b * in + i];
      total += k;
      any_rows += k > 0;
    }
    union_rows = 9 * total >= (8 + B) * any_rows;
  }

  std::vector<Selection> sels(union_rows ? 1 : B);
  if (union_rows) {
    Selection& s = sels[0];
    for (int64_t i = 0; i < in; ++i) {
      bool any = false;
      for (int64_t b = 0; b < B && !any; ++b) any = keep[b * in + i];
      if (!any) continue;
      s.idx.push_back(static_cast<int32_t>(i));
      for (int64_t b = 0; b < B; ++b) s.val.push_back(keep[b * in + i] ? xp[b * in + i] : 0.f);
    }
  } else {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < in; ++i)
        if (keep[b * in + i]) {
          sels[b].idx.push_back(static_cast<int32_t>(i));
          sels[b].val.push_back(xp[b * in + i]);
        }
  }

  auto y = torch::empty({B, out}, x.options());
  float* yp = y.data_ptr<float>();
  const int nb = static_cast<int>(B);
  if (wt.scalar_type() == torch::kFloat) {
    run<float>(sels, nb, union_rows, wt.data_ptr<float>(), out, bp, yp, num_threads, simd);
  } else {
    run<uint16_t>(sels, nb, union_rows, reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>()), out, bp, yp,
                  num_threads, simd);
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_linear", &sparse_linear, "y = x_hat Wt + b reading only the kept rows of Wt (in, out)",
        pybind11::arg("x"), pybind11::arg("wt"), pybind11::arg("bias"), pybind11::arg("threshold"),
        pybind11::arg("thresholds"), pybind11::arg("scores"), pybind11::arg("num_threads"), pybind11::arg("batch_mode"),
        pybind11::arg("simd"));
  m.attr("AVX512") = pybind11::bool_(GP_AVX512);
}
