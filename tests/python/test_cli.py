"""python -m tqattn: demo, bench (with its plot) and codebook."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import tqattn


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "tqattn", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_codebook_command_prints_the_codebook():
    done = _run("codebook", "--dim", "128", "--bits", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    values = np.array([float(v) for v in lines[:4]])
    np.testing.assert_allclose(values, tqattn.codebook(128, 2), rtol=1e-6)
    assert lines[4].startswith("mse ")
    assert float(lines[4].split()[1]) == pytest.approx(0.116, rel=0.01)


def test_python_demo_runs_small():
    done = _run("demo", "--python", "--quick", "--context", "256", "--heads", "4", "--kv-heads",
                "2", "--dim", "64", "--chunk", "16", "--threads", "2")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "3.5" in out and "prod" in out and "vs fp16" in out
    # Every width row reports a finite error and a cosine close to 1 at 8 bits.
    row8 = [line for line in out.splitlines() if line.strip().startswith("8 ")]
    assert row8 and float(row8[0].split()[5]) > 0.99


@pytest.mark.skipif(not hasattr(tqattn._tqattn, "run_cli"),
                    reason="the extension was built without the tqattn command (tools/)")
def test_demo_runs_the_cpp_command():
    done = _run("demo", "--help")
    assert done.returncode in (0, 2)
    assert "demo" in (done.stdout + done.stderr)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib not installed")
def test_bench_writes_a_plot(tmp_path):
    png = tmp_path / "bench.png"
    done = _run("bench", "--contexts", "128,256", "--heads", "4", "--kv-heads", "2", "--dim", "64",
                "--repeats", "1", "--threads", "2", "--plot", str(png))
    assert done.returncode == 0, done.stderr
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fused ms" in done.stdout and "256" in done.stdout


def test_bad_arguments_fail_cleanly():
    done = _run("codebook", "--dim", "128", "--bits", "9")
    assert done.returncode == 1 and "expected" in done.stderr
