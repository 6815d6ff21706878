"""Framework plumbing: which array library an argument comes from, how to hand it to the C++
layer without a copy, and how to give results back in the caller's library.

numpy and PyTorch (CPU and CUDA) cross both ways without copies (DLPack / buffer protocol).
MLX arrays cross *into* the library without a copy; MLX cannot wrap memory it did not allocate,
so results for MLX callers are written into MLX-allocated arrays where the call has an output
argument (attention, dequantize), and copied once where the library owns the result (quantized
planes).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import numpy as np

NUMPY, TORCH, MLX, DLPACK = "numpy", "torch", "mlx", "dlpack"

def framework_of(x: Any, name: str = "array") -> str:
    """The array library `x` belongs to; TypeError for anything that is not an array."""
    if isinstance(x, np.ndarray):
        return NUMPY
    module = type(x).__module__ or ""
    if module.startswith("torch"):
        return TORCH
    if module.startswith("mlx"):
        return MLX
    if hasattr(x, "__dlpack__"):
        return DLPACK
    raise TypeError(
        f"[tqattn] expected {name} to be a numpy array, torch tensor or mlx array, "
        f"got {type(x).__module__}.{type(x).__name__}"
    )


def prepare(x: Any, name: str) -> Any:
    """Validates the Python type of an array argument and readies it for the C++ layer."""
    fw = framework_of(x, name)
    if fw == MLX:
        import mlx.core as mx

        mx.eval(x)  # MLX is lazy: materialise before the pointer is taken
    return x


def contiguous(x: Any, name: str) -> Any:
    """x itself when row-major contiguous, else a contiguous copy in its own library (for inputs
    that are read once, such as new tokens appended to a cache)."""
    fw = framework_of(x, name)
    if fw == TORCH:
        return x.contiguous()
    if fw == MLX:
        import mlx.core as mx

        out = mx.contiguous(x) if hasattr(mx, "contiguous") else x
        mx.eval(out)
        return out
    if fw == NUMPY:
        return np.ascontiguousarray(x)
    return x


def prepare_optional(x: Any, name: str) -> Any:
    return None if x is None else prepare(x, name)


def is_cuda(x: Any) -> bool:
    return framework_of(x) == TORCH and x.is_cuda


def dtype_name(x: Any) -> str:
    fw = framework_of(x)
    if fw == NUMPY:
        return x.dtype.name
    if fw == TORCH:
        return str(x.dtype).replace("torch.", "")
    if fw == MLX:
        return str(x.dtype).replace("mlx.core.", "")
    return str(getattr(x, "dtype", "unknown"))


def device_of(x: Any):
    """('cpu', 0) or ('cuda', index)."""
    if framework_of(x) == TORCH and x.is_cuda:
        return "cuda", x.device.index if x.device.index is not None else 0
    return "cpu", 0


def current_stream(x: Any) -> int:
    """The caller's current CUDA stream (as an integer handle) for a torch CUDA tensor, else 0."""
    if framework_of(x) == TORCH and x.is_cuda:
        import torch

        return int(torch.cuda.current_stream(x.device).cuda_stream)
    return 0


def _mlx_dtype(name: str):
    import mlx.core as mx

    return getattr(mx, name)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def empty(like: Any, shape: Sequence[int], dtype: str):
    """An uninitialised array in `like`'s library and device that the C++ layer can write."""
    fw = framework_of(like)
    shape = tuple(int(s) for s in shape)
    if fw == TORCH:
        import torch

        return torch.empty(shape, dtype=_torch_dtype(dtype), device=like.device)
    if fw == MLX:
        import mlx.core as mx

        # A fresh MLX allocation (evaluated, contiguous, unshared) that we fill in place: the
        # only way to return MLX results without a copy.
        out = mx.zeros(shape, dtype=_mlx_dtype(dtype))
        mx.eval(out)
        return out
    if dtype == "bfloat16":
        raise ValueError("[tqattn] numpy has no bfloat16: pass float32 or float16 arrays")
    return np.empty(shape, dtype=np.dtype(dtype))


def wrap(exported: Any, like_framework: str):
    """A library-owned array (DLPack + buffer protocol) as the caller's library sees it."""
    if exported is None:
        return None
    if like_framework == TORCH:
        import torch

        return torch.from_dlpack(exported)
    if like_framework == MLX:
        import mlx.core as mx

        if hasattr(mx, "from_dlpack"):
            return mx.from_dlpack(exported)  # MLX copies foreign memory
        return mx.array(np.asarray(exported))
    return np.asarray(exported)


def copy(x: Any):
    """An owned copy of an array in its own library."""
    fw = framework_of(x)
    if fw == TORCH:
        return x.clone()
    if fw == MLX:
        import mlx.core as mx

        return mx.array(x)
    return np.array(x, copy=True)


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view (CPU) or copy (CUDA / MLX when unavoidable) of x, for checks and tests."""
    fw = framework_of(x)
    if fw == TORCH:
        return x.detach().cpu().numpy()
    if fw == MLX:
        import mlx.core as mx

        mx.eval(x)
        return np.asarray(x)
    return np.asarray(x)


def float32_cpu(x: Any, name: str) -> np.ndarray:
    """Setup data (signs, matrices, centroids) as a contiguous float32 numpy array."""
    if x is None:
        return None
    if not isinstance(x, (np.ndarray, list, tuple)):
        x = to_numpy(x)
    try:
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise TypeError(f"[tqattn] {name} must be an array of numbers: {e}") from None


def has_module(name: str) -> bool:
    if name in sys.modules:
        return True
    import importlib.util

    return importlib.util.find_spec(name) is not None


def output_like(queries: Any, shape: Sequence[int], dtype: Optional[str] = None):
    """Output buffer for a result computed from `queries` (same library/device/dtype)."""
    return empty(queries, shape, dtype or dtype_name(queries))
