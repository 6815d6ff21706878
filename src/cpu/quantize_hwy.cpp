// The batched quantizer, vectorised ACROSS ROWS: each SIMD lane carries one vector (row), so every
// lane performs exactly Codec::quantize's scalar float operations in the same order (sequential
// norm sums, the same Walsh-Hadamard butterflies, the same dense dot-product order). That makes
// the output bit-identical to the scalar twin without giving up speed: a group of N rows (N =
// lanes: 16 on AVX-512) is transposed into a [D][N] tile, processed with pure vertical ops (no
// shuffles, no horizontal sums), packed vertically and transposed back into the planes.
//
// Bit-identity needs the compiler not to fuse a*b+c into FMA here (the scalar twin, compiled for
// the x86-64 baseline, has no FMA); hence fp-contract=off for this file.
#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/quantize.h"
#include "tqattn/error.h"
#include "tqattn/half.h"

#ifdef TQATTN_HAVE_HIGHWAY
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/quantize_hwy.cpp"
#include "hwy/aligned_allocator.h"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace tqattn::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

#if HWY_HAVE_SCALABLE
// Sizeless vectors (SVE, RVV) cannot live in the register arrays the kernels below use; these
// targets take the scalar twin.
bool QuantizeRows(const PreparedCodec& prepared, const float* x, int64_t n, const PackedPlanes& out,
                  const int64_t* slots) {
  return quantize_rows_scalar(prepared.codec(), x, n, out, slots);
}
void DequantizeRows(const PreparedCodec& prepared, const PackedPlanes& in, int64_t n, float* x) {
  prepared.codec().dequantize(in, n, x);
}
#else

using Tables = PreparedCodec::Tables;

// Per-thread tiles, grown on demand and reused across calls.
struct Tiles {
  hwy::AlignedFreeUniquePtr<float[]> mem;
  size_t size = 0;
  float* get(size_t floats) {
    if (floats > size) {
      mem = hwy::AllocateAligned<float>(floats);
      size = floats;
    }
    return mem.get();
  }
};

// One pass of up to three Walsh-Hadamard stages (half = h0, 2 h0, 4 h0) over a [dim][N] tile:
// each group of 2^kStages rows {i + k h0} is closed under those stages, so it is loaded once, kept
// in registers and stored once. The butterflies are exactly the scalar ones (a + b, a - b on the
// same operands), so the result is bit-identical to running the stages one by one. pre / post
// transform a row on its way in (first pass) / out (last pass).
template <int kStages, class DF, class Pre, class Post>
HWY_INLINE void HadamardPass(DF df, float* HWY_RESTRICT t, int dim, int h0, bool first, bool last,
                             const Pre& pre, const Post& post) {
  const size_t N = hn::Lanes(df);
  constexpr int kCount = 1 << kStages;
  const int span = h0 * kCount;
  for (int block = 0; block < dim; block += span) {
    for (int i = block; i < block + h0; ++i) {
      hn::Vec<DF> v[kCount];
      for (int k = 0; k < kCount; ++k) {
        const int row = i + k * h0;
        v[k] = hn::Load(df, t + static_cast<size_t>(row) * N);
        if (first) v[k] = pre(row, v[k]);
      }
      for (int stage = 0; stage < kStages; ++stage) {
        const int h = 1 << stage;
        for (int k = 0; k < kCount; ++k) {
          if (k & h) continue;
          const auto a = v[k];
          const auto b = v[k + h];
          v[k] = hn::Add(a, b);
          v[k + h] = hn::Sub(a, b);
        }
      }
      for (int k = 0; k < kCount; ++k) {
        const int row = i + k * h0;
        hn::Store(last ? post(row, v[k]) : v[k], df, t + static_cast<size_t>(row) * N);
      }
    }
  }
}

// In-place Walsh-Hadamard transform of a [dim][N] tile (dim a power of two) in the scalar
// fast_hadamard_transform's stage order (half = 1, 2, 4, ...): t <- post(H pre(t)).
template <class DF, class Pre, class Post>
HWY_INLINE void HadamardTile(DF df, float* HWY_RESTRICT t, int dim, const Pre& pre,
                             const Post& post) {
  int log2 = 0;
  while ((1 << log2) < dim) ++log2;
  int done = 0;
  while (done < log2) {
    const int stages = std::min(3, log2 - done);
    const bool first = done == 0;
    const bool last = done + stages == log2;
    const int h0 = 1 << done;
    if (stages == 3) {
      HadamardPass<3>(df, t, dim, h0, first, last, pre, post);
    } else if (stages == 2) {
      HadamardPass<2>(df, t, dim, h0, first, last, pre, post);
    } else {
      HadamardPass<1>(df, t, dim, h0, first, last, pre, post);
    }
    done += stages;
  }
}

