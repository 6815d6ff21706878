"""mlx-vlm interop: against a numpy re-implementation of mlx-vlm's quantizer everywhere, and
against the real mlx-vlm where mlx runs (pip install mlx; pip install --no-deps mlx-vlm)."""

import numpy as np
import pytest

import mlx_vlm_reference as ref
import tqattn
from conftest import HAVE_MLX, attention_ref, randn, rel_err
from tqattn import mlx_vlm as interop

TQ = interop.load_turboquant() if HAVE_MLX else None
needs_mlx_vlm = pytest.mark.skipif(
    TQ is None, reason="mlx and mlx-vlm are not installed (pip install mlx; "
    "pip install --no-deps mlx-vlm): tested against the numpy re-implementation only")


def _keys(rng, b, h, t, d):
    k = randn(rng, b, h, t, d)
    k[..., [2, d // 2 + 1]] *= 15  # outlier channels, so that a split has a clear winner
    return k


def _leaves(state):
    if hasattr(state, "low"):
        return _leaves(state.low) + _leaves(state.high)
    return [np.asarray(a) for a in state]


def _word_agreement(a, b):
    """Fraction of equal uint32 words, all norms required equal (up to a boundary tie)."""
    total = same = 0
    for x, y in zip(_leaves(a), _leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        if x.dtype == np.uint32:
            total += x.size
            same += int(np.sum(x == y))
        else:
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=1e-3)
    return same / total


# ------------------------------------------------------------------------------------------------
# Generators: tqattn.mlx_vlm against the reference.


@pytest.mark.parametrize("dim", [64, 80, 96, 128])
def test_generators_match_reference(dim):
    for seed in (0, 1, 98):
        np.testing.assert_array_equal(interop.rotation_signs(dim, seed), ref.sign_vector(dim, seed))
        np.testing.assert_array_equal(interop.rotation_matrix(dim, seed),
                                      ref.haar_matrix(dim, seed))
        np.testing.assert_array_equal(interop.qjl_matrix(dim, seed), ref.projection(dim, seed + 1))
    for bits in (1, 2, 3, 4):
        np.testing.assert_array_equal(interop.codebook(dim, bits), ref.grid_codebook(dim, bits))


def test_grid_codebook_is_near_our_exact_one():
    grid = interop.codebook(128, 3)
    exact = tqattn.codebook(128, 3)
    assert np.max(np.abs(grid - exact)) < 0.01 * np.max(np.abs(exact))
    assert not np.array_equal(grid, exact)  # why interop passes mlx-vlm's own table


# ------------------------------------------------------------------------------------------------
# Against the numpy reference (always runs).


@pytest.mark.parametrize("bits,key_bits,dim", [(3.5, None, 128), (4, None, 96), (3.5, 2.5, 128),
                                               (3, None, 80), (2, None, 64)])
def test_reference_cache_converts_and_attends(rng, bits, key_bits, dim):
    cache = ref.TurboQuantKVCache(bits, seed=7, key_bits=key_bits)
    k = _keys(rng, 2, 2, 41, dim)
    v = randn(rng, 2, 2, 41, dim)
    cache.update_and_fetch(k[:, :, :30], v[:, :, :30])
    cache.update_and_fetch(k[:, :, 30:], v[:, :, 30:])
    keys, values = tqattn.from_mlx_vlm(cache)
    assert keys.shape == (2, 2, 41, dim)
    # Zero copies: the library reads the reference's own arrays.
    ref_norms = cache.state[0].low.norms if key_bits else cache.state[0].norms
    assert keys._native.data_pointers[0][1] == ref_norms.ctypes.data
    kd, vd = cache.dequantize()
    np.testing.assert_allclose(keys.dequantize(), kd, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(values.dequantize(), vd, rtol=1e-4, atol=2e-5)
    q = randn(rng, 2, 8, 3, dim)
    out = tqattn.scaled_dot_product_attention(q, keys, values, mask="causal")
    expected = ref.sdpa(q, kd, vd, 1 / np.sqrt(dim), mask="causal")
    assert rel_err(out, expected) < 1e-5
    # And back: the planes come out bit for bit.
    back_k = tqattn.to_mlx_vlm(keys)
    for a, b in zip(_leaves(back_k), _leaves(cache.state[0])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bits,key_bits,dim", [(3.5, None, 128), (4, None, 96), (3.5, 2.5, 128)])
def test_compat_cache_quantizes_as_reference(rng, bits, key_bits, dim):
    k = _keys(rng, 1, 2, 300, dim)
    v = randn(rng, 1, 2, 300, dim)
    theirs = ref.TurboQuantKVCache(bits, seed=3, key_bits=key_bits)
    theirs.update_and_fetch(k, v)
    ours = tqattn.KVCache(bits, seed=3, key_bits=key_bits, compat="mlx_vlm")
    ours.update_and_fetch(k, v)
    ks, vs = ours.state
    assert type(ks).__name__ == type(theirs.state[0]).__name__.replace("TurboQuant", "")
    assert _word_agreement(ks, theirs.state[0]) > 0.999
    assert _word_agreement(vs, theirs.state[1]) > 0.999


def test_reference_prod_state_converts(rng):
    codec = ref.ProdCodec(96, 3, seed=4)
    x = randn(rng, 1, 2, 25, 96)
    state = codec.quantize(x)
    states = tqattn.from_mlx_vlm(state, codec)
    assert isinstance(states.state, tqattn.ProdState)
    np.testing.assert_allclose(states.dequantize(), codec.dequantize(state), rtol=1e-4, atol=2e-5)
    ours = interop.codec(96, 3, 4, "prod").quantize(x)
    assert _word_agreement(ours, state) > 0.999
    back = tqattn.to_mlx_vlm(states)
    assert [np.array_equal(a, b) for a, b in zip(_leaves(back), _leaves(state))] == [True] * 4


def test_to_mlx_vlm_refuses_foreign_rotations(rng):
    cache = tqattn.KVCache(4)  # our own generator, not mlx-vlm's
    cache.update_and_fetch(randn(rng, 1, 1, 4, 64), randn(rng, 1, 1, 4, 64))
    if TQ is None:
        with pytest.raises(RuntimeError, match="mlx"):
            tqattn.to_mlx_vlm(cache)
    else:
        with pytest.raises(ValueError, match="compat"):
            tqattn.to_mlx_vlm(cache)


def test_from_mlx_vlm_rejects_other_objects(rng):
    with pytest.raises(TypeError):
        tqattn.from_mlx_vlm(object())
    with pytest.raises(TypeError):
        tqattn.from_mlx_vlm((np.zeros(3),), ref.MSECodec(64, 3, 0))


# ------------------------------------------------------------------------------------------------
# Against the real mlx-vlm.


@needs_mlx_vlm
@pytest.mark.parametrize("dim", [64, 96, 128])
def test_reference_is_faithful_to_mlx_vlm(rng, dim):
    for seed in (0, 5):
        np.testing.assert_array_equal(np.asarray(TQ._rht_sign_vector(dim, seed)),
                                      ref.sign_vector(dim, seed))
        np.testing.assert_array_equal(np.asarray(TQ._rotation_matrix(dim, seed)),
                                      ref.haar_matrix(dim, seed))
        np.testing.assert_array_equal(np.asarray(TQ._projection_matrix(dim, seed)),
                                      ref.projection(dim, seed))
    for bits in (1, 2, 3, 4):
        np.testing.assert_array_equal(np.asarray(TQ._codebook(dim, bits)),
                                      interop.codebook(dim, bits))
    import mlx.core as mx

    x = _keys(rng, 1, 2, 200, dim)
    theirs = TQ.TurboQuantKVCache(bits=3.5, seed=2)
    theirs.update_and_fetch(mx.array(x), mx.array(x))
    mine = ref.TurboQuantKVCache(3.5, seed=2)
    mine.update_and_fetch(x, x)
    assert _word_agreement(theirs.state[0], mine.state[0]) > 0.999
    assert _word_agreement(theirs.state[1], mine.state[1]) > 0.999


def _fill_mlx_vlm(rng, bits, key_bits, dim, tokens=(37, 1, 6)):
    import mlx.core as mx

    cache = TQ.TurboQuantKVCache(bits=bits, seed=11, key_bits=key_bits)
    k = _keys(rng, 1, 4, sum(tokens), dim)
    v = randn(rng, 1, 4, sum(tokens), dim)
    start = 0
    for n in tokens:
        chunk = slice(start, start + n)
        cache.update_and_fetch(mx.array(k[:, :, chunk]), mx.array(v[:, :, chunk]))
        start += n
    return cache, k, v


@needs_mlx_vlm
@pytest.mark.parametrize("bits,key_bits,dim", [(3.5, None, 128), (4, None, 96), (3.5, 2.5, 128),
                                               (2, None, 64)])
def test_mlx_vlm_cache_converts_bit_exactly_and_attends(rng, bits, key_bits, dim):
    import mlx.core as mx

    cache, k, v = _fill_mlx_vlm(rng, bits, key_bits, dim)
    keys, values = tqattn.from_mlx_vlm(cache)
    # The planes are mlx-vlm's own arrays, read in place.
    for a, b in zip(_leaves(keys.state), _leaves(cache.state[0])):
        np.testing.assert_array_equal(a, b)
    assert keys.nbytes + values.nbytes == cache.nbytes  # same exact byte accounting
    kd, vd = cache.dequantize()
    np.testing.assert_allclose(np.asarray(keys.dequantize()), np.asarray(kd), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(values.dequantize()), np.asarray(vd), rtol=1e-5,
                               atol=1e-6)
    q = mx.array(randn(rng, 1, 8, 4, dim))
    scale = dim ** -0.5
    ours = tqattn.scaled_dot_product_attention(q, keys, values, mask="causal")
    groups = 8 // 4
    expected = mx.fast.scaled_dot_product_attention(
        q, mx.repeat(kd, groups, axis=1), mx.repeat(vd, groups, axis=1), scale=scale, mask="causal")
    assert rel_err(np.asarray(ours), np.asarray(expected)) < 1e-5
    theirs = cache.quantized_attention(q, scale=scale, mask="causal")
    assert rel_err(np.asarray(ours), np.asarray(theirs)) < 1e-5


@needs_mlx_vlm
@pytest.mark.parametrize("bits,key_bits,dim", [(3.5, None, 128), (4, None, 80), (3.5, 2.5, 128)])
def test_our_cache_converts_to_mlx_vlm(rng, bits, key_bits, dim):
    import mlx.core as mx

    k = _keys(rng, 1, 2, 50, dim)
    v = randn(rng, 1, 2, 50, dim)
    ours = tqattn.KVCache(bits, seed=9, key_bits=key_bits, compat="mlx_vlm")
    ours.update_and_fetch(mx.array(k), mx.array(v))
    theirs = tqattn.to_mlx_vlm(ours)
    assert isinstance(theirs, TQ.TurboQuantKVCache) and theirs.offset == 50
    for a, b in zip(_leaves(theirs.state[0]), _leaves(ours.state[0])):
        np.testing.assert_array_equal(a, b)  # bit-exact
    kd, vd = theirs.dequantize()
    ok, ov = ours.dequantize()
    np.testing.assert_allclose(np.asarray(kd), np.asarray(ok), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vd), np.asarray(ov), rtol=1e-5, atol=1e-6)
    # mlx-vlm's own quantizer, fed the same data, agrees with ours word for word (but for ties).
    native = TQ.TurboQuantKVCache(bits=bits, seed=9, key_bits=key_bits)
    native.update_and_fetch(mx.array(k), mx.array(v))
    assert _word_agreement(native.state[0], ours.state[0]) > 0.999
    # The converted cache keeps working inside mlx-vlm.
    theirs.update_and_fetch(mx.array(k[:, :, :1]), mx.array(v[:, :, :1]))
    assert theirs.offset == 51


@needs_mlx_vlm
def test_mlx_vlm_prod_state_converts(rng):
    import mlx.core as mx

    codec = TQ._TurboQuantProdCodec(128, 4, 6)
    x = mx.array(randn(rng, 1, 2, 30, 128))
    state = codec.quantize(x)
    states = tqattn.from_mlx_vlm(state, codec)
    np.testing.assert_allclose(np.asarray(states.dequantize()), np.asarray(codec.dequantize(state)),
                               rtol=1e-5, atol=1e-5)
    ours = interop.codec(128, 4, 6, "prod").quantize(np.asarray(x))
    assert _word_agreement(ours, state) > 0.999
    back = tqattn.to_mlx_vlm(states)
    assert type(back).__name__ == "TurboQuantProdState"
    for a, b in zip(_leaves(back), _leaves(state)):
        np.testing.assert_array_equal(a, b)
    values = tqattn.quantize(randn(rng, 1, 2, 30, 128), 4)
    q = randn(rng, 1, 4, 1, 128)
    out = tqattn.scaled_dot_product_attention(q, states, values)
    expected, _ = attention_ref(q, np.asarray(codec.dequantize(state)), values.dequantize())
    assert rel_err(out, expected) < 1e-5
