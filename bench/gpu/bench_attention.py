#!/usr/bin/env python3
"""GPU benchmark: tqattn's fused attention over the packed cache against PyTorch fp16 SDPA.

Every column comes from this one process and card: fused time (the library's default kernels;
beside it `alt`: decode rows through the generic decode kernel, prefill rows through the
mma.sync prefill kernel), fp16 SDPA with the flash and cuDNN
backends on the unquantized K/V, dequantize (our kernel, to fp16) then the faster SDPA, GB/s of
the packed bytes against measured copy bandwidth, and the extra device memory of each path.
Each measurement replays a CUDA graph of many calls (launch gaps excluded) and takes the median of
several replays; inputs rotate over enough copies to exceed the L2 cache.

usage: bench_attention.py LIBTQATTN_SHIM.so [--quick] [--json OUT.json]
       bench_attention.py LIBTQATTN_SHIM.so --dims [--json OUT.json]  (head dims 64, 96, 256)
       bench_attention.py LIBTQATTN_SHIM.so --versus NAME=BASE_SHIM.so... [--head-dim D]
                          [--versus-queries L]    (decode A/B; L > 1: L-token chunks)
"""
import argparse
import ctypes
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

L2_BYTES = 50 << 20
REPLAYS = 7
_STREAM = None  # one stream for every measurement: the library keeps one workspace per stream


def load(path):
    lib = ctypes.CDLL(path)
    lib.tq_last_error.restype = ctypes.c_char_p
    lib.tq_states_create.restype = ctypes.c_void_p
    lib.tq_states_create.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [
        ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    lib.tq_states_destroy.argtypes = [ctypes.c_void_p]
    lib.tq_states_nbytes.restype = ctypes.c_int64
    lib.tq_states_nbytes.argtypes = [ctypes.c_void_p]
    lib.tq_attention.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.tq_dequantize.argtypes = [ctypes.c_void_p] * 4
    lib.tq_workspace_bytes.restype = ctypes.c_int64
    lib.tq_set_decode_splits.argtypes = [ctypes.c_int]
    lib.tq_set_stream_decode.argtypes = [ctypes.c_int]
    lib.tq_set_wgmma_prefill.argtypes = [ctypes.c_int]
    lib.tq_set_cluster_merge.argtypes = [ctypes.c_int]
    lib.tq_memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    if hasattr(lib, "tq_set_early_copies"):  # absent from builds before it (--versus bases)
        lib.tq_set_early_copies.argtypes = [ctypes.c_int]
        lib.tq_cache_create.restype = ctypes.c_void_p
        lib.tq_cache_create.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [
            ctypes.c_int, ctypes.c_int]
        lib.tq_cache_destroy.argtypes = [ctypes.c_void_p]
        lib.tq_cache_step.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_void_p]
    return lib


def check(lib, rc):
    if rc != 0:
        raise RuntimeError(lib.tq_last_error().decode())


def create_states(lib, k, v, B, Hkv, S, D, kbits, vbits, lens):
    """Packed K/V states of fp16 k, v [B, Hkv, S, D] (lens: ctypes int64 [B]) in `lib`."""
    h = lib.tq_states_create(k.data_ptr(), v.data_ptr(), B, Hkv, S, D, kbits, vbits, lens)
    if not h:
        raise RuntimeError(lib.tq_last_error().decode())
    return h


def time_graph(calls, iters):
    """Median seconds per call of `calls` (a list of closures, used round-robin) from graphs."""
    global _STREAM
    if _STREAM is None:
        _STREAM = torch.cuda.Stream()
    stream = _STREAM
    with torch.cuda.stream(stream):
        for f in calls:
            f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(iters):
            calls[i % len(calls)]()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    del graph
    return statistics.median(times)


