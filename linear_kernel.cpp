// y = x W^T for a few rows of x, reading each weight once, with every row's bits independent of the other rows.
//
// x (M, K) and W (N, K), each float32 or bfloat16; y (M, N) in x's dtype; the sums in float32.
//
// Row invariance, by construction: each output element y[m, n] is one chain of vector multiply-adds over k (KV
// elements a step: 8 on AVX2, 16 on AVX-512, 32 pairs-summed with AVX-512 BF16's dot products), the tail of K
// (K mod KV) loaded with zeros past K and taken as one more step, and the lanes then summed by one fixed tree. That
// sequence depends on x's row m, W's row n and K only: not on M, not on which rows share the call, not on the tile an
// element falls in or on how the outputs are split across threads. So a token's logits get the same bits decoded
// alone or among the rows of a verify, without padding a row to two.
//
// The weights are streamed once per call (up to MAX_ROWS rows of x): each row of W (each few rows, past ONE_TILE rows
// of x) is multiplied against every row of x while it sits in L1 (linear_kernel_tiles.h), the bytes ahead prefetched.
// OpenMP splits the outputs across threads in panels of PANEL rows of W (torch's own OpenMP runtime: the extension
// links the same libgomp). The instruction set is chosen at run time: AVX-512 BF16 for bfloat16 x and W where the
// CPU has it, else AVX-512, else AVX2 + FMA.
#include <torch/extension.h>

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define LK_X86 1
#else
#define LK_X86 0
#endif

namespace {

constexpr int64_t MAX_ROWS = 64;  // rows of x per sweep over the weights (more rows: another sweep)
constexpr int64_t PANEL = 16;     // rows of W per panel: a thread's unit of work
constexpr int64_t PARALLEL_WORK = 1 << 16;  // multiply-adds below which one thread does it all (no fork and join)
constexpr int64_t PREFETCH = 8192;  // bytes of W ahead of the tiles that each tile asks into L2 (below)

// A panel: outputs n0..n0+rows-1 of all M rows of x (the kernel's x: float32, or bfloat16 for the dot-product
// path), their float sums into out (M, PANEL).
using PanelFn = void (*)(const void* x, int64_t M, int64_t K, const void* w, int64_t n0, int64_t rows, float* out);

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept: torch's own conversion
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (f != f) return 0x7FC0;
  u += 0x7FFF + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

#if LK_X86
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
bool has_avx512bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }

