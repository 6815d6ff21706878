// Decode kernels for head dim 128 (MSE and Prod keys; the stream decode for the common MSE widths).
#include "cuda/decode.cuh"
#include "cuda/decode_stream.cuh"

TQATTN_INSTANTIATE_DECODE(128)
TQATTN_INSTANTIATE_STREAM_DECODE(128)

// EXPERIMENT: the stamps of the last stream decode call at D = 128.
extern "C" int tq_read_stream_stamps(unsigned long long* dst, int n) {
  static unsigned long long zeros[512 * 16];
  const size_t bytes = sizeof(unsigned long long) * 16 * n;
  cudaError_t e = cudaMemcpyFromSymbol(dst, tqattn::cuda::attn::g_stream_stamps, bytes);
  if (e == cudaSuccess) e = cudaMemcpyToSymbol(tqattn::cuda::attn::g_stream_stamps, zeros, bytes);
  return static_cast<int>(e);
}
