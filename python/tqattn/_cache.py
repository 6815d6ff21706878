"""tqattn.KVCache: one layer's quantized KV cache, shaped like mlx-vlm's TurboQuantKVCache."""

from __future__ import annotations

import math
from typing import Optional, Tuple

from . import _arrays as A
from . import _tqattn
from ._core import QuantizedStates, Quantizer, _int


def _validate_bits(bits, name: str = "bits") -> float:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise TypeError(f"[tqattn] expected {name} to be a number, got {type(bits).__name__}")
    bits = float(bits)
    if not (_tqattn.MIN_BITS <= bits <= _tqattn.MAX_BITS) or math.isnan(bits):
        raise ValueError(
            f"[tqattn.KVCache] expected {name} in [{_tqattn.MIN_BITS}, {_tqattn.MAX_BITS}], "
            f"got {bits}"
        )
    return bits


def resolve_kv_bits(bits, key_bits=None, value_bits=None) -> Tuple[float, float, float]:
    """mlx-vlm's convention: a fractional ``bits`` such as 3.5 means floor(bits)-bit keys and
    ceil(bits)-bit values; explicit ``key_bits`` / ``value_bits`` override (and may themselves
    be fractional: split channels)."""
    bits = _validate_bits(bits)
    fractional = bits != math.floor(bits)
    if key_bits is None:
        key_bits = math.floor(bits) if fractional else bits
    if value_bits is None:
        value_bits = math.ceil(bits) if fractional else bits
    return bits, _validate_bits(key_bits, "key_bits"), _validate_bits(value_bits, "value_bits")


