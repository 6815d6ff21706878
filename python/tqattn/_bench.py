"""Demo and benchmarks driven through the Python API (``python -m tqattn demo|bench``)."""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import _core
from ._cache import KVCache


def synthetic_kv(batch: int, kv_heads: int, tokens: int, dim: int, seed: int = 0,
                 outlier_channels: int = 4, sink_tokens: int = 4):
    """Keys/values shaped like a real LLM layer's: keys carry a few large outlier channels and
    a few attention-sink tokens with large norms; values are plain. float32 numpy."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((batch, kv_heads, tokens, dim), dtype=np.float32)
    values = rng.standard_normal((batch, kv_heads, tokens, dim), dtype=np.float32)
    channels = rng.choice(dim, size=min(outlier_channels, dim), replace=False)
    keys[..., channels] *= 12.0
    keys[:, :, : min(sink_tokens, tokens)] *= 6.0
    return keys, values


def _time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    sync()
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def _relative_error(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _cosine(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def demo(context: int = 4096, heads: int = 32, kv_heads: int = 8, dim: int = 128,
         prefill: int = 128, threads: int = 0, repeats: int = 3,
         widths: Sequence[str] = ("2", "3", "3.5", "4", "8"), print_fn=print) -> List[Dict]:
    """Quantizes a synthetic cache at several widths (MSE and Prod keys) and prints memory,
    attention error against exact fp32 attention, and decode/prefill time of the fused path
    against dense fp32 attention and against dequantize-then-attend."""
    keys, values = synthetic_kv(1, kv_heads, context, dim)
    rng = np.random.default_rng(1)
    decode_q = rng.standard_normal((1, heads, 1, dim), dtype=np.float32)
    prefill_q = rng.standard_normal((1, heads, prefill, dim), dtype=np.float32)
    fp16_bytes = 2 * 2 * keys.size  # keys + values at 2 bytes each
    exact = _core.dense_attention(decode_q, keys, values, num_threads=threads)
    no_sync = lambda: None  # noqa: E731
    dense_decode = _time(lambda: _core.dense_attention(decode_q, keys, values,
                                                       num_threads=threads), repeats, no_sync)
    dense_prefill = _time(lambda: _core.dense_attention(prefill_q, keys, values, mask="causal",
                                                        num_threads=threads), repeats, no_sync)
    print_fn(f"tqattn {context} tokens, B=1 Hq={heads} H_kv={kv_heads} D={dim}, "
             f"prefill chunk {prefill}, threads={threads or 'all'}")
    print_fn(f"dense fp32 attention: decode {dense_decode * 1e3:.3f} ms, "
             f"prefill {dense_prefill * 1e3:.2f} ms")
    header = (f"{'bits':>5} {'keys':>4} {'MiB':>7} {'vs fp16':>7} {'rel err':>8} {'cosine':>8} "
              f"{'decode ms':>9} {'xdense':>6} {'xdeq':>6} {'prefill ms':>10} {'xdense':>6}")
    print_fn(header)
    rows = []
    for width in widths:
        for mode in ("mse", "prod"):
            bits = float(width)
            key_bits = math.floor(bits) if bits != math.floor(bits) else bits
            if mode == "prod" and key_bits < 2:
                continue
            cache = KVCache(bits, key_mode=mode, num_threads=threads)
            k, v = cache.update_and_fetch(keys, values)
            out = _core.scaled_dot_product_attention(decode_q, k, v, num_threads=threads)
            fused_decode = _time(lambda: _core.scaled_dot_product_attention(
                decode_q, k, v, num_threads=threads), repeats, no_sync)
            fused_prefill = _time(lambda: _core.scaled_dot_product_attention(
                prefill_q, k, v, mask="causal", num_threads=threads), repeats, no_sync)

            def deq_then_dense():
                kd, vd = k.dequantize(num_threads=threads), v.dequantize(num_threads=threads)
                return _core.dense_attention(decode_q, kd, vd, num_threads=threads)

            deq_decode = _time(deq_then_dense, repeats, no_sync)
            row = dict(bits=width, keys=mode, nbytes=cache.nbytes,
                       compression=fp16_bytes / cache.nbytes,
                       rel_error=_relative_error(out, exact), cosine=_cosine(out, exact),
                       decode_s=fused_decode, prefill_s=fused_prefill,
                       dense_decode_s=dense_decode, dequantize_decode_s=deq_decode,
                       dense_prefill_s=dense_prefill)
            rows.append(row)
            print_fn(f"{width:>5} {mode:>4} {cache.nbytes / 2**20:7.2f} "
                     f"{row['compression']:6.2f}x {row['rel_error']:8.4f} {row['cosine']:8.5f} "
                     f"{fused_decode * 1e3:9.3f} {dense_decode / fused_decode:5.2f}x "
                     f"{deq_decode / fused_decode:5.2f}x {fused_prefill * 1e3:10.2f} "
                     f"{dense_prefill / fused_prefill:5.2f}x")
    return rows


def bench(contexts: Sequence[int] = (1024, 4096, 16384), heads: int = 32, kv_heads: int = 8,
          dim: int = 128, queries: int = 1, key_bits: float = 3, value_bits: float = 4,
          threads: int = 0, repeats: int = 5, device: str = "cpu", plot: Optional[str] = None,
          print_fn=print) -> List[Dict]:
    """Times fused attention against dense attention and against dequantize-then-dense over
    context lengths; optionally plots time against context (PNG, needs matplotlib).

    On ``device="cuda"`` (torch tensors) the dense baseline is PyTorch's fp16
    scaled_dot_product_attention and dequantize uses the library's kernel.
    """
    rows = []
    cuda = device == "cuda"
    if cuda:
        import torch
        import torch.nn.functional as F

        sync = torch.cuda.synchronize
    else:
        sync = lambda: None  # noqa: E731
    causal = queries > 1
    print_fn(f"tqattn bench: B=1 Hq={heads} H_kv={kv_heads} D={dim} L={queries} "
             f"keys {key_bits} b / values {value_bits} b, {device}, threads={threads or 'all'}")
    print_fn(f"{'context':>8} {'fused ms':>9} {'dense ms':>9} {'deq+dense ms':>12} "
             f"{'xdense':>7} {'xdeq':>7} {'packed GB/s':>11}")
    for s in contexts:
        keys, values = synthetic_kv(1, kv_heads, int(s), dim)
        q = np.random.default_rng(2).standard_normal((1, heads, queries, dim), dtype=np.float32)
        if cuda:
            keys_t = torch.from_numpy(keys).cuda()
            values_t = torch.from_numpy(values).cuda()
            q_t = torch.from_numpy(q).cuda()
            cache = KVCache(key_bits, key_bits=key_bits, value_bits=value_bits)
            k, v = cache.update_and_fetch(keys_t, values_t)
            fused = _time(lambda: _core.scaled_dot_product_attention(
                q_t, k, v, mask="causal" if causal else None), repeats, sync)
            kh, vh, qh = keys_t.half(), values_t.half(), q_t.half()
            groups = heads // kv_heads

            def sdpa16(k16, v16):
                # GQA without materialising Hq heads (PyTorch >= 2.5); else repeat the heads.
                # No mask: PyTorch's is_causal aligns top-left, and a chunk at the end of the
                # context sees nearly every key anyway (L << S).
                try:
                    return F.scaled_dot_product_attention(qh, k16, v16, enable_gqa=True)
                except TypeError:
                    return F.scaled_dot_product_attention(
                        qh, k16.repeat_interleave(groups, dim=1),
                        v16.repeat_interleave(groups, dim=1))

            dense = _time(lambda: sdpa16(kh, vh), repeats, sync)

            def deq():
                kd, vd = k.dequantize(), v.dequantize()
                return sdpa16(kd.half(), vd.half())

            dequant = _time(deq, repeats, sync)
        else:
            cache = KVCache(key_bits, key_bits=key_bits, value_bits=value_bits,
                            num_threads=threads)
            k, v = cache.update_and_fetch(keys, values)
            mask = "causal" if causal else None
            fused = _time(lambda: _core.scaled_dot_product_attention(
                q, k, v, mask=mask, num_threads=threads), repeats, sync)
            dense = _time(lambda: _core.dense_attention(
                q, keys, values, mask=mask, num_threads=threads), repeats, sync)

            def deq():
                kd, vd = k.dequantize(num_threads=threads), v.dequantize(num_threads=threads)
                return _core.dense_attention(q, kd, vd, mask=mask, num_threads=threads)

            dequant = _time(deq, repeats, sync)
        row = dict(context=int(s), fused_s=fused, dense_s=dense, dequantize_s=dequant,
                   nbytes=cache.nbytes)
        rows.append(row)
        print_fn(f"{s:>8} {fused * 1e3:9.3f} {dense * 1e3:9.3f} {dequant * 1e3:12.3f} "
                 f"{dense / fused:6.2f}x {dequant / fused:6.2f}x "
                 f"{cache.nbytes / fused / 1e9:11.1f}")
    if plot:
        plot_rows(rows, plot, title=f"L={queries}, Hq={heads}, H_kv={kv_heads}, D={dim}, "
                                    f"K{key_bits}/V{value_bits} bits, {device}")
        print_fn(f"wrote {plot}")
    return rows


def plot_rows(rows: List[Dict], path: str, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    contexts = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for key, label, style in (("fused_s", "fused (packed cache)", "o-"),
                              ("dense_s", "dense fp attention", "s--"),
                              ("dequantize_s", "dequantize + dense", "^:")):
        ax.plot(contexts, [r[key] * 1e3 for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("time per call (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
