"""Interop with mlx-vlm's TurboQuant KV cache (``mlx_vlm/turboquant.py``).

mlx-vlm stores no rotation or codebook: it regenerates them from a seed with numpy's RNG. Its
planes already have tqattn's packed layout (see docs/format.md), so a cache converts bit for bit
once the same rotation, codebook and QJL matrix are handed to our codecs. What mlx-vlm does, as
read from its source (0.7.x):

* Rotation of a codec of dimension D and seed s: power-of-two D uses a randomized Hadamard
  transform y = H (signs * x) / sqrt(D) (H in Sylvester order, as ``mx.hadamard_transform``),
  signs = ``default_rng(s + 7919 D).choice([-1., 1.], D)``; other D a dense Haar matrix R,
  ``default_rng(s + 7919 D).standard_normal((D, D), float32)``, Q of its QR with columns
  multiplied by sign(diag(R)), applied as y = R x (``x @ R.T``).
* Codebook: Lloyd-Max for the exact coordinate law, iterated on a 32,768-point float32 grid over
  (-1, 1) starting from the law's quantiles (100 iterations at most, stop below 1e-6).
* Prod codec of seed s and b bits: an MSE codec of b - 1 bits and seed s, and the QJL projection
  S = ``default_rng(s + 1 + 2971 D + 17).standard_normal((D, D), float32)``; sign bit j is
  (S r)_j >= 0 for the residual r of the unit vector in the original space.
* Cache: keys use seed, values seed + 1, both MSE. A fractional width b splits channels: the
  round((b - floor b) D) channels of largest mean |x| over the first tensor (at least 1, at most
  D - 1) get ceil(b) bits with seed + 97, the others floor(b) bits with the seed; states are
  ``TurboQuantSplitState(low, high)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from typing import Optional, Sequence, Tuple

import numpy as np

from . import _arrays as A
from ._core import (
    Codec,
    MSEState,
    ProdState,
    QuantizedStates,
    Quantizer,
    SplitState,
    _int,
)

HADAMARD_SEED_STRIDE = 7919
QJL_SEED_STRIDE = 2971
QJL_SEED_OFFSET = 17
SPLIT_HIGH_SEED_OFFSET = 97
CODEBOOK_GRID_POINTS = 32768
CODEBOOK_MAX_ITERATIONS = 100
CODEBOOK_TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------------------
# mlx-vlm's generators, rewritten on numpy (no mlx needed).


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def rotation_signs(dim: int, seed: int) -> np.ndarray:
    """The Hadamard sign vector mlx-vlm draws for a codec of this dim and seed."""
    rng = np.random.default_rng(seed + dim * HADAMARD_SEED_STRIDE)
    return rng.choice([-1.0, 1.0], size=dim).astype(np.float32)


def rotation_matrix(dim: int, seed: int) -> np.ndarray:
    """The dense Haar rotation mlx-vlm draws (applied as y = R @ x)."""
    rng = np.random.default_rng(seed + dim * HADAMARD_SEED_STRIDE)
    gaussian = rng.standard_normal((dim, dim), dtype=np.float32)
    q, r = np.linalg.qr(gaussian)
    q *= np.sign(np.diag(r))  # fixes each column's sign: a Haar-distributed Q
    return q.astype(np.float32)


def qjl_matrix(dim: int, seed: int) -> np.ndarray:
    """The QJL projection of a Prod codec of seed ``seed`` (mlx-vlm draws it from seed + 1)."""
    rng = np.random.default_rng(seed + 1 + dim * QJL_SEED_STRIDE + QJL_SEED_OFFSET)
    return rng.standard_normal((dim, dim), dtype=np.float32).astype(np.float32)


def codebook(dim: int, bits: int) -> np.ndarray:
    """mlx-vlm's codebook: Lloyd-Max iterations on a 32,768-point grid, in float32.

    Slightly off the true optimum that :func:`tqattn.codebook` solves for (the grid stalls the
    iteration), so interop passes this table to our codecs.
    """
    levels = 1 << bits
    if dim <= 1:
        return np.linspace(-1.0, 1.0, levels, dtype=np.float32)
    grid = np.linspace(-1.0 + 1e-6, 1.0 - 1e-6, CODEBOOK_GRID_POINTS, dtype=np.float32)
    log_norm = math.lgamma(dim / 2) - 0.5 * math.log(math.pi) - math.lgamma((dim - 1) / 2)
    log_density = log_norm + ((dim - 3) / 2) * np.log(np.clip(1.0 - grid**2, 1e-30, None))
    density = np.exp(log_density - np.max(log_density))
    total = density.sum()
    weights = density / total if total != 0 else np.full_like(grid, 1.0 / len(grid))
    cdf = np.cumsum(weights)
    quantiles = (np.arange(levels, dtype=np.float32) + 0.5) / levels
    centroids = np.interp(quantiles, cdf, grid).astype(np.float32)
    for _ in range(CODEBOOK_MAX_ITERATIONS):
        edges = np.empty(levels + 1, dtype=np.float32)
        edges[0], edges[-1] = -1.0, 1.0
        edges[1:-1] = 0.5 * (centroids[:-1] + centroids[1:])
        updated = centroids.copy()
        for i in range(levels):
            # Cells are [lo, hi) except the last, which is closed.
            below_hi = grid <= edges[i + 1] if i == levels - 1 else grid < edges[i + 1]
            cell = (grid >= edges[i]) & below_hi
            w = weights[cell]
            if w.size == 0:
                continue
            mass = w.sum()
            if mass > 0:
                updated[i] = np.sum(w * grid[cell]) / mass
        converged = np.max(np.abs(updated - centroids)) < CODEBOOK_TOLERANCE
        centroids = updated
        if converged:
            break
    return centroids.astype(np.float32)


def codec(dim: int, bits: int, seed: int, mode: str = "mse") -> Codec:
    """Our :class:`Codec` equal to mlx-vlm's ``_TurboQuantMSECodec`` / ``_TurboQuantProdCodec``
    (dim, bits, seed)."""
    dim, bits, seed = _int(dim, "dim"), _int(bits, "bits"), _int(seed, "seed")
    index_bits = bits - 1 if mode == "prod" else bits
    rotation = (
        {"signs": rotation_signs(dim, seed)}
        if _is_power_of_two(dim)
        else {"matrix": rotation_matrix(dim, seed)}
    )
    extra = {"qjl_matrix": qjl_matrix(dim, seed)} if mode == "prod" else {}
    return Codec(dim, bits, mode, centroids=codebook(dim, index_bits), **rotation, **extra)


def split_bits(bits: float) -> Tuple[int, int]:
    return math.floor(bits), math.ceil(bits)


def high_channel_count(dim: int, bits: float) -> int:
    low, high = split_bits(bits)
    count = int(round((bits - low) * dim / (high - low)))
    return max(1, min(dim - 1, count))


def split_channels(x, bits: float) -> Tuple[np.ndarray, np.ndarray]:
    """(low_idx, high_idx) as mlx-vlm picks them from the first tensor x [B, H, T, D]: the
    channels of largest mean |x| get the extra bit."""
    dim = int(x.shape[-1])
    count = high_channel_count(dim, bits)
    if A.framework_of(x) == A.MLX:
        import mlx.core as mx

        scores = np.asarray(mx.mean(mx.abs(x.astype(mx.float32)), axis=(0, 1, 2)))
    else:
        scores = np.mean(np.abs(A.to_numpy(x).astype(np.float32)), axis=(0, 1, 2))
    order = np.argsort(scores)
    high = np.sort(order[-count:].astype(np.int32))
    is_low = np.ones(dim, dtype=bool)
    is_low[high] = False
    return np.nonzero(is_low)[0].astype(np.int32), high


def quantizer(
    dim: int,
    bits: float,
    seed: int,
    mode: str = "mse",
    high_channels: Optional[Sequence[int]] = None,
) -> Quantizer:
    """Our :class:`Quantizer` equal to mlx-vlm's codec for (dim, bits, seed); a fractional
    width needs the high-bit channels (see :func:`split_channels`)."""
    bits = float(bits)
    if bits == math.floor(bits):
        return codec(dim, int(bits), seed, mode).quantizer
    if high_channels is None:
        raise ValueError(
            f"[tqattn.mlx_vlm.quantizer] a fractional width ({bits}) needs high_channels"
        )
    high_channels = np.sort(np.asarray(high_channels, dtype=np.int32).reshape(-1))
    low_bits, high_bits = split_bits(bits)
    n_high = len(high_channels)
    return Quantizer.split(
        dim,
        high_channels,
        codec(n_high, high_bits, seed + SPLIT_HIGH_SEED_OFFSET, mode),
        codec(dim - n_high, low_bits, seed, mode),
    )


def quantizer_for(x, bits: float, seed: int, mode: str = "mse") -> Quantizer:
    """mlx-vlm's codec for the first tensor x [B, H, T, D] it sees (channels picked from x)."""
    dim = int(x.shape[-1])
    bits = float(bits)
    if bits == math.floor(bits):
        return quantizer(dim, bits, seed, mode)
    _, high = split_channels(x, bits)
    return quantizer(dim, bits, seed, mode, high)


