"""Codebooks, packing, codecs, quantized states and attention: the Python face of the C++ API."""

from __future__ import annotations

import math
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _arrays as A
from . import _tqattn

# ------------------------------------------------------------------------------------------------
# State tuples: the same fields, order and shapes as mlx-vlm's TurboQuant states.


class MSEState(NamedTuple):
    """TurboQuant_mse planes: ``norms`` fp16 [..., T], ``indices`` uint32 [..., T, P]."""

    norms: Any
    indices: Any


class ProdState(NamedTuple):
    """TurboQuant_prod planes: (b-1)-bit indices plus QJL signs of the residual and its norm."""

    norms: Any
    mse_indices: Any
    residual_norms: Any
    qjl_signs: Any


class SplitState(NamedTuple):
    """A split-channel state: ``low`` and ``high`` are MSE or Prod states of the two groups."""

    low: Any
    high: Any


StateTuple = Union[MSEState, ProdState, SplitState]


def _part_arrays(state) -> Tuple[Any, Any, Any, Any]:
    """(indices, norms, residual_norms, qjl_signs) of one MSE/Prod state, as the C++ layer wants."""
    if isinstance(state, ProdState) or (isinstance(state, tuple) and len(state) == 4):
        norms, indices, residual_norms, qjl_signs = state
        return (
            A.prepare(indices, "mse_indices"),
            A.prepare(norms, "norms"),
            A.prepare(residual_norms, "residual_norms"),
            A.prepare(qjl_signs, "qjl_signs"),
        )
    if isinstance(state, MSEState) or (isinstance(state, tuple) and len(state) == 2):
        norms, indices = state
        return A.prepare(indices, "indices"), A.prepare(norms, "norms"), None, None
    raise TypeError(
        "[tqattn] expected an MSE state (norms, indices) or a Prod state "
        f"(norms, mse_indices, residual_norms, qjl_signs), got {type(state).__name__}"
    )


def _state_from_part(part, framework: str):
    indices, norms, residual_norms, qjl_signs = (A.wrap(a, framework) for a in part)
    if residual_norms is None:
        return MSEState(norms, indices)
    return ProdState(norms, indices, residual_norms, qjl_signs)


def _first_array(state):
    while isinstance(state, tuple) and not hasattr(state, "shape"):
        state = state[0]
    return state


# ------------------------------------------------------------------------------------------------
# Codebooks and packing.


def codebook(dim: int, bits: int) -> np.ndarray:
    """The 2**bits Lloyd-Max centroids (ascending, float32) for one coordinate of a uniformly
    random unit vector in R^dim: the scalar quantizer TurboQuant applies after the rotation.

    Solved once per (dim, bits) by the C++ library under the exact coordinate law
    (1 - x^2)^((dim-3)/2), not its Gaussian approximation.
    """
    return _tqattn.codebook(_int(dim, "dim"), _int(bits, "bits"))


def codebook_distortion(dim: int, bits: int) -> float:
    """dim * E[(y - c[idx(y)])^2]: the codebook's mean squared error on a unit vector."""
    return _tqattn.codebook_distortion(_int(dim, "dim"), _int(bits, "bits"))


def packed_words(dim: int, bits: int) -> int:
    """uint32 words one packed vector of `dim` `bits`-bit indices takes: ceil(dim*bits/32)."""
    return _tqattn.packed_words(_int(dim, "dim"), _int(bits, "bits"))


def pack(indices, bits: int) -> np.ndarray:
    """Packs integer indices [..., dim] (each < 2**bits) into uint32 words [..., ceil(dim*bits/32)].

    The dense LSB-first bit stream of mlx-vlm and docs/format.md: element j occupies bits
    [j*bits, (j+1)*bits) of the vector's words; a value that crosses a word boundary keeps its
    low bits in the first word. uint8 input is read in place; other integer dtypes are
    range-checked and converted.
    """
    bits = _int(bits, "bits")
    arr = _cpu_integers(indices, "indices")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() >= (1 << min(bits, 8))):
            raise ValueError(
                f"[tqattn.pack] expected indices in [0, 2^bits = {1 << bits}), got values in "
                f"[{arr.min()}, {arr.max()}]"
            )
        arr = arr.astype(np.uint8)
    return _tqattn.pack(np.ascontiguousarray(arr), bits)


