// TurboQuant codecs: Lloyd-Max codebooks for the coordinate law of a random unit vector, random
// rotations, and the MSE / Prod vector quantizers, plus the split-channel tensor quantizer.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "tqattn/format.h"

namespace tqattn {

// The optimal scalar quantizer (Lloyd-Max) of one coordinate of a uniform random unit vector in
// R^dim, whose density is proportional to (1 - x^2)^((dim - 3) / 2) on [-1, 1].
class Codebook {
 public:
  // Solved on first use, then cached per (dim, bits). Deterministic. dim >= 2, bits 1..8.
  static std::shared_ptr<const Codebook> lloyd_max(int dim, int bits);
  // A caller's table (e.g. another implementation's centroids): 2^bits ascending values.
  static std::shared_ptr<const Codebook> from_centroids(int dim, int bits,
                                                        std::vector<float> centroids);

  int dim() const { return dim_; }
  int bits() const { return bits_; }
  int size() const { return 1 << bits_; }
  const std::vector<float>& centroids() const { return centroids_; }    // ascending, 2^bits
  const std::vector<float>& boundaries() const { return boundaries_; }  // 2^bits - 1 midpoints
  // dim * E[(y - c[idx(y)])^2] under the exact coordinate law: the distortion of one unit vector.
  double distortion() const { return distortion_; }
  // Index of the nearest centroid (ties to the lower index).
  int nearest(float y) const;

  Codebook(int dim, int bits, std::vector<float> centroids);  // use the factories

 private:
  int dim_;
  int bits_;
  std::vector<float> centroids_;
  std::vector<float> boundaries_;
  double distortion_;
};

enum class RotationKind : uint8_t { kHadamard, kDense };

// An orthogonal map Pi of R^dim. Hadamard: Pi x = H (s .* x) / sqrt(dim) with H in Sylvester
// order and s a +-1 sign vector (power-of-two dim). Dense: Pi x = M x for an orthogonal matrix M
// (row-major). Generators are documented in docs/format.md (SplitMix64 from the seed).
class Rotation {
 public:
  static Rotation hadamard(int dim, uint64_t seed);
  static Rotation hadamard_from_signs(std::vector<float> signs);
  static Rotation dense(int dim, uint64_t seed);  // Haar: QR of a Gaussian, sign-fixed by diag(R)
  static Rotation dense_from_matrix(int dim, std::vector<float> matrix);
  // Hadamard where dim is a power of two, dense otherwise (as mlx-vlm).
  static Rotation default_for(int dim, uint64_t seed);

  RotationKind kind() const { return kind_; }
  int dim() const { return dim_; }
  const std::vector<float>& signs() const { return signs_; }    // Hadamard only
  const std::vector<float>& matrix() const { return matrix_; }  // dense only, dim x dim
  // y = Pi x and x = Pi^T y; in and out may alias.
  void forward(const float* x, float* y) const;
  void inverse(const float* y, float* x) const;
  // The dense matrix of Pi (for tests and for backends that want it).
  std::vector<float> to_matrix() const;

 private:
  Rotation(RotationKind kind, int dim, std::vector<float> signs, std::vector<float> matrix);
  RotationKind kind_;
  int dim_;
  std::vector<float> signs_;
  std::vector<float> matrix_;
};

// In-place fast Walsh-Hadamard transform in Sylvester order, unnormalised. n a power of two.
void fast_hadamard_transform(float* x, int n);

struct CodecConfig {
  int dim = 0;
  int bits = 4;  // total bits per coordinate; Prod spends one of them on the QJL sign
  QuantMode mode = QuantMode::kMse;
  uint64_t seed = 0;
  bool dense_rotation = false;   // force a dense rotation even for power-of-two dim
  bool norm_correction = false;  // store ||x|| / ||c[idx]|| so the reconstruction keeps ||x||
  // Caller-supplied pieces (empty = generate from seed / solve):
  std::vector<float> signs;       // Hadamard sign vector, dim entries of +-1
  std::vector<float> matrix;      // dense rotation, dim x dim row-major
  std::vector<float> centroids;   // 2^index_bits ascending
  std::vector<float> qjl_matrix;  // Prod: S, dim x dim row-major, standard Gaussian entries
};

// Quantizes single vectors of one dimension. Immutable after construction; shareable.
class Codec {
 public:
  explicit Codec(const CodecConfig& config);

  int dim() const { return dim_; }
  int bits() const { return bits_; }
  QuantMode mode() const { return mode_; }
  int index_bits() const { return tqattn::index_bits(mode_, bits_); }
  int64_t index_words() const { return packed_words(dim_, index_bits()); }
  bool norm_correction() const { return norm_correction_; }
  const Codebook& codebook() const { return *codebook_; }
  const Rotation& rotation() const { return rotation_; }
  const std::vector<float>& qjl_matrix() const { return qjl_matrix_; }  // Prod only
  // sqrt(pi/2) / dim: the QJL dequantization constant.
  float qjl_scale() const;

  // n vectors x[i*dim .. ) into slot i of each plane (indices at i*index_words(), norms at i,
  // signs at i*sign_words(dim)). Zero vectors give norm 0 and index of the centroid nearest 0.
  // x must be finite (validated by callers at the public boundary).
  void quantize(const float* x, int64_t n, const PackedPlanes& out) const;
  void dequantize(const PackedPlanes& in, int64_t n, float* x) const;

 private:
  int dim_;
  int bits_;
  QuantMode mode_;
  bool norm_correction_;
  std::shared_ptr<const Codebook> codebook_;
  Rotation rotation_;
  std::vector<float> qjl_matrix_;
};

// How one tensor (keys or values) of head dimension D is quantized: one codec over all channels,
// or, for a fractional width, two codecs over disjoint channel groups. Part p quantizes the
// channels parts[p].channels (ascending) as a vector of their own dimension, with its own rotation
// and norm: the gathered sub-vector x[channels] is what that codec sees.
struct QuantizerPart {
  std::vector<int> channels;
  std::shared_ptr<const Codec> codec;
};

class TensorQuantizer {
 public:
  // One codec over all D channels.
  static TensorQuantizer uniform(std::shared_ptr<const Codec> codec);
  // Fractional width (e.g. 2.5): the round(frac * D) channels of largest mean |x| over `sample`
  // (n_sample rows of D floats) get ceil(bits) bits, the rest floor(bits). Each group's codec is
  // made from `base` (mode, seed, flags) with its own dim; the low group uses base.seed, the high
  // group base.seed + 1. An integral width gives uniform().
  static TensorQuantizer calibrate_split(int dim, double bits, const CodecConfig& base,
                                         const float* sample, int64_t n_sample);
  // A split with given high-bit channels (e.g. read from mlx-vlm).
  static TensorQuantizer split(int dim, std::vector<int> high_channels,
                               std::shared_ptr<const Codec> high, std::shared_ptr<const Codec> low);

  int dim() const { return dim_; }
  const std::vector<QuantizerPart>& parts() const { return parts_; }
  bool is_split() const { return parts_.size() > 1; }
  double bits_per_coordinate() const;
  int64_t bytes_per_vector() const;  // all parts' planes

 private:
  int dim_ = 0;
  std::vector<QuantizerPart> parts_;
};

}  // namespace tqattn
