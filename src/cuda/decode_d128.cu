// Decode kernels for head dim 128 (MSE and Prod keys; the stream decode for the common MSE widths).
#include "cuda/decode.cuh"
#include "cuda/decode_stream.cuh"

TQATTN_INSTANTIATE_DECODE(128)
TQATTN_INSTANTIATE_STREAM_DECODE(128)
