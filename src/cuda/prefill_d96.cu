// Prefill kernels for head dim 96 (MSE and Prod keys).
#include "cuda/prefill.cuh"

TQATTN_INSTANTIATE_PREFILL(96)