def unpack(words, dim: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint32 words [..., ceil(dim*bits/32)] -> uint8 [..., dim]."""
    arr = _cpu_integers(words, "words")
    if arr.dtype != np.uint32:
        raise ValueError(f"[tqattn.unpack] expected words of dtype uint32, got {arr.dtype}")
    return _tqattn.unpack(np.ascontiguousarray(arr), _int(dim, "dim"), _int(bits, "bits"))


def _cpu_integers(x, name: str) -> np.ndarray:
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    fw = A.framework_of(x, name)
    if fw == A.TORCH and x.is_cuda:
        raise ValueError(f"[tqattn] expected {name} on the CPU, got a CUDA tensor")
    arr = A.to_numpy(x)
    if arr.dtype.kind not in "ui":
        raise ValueError(f"[tqattn] expected {name} of an integer dtype, got {arr.dtype}")
    return arr


def _int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"[tqattn] expected {name} to be an int, got {type(v).__name__}")
    return int(v)


# ------------------------------------------------------------------------------------------------
# Codec.


class Codec:
    """A TurboQuant vector quantizer for one dimension.

    Args:
        dim: vector length (2..4096).
        bits: bits per coordinate, 1..8 for ``mode="mse"``; 2..8 for ``"prod"``, which spends one
            of them on the QJL sign of the residual.
        mode: ``"mse"`` (TurboQuant_mse: minimal reconstruction error) or ``"prod"``
            (TurboQuant_prod: unbiased inner products).
        rotation: ``"hadamard"`` (randomized Hadamard, power-of-two ``dim``), ``"dense"`` (Haar
            orthogonal) or None (Hadamard where ``dim`` is a power of two, else dense).
        seed: generates the rotation (and the QJL matrix) when they are not given.
        signs: a caller's Hadamard sign vector (``dim`` entries of +-1).
        matrix: a caller's dense rotation, ``dim x dim``, applied as ``y = matrix @ x``.
        norm_correction: store ||x|| / ||c[idx]|| so that reconstructions keep the input's norm
            (MSE only).
        centroids: a caller's codebook (2**index_bits ascending values), e.g. another
            implementation's; default: :func:`codebook` (dim, index_bits).
        qjl_matrix: Prod only: the ``dim x dim`` Gaussian projection S (signs of ``S r``).

    ``quantize(x)`` takes x [..., dim] (float32/16, bfloat16; numpy, torch CPU/CUDA, mlx) and
    returns an :class:`MSEState` or :class:`ProdState` whose arrays have x's leading shape;
    ``dequantize(state)`` gives float32 [..., dim] back.
    """

    def __init__(
        self,
        dim: int,
        bits: int,
        mode: str = "mse",
        rotation: Optional[str] = None,
        seed: int = 0,
        signs=None,
        matrix=None,
        norm_correction: bool = False,
        centroids=None,
        qjl_matrix=None,
    ):
        dim, bits, seed = _int(dim, "dim"), _int(bits, "bits"), _int(seed, "seed")
        if not isinstance(mode, str):
            raise TypeError(f"[tqattn] expected mode to be a str, got {type(mode).__name__}")
        if rotation not in (None, "hadamard", "dense"):
            raise ValueError(
                f'[tqattn.Codec] expected rotation "hadamard", "dense" or None, got {rotation!r}'
            )
        if rotation == "hadamard" and matrix is None and (dim < 1 or dim & (dim - 1)):
            raise ValueError(
                f"[tqattn.Codec] expected a power-of-two dim for a Hadamard rotation, got {dim}"
            )
        if rotation == "hadamard" and matrix is not None:
            raise ValueError('[tqattn.Codec] expected no matrix with rotation="hadamard"')
        if rotation == "dense" and signs is not None:
            raise ValueError('[tqattn.Codec] expected no signs with rotation="dense"')
        if seed < 0:
            raise ValueError(f"[tqattn.Codec] expected seed >= 0, got {seed}")
        self._native = _tqattn.make_codec(
            dim,
            bits,
            mode,
            seed,
            rotation == "dense",
            bool(norm_correction),
            _flat(signs, "signs"),
            _flat(matrix, "matrix"),
            _flat(centroids, "centroids"),
            _flat(qjl_matrix, "qjl_matrix"),
        )
        self.seed = seed
        self._quantizer = None

    @classmethod
    def _wrap(cls, native) -> "Codec":
        obj = cls.__new__(cls)
        obj._native = native
        obj.seed = None
        obj._quantizer = None
        return obj

    # Properties -----------------------------------------------------------------------------
    dim = property(lambda self: self._native.dim, doc="Vector length.")
    bits = property(lambda self: self._native.bits, doc="Total bits per coordinate.")
    mode = property(lambda self: self._native.mode, doc='"mse" or "prod".')
    index_bits = property(lambda self: self._native.index_bits, doc="Bits per packed index.")
    index_words = property(lambda self: self._native.index_words, doc="uint32 words per vector.")
    norm_correction = property(lambda self: self._native.norm_correction)
    rotation = property(lambda self: self._native.rotation, doc='"hadamard" or "dense".')
    qjl_scale = property(lambda self: self._native.qjl_scale, doc="sqrt(pi/2) / dim.")
    distortion = property(lambda self: self._native.distortion, doc="Codebook MSE per unit vector.")

    @property
    def centroids(self) -> np.ndarray:
        """The codebook (2**index_bits ascending float32)."""
        return self._native.centroids

    @property
    def boundaries(self) -> np.ndarray:
        """Decision boundaries (midpoints of adjacent centroids)."""
        return self._native.boundaries

    @property
    def signs(self) -> Optional[np.ndarray]:
        """The Hadamard sign vector, or None for a dense rotation."""
        return self._native.signs

    @property
    def matrix(self) -> np.ndarray:
        """The rotation as a dense matrix M (y = M @ x), for either kind."""
        return self._native.matrix

    @property
    def qjl_matrix(self) -> Optional[np.ndarray]:
        """Prod: the QJL projection S (dim x dim); None for MSE."""
        return self._native.qjl_matrix

    def __repr__(self) -> str:
        return (
            f"tqattn.Codec(dim={self.dim}, bits={self.bits}, mode={self.mode!r}, "
            f"rotation={self.rotation!r}, norm_correction={self.norm_correction})"
        )

    @property
    def quantizer(self) -> "Quantizer":
        """This codec over all channels, as a :class:`Quantizer` of [B, H, T, dim] tensors."""
        if self._quantizer is None:
            self._quantizer = Quantizer(_tqattn.uniform_quantizer(self._native))
        return self._quantizer

    def quantize(self, x, *, num_threads: int = 0) -> Union[MSEState, ProdState]:
        """Quantizes x [..., dim]; returns the planes as an MSEState / ProdState (x's library)."""
        x = A.prepare(x, "x")
        parts = _tqattn.quantize(self.quantizer._native, x, True, int(num_threads))
        return _state_from_part(parts[0], A.framework_of(x))

    def dequantize(self, state: Union[MSEState, ProdState], *, num_threads: int = 0):
        """Reconstructs float32 vectors [..., dim] from a state of this codec."""
        part = _part_arrays(state)
        native = _tqattn.make_flat_states(self._native, part)
        norms = part[1]
        out = A.empty(norms, tuple(norms.shape) + (self.dim,), "float32")
        _tqattn.dequantize(native, _reshaped_out(out, native), int(num_threads))
        return out


def _flat(x, name):
    arr = A.float32_cpu(x, name)
    return None if arr is None else arr.reshape(-1)


def _reshaped_out(out, native):
    """View `out` [..., D] as [B, H, T, D] for the C++ call (a view, never a copy)."""
    shape = (native.batch, native.heads, native.max_length, native.dim)
    fw = A.framework_of(out)
    if fw == A.MLX:
        import mlx.core as mx

        # Same buffer (a contiguous reshape of an evaluated array shares its data).
        view = mx.reshape(out, shape)
        mx.eval(view)
        return view
    return out.reshape(shape)


# ------------------------------------------------------------------------------------------------
# Quantizer and quantized states.


class Quantizer:
    """How one tensor (keys or values) of head dimension D is quantized: one :class:`Codec` over
    all channels, or a split: the ``high`` channels (a fractional width's outliers) with one codec
    and the rest with another, each seeing its channels as a vector of their own.
    """

    def __init__(self, native):
        self._native = native

    @classmethod
    def uniform(cls, codec: Codec) -> "Quantizer":
        """One codec over all channels."""
        return codec.quantizer

    @classmethod
    def split(cls, dim: int, high_channels, high: Codec, low: Codec) -> "Quantizer":
        """Channels ``high_channels`` quantized by ``high``, the others by ``low``."""
        channels = [int(c) for c in np.asarray(A.to_numpy(high_channels)).reshape(-1)]
        return cls(_tqattn.split_quantizer(_int(dim, "dim"), channels, high._native, low._native))

    @classmethod
    def calibrate(
        cls,
        sample,
        bits: float,
        *,
        mode: str = "mse",
        seed: int = 0,
        rotation: Optional[str] = None,
        norm_correction: bool = False,
    ) -> "Quantizer":
        """A fractional width (e.g. 2.5): the round(frac * D) channels of largest mean |x| over
        `sample` [..., D] get ceil(bits), the rest floor(bits). Integral widths give one codec.
        """
        arr = np.ascontiguousarray(A.to_numpy(sample), dtype=np.float32)
        return cls(
            _tqattn.calibrate_split(
                int(arr.shape[-1]), float(bits), mode, _int(seed, "seed"),
                rotation == "dense", bool(norm_correction), arr,
            )
        )

    dim = property(lambda self: self._native.dim, doc="Head dimension D.")
    is_split = property(lambda self: self._native.is_split, doc="Two channel groups?")
    bits_per_coordinate = property(lambda self: self._native.bits_per_coordinate,
                                   doc="Mean index bits per channel (e.g. 2.5).")
    bytes_per_vector = property(lambda self: self._native.bytes_per_vector,
                                doc="Packed bytes of one token across all planes.")

    @property
    def parts(self) -> List[Tuple[np.ndarray, Codec]]:
        """[(channels, codec)] per part: one for uniform, (low, high) for a split."""
        return [(channels, Codec._wrap(codec)) for channels, codec in self._native.parts]

    def __repr__(self) -> str:
        desc = ", ".join(f"{len(ch)}ch:{c.bits}b/{c.mode}/{c.rotation}" for ch, c in self.parts)
        return f"tqattn.Quantizer(dim={self.dim}, [{desc}])"

    def quantize(self, x, *, num_threads: int = 0) -> "QuantizedStates":
        """Quantizes x [B, H, T, D] into new :class:`QuantizedStates` (x's library and device)."""
        x = A.prepare(x, "x")
        parts = _tqattn.quantize(self._native, x, False, int(num_threads))
        fw = A.framework_of(x)
        states = [_state_from_part(p, fw) for p in parts]
        state = states[0] if len(states) == 1 else SplitState(*states)
        return QuantizedStates(self, state)

    def dequantize(self, states: "QuantizedStates", *, num_threads: int = 0):
        """float32 [B, H, T, D] from states of this quantizer."""
        return states.dequantize(num_threads=num_threads)


class QuantizedStates:
    """Quantized keys or values [B, H, T, D]: a :class:`Quantizer` and its planes.

    ``state`` holds the planes in mlx-vlm's layout (an :class:`MSEState`, :class:`ProdState` or
    :class:`SplitState` of arrays [B, H, T(, W)]); they may be any library's arrays (numpy,
    torch, mlx), row-major or a token-range view of a larger row-major buffer, and are read in
    place. ``lengths`` gives each sequence's valid tokens (default: all T).
    """

    def __init__(
        self, quantizer: Quantizer, state: StateTuple, lengths: Optional[Sequence[int]] = None
    ):
        if not isinstance(quantizer, Quantizer):
            raise TypeError(
                f"[tqattn] expected a tqattn.Quantizer, got {type(quantizer).__name__}"
            )
        n_parts = len(quantizer._native.parts)
        if n_parts == 2:
            if not (isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], tuple)):
                raise TypeError("[tqattn] a split quantizer needs a SplitState(low, high)")
            state = SplitState(*state)
            parts = [_part_arrays(state.low), _part_arrays(state.high)]
        else:
            parts = [_part_arrays(state)]
        lengths = None if lengths is None else [int(v) for v in lengths]
        self._native = _tqattn.make_states(quantizer._native, parts, lengths)
        self.quantizer = quantizer
        self._state = _normalise(state)
        self._framework = A.framework_of(parts[0][1])
        self._cache = None
        self._version = None

    @classmethod
    def _from_cache(cls, cache, native, quantizer: Quantizer, framework: str) -> "QuantizedStates":
        obj = cls.__new__(cls)
        obj._native = native
        obj.quantizer = quantizer
        obj._state = None
        obj._framework = framework
        obj._cache = cache
        obj._version = cache._version
        return obj

    def _checked_native(self):
        if self._cache is not None and self._cache._version != self._version:
            raise RuntimeError(
                "[tqattn.QuantizedStates] these states were fetched from a KVCache that has "
                "changed since (update/trim/reset): fetch them again"
            )
        return self._native

    @property
    def state(self) -> StateTuple:
        """The planes (mlx-vlm layout). For states fetched from a KVCache this is a snapshot
        copy (the cache's storage moves when it grows); otherwise the arrays themselves."""
        if self._state is not None:
            return self._state
        parts = _tqattn.export_states(self._checked_native())
        states = [_state_from_part(p, self._framework) for p in parts]
        states = [type(s)(*(A.copy(a) for a in s)) for s in states]
        return states[0] if len(states) == 1 else SplitState(*states)

    def __iter__(self):
        return iter(self.state)

    batch = property(lambda self: self._native.batch, doc="B.")
    heads = property(lambda self: self._native.heads, doc="H (KV heads).")
    dim = property(lambda self: self._native.dim, doc="D.")
    lengths = property(lambda self: list(self._native.lengths), doc="Valid tokens per sequence.")
    device = property(lambda self: self._native.device, doc='"cpu" or "cuda".')

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(B, H, T, D) with T the longest sequence."""
        n = self._native
        return (n.batch, n.heads, n.max_length, n.dim)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the valid tokens across all planes."""
        return self._checked_native().nbytes

    def dequantize(self, *, num_threads: int = 0):
        """float32 [B, H, T, D] in the states' library (zeros past each sequence's length)."""
        native = self._checked_native()
        like = _first_array(self._state) if self._state is not None else None
        if like is None:
            like = _like_for(self._framework, native)
        out = A.empty(like, self.shape, "float32")
        _tqattn.dequantize(native, out, int(num_threads))
        return out

    def __repr__(self) -> str:
        return (
            f"tqattn.QuantizedStates(shape={self.shape}, lengths={self.lengths}, "
            f"{self.quantizer!r})"
        )