class KVCache:
    """One layer's quantized KV cache for a batch of sequences, with mlx-vlm's interface.

    Keys and values [B, H_kv, n, D] are quantized on insert into packed planes (the mlx-vlm
    layout); :func:`tqattn.scaled_dot_product_attention` reads them in place. Shapes, library and
    device are fixed by the first :meth:`update_and_fetch` (torch CUDA tensors give a cache on
    that GPU).

    Args:
        bits: KV width; fractional (3.5) means floor for keys, ceil for values, as mlx-vlm.
        seed: rotations (keys use seed, values seed + 1).
        key_bits, value_bits: explicit widths; a fractional one splits channels (the
            highest-mean-|x| channels of the first tensor get the extra bit).
        key_mode: "mse" (default, as mlx-vlm since its QJL keys hurt decoding) or "prod".
        rotation: None (Hadamard for power-of-two D, else dense) or "dense".
        norm_correction: keep reconstructions at the input's norm (MSE).
        step: capacity grows in multiples of this many tokens.
        max_capacity: fixed capacity; appending past it raises RuntimeError.
        num_threads: CPU threads for quantize-on-insert (0 = all).
        check_finite: on CUDA, raise ValueError for NaN / Inf keys or values as the CPU does;
            this reads a flag back and so waits for the append's stream. False keeps appends
            asynchronous (they run on the current torch stream either way); a non-finite row is
            then stored with a NaN norm, so attention over its token gives NaN.
        compat: "mlx_vlm" to reproduce mlx-vlm's rotations, codebooks and channel split exactly,
            so that :func:`tqattn.to_mlx_vlm` can hand the cache to mlx-vlm.
    """

    def __init__(
        self,
        bits: float = 4,
        seed: int = 0,
        key_bits: Optional[float] = None,
        value_bits: Optional[float] = None,
        *,
        key_mode: str = "mse",
        rotation: Optional[str] = None,
        norm_correction: bool = False,
        step: int = 256,
        max_capacity: Optional[int] = None,
        num_threads: int = 0,
        check_finite: bool = True,
        compat: Optional[str] = None,
    ):
        self.bits, self.key_bits, self.value_bits = resolve_kv_bits(bits, key_bits, value_bits)
        self.seed = _int(seed, "seed")
        if self.seed < 0:
            raise ValueError(f"[tqattn.KVCache] expected seed >= 0, got {self.seed}")
        if key_mode not in ("mse", "prod"):
            raise ValueError(
                f'[tqattn.KVCache] expected key_mode "mse" or "prod", got {key_mode!r}'
            )
        if rotation not in (None, "dense"):
            raise ValueError(
                f'[tqattn.KVCache] expected rotation None or "dense", got {rotation!r}'
            )
        if compat not in (None, "mlx_vlm"):
            raise ValueError(f'[tqattn.KVCache] expected compat None or "mlx_vlm", got {compat!r}')
        if compat and (rotation or norm_correction):
            raise ValueError(
                '[tqattn.KVCache] compat="mlx_vlm" fixes the rotation and has no norm correction'
            )
        self.key_mode = key_mode
        self.rotation = rotation
        self.norm_correction = bool(norm_correction)
        self.step = _int(step, "step")
        self.max_capacity = -1 if max_capacity is None else _int(max_capacity, "max_capacity")
        self.num_threads = _int(num_threads, "num_threads")
        self.check_finite = bool(check_finite)
        self.compat = compat
        self._native = None
        self._framework = None
        self._device = None
        self._version = 0
        self._fetched = None

    # Construction ------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, keys, values, bits: float = 4, **kwargs) -> "KVCache":
        """A cache holding dense keys/values [B, H_kv, T, D], quantized."""
        cache = cls(bits, **kwargs)
        cache.update_and_fetch(keys, values)
        return cache

    @classmethod
    def from_cache(cls, cache, bits: float, seed: int = 0, key_bits=None, value_bits=None,
                   **kwargs) -> "KVCache":
        """As mlx-vlm's ``TurboQuantKVCache.from_cache``: quantizes a dense cache's ``state``."""
        keys, values = cache.state
        out = cls(bits, seed, key_bits, value_bits, **kwargs)
        if keys is not None:
            out.update_and_fetch(keys, values)
        return out

    def _create(self, keys, values) -> None:
        shape = tuple(int(s) for s in keys.shape)
        if len(shape) != 4:
            raise ValueError(
                f"[tqattn.KVCache.update_and_fetch] expected keys of shape [B, H_kv, n, D], got "
                f"{shape}"
            )
        batch, heads, _, dim = shape
        device, device_id = A.device_of(keys)
        kq = vq = None
        if self.compat == "mlx_vlm":
            from . import mlx_vlm

            kq = mlx_vlm.quantizer_for(keys, self.key_bits, self.seed)._native
            vq = mlx_vlm.quantizer_for(values, self.value_bits, self.seed + 1)._native
        self._native = _tqattn.KVCache(
            batch, heads, dim, self.key_bits, self.value_bits, self.key_mode, self.seed,
            self.norm_correction, self.rotation == "dense", self.step, self.max_capacity,
            device, device_id, self.num_threads, self.check_finite, kq, vq,
        )
        self._framework = A.framework_of(keys)
        self._device = (device, device_id)

    # Updates -----------------------------------------------------------------------------------
    def _check_inputs(self, keys, values, fn: str):
        # New tokens are read once: strided views (models' transposed projections) are made
        # contiguous here rather than refused.
        keys = A.contiguous(A.prepare(keys, "keys"), "keys")
        values = A.contiguous(A.prepare(values, "values"), "values")
        fk, fv = A.framework_of(keys), A.framework_of(values)
        if fk != fv:
            raise TypeError(f"[tqattn.KVCache.{fn}] expected keys and values of one library, "
                            f"got {fk} and {fv}")
        if self._native is not None:
            if fk != self._framework:
                raise TypeError(f"[tqattn.KVCache.{fn}] this cache holds {self._framework} "
                                f"arrays, got {fk}")
            if A.device_of(keys) != self._device:
                raise ValueError(f"[tqattn.KVCache.{fn}] expected arrays on {self._device}, "
                                 f"got {A.device_of(keys)}")
        return keys, values

    def _append(self, call, keys, *args):
        # On the producer's (current torch) stream: ordered after it, and before attention there.
        call(*args, A.current_stream(keys))
        self._version += 1
        self._fetched = None

    def update_and_fetch(self, keys, values):
        """Appends keys/values [B, H_kv, n, D] (float32/16, bfloat16; a strided view is copied
        to contiguous first) to every sequence; returns (keys, values) as
        :class:`QuantizedStates` over the whole cache, for :func:`scaled_dot_product_attention`
        (valid until the next change to the cache)."""
        keys, values = self._check_inputs(keys, values, "update_and_fetch")
        if self._native is None:
            self._create(keys, values)
        self._append(self._native.append, keys, keys, values)
        return self._fetch()

    def append_sequence(self, b: int, keys, values):
        """Appends keys/values [H_kv, n, D] to sequence ``b`` only (sequences of a batch may have
        different lengths)."""
        keys, values = self._check_inputs(keys, values, "append_sequence")
        if self._native is None:
            raise RuntimeError(
                "[tqattn.KVCache.append_sequence] the cache has no shape yet: call "
                "update_and_fetch with [B, H_kv, n, D] first (n may be 0)"
            )
        self._append(self._native.append_sequence, keys, _int(b, "b"), keys, values)
        return self._fetch()

    def _fetch(self) -> Tuple[QuantizedStates, QuantizedStates]:
        if self._native is None:
            raise RuntimeError("[tqattn.KVCache] the cache is empty: call update_and_fetch first")
        if self._fetched is None:
            k = self._native.keys()
            v = self._native.values()
            self._fetched = (
                QuantizedStates._from_cache(self, k, Quantizer(k.quantizer), self._framework),
                QuantizedStates._from_cache(self, v, Quantizer(v.quantizer), self._framework),
            )
        return self._fetched

    def trim(self, n: int) -> int:
        """Drops the last n tokens of every sequence (clamped at 0); returns how many."""
        if self._native is None:
            return 0
        dropped = self._native.trim(_int(n, "n"))
        self._version += 1
        self._fetched = None
        return dropped

    def reset(self) -> None:
        """Empties every sequence, keeping shapes and quantizers."""
        if self._native is not None:
            self._native.reset()
        self._version += 1
        self._fetched = None

    def is_trimmable(self) -> bool:
        return True

    # Reading -----------------------------------------------------------------------------------
    @property
    def keys(self) -> Optional[QuantizedStates]:
        return None if self._native is None else self._fetch()[0]

    @property
    def values(self) -> Optional[QuantizedStates]:
        return None if self._native is None else self._fetch()[1]

    @property
    def state(self):
        """(keys, values) planes in mlx-vlm's layout, as snapshot copies; (None, None) when
        empty."""
        if self._native is None:
            return None, None
        k, v = self._fetch()
        return k.state, v.state

    @property
    def lengths(self):
        return [] if self._native is None else list(self._native.lengths)

    @property
    def offset(self) -> int:
        """Tokens held (the longest sequence)."""
        return max(self.lengths, default=0)

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def capacity(self) -> int:
        return 0 if self._native is None else self._native.capacity

    @property
    def nbytes(self) -> int:
        """Exact bytes of the valid tokens, keys + values."""
        return 0 if self._native is None else self._native.nbytes

    @property
    def allocated_bytes(self) -> int:
        """Bytes held, including spare capacity."""
        return 0 if self._native is None else self._native.allocated_bytes

    @property
    def key_quantizer(self) -> Optional[Quantizer]:
        return None if self._native is None else self._fetch()[0].quantizer

    @property
    def value_quantizer(self) -> Optional[Quantizer]:
        return None if self._native is None else self._fetch()[1].quantizer

    def dequantize(self):
        """(keys, values) float32 [B, H_kv, T, D]."""
        k, v = self._fetch()
        threads = self.num_threads
        return k.dequantize(num_threads=threads), v.dequantize(num_threads=threads)

    def __repr__(self) -> str:
        return (
            f"tqattn.KVCache(key_bits={self.key_bits}, value_bits={self.value_bits}, "
            f"offset={self.offset}, nbytes={self.nbytes})"
        )
