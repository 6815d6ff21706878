"""Shared helpers: optional frameworks, independent numpy references of the format and of
attention, and a fake CUDA array for CPU-only builds."""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import tqattn  # noqa: E402


def _available(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAVE_TORCH = _available("torch")
HAVE_MLX = _available("mlx") and _available("mlx.core")
if HAVE_MLX:
    try:
        import mlx.core  # noqa: F401  (a Linux wheel without its backend fails here)
    except Exception:  # pragma: no cover - depends on the machine
        HAVE_MLX = False
HAVE_TORCH_CUDA = False
if HAVE_TORCH:
    import torch

    HAVE_TORCH_CUDA = torch.cuda.is_available()

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (optional)")
needs_mlx = pytest.mark.skipif(not HAVE_MLX, reason="mlx is not installed or cannot run here")
needs_cuda = pytest.mark.skipif(
    not (HAVE_TORCH_CUDA and tqattn.cuda_available()),
    reason="needs torch with a CUDA device and a CUDA build of tqattn",
)


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------------------------------------
# The packed format and the quantizers, re-derived in numpy from docs/format.md.


def unpack_ref(words, dim, bits):
    """LSB-first bit stream: element j at absolute bits [j*bits, (j+1)*bits)."""
    words = np.asarray(words).astype(np.uint64)
    out = np.zeros(words.shape[:-1] + (dim,), dtype=np.int64)
    for j in range(dim):
        bit = j * bits
        w, off = bit // 32, bit % 32
        v = words[..., w] >> np.uint64(off)
        if off + bits > 32:
            v |= words[..., w + 1] << np.uint64(32 - off)
        out[..., j] = (v & np.uint64((1 << bits) - 1)).astype(np.int64)
    return out


def pack_ref(indices, bits):
    indices = np.asarray(indices).astype(np.uint64)
    dim = indices.shape[-1]
    n = (dim * bits + 31) // 32
    out = np.zeros(indices.shape[:-1] + (n,), dtype=np.uint64)
    for j in range(dim):
        bit = j * bits
        w, off = bit // 32, bit % 32
        out[..., w] |= (indices[..., j] << np.uint64(off)) & np.uint64(0xFFFFFFFF)
        if off + bits > 32:
            out[..., w + 1] |= indices[..., j] >> np.uint64(32 - off)
    return out.astype(np.uint32)


def dequantize_ref(codec, state):
    """Reconstruction from planes through the codec's published pieces, in float64."""
    if isinstance(state, tqattn.ProdState):
        norms, indices, rnorms, signs = (np.asarray(a) for a in state)
    else:
        norms, indices = (np.asarray(a) for a in state)
    y = codec.centroids.astype(np.float64)[unpack_ref(indices, codec.dim, codec.index_bits)]
    x = y @ codec.matrix.astype(np.float64)  # Pi^T y with y = M x
    if codec.mode == "prod":
        s = unpack_ref(signs, codec.dim, 1).astype(np.float64) * 2 - 1
        x = x + codec.qjl_scale * rnorms.astype(np.float64)[..., None] * (
            s @ codec.qjl_matrix.astype(np.float64)
        )
    return norms.astype(np.float64)[..., None] * x


def states_dequantize_ref(states):
    """[B, H, T, D] float64 from QuantizedStates, part by part."""
    out = np.zeros(states.shape, dtype=np.float64)
    state = states.state
    parts = states.quantizer.parts
    pieces = [state] if len(parts) == 1 else [state.low, state.high]
    for (channels, codec), piece in zip(parts, pieces):
        out[..., channels] = dequantize_ref(codec, piece)
    return out


def attention_ref(q, k, v, *, scale=None, causal=False, causal_offset=-1, window=0, mask=None,
                  sinks=None, softcap=0.0, lengths=None):
    """Exact attention in float64 with the library's documented semantics."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    B, Hq, L, D = q.shape
    H, S = k.shape[1], k.shape[2]
    g = Hq // H
    scale = 1 / math.sqrt(D) if scale is None else scale
    k = np.repeat(k, g, axis=1)
    v = np.repeat(v, g, axis=1)
    logits = scale * q @ np.swapaxes(k, -1, -2)
    if softcap:
        logits = softcap * np.tanh(logits / softcap)
    lengths = [S] * B if lengths is None else lengths
    visible = np.ones((B, Hq, L, S), dtype=bool)
    for b in range(B):
        offset = causal_offset if causal_offset >= 0 else lengths[b] - L
        pos = offset + np.arange(L)[:, None]
        j = np.arange(S)[None, :]
        vis = j < lengths[b]
        if causal:
            vis = vis & (j <= pos)
        if window > 0:
            vis = vis & (pos - j < window)
        visible[b] &= vis
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            visible &= np.broadcast_to(mask, visible.shape)
        else:
            logits = logits + np.broadcast_to(mask.astype(np.float64), logits.shape)
    logits = np.where(visible, logits, -np.inf)
    m = logits.max(-1, keepdims=True)
    if sinks is not None:
        sink = np.asarray(sinks, dtype=np.float64)[None, :, None, None]
        m = np.maximum(m, sink)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(logits - m)
    denom = p.sum(-1, keepdims=True)
    if sinks is not None:
        denom = denom + np.exp(sink - m)
    out = np.where(denom > 0, p @ v / np.where(denom > 0, denom, 1), 0.0)
    lse = np.where(denom[..., 0] > 0, np.log(np.where(denom[..., 0] > 0, denom[..., 0], 1))
                   + m[..., 0], -np.inf)
    return out, lse


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ------------------------------------------------------------------------------------------------
# A DLPack capsule that claims to live on a CUDA device (host memory behind it, never read): lets
# a CPU-only build's rejection of CUDA arrays be tested without a GPU or torch.


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _DELETER),
]


class FakeCudaArray:
    """Implements the DLPack protocol for a float32 array that says it lives on cuda:0."""

    _keep = []  # the structs stay alive for the process (tiny, tests only)

    def __init__(self, shape):
        self.shape = tuple(shape)
        self._host = np.zeros(self.shape, dtype=np.float32)
        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        self._managed = _DLManagedTensor()
        t = self._managed.dl_tensor
        t.data = self._host.ctypes.data
        t.device = _DLDevice(2, 0)  # kDLCUDA
        t.ndim = len(shape)
        t.dtype = _DLDataType(2, 32, 1)  # float32
        t.shape = self._shape
        t.strides = None
        t.byte_offset = 0
        self._deleter = _DELETER(lambda _: None)
        self._managed.deleter = self._deleter
        FakeCudaArray._keep.append(self)

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self._managed), b"dltensor", None)
