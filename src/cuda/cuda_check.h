// Host-side CUDA plumbing shared by the backend's .cpp and .cu files: error checks that name the
// failing call, a device guard, dtype codes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tqattn::cuda {

// Throws RuntimeError "[tqattn.<fn>] <call> failed: <name>: <message>" unless err is cudaSuccess.
void check(cudaError_t err, const char* fn, const char* call);
#define TQATTN_CUDA(fn, call) ::tqattn::cuda::check((call), (fn), #call)
// After a kernel launch: the launch error (bad configuration, no image for this device), named.
void check_launch(const char* fn, const char* kernel);

// Makes `device` current for the scope of a call and restores the caller's device after.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* fn);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Element types as the kernels see them (mirrors tqattn::DType for the float kinds).
enum DTypeCode : int { kF32 = 0, kF16 = 1, kBF16 = 2, kBool = 3 };

}  // namespace tqattn::cuda
