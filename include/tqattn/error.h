// Errors thrown at the public boundary. Messages read "[tqattn.<function>] expected <X>, got <Y>".
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace tqattn {

// A caller passed something invalid (shape, dtype, bits, value). Python sees ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A valid request that cannot be carried out here (no GPU, capacity exhausted, CUDA error).
// Python sees RuntimeError.
class RuntimeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}
}  // namespace detail

// Throws InvalidArgument("[tqattn.fn] expected <expected>, got <got>").
template <typename Got>
[[noreturn]] void throw_invalid(const char* fn, const std::string& expected, const Got& got) {
  throw InvalidArgument(detail::concat("[tqattn.", fn, "] expected ", expected, ", got ", got));
}

template <typename... Parts>
[[noreturn]] void throw_runtime(const char* fn, const Parts&... parts) {
  throw RuntimeError(detail::concat("[tqattn.", fn, "] ", parts...));
}

}  // namespace tqattn
