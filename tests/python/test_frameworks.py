"""numpy <-> torch <-> mlx without copies: arrays are read where they lie and results land in
the caller's library (same data pointer wherever the library allows)."""

import numpy as np
import pytest

import tqattn
from conftest import FakeCudaArray, needs_cuda, needs_mlx, needs_torch, randn, rel_err


def _ptr(a):
    module = type(a).__module__
    if module.startswith("torch"):
        return a.data_ptr()
    return np.asarray(a).__array_interface__["data"][0]  # numpy, and mlx via its buffer


def _leaves(state):
    if isinstance(state, tqattn.SplitState):
        return _leaves(state.low) + _leaves(state.high)
    return list(state)


def _plane_order(state):
    """(indices, norms, residual_norms, qjl_signs) as States.data_pointers lists them."""
    if isinstance(state, tqattn.ProdState):
        return [state.mse_indices, state.norms, state.residual_norms, state.qjl_signs]
    return [state.indices, state.norms, None, None]


def _assert_read_in_place(states):
    parts = [states.state] if not isinstance(states.state, tqattn.SplitState) else [
        states.state.low, states.state.high]
    for pointers, part in zip(states._native.data_pointers, parts):
        for p, a in zip(pointers, _plane_order(part)):
            if a is not None:
                assert p == _ptr(a)


def test_numpy_planes_are_library_memory_and_read_in_place(rng):
    x = randn(rng, 1, 2, 9, 64)
    states = tqattn.quantize(x, 4)
    for a in _leaves(states.state):
        assert isinstance(a, np.ndarray) and not a.flags.owndata  # a view of the library's planes
    rebuilt = tqattn.QuantizedStates(states.quantizer, states.state)
    _assert_read_in_place(rebuilt)
    # A change to the caller's array is seen by the library: nothing was copied.
    before = rebuilt.dequantize()
    rebuilt.state.norms[0, 0, 0] = 0
    after = rebuilt.dequantize()
    assert np.all(after[0, 0, 0] == 0) and np.any(before[0, 0, 0] != 0)
    np.testing.assert_array_equal(after[0, 1], before[0, 1])


def test_strided_token_views_are_read_in_place(rng):
    x = randn(rng, 2, 3, 20, 64)
    full = tqattn.quantize(x, 3)
    window = tqattn.MSEState(full.state.norms[:, :, :11], full.state.indices[:, :, :11])
    part = tqattn.QuantizedStates(full.quantizer, window)
    assert part.shape == (2, 3, 11, 64) and part._native.capacity == 20
    _assert_read_in_place(part)
    np.testing.assert_array_equal(part.dequantize(), full.dequantize()[:, :, :11])


@needs_torch
def test_torch_cpu_round_trip_without_copies(rng):
    import torch

    x = torch.from_numpy(randn(rng, 1, 2, 33, 64))
    states = tqattn.quantize(x, 3)
    for a in _leaves(states.state):
        assert isinstance(a, torch.Tensor)
    as_numpy = tqattn.MSEState(*(a.numpy() for a in states.state))  # shares memory
    assert _ptr(as_numpy.norms) == _ptr(states.state.norms)
    rebuilt = tqattn.QuantizedStates(states.quantizer, as_numpy)
    _assert_read_in_place(rebuilt)
    q = torch.from_numpy(randn(rng, 1, 4, 2, 64))
    out = torch.empty_like(q)
    result = tqattn.scaled_dot_product_attention(q, states, states, out=out)
    assert result is out
    ref = tqattn.scaled_dot_product_attention(q.numpy(), rebuilt, rebuilt)
    np.testing.assert_array_equal(out.numpy(), ref)


@needs_torch
def test_torch_bfloat16_queries(rng):
    import torch

    states = tqattn.quantize(randn(rng, 1, 2, 17, 64), 4)
    q = torch.from_numpy(randn(rng, 1, 2, 1, 64))
    out = tqattn.scaled_dot_product_attention(q.bfloat16(), states, states)
    assert out.dtype == torch.bfloat16
    ref = tqattn.scaled_dot_product_attention(q.numpy(), states, states)
    assert rel_err(out.float().numpy(), ref) < 1e-2


@needs_torch
def test_torch_non_contiguous_rejected(rng):
    import torch

    states = tqattn.quantize(randn(rng, 1, 2, 17, 64), 4)
    q = torch.from_numpy(randn(rng, 1, 2, 1, 128))[..., ::2]
    with pytest.raises(ValueError, match="contiguous"):
        tqattn.scaled_dot_product_attention(q, states, states)


@needs_mlx
def test_mlx_in_place_both_ways(rng):
    import mlx.core as mx

    x = randn(rng, 1, 2, 21, 96)
    np_states = tqattn.quantize(x, 4)
    mx_state = tqattn.MSEState(*(mx.array(a) for a in np_states.state))
    mx_states = tqattn.QuantizedStates(np_states.quantizer, mx_state)
    _assert_read_in_place(mx_states)  # mlx arrays read where they lie (DLPack)
    q_np = randn(rng, 1, 4, 3, 96)
    q = mx.array(q_np)
    out = mx.zeros(q.shape, dtype=q.dtype)
    mx.eval(out)
    address = _ptr(out)
    result = tqattn.scaled_dot_product_attention(q, mx_states, mx_states, out=out)
    assert result is out and _ptr(out) == address  # written into MLX's own buffer
    ref = tqattn.scaled_dot_product_attention(q_np, np_states, np_states)
    np.testing.assert_array_equal(np.asarray(out), ref)
    fresh = tqattn.scaled_dot_product_attention(q, mx_states, mx_states)
    assert isinstance(fresh, mx.array) and np.array_equal(np.asarray(fresh), ref)
    deq = mx_states.dequantize()
    assert isinstance(deq, mx.array)
    np.testing.assert_array_equal(np.asarray(deq), np_states.dequantize())


