// QuantizedTensor (owned planes + batched quantize-on-write), QuantizedStates accounting,
// quantize_tensor and dequantize_states.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "cache/cache_internal.h"
#include "cpu/quantize.h"
#include "cpu/thread_pool.h"
#include "cuda/cuda_backend.h"
#include "tqattn/cache.h"
#include "tqattn/error.h"

namespace tqattn {
namespace cache_detail {

constexpr size_t kAlignment = 64;
// Vectors per task: a multiple of every SIMD width (lanes hold rows), big enough to amortise a
// task's setup, small enough to balance 2..16 threads.
constexpr int64_t kRowsPerTask = 64;
// Below this many vectors a write runs on the calling thread: waking workers costs more.
constexpr int64_t kMinVectorsForThreads = 256;

// One plane's memory on the CPU (64-byte aligned) or a CUDA device; zero-filled on allocation so
// that slots past the valid lengths are deterministic.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t bytes, DeviceType device, int device_id)
      : bytes_(bytes), device_(device), device_id_(device_id) {
    if (bytes == 0) return;
    if (device == DeviceType::kCUDA) {
      ptr_ = cuda::device_alloc(bytes, device_id);
      cuda::device_memset_zero(ptr_, bytes, device_id);
    } else {
      const size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
      ptr_ = std::aligned_alloc(kAlignment, rounded);
      if (!ptr_) throw std::bad_alloc();
      std::memset(ptr_, 0, bytes);
    }
  }
  ~Buffer() { release(); }
  Buffer(Buffer&& other) noexcept { swap(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      release();
      swap(other);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void swap(Buffer& other) noexcept {
    std::swap(ptr_, other.ptr_);
    std::swap(bytes_, other.bytes_);
    std::swap(device_, other.device_);
    std::swap(device_id_, other.device_id_);
  }
  void release() noexcept {
    if (!ptr_) return;
    if (device_ == DeviceType::kCUDA) {
      cuda::device_free(ptr_, device_id_);
    } else {
      std::free(ptr_);
    }
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  DeviceType device_ = DeviceType::kCPU;
  int device_id_ = 0;
};

// Bytes per token of each plane of one part.
struct PartLayout {
  int64_t index_words = 0;
  int64_t sign_words = 0;
  bool prod = false;

  explicit PartLayout(const Codec& codec)
      : index_words(codec.index_words()),
        sign_words(codec.mode() == QuantMode::kProd ? tqattn::sign_words(codec.dim()) : 0),
        prod(codec.mode() == QuantMode::kProd) {}
  int64_t bytes_per_vector() const { return 4 * index_words + 2 + (prod ? 2 + 4 * sign_words : 0); }
};

// Planes of one part offset to slot `slot` (slots counted over [B, H, capacity]).
static PackedPlanes offset_planes(const PackedPlanes& p, const PartLayout& layout, int64_t slot) {
  PackedPlanes out;
  out.indices = p.indices ? p.indices + slot * layout.index_words : nullptr;
  out.norms = p.norms ? p.norms + slot : nullptr;
  out.residual_norms = p.residual_norms ? p.residual_norms + slot : nullptr;
  out.qjl_signs = p.qjl_signs ? p.qjl_signs + slot * layout.sign_words : nullptr;
  return out;
}

// Multiplies sizes, throwing when the product does not fit the address space.
static int64_t checked_bytes(const char* fn, std::initializer_list<int64_t> factors) {
  long double product = 1;
  for (int64_t f : factors) product *= static_cast<long double>(f);
  if (product > static_cast<long double>(std::numeric_limits<int64_t>::max() / 2)) {
    throw_invalid(fn, "sizes whose planes fit in 2^62 bytes",
                  detail::concat(static_cast<double>(product), " bytes"));
  }
  int64_t exact = 1;
  for (int64_t f : factors) exact *= f;  // cannot overflow now
  return exact;
}

static void validate_quantizer(const char* fn, const std::shared_ptr<const TensorQuantizer>& q) {
  if (!q || q->parts().empty()) throw_invalid(fn, "a quantizer with at least one part", "none");
  if (q->dim() < kMinDim || q->dim() > kMaxDim) {
    throw_invalid(fn, detail::concat("head_dim in ", kMinDim, "..", kMaxDim), q->dim());
  }
  for (const QuantizerPart& part : q->parts()) {
    if (!part.codec) throw_invalid(fn, "a codec in every quantizer part", "a null codec");
    if (static_cast<int64_t>(part.channels.size()) != part.codec->dim()) {
      throw_invalid(fn, detail::concat("a part of ", part.codec->dim(), " channels"),
                    part.channels.size());
    }
  }
}

// What a QuantizedTensor owns: per quantizer part, its planes and the prepared CPU codec.
struct TensorStorage {
  struct Part {
    PartLayout layout;
    Buffer indices;
    Buffer norms;
    Buffer residual_norms;
    Buffer signs;
    std::shared_ptr<const cpu::PreparedCodec> prepared;  // CPU only

    PackedPlanes planes() const {
      PackedPlanes p;
      p.indices = static_cast<uint32_t*>(indices.get());
      p.norms = static_cast<uint16_t*>(norms.get());
      p.residual_norms = static_cast<uint16_t*>(residual_norms.get());
      p.qjl_signs = static_cast<uint32_t*>(signs.get());
      return p;
    }
  };
  std::vector<Part> parts;

  std::vector<PackedPlanes> planes() const {
    std::vector<PackedPlanes> out;
    for (const Part& p : parts) out.push_back(p.planes());
    return out;
  }
};

// Allocates (zeroed) planes for [batch, heads, capacity] vectors of every part, keeping the
// prepared codecs of `storage`.
static void allocate_parts(TensorStorage& storage, const TensorQuantizer& quantizer, int64_t batch,
                           int64_t heads, int64_t capacity, DeviceType device, int device_id,
                           const char* fn) {
  std::vector<TensorStorage::Part> parts;
  try {
    for (const QuantizerPart& qp : quantizer.parts()) {
      PartLayout layout(*qp.codec);
      const int64_t slots = checked_bytes(fn, {batch, heads, capacity});
      checked_bytes(fn, {slots, layout.bytes_per_vector()});
      TensorStorage::Part part{layout, {}, {}, {}, {}, nullptr};
      part.indices = Buffer(static_cast<size_t>(slots * layout.index_words * 4), device, device_id);
      part.norms = Buffer(static_cast<size_t>(slots * 2), device, device_id);
      if (layout.prod) {
        part.residual_norms = Buffer(static_cast<size_t>(slots * 2), device, device_id);
        part.signs = Buffer(static_cast<size_t>(slots * layout.sign_words * 4), device, device_id);
      }
      parts.push_back(std::move(part));
    }
  } catch (const std::bad_alloc&) {
    throw_runtime(fn, "out of memory allocating a quantized tensor of ", batch, " x ", heads, " x ",
                  capacity, " vectors");
  }
  for (size_t p = 0; p < parts.size() && p < storage.parts.size(); ++p) {
    parts[p].prepared = storage.parts[p].prepared;
  }
  storage.parts = std::move(parts);
}

}  // namespace cache_detail

using cache_detail::api_name;
using cache_detail::ApiScope;
using cache_detail::Buffer;
using cache_detail::kMinVectorsForThreads;
using cache_detail::kRowsPerTask;
using cache_detail::offset_planes;
using cache_detail::PartLayout;
using cache_detail::validate_quantizer;

// ---------------------------------------------------------------------------------------------
// QuantizedStates

int64_t QuantizedStates::max_length() const {
  int64_t m = 0;
  for (int64_t len : lengths) m = std::max(m, len);
  return m;
}

int64_t QuantizedStates::nbytes() const {
  if (!quantizer) return 0;
  int64_t per_vector = 0;
  for (const QuantizerPart& part : quantizer->parts()) {
    per_vector += PartLayout(*part.codec).bytes_per_vector();
  }
  int64_t tokens = 0;
  for (int64_t len : lengths) tokens += len;
  return tokens * heads * per_vector;
}

// ---------------------------------------------------------------------------------------------
// QuantizedTensor

struct QuantizedTensor::Storage : cache_detail::TensorStorage {};

QuantizedTensor::QuantizedTensor(std::shared_ptr<const TensorQuantizer> quantizer, int64_t batch,
                                 int64_t heads, int64_t capacity, DeviceType device, int device_id)
    : quantizer_(std::move(quantizer)),
      batch_(batch),
      heads_(heads),
      capacity_(capacity),
      device_(device),
      device_id_(device_id),
      storage_(std::make_unique<Storage>()) {
  const char* fn = api_name("QuantizedTensor");
  validate_quantizer(fn, quantizer_);
  if (batch <= 0) throw_invalid(fn, "batch >= 1", batch);
  if (heads <= 0) throw_invalid(fn, "heads >= 1", heads);
  if (capacity < 0) throw_invalid(fn, "capacity >= 0", capacity);
  if (device_id < 0) throw_invalid(fn, "device_id >= 0", device_id);
  if (device == DeviceType::kCUDA && cuda::device_count() == 0) {
    throw_runtime(fn, "a CUDA cache needs a CUDA device; ",
                  cuda::built() ? "none is present" : "this build of tqattn has no CUDA backend");
  }
  cache_detail::allocate_parts(*storage_, *quantizer_, batch, heads, capacity, device, device_id,
                               fn);
  if (device == DeviceType::kCPU) {
    for (size_t p = 0; p < storage_->parts.size(); ++p) {
      storage_->parts[p].prepared =
          std::make_shared<cpu::PreparedCodec>(quantizer_->parts()[p].codec);
    }
  }
}

QuantizedTensor::~QuantizedTensor() = default;
QuantizedTensor::QuantizedTensor(QuantizedTensor&&) noexcept = default;
QuantizedTensor& QuantizedTensor::operator=(QuantizedTensor&&) noexcept = default;

int64_t QuantizedTensor::allocated_bytes() const {
  int64_t total = 0;
  for (const Storage::Part& p : storage_->parts) {
    total += static_cast<int64_t>(p.indices.bytes() + p.norms.bytes() + p.residual_norms.bytes() +
                                  p.signs.bytes());
  }
  return total;
}

QuantizedStates QuantizedTensor::view(const std::vector<int64_t>& lengths) const {
  const char* fn = api_name("QuantizedTensor.view");
  if (static_cast<int64_t>(lengths.size()) != batch_) {
    throw_invalid(fn, detail::concat(batch_, " lengths (one per sequence)"), lengths.size());
  }
  for (int64_t len : lengths) {
    if (len < 0 || len > capacity_) {
      throw_invalid(fn, detail::concat("lengths in 0..", capacity_, " (the capacity)"), len);
    }
  }
  QuantizedStates s;
  s.quantizer = quantizer_;
  s.batch = batch_;
  s.heads = heads_;
  s.capacity = capacity_;
  s.lengths = lengths;
  s.parts = storage_->planes();
  s.device = device_;
  s.device_id = device_id_;
  s.settled_tokens = settled_;
  return s;
}

void QuantizedTensor::reserve(int64_t new_capacity, const std::vector<int64_t>& keep) {
  const char* fn = api_name("QuantizedTensor.reserve");
  if (new_capacity < 0) throw_invalid(fn, "capacity >= 0", new_capacity);
  if (static_cast<int64_t>(keep.size()) != batch_) {
    throw_invalid(fn, detail::concat(batch_, " lengths to keep (one per sequence)"), keep.size());
  }
  for (int64_t k : keep) {
    if (k < 0 || k > capacity_) {
      throw_invalid(fn, detail::concat("lengths to keep in 0..", capacity_), k);
    }
  }
  if (new_capacity <= capacity_) return;

  Storage grown;
  for (const Storage::Part& p : storage_->parts) {
    grown.parts.push_back({p.layout, {}, {}, {}, {}, p.prepared});
  }
  cache_detail::allocate_parts(grown, *quantizer_, batch_, heads_, new_capacity, device_,
                               device_id_, fn);

  // Writes on any stream may still be filling the old planes, and the new ones were zeroed on the
  // legacy default stream: wait for all of it, and for the copies before any later write.
  if (device_ == DeviceType::kCUDA) cuda::synchronize_device(device_id_);
  auto copy = [&](const Buffer& from, const Buffer& to, int64_t bytes_per_token) {
    if (!from.get()) return;
    for (int64_t b = 0; b < batch_; ++b) {
      if (keep[b] == 0) continue;
      for (int64_t h = 0; h < heads_; ++h) {
        const int64_t row = b * heads_ + h;
        const auto* src = static_cast<const char*>(from.get()) + row * capacity_ * bytes_per_token;
        auto* dst = static_cast<char*>(to.get()) + row * new_capacity * bytes_per_token;
        const size_t bytes = static_cast<size_t>(keep[b] * bytes_per_token);
        if (device_ == DeviceType::kCUDA) {
          cuda::copy_bytes(dst, src, bytes, device_id_);
        } else {
          std::memcpy(dst, src, bytes);
        }
      }
    }
  };
  for (size_t i = 0; i < storage_->parts.size(); ++i) {
    const Storage::Part& from = storage_->parts[i];
    const Storage::Part& to = grown.parts[i];
    copy(from.indices, to.indices, 4 * from.layout.index_words);
    copy(from.norms, to.norms, 2);
    copy(from.residual_norms, to.residual_norms, 2);
    copy(from.signs, to.signs, 4 * from.layout.sign_words);
  }
  if (device_ == DeviceType::kCUDA) cuda::synchronize_device(device_id_);
  *storage_ = std::move(grown);
  capacity_ = new_capacity;
  settled_ = new_capacity;  // the device was idle after the copies
}

void QuantizedTensor::write(const TensorView& x, const std::vector<int64_t>& start,
                            int64_t sequence, int num_threads, void* stream, bool check_finite) {
  write_planes(x, start, sequence, num_threads, stream, check_finite, false);
}

void QuantizedTensor::write_planes(const TensorView& x, const std::vector<int64_t>& start,
                                   int64_t sequence, int num_threads, void* stream,
                                   bool check_finite, bool beside_previous) {
  const char* fn = api_name("QuantizedTensor.write");
  const int64_t dim = quantizer_->dim();
  cache_detail::check_float_dtype(fn, "x", x.dtype);
  cache_detail::check_device(fn, "x", x, device_, device_id_);
  if (sequence >= batch_ || sequence < -1) {
    throw_invalid(fn, detail::concat("sequence in -1..", batch_ - 1), sequence);
  }
  if (sequence < 0) {
    cache_detail::check_shape(fn, "x", x, {batch_, heads_, -1, dim});
  } else {
    cache_detail::check_shape(fn, "x", x, {heads_, -1, dim});
  }
  const int64_t n = x.shape[x.rank() - 2];
  const bool one_start = sequence >= 0 && start.size() == 1;
  if (!one_start && static_cast<int64_t>(start.size()) != batch_) {
    throw_invalid(fn, detail::concat(batch_, " start positions (one per sequence)"), start.size());
  }
  auto start_of = [&](int64_t b) { return one_start ? start[0] : start[b]; };
  const int64_t first_b = sequence < 0 ? 0 : sequence;
  const int64_t batches = sequence < 0 ? batch_ : 1;
  for (int64_t b = first_b; b < first_b + batches; ++b) {
    if (start_of(b) < 0 || start_of(b) > capacity_ - n) {
      throw_invalid(fn,
                    detail::concat("start in 0..capacity - n = ", capacity_ - n, " (capacity ",
                                   capacity_, ", n ", n, ")"),
                    start_of(b));
    }
  }
  if (n == 0) return;
  if (!x.data) throw_invalid(fn, "x with data", "a null pointer");

  if (device_ == DeviceType::kCUDA) {
    std::vector<int64_t> starts(batch_, 0);
    int64_t lowest = capacity_;
    for (int64_t b = first_b; b < first_b + batches; ++b) {
      starts[b] = start_of(b);
      lowest = std::min(lowest, starts[b]);
    }
    // Lowered before the launch: if the write throws after its kernels ran, their tokens must
    // not count as settled.
    settled_ = lowest;
    if (cuda::quantize_write(*quantizer_, x, storage_->planes(), batch_, heads_, capacity_, starts,
                             sequence, stream, check_finite, beside_previous)) {
      settled_ = capacity_;
    }
    return;
  }
  settled_ = capacity_;  // CPU writes are done when write returns

  // Rows of x in memory order ((b, h, t) flattened) are split into fixed chunks; each row goes to
  // its own slot, so one chunk may span heads (a decode append is one token per head).
  const int64_t total = batches * heads_ * n;
  const int64_t tasks = (total + kRowsPerTask - 1) / kRowsPerTask;
  const int threads = total < kMinVectorsForThreads ? 1 : cpu::resolve_threads(num_threads);
  std::atomic<bool> all_finite{true};

  cpu::parallel_for(tasks, threads, [&](int64_t task) {
    const int64_t r0 = task * kRowsPerTask;
    const int64_t rows = std::min(kRowsPerTask, total - r0);
    thread_local std::vector<int64_t> slots;
    thread_local std::vector<float> converted;  // rows as fp32, all channels
    thread_local std::vector<float> gathered;   // one part's channels
    slots.resize(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = r0 + i;
      const int64_t bh = r / n;
      const int64_t b = first_b + bh / heads_;
      slots[i] = (b * heads_ + bh % heads_) * capacity_ + start_of(b) + r % n;
    }
    const float* full = x.as<const float>() + r0 * dim;
    if (x.dtype != DType::kFloat32) {
      converted.resize(static_cast<size_t>(rows * dim));
      const auto* src = static_cast<const char*>(x.data) + r0 * dim * dtype_size(x.dtype);
      cpu::convert_to_float(src, x.dtype, rows * dim, converted.data());
      full = converted.data();
    }
    for (size_t p = 0; p < storage_->parts.size(); ++p) {
      const Storage::Part& part = storage_->parts[p];
      const QuantizerPart& qp = quantizer_->parts()[p];
      const int64_t part_dim = qp.codec->dim();
      const float* rows_ptr = full;
      if (quantizer_->is_split()) {
        gathered.resize(static_cast<size_t>(rows * part_dim));
        cache_detail::convert_rows(full, DType::kFloat32, 0, dim, rows, qp.channels, part_dim,
                                   gathered.data());
        rows_ptr = gathered.data();
      }
      if (!part.prepared->quantize(rows_ptr, rows, part.planes(), slots.data())) {
        all_finite.store(false, std::memory_order_relaxed);
      }
    }
  });
  if (!all_finite.load()) cache_detail::throw_non_finite(fn, "input", x);
}

// ---------------------------------------------------------------------------------------------
// Free functions

QuantizedTensor quantize_tensor(std::shared_ptr<const TensorQuantizer> quantizer,
                                const TensorView& x, int num_threads) {
  constexpr const char* fn = "quantize_tensor";
  ApiScope scope(fn);
  validate_quantizer(fn, quantizer);
  cache_detail::check_float_dtype(fn, "x", x.dtype);
  if (x.rank() != 4) throw_invalid(fn, "x of rank 4 [B, H, T, D]", shape_string(x.shape));
  cache_detail::check_shape(fn, "x", x, {-1, -1, -1, quantizer->dim()});
  if (x.shape[0] < 1) throw_invalid(fn, "batch >= 1", x.shape[0]);
  if (x.shape[1] < 1) throw_invalid(fn, "heads >= 1", x.shape[1]);
  QuantizedTensor out(quantizer, x.shape[0], x.shape[1], x.shape[2], x.device, x.device_id);
  out.write(x, std::vector<int64_t>(x.shape[0], 0), -1, num_threads);
  return out;
}

void dequantize_states(const QuantizedStates& states, const TensorView& out, int num_threads) {
  constexpr const char* fn = "dequantize_states";
  validate_quantizer(fn, states.quantizer);
  if (states.batch < 1) throw_invalid(fn, "states.batch >= 1", states.batch);
  if (states.heads < 1) throw_invalid(fn, "states.heads >= 1", states.heads);
  if (states.capacity < 0) throw_invalid(fn, "states.capacity >= 0", states.capacity);
  if (static_cast<int64_t>(states.lengths.size()) != states.batch) {
    throw_invalid(fn, detail::concat(states.batch, " lengths"), states.lengths.size());
  }
  for (int64_t len : states.lengths) {
    if (len < 0 || len > states.capacity) {
      throw_invalid(fn, detail::concat("lengths in 0..", states.capacity), len);
    }
  }
  if (states.parts.size() != states.quantizer->parts().size()) {
    throw_invalid(fn, detail::concat(states.quantizer->parts().size(), " plane sets"),
                  states.parts.size());
  }
  const int64_t dim = states.dim();
  const int64_t max_len = states.max_length();
  if (out.dtype != DType::kFloat32) {
    throw_invalid(fn, "out of dtype float32", dtype_name(out.dtype));
  }
  cache_detail::check_device(fn, "out", out, states.device, states.device_id);
  cache_detail::check_shape(fn, "out", out, {states.batch, states.heads, max_len, dim});
  for (size_t p = 0; p < states.parts.size(); ++p) {
    const PackedPlanes& planes = states.parts[p];
    const Codec& codec = *states.quantizer->parts()[p].codec;
    const bool prod = codec.mode() == QuantMode::kProd;
    if (states.capacity > 0 && (!planes.indices || !planes.norms ||
                                (prod && (!planes.residual_norms || !planes.qjl_signs)))) {
      throw_invalid(
          fn,
          prod ? "indices, norms, residual_norms and qjl_signs planes" : "indices and norms planes",
          "a null plane");
    }
  }
  if (out.numel() == 0) return;
  if (!out.data) throw_invalid(fn, "out with data", "a null pointer");

  if (states.device == DeviceType::kCUDA) {
    cuda::dequantize_states(states, out, nullptr);
    return;
  }

  // Tasks: (sequence, head, chunk of kRowsPerTask tokens) over max_len, so that one long sequence
  // still spreads over every thread; chunks past a sequence's length only write zeros.
  std::vector<cpu::PreparedCodec> prepared;
  for (const QuantizerPart& qp : states.quantizer->parts()) prepared.emplace_back(qp.codec);
  const int64_t chunks = (max_len + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t tasks = states.batch * states.heads * chunks;
  const int threads = states.batch * states.heads * max_len < kMinVectorsForThreads
                          ? 1
                          : cpu::resolve_threads(num_threads);
  float* dst = out.as<float>();
  cpu::parallel_for(tasks, threads, [&](int64_t task) {
    const int64_t bh = task / chunks;
    const int64_t t0 = (task % chunks) * kRowsPerTask;
    const int64_t t1 = std::min(max_len, t0 + kRowsPerTask);
    const int64_t len = states.lengths[bh / states.heads];
    float* rows = dst + (bh * max_len + t0) * dim;
    const int64_t valid = std::max<int64_t>(0, std::min(t1, len) - t0);
    std::fill(rows + valid * dim, rows + (t1 - t0) * dim, 0.0f);
    if (valid == 0) return;
    thread_local std::vector<float> scratch;
    for (size_t p = 0; p < states.parts.size(); ++p) {
      const QuantizerPart& qp = states.quantizer->parts()[p];
      const PackedPlanes planes =
          offset_planes(states.parts[p], PartLayout(*qp.codec), bh * states.capacity + t0);
      if (!states.quantizer->is_split()) {
        prepared[p].dequantize(planes, valid, rows);
        continue;
      }
      const int64_t part_dim = qp.codec->dim();
      scratch.resize(static_cast<size_t>(valid * part_dim));
      prepared[p].dequantize(planes, valid, scratch.data());
      for (int64_t t = 0; t < valid; ++t) {
        for (int64_t c = 0; c < part_dim; ++c) {
          rows[t * dim + qp.channels[c]] = scratch[t * part_dim + c];
        }
      }
    }
  });
}

}  // namespace tqattn
