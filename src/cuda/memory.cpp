// Device memory helpers, per-device codec tables and per-stream workspaces.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"
#include "cuda/device_store.h"
#include "tqattn/error.h"

namespace tqattn::cuda {

void check(cudaError_t err, const char* fn, const char* call) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so later calls are not blamed for it
  throw_runtime(fn, call, " failed: ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

void check_launch(const char* fn, const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return;
  throw_runtime(fn, "launching ", kernel, " failed: ", cudaGetErrorName(err), ": ",
                cudaGetErrorString(err));
}

DeviceGuard::DeviceGuard(int device, const char* fn) {
  TQATTN_CUDA(fn, cudaGetDevice(&previous_));
  if (previous_ != device) TQATTN_CUDA(fn, cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

bool built() { return true; }

int device_count() {
  static const int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  }();
  return count;
}

namespace {

void check_device_id(const char* fn, int device_id) {
  const int n = device_count();
  if (device_id < 0 || device_id >= n)
    throw_invalid(fn, detail::concat("a CUDA device id in [0, ", n, ")"), device_id);
}

std::mutex& store_mutex() {
  static std::mutex m;
  return m;
}

// One uploaded codec: its tables live in a single device allocation.
struct CodecEntry {
  std::weak_ptr<const Codec> owner;
  const Codec* codec = nullptr;
  std::vector<int> channels;  // empty: uploaded without channels
  void* buffer = nullptr;
  size_t bytes = 0;
  CodecTables tables;
};

struct StreamWorkspace {
  void* ptr = nullptr;
  size_t bytes = 0;
  size_t zeroed = 0;
};

struct DeviceStore {
  std::vector<std::unique_ptr<CodecEntry>> codecs;
  std::map<void*, StreamWorkspace> workspaces;
  std::map<void*, FiniteFlag> flags;  // per stream: concurrent appends on two streams stay apart
};

std::map<int, DeviceStore>& stores() {
  static auto* s = new std::map<int, DeviceStore>();  // never destroyed: outlives static dtors
  return *s;
}

std::atomic<int> g_decode_splits{0};
// A switch that is on unless the environment variable `name` starts with '0'.
bool on_unless_env_zero(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || v[0] != '0';
}
// The stream decode kernel serves every decode call it supports unless TQATTN_CUDA_STREAM_DECODE=0
// (or set_stream_decode(false)) sends them to the generic kernel, for comparison and diagnosis.
std::atomic<bool> g_stream_decode{on_unless_env_zero("TQATTN_CUDA_STREAM_DECODE")};
// Likewise the wgmma prefill kernel (TQATTN_CUDA_WGMMA_PREFILL=0 sends prefill to mma.sync).
std::atomic<bool> g_wgmma_prefill{on_unless_env_zero("TQATTN_CUDA_WGMMA_PREFILL")};
// Split merges through thread-block clusters (TQATTN_CUDA_CLUSTER_MERGE=0 merges every split
// through the workspace partials instead).
std::atomic<bool> g_cluster_merge{on_unless_env_zero("TQATTN_CUDA_CLUSTER_MERGE")};

// The stream decode's copies before the dependency wait (set_early_copies); the environment
// variable TQATTN_CUDA_EARLY_COPIES, when set to a digit 0-2, replaces the default.
int early_copies_from_env() {
  const char* v = std::getenv("TQATTN_CUDA_EARLY_COPIES");
  return v != nullptr && v[0] >= '0' && v[0] <= '2' && v[1] == '\0' ? v[0] - '0' : 1;
}
std::atomic<int> g_early_copies{early_copies_from_env()};

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

void free_entry(CodecEntry& e) {
  if (e.buffer) cudaFree(e.buffer);
  e.buffer = nullptr;
}

}  // namespace

void* device_alloc(size_t bytes, int device_id) {
  const char* fn = "device_alloc";
  check_device_id(fn, device_id);
  if (bytes == 0) return nullptr;
  DeviceGuard guard(device_id, fn);
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw_runtime(fn, "cudaMalloc of ", bytes, " bytes on device ", device_id,
                  " failed: ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
  }
  return p;
}

void device_free(void* ptr, int device_id) noexcept {
  if (!ptr) return;
  int previous = -1;
  cudaGetDevice(&previous);
  if (previous != device_id) cudaSetDevice(device_id);
  cudaFree(ptr);
  if (previous != device_id && previous >= 0) cudaSetDevice(previous);
}

void device_memset_zero(void* ptr, size_t bytes, int device_id) {
  const char* fn = "device_memset_zero";
  if (bytes == 0) return;
  check_device_id(fn, device_id);
  DeviceGuard guard(device_id, fn);
  TQATTN_CUDA(fn, cudaMemset(ptr, 0, bytes));
}

void copy_bytes(void* dst, const void* src, size_t bytes, int device_id) {
  const char* fn = "copy_bytes";
  if (bytes == 0) return;
  check_device_id(fn, device_id);
  DeviceGuard guard(device_id, fn);
  TQATTN_CUDA(fn, cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
}

void synchronize_device(int device_id) {
  const char* fn = "synchronize_device";
  check_device_id(fn, device_id);
  DeviceGuard guard(device_id, fn);
  TQATTN_CUDA(fn, cudaDeviceSynchronize());
}

bool stream_capturing(void* stream, const char* fn) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  TQATTN_CUDA(fn, cudaStreamIsCapturing(as_stream(stream), &status));
  return status != cudaStreamCaptureStatusNone;
}

const DeviceInfo& device_info(int device) {
  static std::mutex m;
  static std::map<int, DeviceInfo> infos;
  std::lock_guard<std::mutex> lock(m);
  auto it = infos.find(device);
  if (it != infos.end()) return it->second;
  DeviceInfo info;
  const char* fn = "device_info";
  TQATTN_CUDA(fn, cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
  TQATTN_CUDA(fn, cudaDeviceGetAttribute(&info.max_smem_per_block,
                                         cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TQATTN_CUDA(fn, cudaDeviceGetAttribute(&info.max_smem_per_sm,
                                         cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  TQATTN_CUDA(fn,
              cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, device));
  TQATTN_CUDA(fn,
              cudaDeviceGetAttribute(&info.cc_minor, cudaDevAttrComputeCapabilityMinor, device));
  return infos.emplace(device, info).first->second;
}

const CodecTables& codec_tables(const QuantizerPart& part, bool with_channels, int device,
                                void* stream, const char* fn) {
  std::lock_guard<std::mutex> lock(store_mutex());
  DeviceStore& store = stores()[device];
  const Codec* codec = part.codec.get();
  const std::vector<int> no_channels;
  const std::vector<int>& channels = with_channels ? part.channels : no_channels;
  for (const auto& e : store.codecs) {
    if (e->codec == codec && e->channels == channels) {
      const auto alive = e->owner.lock();
      if (alive.get() == codec) return e->tables;
    }
  }
  if (stream_capturing(stream, fn))
    throw_runtime(fn,
                  "a codec's tables must be uploaded to the device before graph capture; "
                  "run the call once outside the capture first");
  // Drop entries whose codec died (a new codec may reuse its address).
  for (auto& e : store.codecs)
    if (e->owner.expired()) free_entry(*e);
  store.codecs.erase(std::remove_if(store.codecs.begin(), store.codecs.end(),
                                    [](const auto& e) { return e->buffer == nullptr; }),
                     store.codecs.end());

  const int n = codec->dim();
  const size_t nn = static_cast<size_t>(n) * n;
  const bool prod = codec->mode() == QuantMode::kProd;
  const bool hadamard = codec->rotation().kind() == RotationKind::kHadamard;
  const std::vector<float>& centroids = codec->codebook().centroids();
  const std::vector<float>& boundaries = codec->codebook().boundaries();

  // Layout of the single allocation, each table 256-byte aligned.
  struct Piece {
    const void* src;
    size_t bytes;
    size_t offset;
  };
  std::vector<float> matrix_t, qjl_t;
  std::vector<Piece> pieces;
  size_t total = 0;
  auto add = [&](const void* src, size_t bytes) {
    pieces.push_back({src, bytes, total});
    total += align256(std::max<size_t>(bytes, 4));
    return pieces.size() - 1;
  };
  const size_t i_cent = add(centroids.data(), centroids.size() * sizeof(float));
  const size_t i_bound = add(boundaries.data(), boundaries.size() * sizeof(float));
  size_t i_signs = SIZE_MAX, i_mat = SIZE_MAX, i_matt = SIZE_MAX, i_qjl = SIZE_MAX,
         i_qjlt = SIZE_MAX, i_chan = SIZE_MAX;
  if (hadamard) {
    i_signs = add(codec->rotation().signs().data(), n * sizeof(float));
  } else {
    const std::vector<float>& m = codec->rotation().matrix();
    matrix_t.resize(nn);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j)
        matrix_t[static_cast<size_t>(j) * n + i] = m[static_cast<size_t>(i) * n + j];
    i_mat = add(m.data(), nn * sizeof(float));
    i_matt = add(matrix_t.data(), nn * sizeof(float));
  }
  if (prod) {
    const std::vector<float>& s = codec->qjl_matrix();
    qjl_t.resize(nn);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j)
        qjl_t[static_cast<size_t>(j) * n + i] = s[static_cast<size_t>(i) * n + j];
    i_qjl = add(s.data(), nn * sizeof(float));
    i_qjlt = add(qjl_t.data(), nn * sizeof(float));
  }
  if (with_channels) i_chan = add(channels.data(), channels.size() * sizeof(int));

  auto entry = std::make_unique<CodecEntry>();
  entry->owner = part.codec;
  entry->codec = codec;
  entry->channels = channels;
  entry->bytes = total;
  TQATTN_CUDA(fn, cudaMalloc(&entry->buffer, total));
  std::vector<char> host(total, 0);
  for (const Piece& p : pieces)
    if (p.bytes) std::copy_n(static_cast<const char*>(p.src), p.bytes, host.data() + p.offset);
  TQATTN_CUDA(fn, cudaMemcpy(entry->buffer, host.data(), total, cudaMemcpyHostToDevice));

  char* base = static_cast<char*>(entry->buffer);
  auto at = [&](size_t i) -> const float* {
    return i == SIZE_MAX ? nullptr : reinterpret_cast<const float*>(base + pieces[i].offset);
  };
  CodecTables& t = entry->tables;
  t.dim = n;
  t.bits = codec->bits();
  t.index_bits = codec->index_bits();
  t.prod = prod;
  t.hadamard = hadamard;
  t.norm_correction = codec->norm_correction();
  t.inv_sqrt_dim = 1.0f / std::sqrt(static_cast<float>(n));
  t.qjl_scale = codec->qjl_scale();
  t.centroids = at(i_cent);
  t.boundaries = at(i_bound);
  t.signs = at(i_signs);
  t.matrix = at(i_mat);
  t.matrix_t = at(i_matt);
  t.qjl = at(i_qjl);
  t.qjl_t = at(i_qjlt);
  t.channels =
      i_chan == SIZE_MAX ? nullptr : reinterpret_cast<const int*>(base + pieces[i_chan].offset);
  store.codecs.push_back(std::move(entry));
  return store.codecs.back()->tables;
}

void* workspace(int device, void* stream, size_t bytes, size_t zeroed, const char* fn) {
  std::lock_guard<std::mutex> lock(store_mutex());
  StreamWorkspace& ws = stores()[device].workspaces[stream];
  bytes = std::max(bytes, zeroed);
  if (bytes > ws.bytes) {
    if (stream_capturing(stream, fn))
      throw_runtime(fn, "the attention workspace must grow (to ", bytes,
                    " bytes) during graph capture; run the call once before capturing, or fix "
                    "the decode split count with set_decode_splits");
    const size_t grown = std::max(align256(bytes), ws.bytes + ws.bytes / 2);
    if (ws.ptr) TQATTN_CUDA(fn, cudaFree(ws.ptr));
    ws.ptr = nullptr;
    ws.bytes = 0;
    ws.zeroed = 0;
    TQATTN_CUDA(fn, cudaMalloc(&ws.ptr, grown));
    ws.bytes = grown;
  }
  if (zeroed > ws.zeroed) {
    TQATTN_CUDA(fn, cudaMemsetAsync(ws.ptr, 0, zeroed, as_stream(stream)));
    ws.zeroed = zeroed;
  }
  return ws.ptr;
}

FiniteFlag finite_flag(int device, void* stream, const char* fn) {
  std::lock_guard<std::mutex> lock(store_mutex());
  FiniteFlag& flag = stores()[device].flags[stream];
  if (!flag.device) {
    TQATTN_CUDA(fn, cudaMalloc(&flag.device, sizeof(int)));
    TQATTN_CUDA(fn, cudaMemset(flag.device, 0, sizeof(int)));
    TQATTN_CUDA(fn, cudaMallocHost(&flag.host, sizeof(int)));
  }
  return flag;
}

void set_decode_splits(int splits) {
  if (splits < 0) throw_invalid("set_decode_splits", "splits >= 0 (0 = automatic)", splits);
  g_decode_splits.store(splits);
}

int decode_splits() { return g_decode_splits.load(); }

void set_stream_decode(bool enabled) { g_stream_decode.store(enabled); }

bool stream_decode_enabled() { return g_stream_decode.load(); }

void set_wgmma_prefill(bool enabled) { g_wgmma_prefill.store(enabled); }

bool wgmma_prefill_enabled() { return g_wgmma_prefill.load(); }

void set_early_copies(int mode) {
  if (mode < 0 || mode > 2)
    throw_invalid("set_early_copies",
                  "mode 0 (never), 1 (the one-round kernel) or 2 (the ring kernel too)", mode);
  g_early_copies.store(mode);
}

int early_copies() { return g_early_copies.load(); }

void set_cluster_merge(bool enabled) { g_cluster_merge.store(enabled); }

bool cluster_merge_enabled() { return g_cluster_merge.load(); }

int64_t workspace_bytes(int device_id) {
  std::lock_guard<std::mutex> lock(store_mutex());
  auto it = stores().find(device_id);
  if (it == stores().end()) return 0;
  int64_t total = 0;
  for (const auto& e : it->second.codecs) total += static_cast<int64_t>(e->bytes);
  for (const auto& [stream, ws] : it->second.workspaces) total += static_cast<int64_t>(ws.bytes);
  total += static_cast<int64_t>(it->second.flags.size() * sizeof(int));
  return total;
}

void release_workspaces(int device_id) {
  std::lock_guard<std::mutex> lock(store_mutex());
  auto it = stores().find(device_id);
  if (it == stores().end()) return;
  int previous = -1;
  cudaGetDevice(&previous);
  cudaSetDevice(device_id);
  cudaDeviceSynchronize();
  for (auto& e : it->second.codecs) free_entry(*e);
  for (auto& [stream, ws] : it->second.workspaces)
    if (ws.ptr) cudaFree(ws.ptr);
  for (auto& [stream, flag] : it->second.flags) {
    if (flag.device) cudaFree(flag.device);
    if (flag.host) cudaFreeHost(flag.host);
  }
  stores().erase(it);
  if (previous >= 0) cudaSetDevice(previous);
}

}  // namespace tqattn::cuda
