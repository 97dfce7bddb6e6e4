// The tiles of linear_kernel.cpp, written once and compiled once per instruction set: linear_kernel.cpp includes
// this file inside a namespace, under that instruction set's `#pragma GCC target`, after defining there the
// operations of each kind of product it serves, as a struct Ops with
//   Acc (a vector of float sums), X (x's element type), KV (k per vector step), MB (most rows of x per tile),
//   W_BYTES, zero(), load_x(p), load_x_tail(p, n), load_w(p), load_w_tail(p, n) (n < KV elements, zeros past
//   them), fma(acc, x, w) (acc + the lane-wise products of x and w), reduce(acc) (the lanes summed in a fixed order).

// out[i * stride] = x row i . W's row w (the whole of K), for MB rows of x: MB sums in registers, plus one vector of
// W and one of x (8 of AVX-512's 32 registers, 7 of AVX2's 16). Each sum is one chain of multiply-adds over k (one
// vector step of KV elements at a time, the tail of K with zeros past it), its lanes then summed by reduce(): the
// same operations for an element whatever MB or its place in the tile.
template <class Ops, int MB>
inline void tile(const typename Ops::X* x, int64_t K, const char* w, float* out, int64_t stride) {
  constexpr int64_t KV = Ops::KV, WS = Ops::W_BYTES;
  typename Ops::Acc acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = Ops::zero();
  const int64_t full = K - K % KV;
  for (int64_t k = 0; k < full; k += KV) {
    const auto wv = Ops::load_w(w + k * WS);  // used by every row of x once loaded
    for (int i = 0; i < MB; ++i) acc[i] = Ops::fma(acc[i], Ops::load_x(x + i * K + k), wv);
  }
  if (full < K) {  // the tail of K: lanes past it are zeros in both operands
    const auto wv = Ops::load_w_tail(w + full * WS, K - full);
    for (int i = 0; i < MB; ++i) acc[i] = Ops::fma(acc[i], Ops::load_x_tail(x + i * K + full, K - full), wv);
  }
  for (int i = 0; i < MB; ++i) out[i * stride] = Ops::reduce(acc[i]);
}

// `tile` for mb <= MB rows of x (the last ones).
template <class Ops, int MB>
inline void tile_rows(int mb, const typename Ops::X* x, int64_t K, const char* w, float* out, int64_t stride) {
  static_assert(MB >= 1 && MB <= 8, "tiles of 1 to 8 rows");
  if (mb == MB) return tile<Ops, MB>(x, K, w, out, stride);  // the usual case
  switch (mb) {
#define LK_ROWS(r) \
    case r: if constexpr (MB > r) return tile<Ops, r>(x, K, w, out, stride);
    LK_ROWS(1) LK_ROWS(2) LK_ROWS(3) LK_ROWS(4) LK_ROWS(5) LK_ROWS(6) LK_ROWS(7)
#undef LK_ROWS
    default: return;
  }
}

// A panel: outputs n0..n0+rows-1 (rows <= PANEL) of every row of x (M <= MAX_ROWS), their sums into out (M, PANEL).
// W's rows one after the other, each against every row of x, MB rows at a time (the row of W stays in L1
// meanwhile): W is then read as a single stream, which the hardware prefetches best (measured on an AMD EPYC with
// SmolLM2's shapes: 26-31 GB/s for a one-row product, against 18-21 GB/s with 4 to 16 rows of W read side by side
// for fewer loads per multiply-add), and the rows of x give the multiply-adds independent chains.
template <class Ops, int MB>
void panel(const void* xv, int64_t M, int64_t K, const void* w, int64_t n0, int64_t rows, float* out) {
  const auto* x = static_cast<const typename Ops::X*>(xv);
  const int64_t row_bytes = K * Ops::W_BYTES;
  const char* wp = static_cast<const char*>(w) + n0 * row_bytes;
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t i0 = 0; i0 < M; i0 += MB)
      tile_rows<Ops, MB>(int(M - i0 < MB ? M - i0 : MB), x + i0 * K, K, wp + j * row_bytes, out + i0 * PANEL + j,
                         PANEL);
}

// The plan of a product of M rows: the tiles' height by row count (one tile up to Ops::MB rows).
template <class Ops>
PanelFn plan(int64_t M) {
  switch (M) {
    case 1: return panel<Ops, 1>;
    case 2: return panel<Ops, 2>;
    case 3: return panel<Ops, 3>;
    case 4: return panel<Ops, 4>;
    case 5: return panel<Ops, 5>;
  }
  return panel<Ops, Ops::MB>;
}