// Nearest centroid of every coordinate of a [dim][N] tile of rotated unit vectors: the number of
// boundaries strictly below y (Codebook::nearest), by a branchless binary search unrolled for
// kBits; indices are packed LSB-first straight into the [words][N] tile as they are produced.
// With `codes`, also sums c[idx]^2 (norm correction) and writes the Prod residual y - c[idx].
template <int kBits, class DF, class M>
HWY_INLINE hn::Vec<DF> IndexTile(DF df, const Tables& t, const float* HWY_RESTRICT y,
                                 uint32_t* HWY_RESTRICT wtile, float* HWY_RESTRICT residual,
                                 M positive) {
  const hn::RebindToSigned<DF> di;
  const hn::RebindToUnsigned<DF> du;
  const size_t N = hn::Lanes(df);
  constexpr int kTable = 1 << kBits;
  // The binary search walks a complete tree: at level L the probe is T_L[m] (see Tables::levels),
  // m the path so far. Levels of <= N entries are looked up in a register, the rest gathered.
  hn::Vec<DF> level_vec[kBits];
  const float* level_ptr[kBits];
  for (int level = 0; level < kBits; ++level) {
    level_ptr[level] = t.levels.data() + t.level_offsets[level];
    level_vec[level] = hn::LoadU(df, level_ptr[level]);
  }
  const bool centroids_in_register = static_cast<size_t>(kTable) <= N;
  const auto centroid_vec = hn::LoadU(df, t.centroids.data());
  const bool codes = t.prod || t.norm_correction;
  auto code_sumsq = hn::Zero(df);
  auto acc = hn::Zero(du);
  int fill = 0;
  uint32_t* word = wtile;
  auto element = [&](int j) HWY_ATTR {
    const auto v = hn::Load(df, y + static_cast<size_t>(j) * N);
    auto idx = hn::Zero(di);
    for (int level = 0; level < kBits; ++level) {
      const auto b = (size_t{1} << level) <= N
                         ? hn::TableLookupLanes(level_vec[level], hn::IndicesFromVec(df, idx))
                         : hn::GatherIndex(df, level_ptr[level], idx);
      // m <- 2 m + (b < y): VecFromMask is -1 where true.
      idx = hn::Sub(hn::Add(idx, idx), hn::VecFromMask(di, hn::RebindMask(di, hn::Lt(b, v))));
    }
    const auto u = hn::BitCast(du, idx);
    acc = hn::Or(acc, hn::ShiftLeftSame(u, fill));
    fill += kBits;
    if (fill >= 32) {
      hn::Store(acc, du, word);
      word += N;
      fill -= 32;
      // A value that straddles two words keeps its high bits for the next one.
      acc = fill > 0 ? hn::ShiftRightSame(u, kBits - fill) : hn::Zero(du);
    }
    if (codes) {
      const auto c = centroids_in_register
                         ? hn::TableLookupLanes(centroid_vec, hn::IndicesFromVec(df, idx))
                         : hn::GatherIndex(df, t.centroids.data(), idx);
      code_sumsq = hn::Add(code_sumsq, hn::Mul(c, c));
      if (t.prod) {
        hn::Store(hn::IfThenElseZero(positive, hn::Sub(v, c)), df,
                  residual + static_cast<size_t>(j) * N);
      }
    }
  };
  // After kPeriod elements the bit stream is back on a word boundary; unrolling one period makes
  // every shift count and store a compile-time constant.
  constexpr int kPeriod = 32 / (kBits & -kBits);  // 32 / gcd(32, kBits)
  int j = 0;
  for (; j + kPeriod <= t.dim; j += kPeriod) {
    fill = 0;
#pragma GCC unroll 32
    for (int e = 0; e < kPeriod; ++e) element(j + e);
  }
  for (; j < t.dim; ++j) element(j);
  if (fill > 0) hn::Store(acc, du, word);
  return code_sumsq;
}

template <class DF, class M>
HWY_INLINE hn::Vec<DF> IndexTileDispatch(DF df, const Tables& t, const float* y, uint32_t* wtile,
                                         float* residual, M positive) {
  switch (t.index_bits) {
    case 1:
      return IndexTile<1>(df, t, y, wtile, residual, positive);
    case 2:
      return IndexTile<2>(df, t, y, wtile, residual, positive);
    case 3:
      return IndexTile<3>(df, t, y, wtile, residual, positive);
    case 4:
      return IndexTile<4>(df, t, y, wtile, residual, positive);
    case 5:
      return IndexTile<5>(df, t, y, wtile, residual, positive);
    case 6:
      return IndexTile<6>(df, t, y, wtile, residual, positive);
    case 7:
      return IndexTile<7>(df, t, y, wtile, residual, positive);
    case 8:
      return IndexTile<8>(df, t, y, wtile, residual, positive);
    default:
      // PreparedCodec only builds tables for valid codecs; this guards the switch.
      throw RuntimeError(
          detail::concat("[tqattn.quantize] index bits 1..8 supported, got ", t.index_bits));
  }
}

