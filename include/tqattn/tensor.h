// A non-owning view of a dense row-major array on the CPU or a CUDA device.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tqattn {

enum class DType : uint8_t { kFloat32, kFloat16, kBFloat16, kBool, kUInt32, kInt32 };
enum class DeviceType : uint8_t { kCPU, kCUDA };

constexpr int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kBool: return 1;
    case DType::kUInt32: return 4;
    case DType::kInt32: return 4;
  }
  return 0;
}

const char* dtype_name(DType dtype);
const char* device_name(DeviceType device);

// Elements are contiguous, last dimension fastest. Views never own memory.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  DeviceType device = DeviceType::kCPU;
  int device_id = 0;

  int64_t rank() const { return static_cast<int64_t>(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t extent : shape) n *= extent;
    return n;
  }
  int64_t nbytes() const { return numel() * dtype_size(dtype); }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

// "[2, 8, 128]" for messages.
std::string shape_string(const std::vector<int64_t>& shape);

inline TensorView cpu_view(float* data, std::vector<int64_t> shape) {
  return TensorView{data, DType::kFloat32, std::move(shape), DeviceType::kCPU, 0};
}
inline TensorView cpu_view(const float* data, std::vector<int64_t> shape) {
  return cpu_view(const_cast<float*>(data), std::move(shape));
}

}  // namespace tqattn
