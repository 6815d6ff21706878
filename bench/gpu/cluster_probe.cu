// EXPERIMENT: how many clusters of n blocks (one 512-thread block per SM, ~200 KB of shared
// memory) the device holds at once.
#include <cstdio>
#include <cuda_runtime.h>
__global__ void probe_kernel(int* x) {
  extern __shared__ int s[];
  s[threadIdx.x] = threadIdx.x;
  if (x) x[0] = s[0];
}
int main() {
  const size_t smem = 200 * 1024;
  cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024);
  cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  for (int n : {1, 2, 4, 8, 16}) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(n * 8, 1, 1);
    cfg.blockDim = dim3(512);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = n;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = -1;
    cudaError_t e = cudaOccupancyMaxActiveClusters(&clusters, probe_kernel, &cfg);
    std::printf("cluster %2d: %d resident (%s)\n", n, clusters, cudaGetErrorString(e));
  }
  return 0;
}