// out[i] = sum_j m[i*dim + j] * in[j], j ascending (Rotation::forward's and the QJL product's
// order). Four outputs at a time share each load of in[j].
template <class DF>
HWY_INLINE void MatVecTile(DF df, const float* HWY_RESTRICT m, const float* HWY_RESTRICT in,
                           float* HWY_RESTRICT out, int dim) {
  const size_t N = hn::Lanes(df);
  int i = 0;
  for (; i + 4 <= dim; i += 4) {
    const float* r0 = m + static_cast<size_t>(i) * dim;
    const float* r1 = r0 + dim;
    const float* r2 = r1 + dim;
    const float* r3 = r2 + dim;
    auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
    for (int j = 0; j < dim; ++j) {
      const auto v = hn::Load(df, in + static_cast<size_t>(j) * N);
      a0 = hn::Add(a0, hn::Mul(hn::Set(df, r0[j]), v));
      a1 = hn::Add(a1, hn::Mul(hn::Set(df, r1[j]), v));
      a2 = hn::Add(a2, hn::Mul(hn::Set(df, r2[j]), v));
      a3 = hn::Add(a3, hn::Mul(hn::Set(df, r3[j]), v));
    }
    hn::Store(a0, df, out + static_cast<size_t>(i) * N);
    hn::Store(a1, df, out + static_cast<size_t>(i + 1) * N);
    hn::Store(a2, df, out + static_cast<size_t>(i + 2) * N);
    hn::Store(a3, df, out + static_cast<size_t>(i + 3) * N);
  }
  for (; i < dim; ++i) {
    const float* r = m + static_cast<size_t>(i) * dim;
    auto a = hn::Zero(df);
    for (int j = 0; j < dim; ++j) {
      a = hn::Add(a, hn::Mul(hn::Set(df, r[j]), hn::Load(df, in + static_cast<size_t>(j) * N)));
    }
    hn::Store(a, df, out + static_cast<size_t>(i) * N);
  }
}

// out[j] = sum_i m[i*dim + j] * in[i], i ascending (Rotation::inverse's dense order).
template <class DF>
HWY_INLINE void MatTVecTile(DF df, const float* HWY_RESTRICT m, const float* HWY_RESTRICT in,
                            float* HWY_RESTRICT out, int dim) {
  const size_t N = hn::Lanes(df);
  for (int j = 0; j < dim; ++j) hn::Store(hn::Zero(df), df, out + static_cast<size_t>(j) * N);
  for (int i = 0; i < dim; ++i) {
    const auto yi = hn::Load(df, in + static_cast<size_t>(i) * N);
    const float* row = m + static_cast<size_t>(i) * dim;
    for (int j = 0; j < dim; ++j) {
      float* o = out + static_cast<size_t>(j) * N;
      hn::Store(hn::Add(hn::Load(df, o), hn::Mul(hn::Set(df, row[j]), yi)), df, o);
    }
  }
}

#if HWY_ARCH_X86 && (HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL)
#define TQATTN_TRANSPOSE_BLOCK 16
// Transposes a 16x16 block: dst[c * dst_stride + i] = src[i * src_stride + c]. 64 shuffles instead
// of 256 scalar moves.
HWY_INLINE void TransposeBlock(const float* HWY_RESTRICT src, size_t src_stride,
                               float* HWY_RESTRICT dst, size_t dst_stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4q + k], 128-bit lane L: column 4L + k of rows 4q .. 4q + 3.
  for (int q = 0; q < 4; ++q) {
    const __m512d a = _mm512_castps_pd(t[4 * q]), b = _mm512_castps_pd(t[4 * q + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * q + 2]), d = _mm512_castps_pd(t[4 * q + 3]);
    r[4 * q + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 p = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x44);
    const __m512 q = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x44);
    const __m512 p2 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xEE);
    const __m512 q2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xEE);
    _mm512_storeu_ps(dst + k * dst_stride, _mm512_shuffle_f32x4(p, q, 0x88));
    _mm512_storeu_ps(dst + (4 + k) * dst_stride, _mm512_shuffle_f32x4(p, q, 0xDD));
    _mm512_storeu_ps(dst + (8 + k) * dst_stride, _mm512_shuffle_f32x4(p2, q2, 0x88));
    _mm512_storeu_ps(dst + (12 + k) * dst_stride, _mm512_shuffle_f32x4(p2, q2, 0xDD));
  }
}
#elif HWY_ARCH_X86 && HWY_TARGET == HWY_AVX2
#define TQATTN_TRANSPOSE_BLOCK 8
// The 8x8 version: 24 shuffles instead of 64 scalar moves.
HWY_INLINE void TransposeBlock(const float* HWY_RESTRICT src, size_t src_stride,
                               float* HWY_RESTRICT dst, size_t dst_stride) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * dst_stride, _mm256_permute2f128_ps(u[k], u[4 + k], 0x20));
    _mm256_storeu_ps(dst + (4 + k) * dst_stride, _mm256_permute2f128_ps(u[k], u[4 + k], 0x31));
  }
}
#endif