def _normalise(state):
    if isinstance(state, (MSEState, ProdState, SplitState)):
        return state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], tuple):
        return SplitState(_normalise(state[0]), _normalise(state[1]))
    if isinstance(state, tuple) and len(state) == 4:
        return ProdState(*state)
    return MSEState(*state)


def _like_for(framework: str, native):
    """A tiny array of the right library/device for allocating outputs."""
    if framework == A.TORCH:
        import torch

        device = f"cuda:{native.device_id}" if native.device == "cuda" else "cpu"
        return torch.empty(0, device=device)
    if framework == A.MLX:
        import mlx.core as mx

        return mx.zeros((0,))
    return np.empty(0)


def quantize(
    x,
    bits: float = 4,
    *,
    mode: str = "mse",
    seed: int = 0,
    rotation: Optional[str] = None,
    norm_correction: bool = False,
    num_threads: int = 0,
) -> QuantizedStates:
    """Quantizes a whole tensor x [B, H, T, D] at `bits` (fractional: split channels, calibrated
    on x itself) and returns its :class:`QuantizedStates`."""
    x = A.prepare(x, "x")
    if len(x.shape) != 4:
        raise ValueError(
            f"[tqattn.quantize] expected x of shape [B, H, T, D], got {tuple(x.shape)}"
        )
    dim = int(x.shape[-1])
    bits = float(bits)
    if bits == math.floor(bits):
        quantizer = Codec(
            dim, int(bits), mode, rotation=rotation, seed=seed, norm_correction=norm_correction
        ).quantizer
    else:
        quantizer = Quantizer.calibrate(
            x, bits, mode=mode, seed=seed, rotation=rotation, norm_correction=norm_correction
        )
    return quantizer.quantize(x, num_threads=num_threads)


