// Decode kernels for head dim 64 (MSE and Prod keys; the stream decode for the common MSE widths).
#include "cuda/decode.cuh"
#include "cuda/decode_stream.cuh"

TQATTN_INSTANTIATE_DECODE(64)
TQATTN_INSTANTIATE_STREAM_DECODE(64)
