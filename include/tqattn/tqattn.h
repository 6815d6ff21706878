// tqattn: attention over a TurboQuant-quantized KV cache. The whole public API.
#pragma once

#include "tqattn/attention.h"
#include "tqattn/cache.h"
#include "tqattn/codec.h"
#include "tqattn/error.h"
#include "tqattn/format.h"
#include "tqattn/half.h"
#include "tqattn/tensor.h"

namespace tqattn {
const char* version();
bool cuda_available();  // built with CUDA and a device is present
}  // namespace tqattn