// Copies rows [0, valid) of x (dim floats each) into the [dim][N] tile; missing rows are 0.
template <class DF>
HWY_INLINE void TransposeIn(DF df, const float* HWY_RESTRICT x, size_t valid, int dim,
                            float* HWY_RESTRICT tile) {
  const size_t N = hn::Lanes(df);
  int j0 = 0;
#ifdef TQATTN_TRANSPOSE_BLOCK
  if (valid == N && N == TQATTN_TRANSPOSE_BLOCK) {
    for (; j0 + TQATTN_TRANSPOSE_BLOCK <= dim; j0 += TQATTN_TRANSPOSE_BLOCK) {
      TransposeBlock(x + j0, dim, tile + static_cast<size_t>(j0) * N, N);
    }
  }
#endif
  if (j0 == dim) return;
  if (valid < N) std::memset(tile, 0, sizeof(float) * N * dim);
  for (size_t lane = 0; lane < valid; ++lane) {
    const float* row = x + lane * dim;
    for (int j = j0; j < dim; ++j) tile[static_cast<size_t>(j) * N + lane] = row[j];
  }
}

// The inverse: lanes [0, valid) of the [dim][N] tile to rows of x (dim floats each).
template <class DF>
HWY_INLINE void TransposeOut(DF df, const float* HWY_RESTRICT tile, size_t valid, int dim,
                             float* HWY_RESTRICT x) {
  const size_t N = hn::Lanes(df);
  int j0 = 0;
#ifdef TQATTN_TRANSPOSE_BLOCK
  if (valid == N && N == TQATTN_TRANSPOSE_BLOCK) {
    for (; j0 + TQATTN_TRANSPOSE_BLOCK <= dim; j0 += TQATTN_TRANSPOSE_BLOCK) {
      TransposeBlock(tile + static_cast<size_t>(j0) * N, N, x + j0, dim);
    }
  }
#endif
  for (size_t lane = 0; lane < valid; ++lane) {
    float* row = x + lane * dim;
    for (int j = j0; j < dim; ++j) row[j] = tile[static_cast<size_t>(j) * N + lane];
  }
}
#undef TQATTN_TRANSPOSE_BLOCK

