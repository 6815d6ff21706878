// The wgmma prefill kernel (D = 128, MSE keys): all width pairs in one file.
#include "cuda/prefill_wgmma.cuh"

namespace tqattn::cuda {

void launch_prefill_wgmma(const AttnParams& p, dim3 grid, size_t smem, cudaStream_t stream) {
  attn::launch_prefill_wgmma_widths(p, grid, smem, stream);
}

int prefill_wgmma_occupancy(size_t smem) { return attn::prefill_wgmma_kernel_occupancy(smem); }

int prefill_wgmma_max_clusters(size_t smem, int cluster) {
  return attn::prefill_wgmma_kernel_max_clusters(smem, cluster);
}

}  // namespace tqattn::cuda
