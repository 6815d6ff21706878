// How many thread-block clusters of each size can be resident at once on this card, for blocks of
// 512 threads holding 100 or 200 KiB of shared memory (two or one per SM): whether a split-KV
// decode could merge its splits through distributed shared memory (docs/perf.md, history 91).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o cluster_query \
//     bench/gpu/cluster_query.cu && ./cluster_query
#include <cuda_runtime.h>

#include <cstdio>

namespace {

__global__ void occupy_shared(int* out) {
  extern __shared__ int shared_words[];
  if (out != nullptr) out[0] = shared_words[0];
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::printf("no CUDA device\n");
    return 1;
  }
  std::printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cudaFuncSetAttribute(occupy_shared, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  for (int shared_bytes : {100 * 1024, 200 * 1024}) {
    cudaFuncSetAttribute(occupy_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
    for (int cluster : {1, 2, 4, 6, 7, 8, 10, 12, 14, 16}) {
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(cluster * 8);
      config.blockDim = dim3(512);
      config.dynamicSmemBytes = shared_bytes;
      cudaLaunchAttribute attribute[1];
      attribute[0].id = cudaLaunchAttributeClusterDimension;
      attribute[0].val.clusterDim.x = cluster;
      attribute[0].val.clusterDim.y = 1;
      attribute[0].val.clusterDim.z = 1;
      config.attrs = attribute;
      config.numAttrs = 1;
      int clusters = -1;
      const cudaError_t status = cudaOccupancyMaxActiveClusters(&clusters, occupy_shared, &config);
      std::printf("%3d KiB, cluster %2d: %3d clusters (%s), %3d blocks\n", shared_bytes / 1024,
                  cluster, clusters, cudaGetErrorString(status), clusters * cluster);
    }
  }
  return 0;
}
