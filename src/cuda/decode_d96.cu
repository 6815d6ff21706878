// Decode kernels for head dim 96 (MSE and Prod keys; the stream decode for the common MSE widths).
#include "cuda/decode.cuh"
#include "cuda/decode_stream.cuh"

TQATTN_INSTANTIATE_DECODE(96)
TQATTN_INSTANTIATE_STREAM_DECODE(96)