bool QuantizeRows(const PreparedCodec& prepared, const float* HWY_RESTRICT x, int64_t n,
                  const PackedPlanes& out, const int64_t* slots) {
  const Tables& t = prepared.tables();
  const hn::ScalableTag<float> df;
  const hn::RebindToUnsigned<decltype(df)> du;
  const size_t N = hn::Lanes(df);
  const int dim = t.dim;
  const size_t tile = N * static_cast<size_t>(dim);
  const int64_t words = t.index_words;
  const int64_t swords = t.sign_words;

  thread_local Tiles tiles;
  float* mem = tiles.get(3 * tile + (words + swords + 4) * N);
  float* y = mem;         // the rotated unit vectors
  float* r = mem + tile;  // Prod: residual (rotated), then un-rotated
  float* tmp = mem + 2 * tile;
  uint32_t* wtile = reinterpret_cast<uint32_t*>(mem + 3 * tile);  // [words][N]
  uint32_t* stile = wtile + words * N;                            // [sign_words][N]
  float* lanes = reinterpret_cast<float*>(stile + swords * N);    // [2][N] per-lane scalars

  const auto zero = hn::Zero(df);
  bool all_finite = true;

  for (int64_t r0 = 0; r0 < n; r0 += static_cast<int64_t>(N)) {
    const size_t valid = static_cast<size_t>(std::min<int64_t>(N, n - r0));
    auto slot = [&](size_t lane) {
      const int64_t row = r0 + static_cast<int64_t>(lane);
      return slots ? slots[row] : row;
    };
    TransposeIn(df, x + r0 * dim, valid, dim, t.hadamard ? y : tmp);
    float* src = t.hadamard ? y : tmp;

    // ||x||, summed in row order like the scalar twin.
    auto sumsq = zero;
    for (int j = 0; j < dim; ++j) {
      const auto v = hn::Load(df, src + static_cast<size_t>(j) * N);
      sumsq = hn::Add(sumsq, hn::Mul(v, v));
    }
    if (!hn::AllTrue(df, hn::IsFinite(sumsq))) all_finite = false;
    const auto norm = hn::Sqrt(sumsq);
    const auto positive = hn::Gt(norm, zero);
    const auto inv = hn::IfThenElseZero(positive, hn::Div(hn::Set(df, 1.0f), norm));

    // y = Pi (x * inv): the sign flip on the way into the first pass, the 1/sqrt(d) on the way
    // out of the last (the scalar twin's three loops, fused).
    if (t.hadamard) {
      const auto scale = hn::Set(df, t.inv_sqrt_dim);
      HadamardTile(
          df, y, dim,
          [&](int j, decltype(zero) v) {
            return hn::Mul(hn::Mul(v, inv), hn::Set(df, t.signs[j]));
          },
          [&](int, decltype(zero) v) { return hn::Mul(v, scale); });
    } else {
      for (int j = 0; j < dim; ++j) {
        float* p = tmp + static_cast<size_t>(j) * N;
        hn::Store(hn::Mul(hn::Load(df, p), inv), df, p);
      }
      MatVecTile(df, t.rotation.data(), tmp, y, dim);
    }

    const auto code_sumsq = IndexTileDispatch(df, t, y, wtile, r, positive);
    for (size_t lane = 0; lane < valid; ++lane) {
      uint32_t* dst = out.indices + slot(lane) * words;
      for (int64_t w = 0; w < words; ++w) dst[w] = wtile[w * N + lane];
    }
    auto stored = norm;
    if (t.norm_correction) {
      stored = hn::IfThenElse(hn::Gt(code_sumsq, zero), hn::Div(norm, hn::Sqrt(code_sumsq)), norm);
    }
    hn::Store(stored, df, lanes);
    for (size_t lane = 0; lane < valid; ++lane) out.norms[slot(lane)] = float_to_half(lanes[lane]);
    if (!t.prod) continue;

    // Prod: gamma = ||r|| (rotation-invariant, taken in rotated space like the scalar twin), then
    // the residual back in the original space and the signs of S r.
    auto gamma_sq = zero;
    for (int j = 0; j < dim; ++j) {
      const auto v = hn::Load(df, r + static_cast<size_t>(j) * N);
      gamma_sq = hn::Add(gamma_sq, hn::Mul(v, v));
    }
    const float* residual = r;
    if (t.hadamard) {
      HadamardTile(
          df, r, dim, [](int, decltype(zero) v) { return v; },
          [&](int j, decltype(zero) v) {
            return hn::Mul(v, hn::Set(df, t.inv_sqrt_dim * t.signs[j]));
          });
    } else {
      MatTVecTile(df, t.rotation.data(), r, tmp, dim);
      residual = tmp;
    }
    float* projected = t.hadamard ? tmp : y;  // y is free now
    MatVecTile(df, t.qjl.data(), residual, projected, dim);
    std::memset(stile, 0, sizeof(uint32_t) * swords * N);
    for (int i = 0; i < dim; ++i) {
      const auto nonneg = hn::Ge(hn::Load(df, projected + static_cast<size_t>(i) * N), zero);
      uint32_t* s = stile + (i >> 5) * N;
      const auto bit = hn::Set(du, 1u << (i & 31));
      hn::Store(hn::Or(hn::Load(du, s), hn::IfThenElseZero(hn::RebindMask(du, nonneg), bit)), du,
                s);
    }
    for (size_t lane = 0; lane < valid; ++lane) {
      uint32_t* dst = out.qjl_signs + slot(lane) * swords;
      for (int64_t w = 0; w < swords; ++w) dst[w] = stile[w * N + lane];
    }
    hn::Store(hn::Sqrt(gamma_sq), df, lanes);
    for (size_t lane = 0; lane < valid; ++lane) {
      out.residual_norms[slot(lane)] = float_to_half(lanes[lane]);
    }
  }
  return all_finite;
}

