// Decode kernels for head dim 64 (MSE and Prod keys).
#include "cuda/decode.cuh"

TQATTN_INSTANTIATE_DECODE(64)