# ------------------------------------------------------------------------------------------------
# Reading mlx-vlm objects (duck-typed: mlx-vlm itself need not be importable).


def _np32(a) -> np.ndarray:
    return np.ascontiguousarray(A.to_numpy(a), dtype=np.float32)


def _codec_from_mlx_vlm(c) -> Codec:
    if hasattr(c, "mse_codec"):
        inner = c.mse_codec
        rotation = _rotation_from_mlx_vlm(inner)
        return Codec(
            int(c.dim), int(c.bits), "prod", centroids=_np32(inner.codebook),
            qjl_matrix=_np32(c.projection), **rotation,
        )
    if hasattr(c, "codebook"):
        return Codec(int(c.dim), int(c.bits), "mse", centroids=_np32(c.codebook),
                     **_rotation_from_mlx_vlm(c))
    raise TypeError(f"[tqattn.from_mlx_vlm] unsupported mlx-vlm codec {type(c).__name__} "
                    "(MSE, Prod and split codecs are supported; PolarQuant is not)")


def _rotation_from_mlx_vlm(c) -> dict:
    if getattr(c, "use_rht", False):
        return {"signs": _np32(c.signs)}
    return {"matrix": _np32(c.rotation)}


def quantizer_from_mlx_vlm(c) -> Quantizer:
    """Our :class:`Quantizer` reading an mlx-vlm codec object's own rotation, codebook and
    projection (so the conversion holds whatever numpy produced them)."""
    if hasattr(c, "low_codec") and hasattr(c, "high_codec"):
        return Quantizer.split(
            int(c.dim), _np_int(c.high_idx), _codec_from_mlx_vlm(c.high_codec),
            _codec_from_mlx_vlm(c.low_codec),
        )
    return _codec_from_mlx_vlm(c).quantizer