// Unpacks the [words][N] tile of packed indices into centroid values c[idx] in the [dim][N] tile.
template <int kBits, class DF>
HWY_INLINE void DecodeTile(DF df, const Tables& t, const uint32_t* HWY_RESTRICT wtile,
                           float* HWY_RESTRICT y) {
  const hn::RebindToSigned<DF> di;
  const hn::RebindToUnsigned<DF> du;
  const size_t N = hn::Lanes(df);
  constexpr int kTable = 1 << kBits;
  const bool in_register = static_cast<size_t>(kTable) <= N;
  const auto centroid_vec = hn::LoadU(df, t.centroids.data());
  const auto mask = hn::Set(du, kTable - 1);
  auto element = [&](int j) HWY_ATTR {
    const int bit = j * kBits;
    const int offset = bit & 31;
    const uint32_t* w = wtile + static_cast<size_t>(bit >> 5) * N;
    auto v = hn::ShiftRightSame(hn::Load(du, w), offset);
    if (offset + kBits > 32) v = hn::Or(v, hn::ShiftLeftSame(hn::Load(du, w + N), 32 - offset));
    const auto idx = hn::BitCast(di, hn::And(v, mask));
    const auto c = in_register ? hn::TableLookupLanes(centroid_vec, hn::IndicesFromVec(df, idx))
                               : hn::GatherIndex(df, t.centroids.data(), idx);
    hn::Store(c, df, y + static_cast<size_t>(j) * N);
  };
  constexpr int kPeriod = 32 / (kBits & -kBits);
  int j = 0;
  for (; j + kPeriod <= t.dim; j += kPeriod) {
#pragma GCC unroll 32
    for (int e = 0; e < kPeriod; ++e) element(j + e);
  }
  for (; j < t.dim; ++j) element(j);
}

template <class DF>
HWY_INLINE void DecodeTileDispatch(DF df, const Tables& t, const uint32_t* wtile, float* y) {
  switch (t.index_bits) {
    case 1:
      return DecodeTile<1>(df, t, wtile, y);
    case 2:
      return DecodeTile<2>(df, t, wtile, y);
    case 3:
      return DecodeTile<3>(df, t, wtile, y);
    case 4:
      return DecodeTile<4>(df, t, wtile, y);
    case 5:
      return DecodeTile<5>(df, t, wtile, y);
    case 6:
      return DecodeTile<6>(df, t, wtile, y);
    case 7:
      return DecodeTile<7>(df, t, wtile, y);
    case 8:
      return DecodeTile<8>(df, t, wtile, y);
    default:
      throw RuntimeError(
          detail::concat("[tqattn.dequantize] index bits 1..8 supported, got ", t.index_bits));
  }
}

// Codec::dequantize for n rows (row i from slot i of `in`) into x [n][dim], one row per lane with
// the scalar twin's operations in its order, so the output is bit-identical.
void DequantizeRows(const PreparedCodec& prepared, const PackedPlanes& in, int64_t n,
                    float* HWY_RESTRICT x) {
  const Tables& t = prepared.tables();
  const hn::ScalableTag<float> df;
  const hn::RebindToUnsigned<decltype(df)> du;
  const size_t N = hn::Lanes(df);
  const int dim = t.dim;
  const size_t tile = N * static_cast<size_t>(dim);
  const int64_t words = t.index_words;
  const int64_t swords = t.sign_words;

  thread_local Tiles tiles;
  float* mem = tiles.get(3 * tile + (words + swords + 4) * N);
  float* y = mem;
  float* qjl = mem + tile;
  float* tmp = mem + 2 * tile;
  uint32_t* wtile = reinterpret_cast<uint32_t*>(mem + 3 * tile);
  uint32_t* stile = wtile + words * N;
  float* lanes = reinterpret_cast<float*>(stile + swords * N);  // [2][N]
  const float qjl_constant = prepared.codec().qjl_scale();

  for (int64_t r0 = 0; r0 < n; r0 += static_cast<int64_t>(N)) {
    const size_t valid = static_cast<size_t>(std::min<int64_t>(N, n - r0));
    for (size_t lane = 0; lane < N; ++lane) {
      const bool ok = lane < valid;
      const int64_t row = r0 + static_cast<int64_t>(lane);
      for (int64_t w = 0; w < words; ++w)
        wtile[w * N + lane] = ok ? in.indices[row * words + w] : 0;
      lanes[lane] = ok ? half_to_float(in.norms[row]) : 0.0f;
      if (t.prod) {
        for (int64_t w = 0; w < swords; ++w) {
          stile[w * N + lane] = ok ? in.qjl_signs[row * swords + w] : 0;
        }
        lanes[N + lane] = ok ? half_to_float(in.residual_norms[row]) * qjl_constant : 0.0f;
      }
    }
    DecodeTileDispatch(df, t, wtile, y);
    float* xt = y;  // Pi^T c, in the original space
    if (t.hadamard) {
      HadamardTile(
          df, y, dim, [](int, decltype(hn::Zero(df)) v) { return v; },
          [&](int j, decltype(hn::Zero(df)) v) {
            return hn::Mul(v, hn::Set(df, t.inv_sqrt_dim * t.signs[j]));
          });
    } else {
      MatTVecTile(df, t.rotation.data(), y, tmp, dim);
      xt = tmp;
    }
    if (t.prod) {
      // qjl[j] = sum_i (+-gamma)_i S[i][j], i ascending, like the scalar twin.
      const auto gamma = hn::Load(df, lanes + N);
      const auto neg_gamma = hn::Neg(gamma);
      for (int j = 0; j < dim; ++j) hn::Store(hn::Zero(df), df, qjl + static_cast<size_t>(j) * N);
      for (int i = 0; i < dim; ++i) {
        const auto word = hn::Load(du, stile + static_cast<size_t>(i >> 5) * N);
        const auto bit = hn::Set(du, 1u << (i & 31));
        const auto set = hn::RebindMask(df, hn::Ne(hn::And(word, bit), hn::Zero(du)));
        const auto sv = hn::IfThenElse(set, gamma, neg_gamma);
        const float* row = t.qjl.data() + static_cast<size_t>(i) * dim;
        for (int j = 0; j < dim; ++j) {
          float* q = qjl + static_cast<size_t>(j) * N;
          hn::Store(hn::Add(hn::Load(df, q), hn::Mul(sv, hn::Set(df, row[j]))), df, q);
        }
      }
      for (int j = 0; j < dim; ++j) {
        float* p = xt + static_cast<size_t>(j) * N;
        hn::Store(hn::Add(hn::Load(df, p), hn::Load(df, qjl + static_cast<size_t>(j) * N)), df, p);
      }
    }
    const auto norm = hn::Load(df, lanes);
    for (int j = 0; j < dim; ++j) {
      float* p = xt + static_cast<size_t>(j) * N;
      hn::Store(hn::Mul(hn::Load(df, p), norm), df, p);
    }
    TransposeOut(df, xt, valid, dim, x + r0 * dim);
  }
}

