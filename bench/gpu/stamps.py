"""EXPERIMENT: per-block %globaltimer stamps of the stream decode kernel (last call of a replay)."""
import ctypes
import statistics
import sys

import bench_attention as b

NAMES = ["entry", "wait", "rotated", "w0 landed", "w15 landed", "w0 loop", "w15 loop",
         "loop sync", "warp merge", "partial", "flag", "merged", "end"]


def main():
    lib = b.load(sys.argv[1])
    lib.tq_read_stream_stamps.argtypes = [ctypes.c_void_p, ctypes.c_int]
    variants = [int(v) for v in (sys.argv[2].split(",") if len(sys.argv) > 2 else ["0"])]
    for S in (2048, 32768, 131072):
        for v in variants:
            lib.tq_set_stream_variant(v)
            clear = (ctypes.c_ulonglong * (512 * 16))()
            lib.tq_read_stream_stamps(clear, 512)
            r = b.run_config(lib, "decode", 1, 32, 8, 128, 1, [S], 3, 4, False, 50, False)
            buf = (ctypes.c_ulonglong * (512 * 16))()
            lib.tq_read_stream_stamps(buf, 512)
            blocks = [list(buf[i * 16:(i + 1) * 16]) for i in range(512)]
            blocks = [x for x in blocks if x[0] != 0]
            t0 = min(x[0] for x in blocks)
            print(f"S={S} variant={v} call {r['fused_s'] * 1e6:.1f} us, {len(blocks)} blocks "
                  "(us from the first entry: median / max over blocks; last blocks apart)")
            last = [x for x in blocks if x[13] == 1]
            for k, name in enumerate(NAMES):
                vals = [(x[k] - t0) / 1e3 for x in blocks if x[k] >= t0 and x[k] - t0 < 1e7]
                lv = [(x[k] - t0) / 1e3 for x in last if x[k] >= t0 and x[k] - t0 < 1e7]
                if not vals:
                    continue
                line = f"  {name:>11} {statistics.median(vals):7.2f} {max(vals):7.2f}"
                if lv:
                    line += f"   last {statistics.median(lv):7.2f} {max(lv):7.2f}"
                print(line, flush=True)
    lib.tq_set_stream_variant(0)


if __name__ == "__main__":
    main()