# ------------------------------------------------------------------------------------------------
# Attention.


def _attention_args(queries, scale, mask, causal, causal_offset, window, sinks, softcap):
    fn = "[tqattn.scaled_dot_product_attention]"
    if scale is not None:
        scale = float(scale)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f'{fn} expected mask "causal", an array or None, got {mask!r}')
        if causal is False:
            raise ValueError(f'{fn} expected causal=None or True with mask="causal", got False')
        mask, causal = None, True
    causal = bool(causal) if causal is not None else False
    causal_offset = -1 if causal_offset is None else _int(causal_offset, "causal_offset")
    if causal_offset < -1:
        raise ValueError(f"{fn} expected causal_offset >= 0 or None, got {causal_offset}")
    window = 0 if window is None else _int(window, "window")
    softcap = 0.0 if softcap is None else float(softcap)
    mask = A.prepare_optional(mask, "mask")
    sinks = A.prepare_optional(sinks, "sinks")
    return scale, causal, causal_offset, window, mask, sinks, softcap


def _resolve_kv(keys, values):
    from ._cache import KVCache  # circular at import time

    if isinstance(keys, KVCache):
        if values is not None and values is not keys:
            raise ValueError(
                "[tqattn.scaled_dot_product_attention] expected values=None (or the same cache) "
                "when keys is a KVCache"
            )
        k, v = keys._fetch()
        return k._checked_native(), v._checked_native()
    for name, s in (("keys", keys), ("values", values)):
        if not isinstance(s, QuantizedStates):
            raise TypeError(
                f"[tqattn.scaled_dot_product_attention] expected {name} to be tqattn."
                f"QuantizedStates (or keys a KVCache), got {type(s).__name__}"
            )
    return keys._checked_native(), values._checked_native()


