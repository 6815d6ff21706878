"""tqattn.KVCache: the mlx-vlm-shaped cache interface."""

import numpy as np
import pytest

import tqattn
from conftest import attention_ref, randn, rel_err, states_dequantize_ref


def _planes_equal(a, b):
    if isinstance(a, tqattn.SplitState):
        return _planes_equal(a.low, b.low) and _planes_equal(a.high, b.high)
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_bits_resolution_as_mlx_vlm():
    assert tqattn.resolve_kv_bits(3.5) == (3.5, 3, 4)
    assert tqattn.resolve_kv_bits(4) == (4, 4, 4)
    assert tqattn.resolve_kv_bits(3.5, key_bits=2.5) == (3.5, 2.5, 4)
    with pytest.raises(ValueError):
        tqattn.resolve_kv_bits(0.5)
    with pytest.raises(ValueError):
        tqattn.KVCache(9)
    with pytest.raises(TypeError):
        tqattn.KVCache("4")


@pytest.mark.parametrize("bits", [3.5, 4])
def test_chunked_updates_equal_one_update(rng, bits):
    k = randn(rng, 2, 2, 1008, 64)
    v = randn(rng, 2, 2, 1008, 64)
    one = tqattn.KVCache(bits)
    one.update_and_fetch(k, v)
    chunked = tqattn.KVCache(bits)
    start = 0
    for n in (1, 7, 1000):
        keys, values = chunked.update_and_fetch(k[:, :, start:start + n], v[:, :, start:start + n])
        start += n
        assert keys.shape == (2, 2, start, 64) and chunked.offset == start
    ka, va = one.state
    kb, vb = chunked.state
    assert _planes_equal(ka, kb) and _planes_equal(va, vb)
    assert one.nbytes == chunked.nbytes


def test_nbytes_is_exact(rng):
    cache = tqattn.KVCache(3.5)
    cache.update_and_fetch(randn(rng, 1, 8, 100, 128), randn(rng, 1, 8, 100, 128))
    per_token = (4 * tqattn.packed_words(128, 3) + 2) + (4 * tqattn.packed_words(128, 4) + 2)
    assert cache.nbytes == 8 * 100 * per_token
    assert cache.allocated_bytes >= cache.nbytes
    assert cache.capacity >= 100


def test_attention_over_cache_equals_states_reference(rng):
    cache = tqattn.KVCache(4, seed=5)
    k = randn(rng, 1, 2, 50, 96)
    v = randn(rng, 1, 2, 50, 96)
    keys, values = cache.update_and_fetch(k, v)
    q = randn(rng, 1, 4, 3, 96)
    a = tqattn.scaled_dot_product_attention(q, keys, values, mask="causal")
    b = tqattn.scaled_dot_product_attention(q, cache, mask="causal")
    np.testing.assert_array_equal(a, b)
    expected, _ = attention_ref(q, states_dequantize_ref(keys), states_dequantize_ref(values),
                                causal=True)
    assert rel_err(a, expected) < 1e-5
    kd, vd = cache.dequantize()
    np.testing.assert_allclose(kd, states_dequantize_ref(keys), rtol=1e-4, atol=1e-4)
    assert rel_err(kd, k) < 0.15  # 4-bit reconstruction


def test_trim_and_stale_states(rng):
    cache = tqattn.KVCache(4)
    keys, values = cache.update_and_fetch(randn(rng, 1, 1, 10, 64), randn(rng, 1, 1, 10, 64))
    assert cache.is_trimmable()
    assert cache.trim(3) == 3 and cache.offset == 7
    with pytest.raises(RuntimeError, match="fetch them again"):
        tqattn.scaled_dot_product_attention(randn(rng, 1, 1, 1, 64), keys, values)
    assert cache.trim(100) == 7 and cache.offset == 0 and cache.empty()
    keys, values = cache.update_and_fetch(randn(rng, 1, 1, 4, 64), randn(rng, 1, 1, 4, 64))
    assert keys.shape[2] == 4


