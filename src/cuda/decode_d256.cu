// Decode kernels for head dim 256 (MSE and Prod keys; the stream decode for the common MSE widths).
#include "cuda/decode.cuh"
#include "cuda/decode_stream.cuh"

TQATTN_INSTANTIATE_DECODE(256)
TQATTN_INSTANTIATE_STREAM_DECODE(256)
