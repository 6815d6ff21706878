// Helpers for the CUDA tests: device buffers, uploads, poisoning, dtype conversion on the host.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda/cuda_backend.h"
#include "tqattn/tqattn.h"

#define TQATTN_SKIP_WITHOUT_GPU()                                              \
  do {                                                                         \
    if (::tqattn::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

namespace tqattn::testing {

// A device allocation on device 0 that frees itself.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    ptr_ = bytes ? cuda::device_alloc(bytes, 0) : nullptr;
  }
  ~DeviceBuffer() { cuda::device_free(ptr_, 0); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  void upload(const void* src) { cuda::copy_bytes(ptr_, src, bytes_, 0); }
  void download(void* dst) const { cuda::copy_bytes(dst, ptr_, bytes_, 0); }
  // Fills with 0xff bytes: NaN in fp32, fp16 and bf16.
  void poison() {
    std::vector<unsigned char> ff(bytes_, 0xff);
    upload(ff.data());
  }
  template <typename T>
  std::vector<T> to_host() const {
    std::vector<T> v(bytes_ / sizeof(T));
    download(v.data());
    return v;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Rounds fp32 values to `dtype` and returns the raw bytes of that dtype.
inline std::vector<unsigned char> encode(const std::vector<float>& x, DType dtype) {
  std::vector<unsigned char> out(x.size() * dtype_size(dtype));
  for (size_t i = 0; i < x.size(); ++i) {
    if (dtype == DType::kFloat32) {
      std::memcpy(out.data() + 4 * i, &x[i], 4);
    } else {
      const uint16_t h = dtype == DType::kFloat16 ? float_to_half(x[i]) : float_to_bf16(x[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

inline std::vector<float> decode(const void* data, DType dtype, size_t n) {
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    if (dtype == DType::kFloat32) {
      std::memcpy(&out[i], static_cast<const char*>(data) + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, static_cast<const char*>(data) + 2 * i, 2);
      out[i] = dtype == DType::kFloat16 ? half_to_float(h) : bf16_to_float(h);
    }
  }
  return out;
}

inline TensorView device_view(const DeviceBuffer& buf, DType dtype, std::vector<int64_t> shape) {
  return TensorView{buf.get(), dtype, std::move(shape), DeviceType::kCUDA, 0};
}

// Bytes of each plane of one quantizer part for [B, H, capacity] vectors.
struct PlaneBytes {
  size_t indices = 0, norms = 0, residual_norms = 0, qjl_signs = 0;
};
inline PlaneBytes plane_bytes(const Codec& codec, int64_t vectors) {
  PlaneBytes b;
  b.indices = static_cast<size_t>(vectors * codec.index_words() * 4);
  b.norms = static_cast<size_t>(vectors * 2);
  if (codec.mode() == QuantMode::kProd) {
    b.residual_norms = static_cast<size_t>(vectors * 2);
    b.qjl_signs = static_cast<size_t>(vectors * sign_words(codec.dim()) * 4);
  }
  return b;
}

// Copies every plane of `from` into `to` (same quantizer and sizes; either side host or device).
inline void copy_planes(const QuantizedTensor& from, const QuantizedTensor& to, int64_t batch,
                        int64_t heads) {
  const QuantizedStates a = from.view(std::vector<int64_t>(batch, 0));
  const QuantizedStates b = to.view(std::vector<int64_t>(batch, 0));
  const auto& parts = from.quantizer()->parts();
  for (size_t p = 0; p < parts.size(); ++p) {
    const PlaneBytes n = plane_bytes(*parts[p].codec, batch * heads * from.capacity());
    cuda::copy_bytes(b.parts[p].indices, a.parts[p].indices, n.indices, 0);
    cuda::copy_bytes(b.parts[p].norms, a.parts[p].norms, n.norms, 0);
    if (n.residual_norms) {
      cuda::copy_bytes(b.parts[p].residual_norms, a.parts[p].residual_norms, n.residual_norms, 0);
      cuda::copy_bytes(b.parts[p].qjl_signs, a.parts[p].qjl_signs, n.qjl_signs, 0);
    }
  }
}

}  // namespace tqattn::testing