// ---------------------------------------------------------------------------------------------------------------
namespace avx2 {  // 8 lanes, 16 registers
#pragma GCC push_options
#pragma GCC target("avx2,fma")
inline __m256 tail_f32(const float* p, int64_t n) {  // no masked loads of 16-bit values here: a zeroed buffer
  alignas(32) float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(buf, p, n * 4);
  return _mm256_load_ps(buf);
}
inline __m256 widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline float reduce8(__m256 v) {  // ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
template <bool BF16W>
struct Fma {  // float32 x; float32 or bfloat16 W (widened exactly)
  using Acc = __m256;
  using W = __m256;
  using X = float;
  static constexpr int64_t KV = 8, NB = 3, MB = 3, ONE_TILE = 5, W_BYTES = BF16W ? 2 : 4;
  static Acc zero() { return _mm256_setzero_ps(); }
  static __m256 load_x(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 load_x_tail(const float* p, int64_t n) { return tail_f32(p, n); }
  static W load_w(const char* p) {
    if constexpr (BF16W) return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    else return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  }
  static W load_w_tail(const char* p, int64_t n) {
    if constexpr (BF16W) {
      alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(buf, p, n * 2);
      return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
    } else {
      return tail_f32(reinterpret_cast<const float*>(p), n);
    }
  }
  static Acc fma(Acc acc, __m256 x, W w) { return _mm256_fmadd_ps(x, w, acc); }
  static float reduce(Acc v) { return reduce8(v); }
};
#include "linear_kernel_tiles.h"
#pragma GCC pop_options
}  // namespace avx2

// ---------------------------------------------------------------------------------------------------------------
namespace avx512 {  // 16 lanes, 32 registers
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
inline __mmask16 first16(int64_t n) { return __mmask16((1u << n) - 1); }
inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
template <bool BF16W>
struct Fma {
  using Acc = __m512;
  using W = __m512;
  using X = float;
  static constexpr int64_t KV = 16, NB = 4, MB = 4, ONE_TILE = 5, W_BYTES = BF16W ? 2 : 4;
  static Acc zero() { return _mm512_setzero_ps(); }
  static __m512 load_x(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load_x_tail(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first16(n), p); }
  static W load_w(const char* p) {
    if constexpr (BF16W) return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    else return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  }
  static W load_w_tail(const char* p, int64_t n) {
    if constexpr (BF16W) return widen(_mm256_maskz_loadu_epi16(first16(n), p));
    else return _mm512_maskz_loadu_ps(first16(n), p);
  }
  static Acc fma(Acc acc, __m512 x, W w) { return _mm512_fmadd_ps(x, w, acc); }
  static float reduce(Acc v) { return _mm512_reduce_add_ps(v); }
};
#include "linear_kernel_tiles.h"
#pragma GCC pop_options
}  // namespace avx512

// ---------------------------------------------------------------------------------------------------------------
namespace avx512bf16 {  // bfloat16 x and W: one instruction multiplies 32 pairs into 16 float sums
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")
inline __mmask32 first32(int64_t n) { return __mmask32((uint64_t(1) << n) - 1); }
struct Dot {
  using Acc = __m512;
  using W = __m512bh;
  using X = uint16_t;
  static constexpr int64_t KV = 32, NB = 1, MB = 6, ONE_TILE = 12, W_BYTES = 2;
  static Acc zero() { return _mm512_setzero_ps(); }
  static __m512bh load(const void* p) {  // memcpy: a plain unaligned load (a cast from __m512i costs a spill in GCC 12)
    __m512bh v;
    std::memcpy(&v, p, 64);
    return v;
  }
  static __m512bh load_tail(const void* p, int64_t n) {
    const __m512i v = _mm512_maskz_loadu_epi16(first32(n), p);
    __m512bh h;
    std::memcpy(&h, &v, 64);
    return h;
  }
  static __m512bh load_x(const uint16_t* p) { return load(p); }
  static __m512bh load_x_tail(const uint16_t* p, int64_t n) { return load_tail(p, n); }
  static W load_w(const char* p) { return load(p); }
  static W load_w_tail(const char* p, int64_t n) { return load_tail(p, n); }
  static Acc fma(Acc acc, __m512bh x, W w) { return _mm512_dpbf16_ps(acc, x, w); }
  static float reduce(Acc v) { return _mm512_reduce_add_ps(v); }
};
#include "linear_kernel_tiles.h"
#pragma GCC pop_options
}  // namespace avx512bf16
#else
bool has_avx2() { return false; }
bool has_avx512() { return false; }
bool has_avx512bf16() { return false; }
#endif  // LK_X86

enum Path { AUTO = 0, AVX2 = 1, AVX512 = 2, AVX512BF16 = 3 };
const char* const NAMES[] = {"auto", "avx2", "avx512", "avx512bf16"};

bool runs(int path) {
  return (path == AVX2 && has_avx2()) || (path == AVX512 && has_avx512()) ||
         (path == AVX512BF16 && has_avx512bf16());
}

// The path a product takes: the dot-product path needs bfloat16 x and W (it would round a float32 x).
int resolve(int64_t path, bool bf16x, bool bf16w) {
  const bool dot = bf16x && bf16w;
  if (path == AUTO)
    path = dot && has_avx512bf16() ? AVX512BF16 : has_avx512() ? AVX512 : has_avx2() ? AVX2 : -1;
  TORCH_CHECK(path != -1, "linear_kernel: this CPU has neither AVX2 + FMA nor AVX-512");
  TORCH_CHECK(path >= AVX2 && path <= AVX512BF16 && runs(int(path)), "linear_kernel: this CPU cannot run path ",
              path >= 0 && path <= 3 ? NAMES[path] : "?");
  TORCH_CHECK(path != AVX512BF16 || dot, "linear_kernel: the avx512bf16 path takes bfloat16 x and W");
  return int(path);
}

PanelFn plan(int path, bool bf16w, int64_t M) {
#if LK_X86
  switch (path) {
    case AVX2: return bf16w ? avx2::plan<avx2::Fma<true>>(M) : avx2::plan<avx2::Fma<false>>(M);
    case AVX512: return bf16w ? avx512::plan<avx512::Fma<true>>(M) : avx512::plan<avx512::Fma<false>>(M);
    case AVX512BF16: return avx512bf16::plan<avx512bf16::Dot>(M);
  }
#endif
  TORCH_CHECK(false, "linear_kernel: no vector path on this CPU");
}

}  // namespace

// The paths this CPU can run, e.g. ["avx2", "avx512", "avx512bf16"]; [] where none (nothing here serves).
std::vector<std::string> paths() {
  std::vector<std::string> out;
  for (int p = AVX2; p <= AVX512BF16; ++p)
    if (runs(p)) out.push_back(NAMES[p]);
  return out;
}

// x (M, K) float32 or bfloat16, w (N, K) float32 or bfloat16, both contiguous on the CPU -> (M, N) in x's dtype.
// path: 0 the fastest this CPU runs for these dtypes, else the index of a name in paths()'s vocabulary.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_kernel: shapes (M, K) and (N, K)");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.device().is_cpu() && w.device().is_cpu(),
              "linear_kernel: contiguous CPU tensors");
  const auto xt = x.scalar_type(), wt = w.scalar_type();
  TORCH_CHECK((xt == at::kFloat || xt == at::kBFloat16) && (wt == at::kFloat || wt == at::kBFloat16),
              "linear_kernel: float32 or bfloat16");
  const bool bf16x = xt == at::kBFloat16, bf16w = wt == at::kBFloat16;
  const int p = resolve(path, bf16x, bf16w);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const bool dot = p == AVX512BF16;
  static thread_local std::vector<float> xbuf;  // the FMA paths take x as float32 (exact for bfloat16)
  const void* xk = x.data_ptr();
  if (bf16x && !dot) {
    xbuf.resize(M * K);
    const auto* xh = reinterpret_cast<const uint16_t*>(x.data_ptr());
    for (int64_t i = 0; i < M * K; ++i) xbuf[i] = bf16_to_float(xh[i]);
    xk = xbuf.data();
  }
  float* yf = bf16x ? nullptr : y.data_ptr<float>();
  uint16_t* yh = bf16x ? reinterpret_cast<uint16_t*>(y.data_ptr()) : nullptr;
  const int64_t xrow = K * (dot ? 2 : 4);
  const void* wp = w.data_ptr();
  for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {  // each row group sweeps the weights once
    const int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
    const void* xg = static_cast<const char*>(xk) + m0 * xrow;
    const PanelFn panel = plan(p, bf16w, rows);
    const int64_t panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static) if (N * K * rows >= PARALLEL_WORK)
    for (int64_t b = 0; b < panels; ++b) {
      const int64_t n0 = b * PANEL, nb = N - n0 < PANEL ? N - n0 : PANEL;
      float out[MAX_ROWS * PANEL];
      panel(xg, rows, K, wp, n0, nb, out);
      for (int64_t i = 0; i < rows; ++i)  // the sums, rounded once for a bfloat16 y
        for (int64_t j = 0; j < nb; ++j) {
          if (yh) yh[(m0 + i) * N + n0 + j] = float_to_bf16(out[i * PANEL + j]);
          else yf[(m0 + i) * N + n0 + j] = out[i * PANEL + j];
        }
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x W^T, each row's bits independent of the others, the weights read once",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("path") = 0);
  m.def("paths", &paths, "the instruction sets this CPU runs");
}