def scaled_dot_product_attention(
    queries,
    keys,
    values=None,
    *,
    scale: Optional[float] = None,
    mask=None,
    causal: Optional[bool] = None,
    causal_offset: Optional[int] = None,
    window: Optional[int] = None,
    sinks=None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    num_threads: int = 0,
    stream: Optional[int] = None,
    out=None,
):
    """softmax(scale * Q K^T + mask) V straight from the quantized cache (no dequantized copy).

    Args:
        queries: [B, Hq, L, D] float32/float16/bfloat16 (numpy, torch CPU/CUDA, mlx).
        keys, values: :class:`QuantizedStates` of [B, H_kv, S, D] (Hq % H_kv == 0), or ``keys``
            a :class:`KVCache` and ``values`` None.
        scale: logit scale, default 1/sqrt(D).
        mask: None, ``"causal"`` (as mlx: the L queries are the last L positions), or an array
            broadcastable to [B, Hq, L, S]: boolean (True = attend) or additive float.
        causal: causal masking (also implied by ``mask="causal"``); combines with an array mask.
        causal_offset: absolute position of query 0 for chunked prefill (default: lengths - L).
        window: sliding window (> 0): key j is visible only if position - j < window.
        sinks: float32 [Hq] attention-sink logits (gpt-oss) joining each softmax denominator.
        softcap: > 0: logits become softcap * tanh(logits / softcap) (Gemma 2).
        return_lse: also return the float32 [B, Hq, L] log-sum-exp of each row.
        num_threads: CPU threads (0 = all).
        stream: CUDA stream handle; default the current torch stream of ``queries``.
        out: optional output [B, Hq, L, D] (queries' dtype, library and device).

    Returns ``out`` (queries' dtype, library and device), or ``(out, lse)``. A row with no
    visible key (and no sink) gives zeros and lse = -inf.
    """
    queries = A.prepare(queries, "queries")
    k, v = _resolve_kv(keys, values)
    args = _attention_args(queries, scale, mask, causal, causal_offset, window, sinks, softcap)
    shape = tuple(int(s) for s in queries.shape)
    if len(shape) != 4:
        raise ValueError(
            f"[tqattn.scaled_dot_product_attention] expected queries of shape [B, Hq, L, D], got "
            f"{shape}"
        )
    if out is None:
        out = A.output_like(queries, shape)
    else:
        A.prepare(out, "out")
    lse = A.empty(queries, shape[:3], "float32") if return_lse else None
    if stream is None:
        stream = A.current_stream(queries)
    _tqattn.attention(queries, k, v, out, *args, int(num_threads), int(stream), lse)
    return (out, lse) if return_lse else out


