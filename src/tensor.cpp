#include "tqattn/tensor.h"

#include <sstream>

#include "tqattn/tqattn.h"

namespace tqattn {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kBool: return "bool";
    case DType::kUInt32: return "uint32";
    case DType::kInt32: return "int32";
  }
  return "unknown";
}

const char* device_name(DeviceType device) {
  return device == DeviceType::kCUDA ? "cuda" : "cpu";
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

const char* version() { return "0.1.0"; }

}  // namespace tqattn