def _np_int(a) -> np.ndarray:
    return np.asarray(A.to_numpy(a)).astype(np.int64).reshape(-1)


def _unwrap(state):
    return getattr(state, "_state", state)  # mlx-vlm's _QuantizedStateProxy


def _state_from_mlx_vlm(state):
    state = _unwrap(state)
    fields = getattr(state, "_fields", None)
    if fields == ("low", "high"):
        return SplitState(_state_from_mlx_vlm(state.low), _state_from_mlx_vlm(state.high))
    if fields == ("norms", "mse_indices", "residual_norms", "qjl_signs"):
        return ProdState(*state)
    if fields == ("norms", "indices"):
        return MSEState(*state)
    raise TypeError(
        f"[tqattn.from_mlx_vlm] unsupported mlx-vlm state {type(state).__name__} (expected "
        "TurboQuantMSEState, TurboQuantProdState or TurboQuantSplitState)"
    )


def from_mlx_vlm(obj, codec=None):
    """Reads mlx-vlm TurboQuant data without copying its planes.

    * ``from_mlx_vlm(cache)`` with a ``TurboQuantKVCache``: returns ``(keys, values)`` as
      :class:`tqattn.QuantizedStates` over the cache's valid tokens;
    * ``from_mlx_vlm(state, codec)`` with a state tuple (MSE, Prod or split) and the mlx-vlm
      codec that made it: returns its :class:`tqattn.QuantizedStates`.

    The arrays stay mlx arrays (read in place); the rotations, codebooks and QJL matrices are
    read from mlx-vlm's codec objects.
    """
    if codec is None:
        if "Batch" in type(obj).__name__:
            raise TypeError(
                "[tqattn.from_mlx_vlm] BatchTurboQuantKVCache (left-padded rows) is not supported; "
                "extract a row (cache.extract(i)) first"
            )
        if not hasattr(obj, "key_codec"):
            raise TypeError(
                "[tqattn.from_mlx_vlm] expected a TurboQuantKVCache, or a state with its codec, "
                f"got {type(obj).__name__}"
            )
        keys, values = obj.state[0], obj.state[1]
        if keys is None:
            raise ValueError("[tqattn.from_mlx_vlm] expected a non-empty cache, got an empty one")
        return (
            QuantizedStates(quantizer_from_mlx_vlm(obj.key_codec), _state_from_mlx_vlm(keys)),
            QuantizedStates(quantizer_from_mlx_vlm(obj.value_codec), _state_from_mlx_vlm(values)),
        )
    return QuantizedStates(quantizer_from_mlx_vlm(codec), _state_from_mlx_vlm(obj))