def dense_attention(
    queries,
    keys,
    values,
    *,
    scale: Optional[float] = None,
    mask=None,
    causal: Optional[bool] = None,
    causal_offset: Optional[int] = None,
    window: Optional[int] = None,
    sinks=None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    num_threads: int = 0,
    stream: Optional[int] = None,
    out=None,
):
    """The same operation over unquantized float32 keys/values [B, H_kv, S, D] (BLAS scores and
    a vectorised softmax): the baseline the fused path is measured against. Same options as
    :func:`scaled_dot_product_attention`."""
    queries = A.prepare(queries, "queries")
    keys = A.prepare(keys, "keys")
    values = A.prepare(values, "values")
    args = _attention_args(queries, scale, mask, causal, causal_offset, window, sinks, softcap)
    shape = tuple(int(s) for s in queries.shape)
    if len(shape) != 4:
        raise ValueError(
            f"[tqattn.dense_attention] expected queries of shape [B, Hq, L, D], got {shape}"
        )
    if out is None:
        out = A.output_like(queries, shape)
    lse = A.empty(queries, shape[:3], "float32") if return_lse else None
    if stream is None:
        stream = A.current_stream(queries)
    _tqattn.dense_attention(queries, keys, values, out, *args, int(num_threads), int(stream), lse)
    return (out, lse) if return_lse else out


def attention_unsupported_reason(queries, keys, values=None, **options) -> str:
    """Empty when the fused path supports these inputs on their device, else why not."""
    queries = A.prepare(queries, "queries")
    k, v = _resolve_kv(keys, values)
    args = _attention_args(
        queries,
        options.get("scale"),
        options.get("mask"),
        options.get("causal"),
        options.get("causal_offset"),
        options.get("window"),
        options.get("sinks"),
        options.get("softcap"),
    )
    return _tqattn.attention_unsupported_reason(queries, k, v, *args)
