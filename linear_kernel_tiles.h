// The tiles of linear_kernel.cpp, written once and compiled once per instruction set: linear_kernel.cpp includes
// this file inside a namespace, under that instruction set's `#pragma GCC target`, after defining there the
// operations of each kind of product it serves, as a struct Ops with
//   Acc (a vector of float sums), X (x's element type), KV (k per vector step), ONE_TILE (up to this many rows of x,
//   one tile of them all against one row of W at a time), NB x MB (the tile of W's rows x x's rows past ONE_TILE
//   rows; measured fastest on an AMD EPYC: 4 x 4 AVX-512 FMA, 1 x 6 AVX-512 BF16, 3 x 3 AVX2), W_BYTES, zero(),
//   load_x(p), load_x_tail(p, n), load_w(p), load_w_tail(p, n) (n < KV elements, zeros past them), fma(acc, x, w)
//   (acc + the lane-wise products of x and w), reduce(acc) (the lanes summed in a fixed order).

// out[i * stride + j] = x row i . W row j (the whole of K), for NB rows of W and MB rows of x: NB * MB sums in
// registers, plus MB of x and one of W (NB = 1: the vector of x loaded as it is used). Each sum is one chain of
// multiply-adds over k (one vector step of KV elements at a time, the tail of K with zeros past it), its lanes then
// summed by reduce(): the same operations for an element whatever NB, MB or its place in the tile.
template <class Ops, int NB, int MB>
inline void tile(const typename Ops::X* x, int64_t K, const char* w, float* out, int64_t stride) {
  constexpr int64_t KV = Ops::KV, WS = Ops::W_BYTES;
  const int64_t row_bytes = K * WS;
  typename Ops::Acc acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) acc[j][i] = Ops::zero();
  const int64_t full = K - K % KV;
  const auto ahead = reinterpret_cast<uintptr_t>(w) + PREFETCH;  // an address, not a pointer: it may pass W's end
  for (int64_t k = 0; k < full; k += KV) {
    for (int j = 0; j < NB; ++j)  // W's bytes PREFETCH ahead, into L2 (a hint: the arithmetic is unchanged)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + j * row_bytes + k * WS), _MM_HINT_T1);
    if constexpr (NB == 1) {
      const auto wv = Ops::load_w(w + k * WS);
      for (int i = 0; i < MB; ++i) acc[0][i] = Ops::fma(acc[0][i], Ops::load_x(x + i * K + k), wv);
    } else {  // each vector of x loaded once for NB rows of W
      decltype(Ops::load_x(x)) xv[MB];
      for (int i = 0; i < MB; ++i) xv[i] = Ops::load_x(x + i * K + k);
      for (int j = 0; j < NB; ++j) {
        const auto wv = Ops::load_w(w + j * row_bytes + k * WS);
        for (int i = 0; i < MB; ++i) acc[j][i] = Ops::fma(acc[j][i], xv[i], wv);
      }
    }
  }
  if (full < K) {  // the tail of K: lanes past it are zeros in both operands
    const int64_t n = K - full;
    for (int j = 0; j < NB; ++j) {
      const auto wv = Ops::load_w_tail(w + j * row_bytes + full * WS, n);
      for (int i = 0; i < MB; ++i) acc[j][i] = Ops::fma(acc[j][i], Ops::load_x_tail(x + i * K + full, n), wv);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) out[i * stride + j] = Ops::reduce(acc[j][i]);
}

// `tile` for mb <= MB rows of x (the last ones).
template <class Ops, int NB, int MB>
inline void tile_rows(int mb, const typename Ops::X* x, int64_t K, const char* w, float* out, int64_t stride) {
  static_assert(MB >= 1 && MB <= 12, "tiles of 1 to 12 rows");
  if (mb == MB) return tile<Ops, NB, MB>(x, K, w, out, stride);  // the usual case
  switch (mb) {
#define LK_ROWS(r) \
    case r: if constexpr (MB > r) return tile<Ops, NB, r>(x, K, w, out, stride);
    LK_ROWS(1) LK_ROWS(2) LK_ROWS(3) LK_ROWS(4) LK_ROWS(5) LK_ROWS(6) LK_ROWS(7) LK_ROWS(8) LK_ROWS(9) LK_ROWS(10)
    LK_ROWS(11)
#undef LK_ROWS
    default: return;
  }
}

// A panel: outputs n0..n0+rows-1 (rows <= PANEL) of every row of x (M <= MAX_ROWS), their sums into out (M, PANEL):
// NB rows of W at a time (the last ones one by one), each group against every row of x, MB rows at a time (the group
// stays in L1 meanwhile). Every tile asks for W's bytes PREFETCH ahead of it into L2: with a few rows of x the
// arithmetic keeps the core busy, and the hardware's own prefetching alone then fell behind (measured on an AMD EPYC,
// SmolLM2's products in bf16: 5 rows 1.43x one row without it, 1.09x with it; 9 rows 1.85x, 1.53x).
//   NB = 1 (few rows of x, where reading W binds): W is read as a single stream, which the hardware prefetches best
//   (measured on an AMD EPYC with SmolLM2's shapes: 26-31 GB/s for a one-row product, against 18-21 GB/s with 4 to
//   16 rows of W read side by side), and the rows of x give the multiply-adds independent chains.
//   NB > 1 (many rows of x, where the arithmetic binds): each vector of x loaded once serves NB rows of W, a quarter
//   of the loads per multiply-add (x of 17 rows no longer fits L1: every load of it would come from L2).
template <class Ops, int NB, int MB>
void panel(const void* xv, int64_t M, int64_t K, const void* w, int64_t n0, int64_t rows, float* out) {
  const auto* x = static_cast<const typename Ops::X*>(xv);
  const int64_t row_bytes = K * Ops::W_BYTES;
  const char* wp = static_cast<const char*>(w) + n0 * row_bytes;
  for (int64_t j = 0; j < rows;) {
    const bool group = rows - j >= NB;
    for (int64_t i0 = 0; i0 < M; i0 += MB) {
      const int mb = int(M - i0 < MB ? M - i0 : MB);
      float* o = out + i0 * PANEL + j;
      if (group) tile_rows<Ops, NB, MB>(mb, x + i0 * K, K, wp + j * row_bytes, o, PANEL);
      else tile_rows<Ops, 1, MB>(mb, x + i0 * K, K, wp + j * row_bytes, o, PANEL);
    }
    j += group ? NB : 1;
  }
}

// The plan of a product of M rows: the tiles' shape by row count. Up to Ops::ONE_TILE rows, one tile of all of them
// (one row of W at a time); more, NB x MB tiles.
template <class Ops>
PanelFn plan(int64_t M) {
  switch (M) {
#define LK_ONE(r) \
    case r: if constexpr (Ops::ONE_TILE >= r) return panel<Ops, 1, r>; break;
    LK_ONE(1) LK_ONE(2) LK_ONE(3) LK_ONE(4) LK_ONE(5) LK_ONE(6) LK_ONE(7) LK_ONE(8) LK_ONE(9) LK_ONE(10) LK_ONE(11)
    LK_ONE(12)
#undef LK_ONE
  }
  return panel<Ops, Ops::NB, Ops::MB>;
}