#endif  // HWY_HAVE_SCALABLE

// fp16 / bf16 -> fp32, exact for every non-NaN value (subnormals included), like half_to_float
// and bf16_to_float.
template <typename Half>
HWY_INLINE void PromoteRows(const uint16_t* HWY_RESTRICT src, int64_t count,
                            float* HWY_RESTRICT dst) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<Half, decltype(df)> dh;
  const size_t N = hn::Lanes(df);
  const Half* in = reinterpret_cast<const Half*>(src);
  int64_t i = 0;
  const hn::Rebind<uint16_t, decltype(df)> du16;
  // Highway's emulated fp16 promotion (targets without F16C) turns Inf/NaN into finite values,
  // which would slip past the finiteness check; those lanes are redone by the scalar conversion.
  const bool is_f16 = std::is_same<Half, hwy::float16_t>::value;
  const auto exponent = hn::Set(du16, 0x7c00);
  for (; i + static_cast<int64_t>(N) <= count; i += N) {
    hn::StoreU(hn::PromoteTo(df, hn::LoadU(dh, in + i)), df, dst + i);
    if (is_f16) {
      const auto bits = hn::LoadU(du16, src + i);
      if (!hn::AllFalse(du16, hn::Eq(hn::And(bits, exponent), exponent))) {
        for (size_t k = 0; k < N; ++k) dst[i + k] = half_to_float(src[i + k]);
      }
    }
  }
  for (; i < count; ++i) {
    dst[i] =
        std::is_same<Half, hwy::float16_t>::value ? half_to_float(src[i]) : bf16_to_float(src[i]);
  }
}

