// The wgmma prefill kernel for head dim 256 (MSE keys): all width pairs in one file.
#include "cuda/prefill_wgmma.cuh"

TQATTN_INSTANTIATE_WGMMA_PREFILL(256)