@needs_mlx
def test_mlx_quantize_and_cache(rng):
    import mlx.core as mx

    x = randn(rng, 1, 2, 10, 64)
    states = tqattn.quantize(mx.array(x), 3)
    assert all(isinstance(a, mx.array) for a in states.state)  # one copy: MLX owns its memory
    np.testing.assert_array_equal(np.asarray(states.state.indices),
                                  tqattn.quantize(x, 3).state.indices)
    cache = tqattn.KVCache(3.5)
    keys, values = cache.update_and_fetch(mx.array(x), mx.array(x))
    out = tqattn.scaled_dot_product_attention(mx.array(randn(rng, 1, 2, 1, 64)), keys, values)
    assert isinstance(out, mx.array) and np.all(np.isfinite(np.asarray(out)))
    assert isinstance(cache.state[0].norms, mx.array)


@pytest.mark.skipif(tqattn.cuda_available(), reason="a CUDA device is visible")
def test_cuda_array_without_cuda_raises(rng):
    """A CUDA array where tqattn cannot run CUDA: a CPU-only build, or no device visible."""
    states = tqattn.quantize(randn(rng, 1, 2, 5, 64), 4)
    fake = FakeCudaArray((1, 2, 1, 64))
    out = np.empty((1, 2, 1, 64), np.float32)
    with pytest.raises(RuntimeError, match="no CUDA (backend|device)"):
        tqattn.scaled_dot_product_attention(fake, states, states, out=out)
    with pytest.raises(RuntimeError, match="no CUDA (backend|device)"):
        tqattn.Codec(64, 4).quantize(fake)
    with pytest.raises(RuntimeError, match="no CUDA (backend|device)"):
        tqattn.KVCache(4).update_and_fetch(fake, fake)


@needs_cuda
def test_torch_cuda_matches_cpu(rng):
    import torch

    k = randn(rng, 1, 2, 129, 128)
    v = randn(rng, 1, 2, 129, 128)
    q = randn(rng, 1, 8, 3, 128)
    cpu = tqattn.KVCache(3.5)
    cpu_k, cpu_v = cpu.update_and_fetch(k, v)
    gpu = tqattn.KVCache(3.5)
    gpu_k, gpu_v = gpu.update_and_fetch(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda())
    assert gpu_k.device == "cuda"
    for a, b in zip(cpu.state[0], gpu.state[0]):
        assert b.is_cuda
        np.testing.assert_array_equal(a, b.cpu().numpy())
    qd = torch.from_numpy(q).cuda()
    out = torch.full_like(qd, float("nan"))
    tqattn.scaled_dot_product_attention(qd, gpu_k, gpu_v, mask="causal", out=out)
    ref = tqattn.scaled_dot_product_attention(q, cpu_k, cpu_v, mask="causal")
    assert rel_err(out.cpu().numpy(), ref) < 2e-3  # the GPU kernels' stated bound
    with torch.cuda.stream(torch.cuda.Stream()):
        side = tqattn.scaled_dot_product_attention(qd.half(), gpu_k, gpu_v, mask="causal")
    torch.cuda.synchronize()
    assert rel_err(side.float().cpu().numpy(), ref) < 2e-3


@needs_cuda
def test_torch_cuda_cache_appends_on_the_current_stream(rng):
    import torch

    k = randn(rng, 1, 2, 300, 128)
    v = randn(rng, 1, 2, 300, 128)
    q = randn(rng, 1, 8, 1, 128)
    cpu = tqattn.KVCache(3.5, step=64)
    cpu.update_and_fetch(k[:, :, :200], v[:, :, :200])
    ref = tqattn.scaled_dot_product_attention(q, *cpu.update_and_fetch(k[:, :, 200:], v[:, :, 200:]))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        kd, vd = torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda()
        gpu = tqattn.KVCache(3.5, step=64, check_finite=False)
        gpu.update_and_fetch(kd[:, :, :200], vd[:, :, :200])  # strided views: copied on `side`
        gk, gv = gpu.update_and_fetch(kd[:, :, 200:], vd[:, :, 200:])  # grows 256 -> 512
        out = tqattn.scaled_dot_product_attention(torch.from_numpy(q).cuda(), gk, gv)
    side.synchronize()
    assert gpu.capacity == 512
    assert rel_err(out.cpu().numpy(), ref) < 2e-3

    bad = torch.from_numpy(k).cuda()
    bad[0, 1, 3, 0] = float("nan")
    vd = torch.from_numpy(v).cuda()
    with pytest.raises(ValueError, match="finite"):
        tqattn.KVCache(3.5).update_and_fetch(bad, vd)
    uk, uv = tqattn.KVCache(3.5, check_finite=False).update_and_fetch(bad, vd)
    o = tqattn.scaled_dot_product_attention(torch.from_numpy(q).cuda(), uk, uv).cpu().numpy()
    # Query heads 4-7 read KV head 1, which holds the NaN row.
    assert np.isfinite(o[0, :4]).all() and np.isnan(o[0, 4:]).all()


@needs_cuda
def test_cuda_and_cpu_mixed_raises(rng):
    import torch

    states = tqattn.quantize(randn(rng, 1, 2, 5, 64), 4)
    q = torch.from_numpy(randn(rng, 1, 2, 1, 64)).cuda()
    with pytest.raises(ValueError):
        tqattn.scaled_dot_product_attention(q, states, states)
