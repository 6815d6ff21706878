// What the CUDA backend keeps on each device between calls: the tables of every codec it has
// seen (uploaded once, freed when the codec dies) and one workspace per (device, stream).
#pragma once

#include <cstddef>
#include <cstdint>

#include "tqattn/codec.h"

namespace tqattn::cuda {

// Device copies of one quantizer part's constants. Pointers are device pointers (null when the
// part has no such table). Valid until the codec is destroyed or release_workspaces() runs.
struct CodecTables {
  int dim = 0;
  int bits = 0;        // total bits per coordinate
  int index_bits = 0;  // bits of each packed index (bits - 1 for Prod)
  bool prod = false;
  bool hadamard = false;
  bool norm_correction = false;
  float inv_sqrt_dim = 0.0f;  // computed as Rotation::forward does
  float qjl_scale = 0.0f;
  const float* centroids = nullptr;   // 2^index_bits
  const float* boundaries = nullptr;  // 2^index_bits - 1
  const float* signs = nullptr;       // Hadamard sign vector
  const float* matrix = nullptr;      // dense rotation M, row-major (y = M x)
  const float* matrix_t = nullptr;    // M^T, row-major
  const float* qjl = nullptr;         // Prod: S, row-major
  const float* qjl_t = nullptr;       // Prod: S^T, row-major
  const int* channels = nullptr;      // the part's channels (split quantizers only)
};

// Tables of `part` on `device` (the current device must be `device`). Uploads on first use
// (synchronous; not allowed while the current stream is being captured).
const CodecTables& codec_tables(const QuantizerPart& part, bool with_channels, int device,
                                void* stream, const char* fn);

// A device buffer of at least `bytes` for `stream` on the current device `device`, whose first
// `zeroed` bytes are zero when the next kernel on `stream` starts (kernels that use them as
// counters leave them zero). Grows on demand; throws during capture if it would have to grow.
void* workspace(int device, void* stream, size_t bytes, size_t zeroed, const char* fn);

// A device int the quantize kernel raises when it meets a non-finite row, and a pinned host int
// to read it back into.
struct FiniteFlag {
  int* device = nullptr;
  int* host = nullptr;
};
FiniteFlag finite_flag(int device, void* stream, const char* fn);

// Whether `stream` is being captured into a graph.
bool stream_capturing(void* stream, const char* fn);

// Multiprocessors, shared-memory limits and compute capability of `device`.
struct DeviceInfo {
  int sm_count = 0;
  int max_smem_per_block = 0;
  int max_smem_per_sm = 0;
  int cc_major = 0;
  int cc_minor = 0;
};
const DeviceInfo& device_info(int device);

}  // namespace tqattn::cuda
