// Prefill kernels for head dim 64 (MSE and Prod keys).
#include "cuda/prefill.cuh"

TQATTN_INSTANTIATE_PREFILL(64)
