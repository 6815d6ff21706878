"""tqattn: scaled-dot-product attention over a TurboQuant-quantized KV cache.

The C++/CUDA core reads the packed cache directly (no dequantized copy); this package hands it
numpy arrays, PyTorch tensors (CPU and CUDA, on the current stream) and MLX arrays without
copies, and reads and writes mlx-vlm's TurboQuantKVCache bit for bit. See docs/python.md.

    import numpy as np, tqattn
    cache = tqattn.KVCache(bits=3.5)                  # 3-bit keys, 4-bit values (as mlx-vlm)
    keys, values = cache.update_and_fetch(k, v)       # k, v: [B, H_kv, T, D]
    out = tqattn.scaled_dot_product_attention(q, keys, values, mask="causal")
"""

from . import _tqattn
from ._cache import KVCache, resolve_kv_bits
from ._core import (
    Codec,
    MSEState,
    ProdState,
    QuantizedStates,
    Quantizer,
    SplitState,
    attention_unsupported_reason,
    codebook,
    codebook_distortion,
    dense_attention,
    pack,
    packed_words,
    quantize,
    scaled_dot_product_attention,
    unpack,
)
from .mlx_vlm import from_mlx_vlm, to_mlx_vlm

__version__ = _tqattn.version()


def cuda_available() -> bool:
    """Whether this build has the CUDA backend and a CUDA device is visible."""
    return _tqattn.cuda_built() and _tqattn.cuda_device_count() > 0


__all__ = [
    "Codec",
    "KVCache",
    "MSEState",
    "ProdState",
    "QuantizedStates",
    "Quantizer",
    "SplitState",
    "attention_unsupported_reason",
    "codebook",
    "codebook_distortion",
    "cuda_available",
    "dense_attention",
    "from_mlx_vlm",
    "pack",
    "packed_words",
    "quantize",
    "resolve_kv_bits",
    "scaled_dot_product_attention",
    "to_mlx_vlm",
    "unpack",
]