void PromoteF16(const uint16_t* src, int64_t count, float* dst) {
  PromoteRows<hwy::float16_t>(src, count, dst);
}
void PromoteBF16(const uint16_t* src, int64_t count, float* dst) {
  PromoteRows<hwy::bfloat16_t>(src, count, dst);
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace tqattn::cpu
HWY_AFTER_NAMESPACE();
#endif  // TQATTN_HAVE_HIGHWAY

#if !defined(TQATTN_HAVE_HIGHWAY) || HWY_ONCE
namespace tqattn::cpu {

#ifdef TQATTN_HAVE_HIGHWAY
HWY_EXPORT(QuantizeRows);
HWY_EXPORT(DequantizeRows);
HWY_EXPORT(TargetName);
HWY_EXPORT(PromoteF16);
HWY_EXPORT(PromoteBF16);
#endif

// Padding for full-vector loads of small tables (the widest vector: 2048-bit SVE).
constexpr int64_t kMaxLanes = 64;

PreparedCodec::PreparedCodec(std::shared_ptr<const Codec> codec) : codec_(std::move(codec)) {
  const Codec& c = *codec_;
  Tables& t = tables_;
  t.dim = c.dim();
  t.index_bits = c.index_bits();
  t.index_words = c.index_words();
  t.prod = c.mode() == QuantMode::kProd;
  t.sign_words = t.prod ? tqattn::sign_words(c.dim()) : 0;
  t.hadamard = c.rotation().kind() == RotationKind::kHadamard;
  t.norm_correction = c.norm_correction();
  // Exactly Rotation::forward's scale expression.
  t.inv_sqrt_dim = 1.0f / std::sqrt(static_cast<float>(t.dim));
  if (t.hadamard) {
    t.signs = c.rotation().signs();
  } else {
    t.rotation = c.rotation().matrix();
  }
  if (t.prod) t.qjl = c.qjl_matrix();
  // Padded so that a full vector load is always in bounds; the padding is never selected.
  t.centroids = c.codebook().centroids();
  t.centroids.resize(256, 0.0f);
  // Level L of the search tree (L = 0 .. bits - 1, 2^L entries): T_L[m] = b[(2m + 1) 2^(bits-1-L) -
  // 1], the boundary probed when the path so far is m. Each level is padded for full-vector loads.
  const std::vector<float>& b = c.codebook().boundaries();
  for (int level = 0; level < t.index_bits; ++level) {
    t.level_offsets.push_back(static_cast<int64_t>(t.levels.size()));
    const int64_t step = int64_t{1} << (t.index_bits - 1 - level);
    const int64_t entries = int64_t{1} << level;
    for (int64_t m = 0; m < entries; ++m) t.levels.push_back(b[(2 * m + 1) * step - 1]);
    t.levels.resize(t.levels.size() + std::max<int64_t>(0, kMaxLanes - entries), 0.0f);
  }
#ifdef TQATTN_HAVE_HIGHWAY
  vectorised_ = true;
#endif
}

bool PreparedCodec::quantize(const float* x, int64_t n, const PackedPlanes& out,
                             const int64_t* slots) const {
  if (n <= 0) return true;
#ifdef TQATTN_HAVE_HIGHWAY
  return HWY_DYNAMIC_DISPATCH(QuantizeRows)(*this, x, n, out, slots);
#else
  return quantize_rows_scalar(*codec_, x, n, out, slots);
#endif
}

void PreparedCodec::dequantize(const PackedPlanes& in, int64_t n, float* x) const {
  if (n <= 0) return;
#ifdef TQATTN_HAVE_HIGHWAY
  HWY_DYNAMIC_DISPATCH(DequantizeRows)(*this, in, n, x);
#else
  codec_->dequantize(in, n, x);
#endif
}

bool quantize_rows_scalar(const Codec& codec, const float* x, int64_t n, const PackedPlanes& out,
                          const int64_t* slots) {
  const int64_t dim = codec.dim();
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    float sumsq = 0.0f;
    for (int64_t j = 0; j < dim; ++j) sumsq += x[i * dim + j] * x[i * dim + j];
    finite = finite && std::isfinite(sumsq);
  }
  if (!slots) {
    codec.quantize(x, n, out);
    return finite;
  }
  const int64_t words = codec.index_words();
  const int64_t signs = sign_words(dim);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = slots[i];
    const PackedPlanes at{out.indices + s * words, out.norms + s,
                          out.residual_norms ? out.residual_norms + s : nullptr,
                          out.qjl_signs ? out.qjl_signs + s * signs : nullptr};
    codec.quantize(x + i * dim, 1, at);
  }
  return finite;
}

void convert_to_float(const void* src, DType dtype, int64_t count, float* dst) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
      return;
    case DType::kFloat16:
#ifdef TQATTN_HAVE_HIGHWAY
      HWY_DYNAMIC_DISPATCH(PromoteF16)(static_cast<const uint16_t*>(src), count, dst);
#else
      for (int64_t i = 0; i < count; ++i)
        dst[i] = half_to_float(static_cast<const uint16_t*>(src)[i]);
#endif
      return;
    case DType::kBFloat16:
#ifdef TQATTN_HAVE_HIGHWAY
      HWY_DYNAMIC_DISPATCH(PromoteBF16)(static_cast<const uint16_t*>(src), count, dst);
#else
      for (int64_t i = 0; i < count; ++i)
        dst[i] = bf16_to_float(static_cast<const uint16_t*>(src)[i]);
#endif
      return;
    default:
      throw RuntimeError(
          detail::concat("[tqattn.convert_to_float] float32, float16 or bfloat16 "
                         "supported, got ",
                         dtype_name(dtype)));
  }
}

const char* quantize_target_name() {
#ifdef TQATTN_HAVE_HIGHWAY
  return HWY_DYNAMIC_DISPATCH(TargetName)();
#else
  return "scalar";
#endif
}

}  // namespace tqattn::cpu
#endif
