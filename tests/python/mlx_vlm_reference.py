"""A plain numpy re-implementation of mlx-vlm's TurboQuant quantizer (mlx_vlm/turboquant.py,
0.7.x), written from reading its source, for testing interop where mlx cannot run.

Independent of tqattn's own interop code on purpose: the tests check tqattn against this, and
this against the real mlx-vlm wherever mlx is installed. Objects carry mlx-vlm's attribute and
field names (key_codec, use_rht, signs, rotation, codebook, mse_codec, projection, low_idx,
TurboQuant*State fields) so that tqattn.from_mlx_vlm reads them as it reads mlx-vlm's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

EPS = 1e-6


class TurboQuantMSEState(NamedTuple):
    norms: np.ndarray
    indices: np.ndarray


class TurboQuantProdState(NamedTuple):
    norms: np.ndarray
    mse_indices: np.ndarray
    residual_norms: np.ndarray
    qjl_signs: np.ndarray


class TurboQuantSplitState(NamedTuple):
    low: object
    high: object


def sign_vector(dim, seed):
    return np.random.default_rng(seed + dim * 7919).choice([-1.0, 1.0], size=dim).astype(
        np.float32
    )


def haar_matrix(dim, seed):
    g = np.random.default_rng(seed + dim * 7919).standard_normal((dim, dim), dtype=np.float32)
    q, r = np.linalg.qr(g)
    return (q * np.sign(np.diag(r))).astype(np.float32)


def projection(dim, seed):
    return np.random.default_rng(seed + dim * 2971 + 17).standard_normal(
        (dim, dim), dtype=np.float32
    )


def grid_codebook(dim, bits):
    n = 1 << bits
    x = np.linspace(-1.0 + 1e-6, 1.0 - 1e-6, 32768, dtype=np.float32)
    c0 = math.lgamma(dim / 2) - 0.5 * math.log(math.pi) - math.lgamma((dim - 1) / 2)
    lp = c0 + ((dim - 3) / 2) * np.log(np.clip(1.0 - x**2, 1e-30, None))
    p = np.exp(lp - np.max(lp))
    p = p / p.sum()
    cdf = np.cumsum(p)
    c = np.interp((np.arange(n, dtype=np.float32) + 0.5) / n, cdf, x).astype(np.float32)
    for _ in range(100):
        b = np.empty(n + 1, dtype=np.float32)
        b[0], b[-1] = -1.0, 1.0
        b[1:-1] = 0.5 * (c[:-1] + c[1:])
        nc = c.copy()
        for i in range(n):
            m = (x >= b[i]) & ((x <= b[i + 1]) if i == n - 1 else (x < b[i + 1]))
            w = p[m]
            if w.size and w.sum() > 0:
                nc[i] = np.sum(w * x[m]) / w.sum()
        done = np.max(np.abs(nc - c)) < 1e-6
        c = nc
        if done:
            break
    return c.astype(np.float32)


def sylvester(n):
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def pack_lowbit(values, bits):
    values = values.astype(np.uint64)
    length = values.shape[-1]
    width = (length * bits + 31) // 32
    flat = values.reshape(-1, length)
    out = np.zeros((flat.shape[0], width), dtype=np.uint64)
    for j in range(length):
        bit = j * bits
        w, off = bit // 32, bit % 32
        out[:, w] |= (flat[:, j] << off) & 0xFFFFFFFF
        spill = off + bits - 32
        if spill > 0:
            out[:, w + 1] |= flat[:, j] >> (bits - spill)
    return out.astype(np.uint32).reshape(*values.shape[:-1], width)


def unpack_lowbit(packed, bits, length):
    flat = packed.reshape(-1, packed.shape[-1]).astype(np.uint64)
    out = np.zeros((flat.shape[0], length), dtype=np.uint64)
    for j in range(length):
        bit = j * bits
        w, off = bit // 32, bit % 32
        v = flat[:, w] >> off
        if off + bits > 32:
            v |= flat[:, w + 1] << (32 - off)
        out[:, j] = v & ((1 << bits) - 1)
    return out.astype(np.int64).reshape(*packed.shape[:-1], length)


class MSECodec:
    def __init__(self, dim, bits, seed):
        self.dim, self.bits = dim, bits
        self.use_rht = dim & (dim - 1) == 0
        self.signs = sign_vector(dim, seed) if self.use_rht else None
        self.rotation = haar_matrix(dim, seed)
        self.codebook = grid_codebook(dim, bits)

    def forward(self, x):
        if self.use_rht:
            h = sylvester(self.dim)
            return ((x * self.signs) @ h.T / math.sqrt(self.dim)).astype(np.float32)
        return (x @ self.rotation.T).astype(np.float32)

    def inverse(self, y):
        if self.use_rht:
            return (y @ sylvester(self.dim) / math.sqrt(self.dim) * self.signs).astype(np.float32)
        return (y @ self.rotation).astype(np.float32)

    def indices(self, unit):
        mid = (self.codebook[:-1] + self.codebook[1:]) / 2
        rotated = self.forward(unit)
        return (rotated[..., None] > mid).sum(-1)

    def quantize(self, x):
        x = x.astype(np.float32)
        norms = np.linalg.norm(x, axis=-1)
        unit = x / np.maximum(norms[..., None], EPS)
        return TurboQuantMSEState(
            norms.astype(np.float16), pack_lowbit(self.indices(unit), self.bits)
        )

    def unit(self, packed):
        return self.inverse(self.codebook[unpack_lowbit(packed, self.bits, self.dim)])

    def dequantize(self, state):
        return state.norms[..., None].astype(np.float32) * self.unit(state.indices)


class ProdCodec:
    def __init__(self, dim, bits, seed):
        self.dim, self.bits = dim, bits
        self.mse_codec = MSECodec(dim, bits - 1, seed)
        self.projection = projection(dim, seed + 1)
        self.scale = math.sqrt(math.pi / 2) / dim

    def quantize(self, x):
        x = x.astype(np.float32)
        norms = np.linalg.norm(x, axis=-1)
        unit = x / np.maximum(norms[..., None], EPS)
        idx = self.mse_codec.indices(unit)
        residual = unit - self.mse_codec.inverse(self.mse_codec.codebook[idx])
        signs = (residual @ self.projection.T >= 0).astype(np.int64)
        return TurboQuantProdState(
            norms.astype(np.float16),
            pack_lowbit(idx, self.mse_codec.bits),
            np.linalg.norm(residual, axis=-1).astype(np.float16),
            pack_lowbit(signs, 1),
        )

    def dequantize(self, state):
        mse = self.mse_codec.unit(state.mse_indices)
        signs = unpack_lowbit(state.qjl_signs, 1, self.dim).astype(np.float32) * 2 - 1
        gamma = state.residual_norms[..., None].astype(np.float32)
        qjl = self.scale * gamma * (signs @ self.projection)
        return state.norms[..., None].astype(np.float32) * (mse + qjl)


class SplitCodec:
    def __init__(self, x, bits, mode, seed):
        dim = x.shape[-1]
        lo, hi = math.floor(bits), math.ceil(bits)
        count = max(1, min(dim - 1, int(round((bits - lo) * dim / (hi - lo)))))
        scores = np.mean(np.abs(x.astype(np.float32)), axis=(0, 1, 2))
        self.high_idx = np.sort(np.argsort(scores)[-count:]).astype(np.int32)
        self.low_idx = np.setdiff1d(np.arange(dim), self.high_idx).astype(np.int32)
        cls = ProdCodec if mode == "prod" else MSECodec
        self.dim, self.bits = dim, bits
        self.low_codec = cls(len(self.low_idx), lo, seed)
        self.high_codec = cls(len(self.high_idx), hi, seed + 97)

    def quantize(self, x):
        return TurboQuantSplitState(
            self.low_codec.quantize(x[..., self.low_idx]),
            self.high_codec.quantize(x[..., self.high_idx]),
        )

    def dequantize(self, state):
        out = np.empty(state.low.norms.shape + (self.dim,), dtype=np.float32)
        out[..., self.low_idx] = self.low_codec.dequantize(state.low)
        out[..., self.high_idx] = self.high_codec.dequantize(state.high)
        return out


def build_codec(x, bits, mode, seed):
    if bits == int(bits):
        return (ProdCodec if mode == "prod" else MSECodec)(x.shape[-1], int(bits), seed)
    return SplitCodec(x, bits, mode, seed)


def _concat(a, b):
    if isinstance(a, TurboQuantSplitState):
        return TurboQuantSplitState(_concat(a.low, b.low), _concat(a.high, b.high))
    return type(a)(*(np.concatenate([x, y], axis=2) for x, y in zip(a, b)))


class TurboQuantKVCache:
    """mlx-vlm's single-sequence cache: MSE keys (seed) and values (seed + 1)."""

    def __init__(self, bits, seed=0, key_bits=None, value_bits=None):
        frac = bits != math.floor(bits)
        self.key_bits = key_bits if key_bits is not None else (math.floor(bits) if frac else bits)
        self.value_bits = (
            value_bits if value_bits is not None else (math.ceil(bits) if frac else bits)
        )
        self.seed = seed
        self.key_codec = self.value_codec = None
        self.keys = self.values = None
        self.offset = 0

    def update_and_fetch(self, keys, values):
        if self.key_codec is None:
            self.key_codec = build_codec(keys, self.key_bits, "mse", self.seed)
            self.value_codec = build_codec(values, self.value_bits, "mse", self.seed + 1)
        k, v = self.key_codec.quantize(keys), self.value_codec.quantize(values)
        self.keys = k if self.keys is None else _concat(self.keys, k)
        self.values = v if self.values is None else _concat(self.values, v)
        self.offset += keys.shape[2]
        return self.state

    @property
    def state(self):
        return self.keys, self.values

    def dequantize(self):
        return self.key_codec.dequantize(self.keys), self.value_codec.dequantize(self.values)


def sdpa(queries, keys, values, scale, mask=None):
    """Dense attention in float64: queries [B, Hq, L, D], keys/values [B, H, S, D]."""
    q = queries.astype(np.float64)
    groups = q.shape[1] // keys.shape[1]
    k = np.repeat(keys.astype(np.float64), groups, axis=1)
    v = np.repeat(values.astype(np.float64), groups, axis=1)
    logits = scale * q @ np.swapaxes(k, -1, -2)
    if mask == "causal":
        L, S = logits.shape[-2:]
        visible = np.arange(S)[None, :] <= (S - L + np.arange(L))[:, None]
        logits = np.where(visible, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(-1, keepdims=True)) @ v
