// Prefill kernels for head dim 256 (MSE and Prod keys).
#include "cuda/prefill.cuh"

TQATTN_INSTANTIATE_PREFILL(256)