def copy_bandwidth(lib):
    """Bytes read + written per second of a 1 GiB device copy: the best of torch and cudaMemcpy."""
    n = 1 << 30
    x = torch.empty(n // 4, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    x.normal_()
    t_torch = time_graph([lambda: y.copy_(x)], 10)
    t_memcpy = time_graph([lambda: check(lib, lib.tq_memcpy(
        y.data_ptr(), x.data_ptr(), n, torch.cuda.current_stream().cuda_stream))], 10)
    return 2 * n / min(t_torch, t_memcpy)


def sets_for(nbytes):
    return max(1, min(16, math.ceil(2 * L2_BYTES / max(nbytes, 1))))


def sdpa_time(backend, q, ks, vs, causal, iters):
    def mk(k, v):
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    try:
        with sdpa_kernel(backend):
            return time_graph([mk(k, v) for k, v in zip(ks, vs)], iters)
    except Exception as e:  # a backend that does not take this shape
        print(f"  [{backend.name} unavailable: {str(e).splitlines()[0][:100]}]", file=sys.stderr)
        return float("nan")


def kvcache_capacity(lengths, step=256):
    """The capacity KVCache allocates for these lengths (multiples of its 256-token step)."""
    return -(-max(lengths) // step) * step


def run_config(lib, name, B, Hq, Hkv, D, L, lengths, kbits, vbits, causal, iters, with_baselines,
               cap=None, compare_alt=None):
    # S: the cache capacity per sequence (default: the longest length).
    S = cap if cap else max(lengths)
    dev = "cuda"
    torch.manual_seed(0)
    fp16_set_bytes = 2 * B * Hkv * S * D * 2
    nb = sets_for(fp16_set_bytes) if with_baselines else 0
    ks = [torch.randn(B, Hkv, S, D, device=dev, dtype=torch.float16) for _ in range(max(nb, 1))]
    vs = [torch.randn(B, Hkv, S, D, device=dev, dtype=torch.float16) for _ in range(max(nb, 1))]
    q = torch.randn(B, Hq, L, D, device=dev, dtype=torch.float16)
    out = torch.empty_like(q)
    lens = (ctypes.c_int64 * B)(*lengths)
    states = [create_states(lib, ks[0], vs[0], B, Hkv, S, D, kbits, vbits, lens)]
    packed = lib.tq_states_nbytes(states[0])
    for i in range(1, sets_for(packed)):
        states.append(create_states(lib, ks[i % len(ks)], vs[i % len(vs)], B, Hkv, S, D, kbits,
                                    vbits, lens))
    ws_before = lib.tq_workspace_bytes()

    def fused(h):
        return lambda: check(lib, lib.tq_attention(h, q.data_ptr(), out.data_ptr(), Hq, L, 1,
                                                   int(causal),
                                                   torch.cuda.current_stream().cuda_stream))
    t_fused = time_graph([fused(h) for h in states], iters)
    extra = lib.tq_workspace_bytes()
    row = dict(name=name, B=B, L=L, S=S, kbits=kbits, vbits=vbits, fused_s=t_fused,
               packed_bytes=packed, fused_gbs=packed / t_fused / 1e9, extra_bytes=extra,
               workspace_growth=extra - ws_before)
    if compare_alt is None:
        compare_alt = with_baselines
    if compare_alt:
        # The other kernel on the same states, beside the default one: the generic decode kernel
        # (not the stream one), or the mma.sync prefill kernel (not the wgmma one).
        toggle = lib.tq_set_stream_decode if L <= 8 else lib.tq_set_wgmma_prefill
        toggle(0)
        row["alt_s"] = time_graph([fused(h) for h in states], iters)
        toggle(1)
    if with_baselines:
        t_flash = sdpa_time(SDPBackend.FLASH_ATTENTION, q, ks, vs, causal, iters)
        t_cudnn = sdpa_time(SDPBackend.CUDNN_ATTENTION, q, ks, vs, causal, iters)
        best = min((t for t in (t_flash, t_cudnn) if not math.isnan(t)), default=float("nan"))
        backend = SDPBackend.FLASH_ATTENTION if t_flash == best else SDPBackend.CUDNN_ATTENTION
        kd = torch.empty(B, Hkv, S, D, device=dev, dtype=torch.float16)
        vd = torch.empty_like(kd)

        def deq_sdpa(h):
            def f():
                check(lib, lib.tq_dequantize(h, kd.data_ptr(), vd.data_ptr(),
                                             torch.cuda.current_stream().cuda_stream))
                F.scaled_dot_product_attention(q, kd, vd, is_causal=causal, enable_gqa=True)
            return f
        with sdpa_kernel(backend):
            t_deq = time_graph([deq_sdpa(h) for h in states], iters)
        row.update(flash_s=t_flash, cudnn_s=t_cudnn, fp16_best_s=best, deq_sdpa_s=t_deq,
                   deq_extra_bytes=2 * kd.numel() * 2, speedup=best / t_fused)
        del kd, vd
    for h in states:
        lib.tq_states_destroy(h)
    del ks, vs
    torch.cuda.empty_cache()
    return row


def profile(lib, only=None):
    """Two calls (warm-up, measured) of each shape worth profiling, or of one ("decode:2048")."""
    shapes = (("decode", 1, 2048, False), ("decode", 1, 131072, False),
              ("chunk", 128, 32768, False), ("causal", 4096, 4096, True))
    if only:
        name, S = only.split(":")
        S = int(S)
        L = {"decode": 1, "chunk": 128, "causal": S}[name]
        shapes = ((name, L, S, name == "causal"),)
    for name, L, S, causal in shapes:
        torch.manual_seed(0)
        k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.float16)
        out = torch.empty_like(q)
        h = create_states(lib, k, v, 1, 8, S, 128, 3, 4, (ctypes.c_int64 * 1)(S))
        for _ in range(2):
            check(lib, lib.tq_attention(h, q.data_ptr(), out.data_ptr(), 32, L, 1, int(causal),
                                        torch.cuda.current_stream().cuda_stream))
        torch.cuda.synchronize()
        lib.tq_states_destroy(h)
        print(name, "ok", flush=True)


def split_sweep(lib):
    """Decode time against a fixed split count (0 = the library's own choice), 3/4 bits, for the
    stream kernel and the generic one: where the fixed cost of a call goes (splits <= 8 merge in a
    cluster, more through the workspace), and from the lengths at a fixed count, the cost per
    token and per call."""
    counts = (0, 8, 16, 32)
    for stream in (1, 0):
        lib.tq_set_stream_decode(stream)
        kind = "stream" if stream else "generic"
        print(f"split sweep, {kind} kernel (decode L=1, 3/4 bits, us):", flush=True)
        print(f"{'S':>7}" + "".join(f"{n if n else 'auto':>8}" for n in counts), flush=True)
        for S in (2048, 4096, 8192, 16384, 32768, 65536, 131072):
            times = []
            for n in counts:
                check(lib, lib.tq_set_decode_splits(n))
                r = run_config(lib, "decode", 1, 32, 8, 128, 1, [S], 3, 4, False, 50, False)
                times.append(r["fused_s"])
            print(f"{S:>7}" + "".join(f"{t * 1e6:8.1f}" for t in times), flush=True)
        g = torch.Generator().manual_seed(7)
        mixed = [int(x) for x in torch.randint(1024, 32769, (16,), generator=g)]
        if stream:
            print("B=16 lengths:", mixed, flush=True)
        bcounts = (0, 1, 2, 3, 4, 6)
        print("B=16 mixed" + "".join(f"{n if n else 'auto':>8}" for n in bcounts), flush=True)
        times = []
        for n in bcounts:
            check(lib, lib.tq_set_decode_splits(n))
            r = run_config(lib, "decode", 16, 32, 8, 128, 1, mixed, 3, 4, False, 30, False,
                           cap=kvcache_capacity(mixed))
            times.append(r["fused_s"])
        print(f"{'':>10}" + "".join(f"{t * 1e6:8.1f}" for t in times), flush=True)
    check(lib, lib.tq_set_decode_splits(0))
    lib.tq_set_stream_decode(1)


def early_sweep(lib):
    """Decode with the stream kernel's first copies issued after the dependency wait (mode 0),
    before it in the one-round kernel (1, the default) and in the ring kernel too (2), on the same
    states, graphs replayed in alternation. `attend`: back-to-back attention calls (every token settled);
    `step`: a KVCache decode step, KVCache::append of one token (unchecked: the keys' and the
    values' quantize kernels) then attention (every token but the new one settled), beside fp16's
    step (the new K/V token copied into the cache, then cuDNN SDPA)."""
    rounds = 3
    modes = (0, 1, 2)
    print(f"early copies, B=1 Hq=32 Hkv=8 D=128, medians of {rounds} alternations of "
          f"{REPLAYS}-replay graph medians (us):", flush=True)
    print(f"{'K/V':>4}{'S':>8}" + "".join(f"{'attend ' + str(m):>10}" for m in modes)
          + "".join(f"{'step ' + str(m):>9}" for m in modes)
          + f"{'cuDNN':>9}{'fp16 step':>10}{'x fp16':>8}", flush=True)
    rows = []
    for kbits, vbits, S in ((3, 4, 2048), (3, 4, 8192), (3, 4, 32768), (3, 4, 65536),
                            (3, 4, 131072), (4, 4, 32768)):
        torch.manual_seed(0)
        D = 128
        stream_ptr = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
        nb = sets_for(2 * 8 * S * D * 2)
        ks = [torch.randn(1, 8, S, D, device="cuda", dtype=torch.float16) for _ in range(nb)]
        vs = [torch.randn_like(ks[0]) for _ in range(nb)]
        k1 = torch.randn(1, 8, 1, D, device="cuda", dtype=torch.float16)
        v1 = torch.randn_like(k1)
        q = torch.randn(1, 32, 1, D, device="cuda", dtype=torch.float16)
        out = torch.empty_like(q)
        lens = (ctypes.c_int64 * 1)(S)
        hs = [create_states(lib, ks[i % nb], vs[i % nb], 1, 8, S, D, kbits, vbits, lens)
              for i in range(sets_for(S * 8 * D))]
        caches = []
        for i in range(len(hs)):
            caches.append(lib.tq_cache_create(ks[i % nb].data_ptr(), vs[i % nb].data_ptr(), 1, 8,
                                              S, D, kbits, vbits))
            if not caches[-1]:
                raise RuntimeError(lib.tq_last_error().decode())

        def attend(h, mode):
            def f():
                check(lib, lib.tq_set_early_copies(mode))
                check(lib, lib.tq_attention(h, q.data_ptr(), out.data_ptr(), 32, 1, 1, 0,
                                            stream_ptr()))
            return f

        def step(c, mode):
            def f():
                check(lib, lib.tq_set_early_copies(mode))
                check(lib, lib.tq_cache_step(c, k1.data_ptr(), v1.data_ptr(), q.data_ptr(),
                                             out.data_ptr(), 32, stream_ptr()))
            return f

        def fp16(k, v, with_append):
            def f():
                if with_append:
                    k[:, :, S - 1:S].copy_(k1)
                    v[:, :, S - 1:S].copy_(v1)
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return f
        variants = [[attend(h, m) for h in hs] for m in modes]
        variants += [[step(c, m) for c in caches] for m in modes]
        times = [[] for _ in variants]
        t_sdpa, t_fp16_step = [], []
        for _ in range(rounds):
            for i, c in enumerate(variants):
                times[i].append(time_graph(c, 50))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t_sdpa.append(time_graph([fp16(k, v, False) for k, v in zip(ks, vs)], 50))
                t_fp16_step.append(time_graph([fp16(k, v, True) for k, v in zip(ks, vs)], 50))
        med = [statistics.median(t) for t in times]
        sdpa, fp16_step = statistics.median(t_sdpa), statistics.median(t_fp16_step)
        print(f"{kbits}/{vbits}{S:>8}" + "".join(f"{m * 1e6:10.2f}" for m in med[:3])
              + "".join(f"{m * 1e6:9.2f}" for m in med[3:])
              + f"{sdpa * 1e6:9.2f}{fp16_step * 1e6:10.2f}{fp16_step / med[4]:8.2f}", flush=True)
        rows.append(dict(kbits=kbits, vbits=vbits, S=S, attend_s=med[:3], step_s=med[3:],
                         cudnn_s=sdpa, fp16_step_s=fp16_step))
        check(lib, lib.tq_set_early_copies(1))
        for h in hs:
            lib.tq_states_destroy(h)
        for c in caches:
            lib.tq_cache_destroy(c)
        del ks, vs
        torch.cuda.empty_cache()
    return rows


def versus(libs, D=128, L=1):
    """Decode (or, L > 1, non-causal L-token chunk) time of several builds of the library (this
    tree first, then the bases) on the same fp16 K/V, their graphs replayed in alternation
    (A B C A B C ...) so that all see the same clocks and neighbours: for changes smaller than the
    noise between two runs. `libs`: (name, lib)."""
    rounds = 5
    what = "decode" if L == 1 else f"chunk L={L}"
    print(f"{what} A/B, B=1 Hq=32 Hkv=8 D={D}, medians of {rounds} alternations of "
          f"{REPLAYS}-replay graph medians (us; x: against the first):", flush=True)
    print(f"{'K/V':>4}{'S':>8}" + "".join(f"{n[:14]:>15}" for n, _ in libs), flush=True)
    rows = []
    shapes = ((3, 4, 2048), (3, 4, 8192), (3, 4, 32768), (3, 4, 131072), (4, 4, 2048),
              (4, 4, 32768))
    if L > 1:
        shapes = ((3, 4, 8192), (3, 4, 32768), (3, 4, 131072), (4, 4, 32768))
    for kbits, vbits, S in shapes:
        torch.manual_seed(0)
        k = torch.randn(1, 8, S, D, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        q = torch.randn(1, 32, L, D, device="cuda", dtype=torch.float16)
        out = torch.empty_like(q)
        lens = (ctypes.c_int64 * 1)(S)
        calls, handles = [], []
        for _, l in libs:
            hs = []
            for _ in range(sets_for(S * 8 * D)):  # ~1 byte a coordinate: past the L2
                hs.append(create_states(l, k, v, 1, 8, S, D, kbits, vbits, lens))
                handles.append((l, hs[-1]))

            def mk(l, h):
                return lambda: check(l, l.tq_attention(h, q.data_ptr(), out.data_ptr(), 32, L, 1,
                                                       0, torch.cuda.current_stream().cuda_stream))
            calls.append([mk(l, h) for h in hs])
        times = [[] for _ in libs]
        for _ in range(rounds):
            for i, c in enumerate(calls):
                times[i].append(time_graph(c, 50 if L == 1 else 20))
        med = [statistics.median(t) for t in times]
        cells = [f"{med[0] * 1e6:15.2f}"] + [f"{m * 1e6:8.2f} x{m / med[0]:5.3f}" for m in med[1:]]
        print(f"{kbits}/{vbits}{S:>8}" + "".join(cells), flush=True)
        rows.append(dict(kbits=kbits, vbits=vbits, S=S, D=D, L=L,
                         times_s={n: m for (n, _), m in zip(libs, med)}))
        for l, h in handles:
            l.tq_states_destroy(h)
        del k, v
        torch.cuda.empty_cache()
    return rows


def head_dims(lib):
    """The other head dims (64, 96, 256; B=1, Hq=32, Hkv=8, 3/4 bits) against fp16 SDPA at the same
    D: decode at 8K / 32K / 128K (beside it the generic decode kernel) and a 128-token chunk at 32K
    (at D = 64 and 256 also 8K and 128K, beside them the mma.sync kernel: D = 64, 128 and 256 run
    the wgmma one, 96 mma.sync), and at D = 256 a causal prefill L = S = 16K."""
    rows = []
    for D in (64, 96, 256):
        shapes = [(1, 8192), (1, 32768), (1, 131072), (128, 32768)]
        if D != 96:
            shapes += [(128, 8192), (128, 131072)]
        for L, S in shapes:
            r = run_config(lib, "decode" if L == 1 else "chunk", 1, 32, 8, D, L, [S], 3, 4, False,
                           50 if L == 1 else 20, True, compare_alt=L == 1 or D != 96)
            r["D"] = D
            rows.append(r)
            print(json.dumps(r), flush=True)
        if D == 256:
            r = run_config(lib, "prefill-causal", 1, 32, 8, D, 16384, [16384], 3, 4, True, 3, True,
                           compare_alt=True)
            r["D"] = D
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def fmt_us(s):
    return "n/a" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{s * 1e6:9.1f}"


def finish(args, props, bw, rows, shape_note, lead_name, lead):
    """Writes the rows to --json and prints the short table, `lead(row)` in the second column."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=props.name, copy_bw=bw, rows=rows), f, indent=1)
    print()
    print(f"{props.name}  copy bandwidth {bw / 1e9:.0f} GB/s  (times in us; {shape_note})")
    print(f"{'shape':<17}{lead_name:>4}{'S':>7}{'fused':>10}{'alt':>10}{'flash':>10}{'cuDNN':>10}"
          f"{'deq+sdpa':>10}{'x fp16':>8}{'GB/s':>7}{'%bw':>5}{'extra MiB':>10}")
    for r in rows:
        spd = f"{r['speedup']:.2f}" if "speedup" in r else "-"
        print(f"{r['name'] + ' L=' + str(r['L']):<17}{lead(r):>4}{r['S']:>7}"
              f"{fmt_us(r['fused_s']):>10}{fmt_us(r.get('alt_s')):>10}"
              f"{fmt_us(r.get('flash_s')):>10}{fmt_us(r.get('cudnn_s')):>10}"
              f"{fmt_us(r.get('deq_sdpa_s')):>10}{spd:>8}{r['fused_gbs']:>7.0f}"
              f"{100 * r['fused_gbs'] * 1e9 / bw:>5.0f}{r['extra_bytes'] / 2**20:>10.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shim")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--sweep", action="store_true", help="only the decode split-count sweep")
    ap.add_argument("--versus", metavar="NAME=BASE_SHIM.so", nargs="+",
                    help="only decode, against other builds of the library (A/B)")
    ap.add_argument("--early", action="store_true",
                    help="only decode with the first copies after / before the dependency wait")
    ap.add_argument("--dims", action="store_true",
                    help="only the other head dims (64, 96, 256) against fp16 SDPA")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim of the --versus shapes")
    ap.add_argument("--versus-queries", type=int, default=1,
                    help="query length of the --versus shapes (1: decode; more: chunks)")
    ap.add_argument("--profile-one", metavar="SHAPE:S",
                    help="like --profile, one shape only (decode:2048, chunk:32768, causal:4096)")
    ap.add_argument("--profile", action="store_true",
                    help="one plain call per kernel shape, for ncu (no graphs, no baselines)")
    ap.add_argument("--generic", action="store_true",
                    help="the other kernels: generic decode (not stream), mma.sync prefill (not "
                         "wgmma); for --profile / --profile-one")
    args = ap.parse_args()
    lib = load(args.shim)
    lib.tq_set_stream_decode(0 if args.generic else 1)
    lib.tq_set_wgmma_prefill(0 if args.generic else 1)
    props = torch.cuda.get_device_properties(0)
    if args.profile or args.profile_one:
        profile(lib, args.profile_one)
        return
    if args.sweep:
        split_sweep(lib)
        return
    if args.early:
        rows = early_sweep(lib)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=props.name, early=rows), f, indent=1)
        return
    if args.versus:
        bases = [a.split("=", 1) for a in args.versus]
        rows = versus([("this tree", lib)] + [(name, load(path)) for name, path in bases],
                      args.head_dim, args.versus_queries)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=props.name, versus=rows), f, indent=1)
        return
    bw = copy_bandwidth(lib)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    if args.dims:
        rows = head_dims(lib)
        finish(args, props, bw, rows, "B=1 Hq=32 Hkv=8, 3/4 bits", "D", lambda r: str(r["D"]))
        return
    rows = []
    seqs = [2048, 8192, 32768, 65536, 131072]
    if args.quick:
        seqs = [2048, 32768, 131072]
    for kbits, vbits in ((3, 4), (4, 4)):
        for L in (1, 128):
            for S in seqs:
                iters = 50 if L == 1 else 20
                r = run_config(lib, f"{'decode' if L == 1 else 'chunk'}", 1, 32, 8, 128, L, [S],
                               kbits, vbits, False, iters, True)
                rows.append(r)
                print(json.dumps(r), flush=True)
    # B = 16 decode with mixed lengths up to 32K.
    g = torch.Generator().manual_seed(7)
    mixed = [int(x) for x in torch.randint(1024, 32769, (16,), generator=g)]
    # The capacity as KVCache allocates it (aligned planes), and the longest length itself (odd
    # here: the norm planes lose 16-byte alignment).
    for name, c in (("decode-B16-mixed", kvcache_capacity(mixed)),
                    ("B16-mixed-oddcap", max(mixed))):
        r = run_config(lib, name, 16, 32, 8, 128, 1, mixed, 3, 4, False, 30, False, cap=c,
                       compare_alt=True)
        rows.append(r)
        print(json.dumps(r), flush=True)
    # Full causal prefill L = S = 16K.
    r = run_config(lib, "prefill-causal", 1, 32, 8, 128, 16384, [16384], 3, 4, True, 3, True)
    rows.append(r)
    print(json.dumps(r), flush=True)
    finish(args, props, bw, rows, "B=1 Hq=32 Hkv=8 D=128 unless noted", "K/V",
           lambda r: f"{r['kbits']}/{r['vbits']}")


if __name__ == "__main__":
    main()