def test_state_is_a_snapshot(rng):
    cache = tqattn.KVCache(3)
    cache.update_and_fetch(randn(rng, 1, 2, 5, 64), randn(rng, 1, 2, 5, 64))
    k_state, _ = cache.state
    before = np.array(k_state.indices)
    cache.trim(5)
    cache.update_and_fetch(randn(rng, 1, 2, 300, 64), randn(rng, 1, 2, 300, 64))  # regrows
    np.testing.assert_array_equal(k_state.indices, before)
    assert isinstance(k_state, tqattn.MSEState) and k_state.norms.shape == (1, 2, 5)


def test_from_dense_and_from_cache(rng):
    k = randn(rng, 1, 2, 12, 64)
    v = randn(rng, 1, 2, 12, 64)
    a = tqattn.KVCache.from_dense(k, v, bits=3.5)

    class Dense:
        state = (k, v)

    b = tqattn.KVCache.from_cache(Dense(), 3.5)
    assert a.offset == b.offset == 12
    assert _planes_equal(a.state[0], b.state[0])


def test_append_sequence_gives_ragged_lengths(rng):
    cache = tqattn.KVCache(4)
    cache.update_and_fetch(randn(rng, 2, 2, 3, 64), randn(rng, 2, 2, 3, 64))
    keys, values = cache.append_sequence(1, randn(rng, 2, 4, 64), randn(rng, 2, 4, 64))
    assert cache.lengths == [3, 7] and keys.lengths == [3, 7]
    q = randn(rng, 2, 2, 1, 64)
    out = tqattn.scaled_dot_product_attention(q, keys, values)
    expected, _ = attention_ref(q, states_dequantize_ref(keys), states_dequantize_ref(values),
                                lengths=[3, 7])
    assert rel_err(out, expected) < 1e-5


def test_split_keys_and_prod_keys(rng):
    k = randn(rng, 1, 2, 40, 128)
    k[..., [5, 9, 77]] *= 25
    cache = tqattn.KVCache(3.5, key_bits=2.5)
    keys, _ = cache.update_and_fetch(k, randn(rng, 1, 2, 40, 128))
    assert keys.quantizer.is_split
    assert {5, 9, 77} <= set(keys.quantizer.parts[1][0].tolist())
    prod = tqattn.KVCache(4, key_mode="prod")
    keys, _ = prod.update_and_fetch(k, randn(rng, 1, 2, 40, 128))
    assert isinstance(keys.state, tqattn.ProdState)


def test_cache_rejects_bad_input(rng):
    cache = tqattn.KVCache(4)
    with pytest.raises(ValueError):
        cache.update_and_fetch(randn(rng, 1, 2, 3, 64), randn(rng, 1, 2, 4, 64))  # shapes
    with pytest.raises(ValueError):
        cache.update_and_fetch(randn(rng, 2, 3, 64), randn(rng, 2, 3, 64))  # rank
    cache.update_and_fetch(randn(rng, 1, 2, 3, 64), randn(rng, 1, 2, 3, 64))
    with pytest.raises(ValueError):
        cache.update_and_fetch(randn(rng, 1, 2, 3, 32), randn(rng, 1, 2, 3, 32))  # head dim
    with pytest.raises(ValueError):
        cache.update_and_fetch(randn(rng, 1, 2, 3, 64, dtype=np.float64),
                               randn(rng, 1, 2, 3, 64, dtype=np.float64))
    with pytest.raises(TypeError):
        cache.update_and_fetch("keys", "values")
    full = tqattn.KVCache(4, max_capacity=4)
    full.update_and_fetch(randn(rng, 1, 1, 4, 64), randn(rng, 1, 1, 4, 64))
    with pytest.raises(RuntimeError):
        full.update_and_fetch(randn(rng, 1, 1, 1, 64), randn(rng, 1, 1, 1, 64))
    with pytest.raises(ValueError):
        tqattn.KVCache(4, key_mode="qjl")
