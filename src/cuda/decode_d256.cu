// Decode kernels for head dim 256 (MSE and Prod keys).
#include "cuda/decode.cuh"

TQATTN_INSTANTIATE_DECODE(256)
