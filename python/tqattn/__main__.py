"""python -m tqattn demo | bench | codebook

``demo`` runs the C++ ``tqattn demo`` (same code, same flags) when the extension carries the
command, else the same job through the Python API; ``bench`` times fused attention against dense
and dequantize-then-dense over context lengths, with ``--plot out.png``.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import _bench, _core, _tqattn


def _ints(text: str) -> List[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = 1
        if part.endswith("k"):
            part, scale = part[:-1], 1024
        out.append(int(part) * scale)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tqattn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job: memory, error and speed per width")
    d.add_argument("--python", action="store_true",
                   help="run the Python-API demo even where the C++ command is built in")
    d.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    d.add_argument("--context", type=int, default=None)
    d.add_argument("--threads", type=int, default=0)
    d.add_argument("--repeats", type=int, default=None)
    d.add_argument("--heads", type=int, default=32)
    d.add_argument("--kv-heads", type=int, default=8)
    d.add_argument("--dim", type=int, default=128)
    d.add_argument("--chunk", type=int, default=None, help="prefill chunk length")

    b = sub.add_parser("bench", help="time against context length (optionally plot)")
    b.add_argument("--contexts", type=_ints, default=[1024, 4096, 16384],
                   help="comma-separated context lengths (k = 1024), default 1k,4k,16k")
    b.add_argument("--queries", type=int, default=1, help="L: 1 = decode, >1 causal chunk")
    b.add_argument("--heads", type=int, default=32)
    b.add_argument("--kv-heads", type=int, default=8)
    b.add_argument("--dim", type=int, default=128)
    b.add_argument("--key-bits", type=float, default=3)
    b.add_argument("--value-bits", type=float, default=4)
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--plot", metavar="PNG", default=None,
                   help="write time vs context for fused / dense / dequantize (matplotlib)")

    c = sub.add_parser("codebook", help="Lloyd-Max centroids, then 'mse <d*C>'")
    c.add_argument("--dim", type=int, required=True)
    c.add_argument("--bits", type=int, required=True)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo" and "--python" not in argv and hasattr(_tqattn, "run_cli"):
        sys.stdout.flush()
        return int(_tqattn.run_cli(["tqattn"] + list(argv)))
    args = _parser().parse_args(argv)
    try:
        if args.command == "codebook":
            for value in _core.codebook(args.dim, args.bits):
                print(f"{value:.9g}")
            print(f"mse {_core.codebook_distortion(args.dim, args.bits):.9g}")
        elif args.command == "demo":
            context = args.context or (512 if args.quick else 4096)
            repeats = args.repeats or (1 if args.quick else 3)
            chunk = args.chunk or (32 if args.quick else 128)
            _bench.demo(context=context, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim,
                        prefill=min(chunk, context), threads=args.threads, repeats=repeats)
        else:
            _bench.bench(contexts=args.contexts, heads=args.heads, kv_heads=args.kv_heads,
                         dim=args.dim, queries=args.queries, key_bits=args.key_bits,
                         value_bits=args.value_bits, threads=args.threads,
                         repeats=args.repeats, device=args.device, plot=args.plot)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
