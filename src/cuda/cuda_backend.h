// What the host-side front ends call on the CUDA backend. Std types only, so that the CPU build
// compiles it; no_cuda.cpp defines each function to throw when CUDA is not built in.
// Inputs are validated by the front end before any of these is called.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tqattn/attention.h"
#include "tqattn/cache.h"

namespace tqattn::cuda {

bool built();        // compiled with CUDA
int device_count();  // 0 when not built or no device

void* device_alloc(size_t bytes, int device_id);
void device_free(void* ptr, int device_id) noexcept;
void device_memset_zero(void* ptr, size_t bytes, int device_id);
// Copies within one device (or host<->device when either side is host memory).
void copy_bytes(void* dst, const void* src, size_t bytes, int device_id);
// Waits for all work on the device, every stream's.
void synchronize_device(int device_id);

// Quantizes x [B, H, n, D] (or [H, n, D] for one sequence) on the device into the planes of
// `states` (capacity-strided) at token start[b] of each written sequence, in `stream` order.
// check_finite: read the kernel's non-finite flag back (waits for the stream) and throw; else the
// call stays asynchronous and a non-finite row is stored with a NaN norm. beside_previous: the
// previous work in `stream` is a write of other planes whose kernels were launched normally (a
// KVCache's keys, before its values), so this one may run beside it (it neither reads nor writes
// what that one does) and ends after it. Returns whether the host waited for the stream after
// the kernels (so that they have completed).
bool quantize_write(const TensorQuantizer& quantizer, const TensorView& x,
                    const std::vector<PackedPlanes>& planes, int64_t batch, int64_t heads,
                    int64_t capacity, const std::vector<int64_t>& start, int64_t sequence,
                    void* stream, bool check_finite, bool beside_previous = false);

void dequantize_states(const QuantizedStates& states, const TensorView& out, void* stream);

void attention(const TensorView& queries, const QuantizedStates& keys,
               const QuantizedStates& values, const TensorView& out,
               const AttentionOptions& options, const TensorView* lse);

// Empty when the CUDA kernels handle these inputs, else the reason.
std::string unsupported_reason(const TensorView& queries, const QuantizedStates& keys,
                               const QuantizedStates& values, const AttentionOptions& options);

// Workspace and graph capture. Each (device, stream) keeps one cached device workspace for the
// split-KV partial results, grown on demand and never shrunk; each codec used on a device keeps
// its tables (centroids, rotation, QJL matrix) there. Once both exist for a call's shapes, a call
// neither allocates nor synchronises the host, so it can be captured into a CUDA graph. Run the
// call once before capturing; a capture that would need a larger workspace throws.
//
// Decode split count: 0 (default) picks it from the shapes and lengths; n > 0 fixes every decode
// call to at most n KV splits per sequence, so that the workspace size (and a captured graph) does
// not depend on the lengths.
void set_decode_splits(int splits);
int decode_splits();
// When enabled, the stream decode kernel serves decode for the common MSE widths (2/2, 3/3, 3/4,
// 4/4) at D 64, 96, 128, 256 over aligned planes; otherwise the generic decode kernel does. On by
// default; TQATTN_CUDA_STREAM_DECODE=0 turns it off at start.
void set_stream_decode(bool enabled);
bool stream_decode_enabled();
// When enabled, the wgmma prefill kernel serves prefill (L > 8) over MSE keys at D = 64 and 128 on
// compute capability 9.0 devices (every width pair but 8/8, whose tables do not fit); otherwise
// the mma.sync prefill kernel does. On by default; TQATTN_CUDA_WGMMA_PREFILL=0 turns it off at
// start.
void set_wgmma_prefill(bool enabled);
bool wgmma_prefill_enabled();
// When enabled, the KV splits of a unit merge inside one thread-block cluster through distributed
// shared memory where they can (decode: at most 8 splits of equal count per sequence; wgmma
// prefill: at most 8 splits, all clusters resident at once); otherwise, and for the other cases,
// through workspace partials merged by the unit's last block. On by default;
// TQATTN_CUDA_CLUSTER_MERGE=0 turns it off at start.
void set_cluster_merge(bool enabled);
bool cluster_merge_enabled();
// Whether the stream decode kernel issues its first copies before its dependency wait (while the
// previous kernel in the stream finishes) when they read only settled tokens
// (QuantizedStates::settled_tokens): 0 never; 1 in the one-round kernel (splits of one round:
// the whole split); 2 also in the ring kernel (every slot's first round). Default 1 (the ring
// kernel's were slower: docs/perf.md, history 80); TQATTN_CUDA_EARLY_COPIES=<n> sets it at start.
void set_early_copies(int mode);
int early_copies();
// The kernel family the calling thread's last attention call launched: "stream decode",
// "decode", "wgmma prefill" or "prefill" ("" before any call). For tests and diagnostics.
const char* last_attention_kernel();
// How that call merged its KV splits: "none" (one split per unit), "cluster" or "workspace".
const char* last_split_merge();
// Which stream decode kernel that call launched: "one round" (every split fits one round: 512
// tokens, 256 at D = 256) or "ring" (round slots refilled as the warps finish them); "" for the
// other kernels.
const char* last_stream_decode_variant();
// Bytes of device memory the backend holds on a device (workspaces plus codec tables).
int64_t workspace_bytes(int device_id);
// Frees a device's cached workspaces and codec tables (synchronises the device).
void release_workspaces(int device_id);

}  // namespace tqattn::cuda
