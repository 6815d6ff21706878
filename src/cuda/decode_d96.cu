// Decode kernels for head dim 96 (MSE and Prod keys).
#include "cuda/decode.cuh"

TQATTN_INSTANTIATE_DECODE(96)