# ------------------------------------------------------------------------------------------------
# Writing mlx-vlm objects.


def load_turboquant():
    """mlx-vlm's ``turboquant`` module, or None where mlx / mlx-vlm are not installed.

    ``import mlx_vlm`` pulls in its whole model stack (transformers, ...). Its TurboQuant module
    needs only mlx and numpy, so where the package's ``__init__`` cannot import, the module is
    loaded from the installed files under placeholder parent packages.
    """
    if not (A.has_module("mlx") and A.has_module("mlx_vlm")):
        return None
    try:
        return importlib.import_module("mlx_vlm.turboquant")
    except ImportError:
        pass
    spec = importlib.util.find_spec("mlx_vlm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    for name, path in (("mlx_vlm", root), ("mlx_vlm.models", root + "/models")):
        if name not in sys.modules:
            placeholder = types.ModuleType(name)
            placeholder.__path__ = [path]
            sys.modules[name] = placeholder
    try:
        return importlib.import_module("mlx_vlm.turboquant")
    except ImportError:
        return None


def _to_mx(a):
    import mlx.core as mx

    if A.framework_of(a) == A.MLX:
        return a
    return mx.array(np.ascontiguousarray(A.to_numpy(a)))


def _state_to_mlx_vlm(state, tq):
    if isinstance(state, SplitState):
        cls = tq.TurboQuantSplitState if tq else SplitState
        return cls(_state_to_mlx_vlm(state.low, tq), _state_to_mlx_vlm(state.high, tq))
    convert = _to_mx if A.has_module("mlx") else (lambda a: np.ascontiguousarray(A.to_numpy(a)))
    if isinstance(state, ProdState):
        cls = tq.TurboQuantProdState if tq else ProdState
    else:
        cls = tq.TurboQuantMSEState if tq else MSEState
    return cls(*(convert(a) for a in state))


def _same_quantizer(ours: Quantizer, theirs: Quantizer) -> bool:
    if len(ours.parts) != len(theirs.parts):
        return False
    for (ch_a, a), (ch_b, b) in zip(ours.parts, theirs.parts):
        if not np.array_equal(ch_a, ch_b) or (a.dim, a.bits, a.mode) != (b.dim, b.bits, b.mode):
            return False
        if a.rotation != b.rotation or not np.array_equal(a.centroids, b.centroids):
            return False
        if a.rotation == "hadamard" and not np.array_equal(a.signs, b.signs):
            return False
        if a.rotation == "dense" and not np.array_equal(a.matrix, b.matrix):
            return False
        if a.mode == "prod" and not np.array_equal(a.qjl_matrix, b.qjl_matrix):
            return False
    return True


def _high_channels(q: Quantizer) -> Optional[np.ndarray]:
    return q.parts[1][0] if q.is_split else None


def _bits_of(q: Quantizer) -> float:
    if not q.is_split:
        return float(q.parts[0][1].bits)
    low, high = q.parts[0][1].bits, q.parts[1][1].bits
    n_high = len(q.parts[1][0])
    # The .5-step width whose channel count mlx-vlm would derive.
    for b in np.arange(low + 0.5, high, 0.5):
        if high_channel_count(q.dim, float(b)) == n_high:
            return float(b)
    return low + n_high / q.dim


def to_mlx_vlm(keys, values=None, *, seed: Optional[int] = None):
    """Hands tqattn data to mlx-vlm, planes copied once into mlx arrays (MLX cannot wrap
    foreign memory).

    * ``to_mlx_vlm(states)``: the state tuple (``TurboQuantMSEState`` / ``ProdState`` /
      ``SplitState`` when mlx-vlm is importable, else tqattn's tuples of the same fields).
    * ``to_mlx_vlm(cache)`` with a :class:`tqattn.KVCache`, or ``to_mlx_vlm(keys, values,
      seed=s)`` with :class:`QuantizedStates`: a ``TurboQuantKVCache`` (needs mlx-vlm). The
      quantizers must be mlx-vlm's for that seed (build the cache with
      ``KVCache(..., compat="mlx_vlm")``, or get the states from :func:`from_mlx_vlm`);
      otherwise ValueError, since mlx-vlm would rebuild different rotations from the seed.
    """
    from ._cache import KVCache

    tq = load_turboquant()
    if isinstance(keys, KVCache):
        if values is not None:
            raise ValueError("[tqattn.to_mlx_vlm] expected values=None with a KVCache")
        if seed is None:
            seed = keys.seed
        keys, values = keys._fetch()
    if values is None:
        if not isinstance(keys, QuantizedStates):
            raise TypeError(
                f"[tqattn.to_mlx_vlm] expected QuantizedStates, got {type(keys).__name__}"
            )
        return _state_to_mlx_vlm(keys.state, tq)
    if tq is None:
        raise RuntimeError(
            "[tqattn.to_mlx_vlm] building a TurboQuantKVCache needs mlx and mlx-vlm "
            "(pip install mlx; pip install --no-deps mlx-vlm)"
        )
    if seed is None:
        raise ValueError("[tqattn.to_mlx_vlm] expected the seed the states were made with")
    seed = _int(seed, "seed")
    lengths = set(keys.lengths) | set(values.lengths)
    if len(lengths) != 1:
        raise ValueError(
            "[tqattn.to_mlx_vlm] mlx-vlm's cache has one length for the batch, got "
            f"{sorted(lengths)}"
        )
    offset = lengths.pop()
    codecs = []
    for name, states, s in (("keys", keys, seed), ("values", values, seed + 1)):
        q = states.quantizer
        if any(c.mode != "mse" for _, c in q.parts):
            raise ValueError(
                f"[tqattn.to_mlx_vlm] mlx-vlm's cache holds MSE {name}; pass Prod states alone "
                "(to_mlx_vlm(states)) to get its TurboQuantProdState"
            )
        bits = _bits_of(q)
        expected = quantizer(q.dim, bits, s, "mse", _high_channels(q))
        if not _same_quantizer(q, expected):
            raise ValueError(
                f"[tqattn.to_mlx_vlm] the {name} were not quantized with mlx-vlm's rotation and "
                f"codebook for seed {s}: build them with KVCache(..., compat='mlx_vlm') or "
                "tqattn.mlx_vlm.quantizer(...)"
            )
        if q.is_split:
            low_idx = q.parts[0][0].astype(np.int32)
            high_idx = q.parts[1][0].astype(np.int32)
            split = tq._SplitCodec.from_indices(q.dim, bits, "mse", s, low_idx, high_idx)
            codecs.append((bits, split))
        else:
            codecs.append((bits, tq._TurboQuantMSECodec(q.dim, int(bits), s)))
    (key_bits, key_codec), (value_bits, value_codec) = codecs
    cache = tq.TurboQuantKVCache(bits=key_bits, seed=seed, key_bits=key_bits, value_bits=value_bits)
    cache.key_codec, cache.value_codec = key_codec, value_codec
    cache.keys = _state_to_mlx_vlm(_trimmed(keys.state, offset), tq)
    cache.values = _state_to_mlx_vlm(_trimmed(values.state, offset), tq)
    cache.offset = offset
    return cache


def _trimmed(state, length: int):
    if isinstance(state, SplitState):
        return SplitState(_trimmed(state.low, length), _trimmed(state.high, length))
    return type(state)(*(a[:, :, :length] for a in state))
