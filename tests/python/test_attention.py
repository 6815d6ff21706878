"""Attention through the Python API against a plain float64 numpy reference."""

import numpy as np
import pytest

import tqattn
from conftest import attention_ref, randn, rel_err, states_dequantize_ref


def _states(rng, b, h, s, d, key_bits=4, value_bits=4, key_mode="mse"):
    k = randn(rng, b, h, s, d)
    v = randn(rng, b, h, s, d)
    k[..., 1] *= 8  # an outlier channel, as real keys have
    ks = tqattn.quantize(k, key_bits, mode=key_mode, seed=1)
    vs = tqattn.quantize(v, value_bits, seed=2)
    return ks, vs


@pytest.mark.parametrize("d", [64, 96, 128, 256])
@pytest.mark.parametrize("groups", [1, 4, 7])
@pytest.mark.parametrize("L,S", [(1, 1), (1, 129), (3, 7), (16, 129)])
def test_fused_matches_numpy_reference(rng, d, groups, L, S):
    h = 1 if groups == 7 else 2
    ks, vs = _states(rng, 2, h, S, d, key_bits=3, value_bits=4)
    q = randn(rng, 2, h * groups, L, d)
    out = tqattn.scaled_dot_product_attention(q, ks, vs)
    assert out.shape == q.shape and out.dtype == np.float32
    expected, _ = attention_ref(q, states_dequantize_ref(ks), states_dequantize_ref(vs))
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("key_mode,bits", [("mse", 1), ("mse", 2), ("prod", 3), ("mse", 8),
                                           ("prod", 8)])
def test_fused_bits_and_modes(rng, key_mode, bits):
    ks, vs = _states(rng, 1, 2, 33, 64, key_bits=bits, value_bits=bits if key_mode == "mse" else 3,
                     key_mode=key_mode)
    q = randn(rng, 1, 8, 2, 64)
    out = tqattn.scaled_dot_product_attention(q, ks, vs, mask="causal")
    expected, _ = attention_ref(q, states_dequantize_ref(ks), states_dequantize_ref(vs),
                                causal=True)
    assert rel_err(out, expected) < 1e-5


def test_split_channel_states(rng):
    ks, vs = _states(rng, 1, 2, 40, 128, key_bits=2.5, value_bits=3.5)
    assert ks.quantizer.is_split and vs.quantizer.is_split
    q = randn(rng, 1, 4, 3, 128)
    out = tqattn.scaled_dot_product_attention(q, ks, vs)
    expected, _ = attention_ref(q, states_dequantize_ref(ks), states_dequantize_ref(vs))
    assert rel_err(out, expected) < 1e-5


def _reference_with(q, ks, vs, **kw):
    return attention_ref(q, states_dequantize_ref(ks), states_dequantize_ref(vs), **kw)


@pytest.mark.parametrize("options", [
    dict(mask="causal"),
    dict(causal=True, causal_offset=10),
    dict(causal=True, window=5),
    dict(window=4, causal_offset=20),
    dict(softcap=3.0),
    dict(scale=0.3),
    dict(sinks="sinks"),
    dict(mask="bool"),
    dict(mask="additive"),
    dict(mask="bool", causal=True),
])
def test_options_match_reference(rng, options):
    ks, vs = _states(rng, 2, 2, 29, 64)
    q = randn(rng, 2, 4, 5, 64)
    kw = dict(options)
    ref_kw = dict(options)
    if options.get("sinks") == "sinks":
        kw["sinks"] = ref_kw["sinks"] = randn(rng, 4) * 2
    if options.get("mask") == "bool":
        kw["mask"] = ref_kw["mask"] = rng.random((2, 1, 5, 29)) < 0.7
    elif options.get("mask") == "additive":
        kw["mask"] = ref_kw["mask"] = randn(rng, 1, 4, 5, 29)
    elif options.get("mask") == "causal":
        del ref_kw["mask"]
        ref_kw["causal"] = True
    out, lse = tqattn.scaled_dot_product_attention(q, ks, vs, return_lse=True, **kw)
    expected, expected_lse = _reference_with(q, ks, vs, **ref_kw)
    assert rel_err(out, expected) < 1e-5
    assert lse.shape == (2, 4, 5) and lse.dtype == np.float32
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(lse[finite], expected_lse[finite], rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(lse[~finite]))


def test_fully_masked_rows_give_zeros(rng):
    ks, vs = _states(rng, 1, 1, 9, 64)
    q = randn(rng, 1, 1, 2, 64)
    mask = np.zeros((1, 1, 2, 9), dtype=bool)
    mask[0, 0, 1, 3] = True
    out, lse = tqattn.scaled_dot_product_attention(q, ks, vs, mask=mask, return_lse=True)
    assert np.all(out[0, 0, 0] == 0) and np.isneginf(lse[0, 0, 0])
    assert np.all(np.isfinite(out))


def test_per_sequence_lengths(rng):
    k = randn(rng, 3, 2, 20, 64)
    v = randn(rng, 3, 2, 20, 64)
    ks = tqattn.quantize(k, 4)
    vs = tqattn.quantize(v, 4)
    lengths = [20, 7, 13]
    ks2 = tqattn.QuantizedStates(ks.quantizer, ks.state, lengths)
    vs2 = tqattn.QuantizedStates(vs.quantizer, vs.state, lengths)
    assert ks2.lengths == lengths
    q = randn(rng, 3, 4, 1, 64)
    out = tqattn.scaled_dot_product_attention(q, ks2, vs2)
    expected, _ = attention_ref(q, states_dequantize_ref(ks), states_dequantize_ref(vs),
                                lengths=lengths)
    assert rel_err(out, expected) < 1e-5


def test_half_precision_queries(rng):
    ks, vs = _states(rng, 1, 2, 65, 128)
    q = randn(rng, 1, 8, 3, 128).astype(np.float16)
    out = tqattn.scaled_dot_product_attention(q, ks, vs, mask="causal")
    assert out.dtype == np.float16
    expected, _ = _reference_with(q.astype(np.float32), ks, vs, causal=True)
    assert rel_err(out, expected) < 2e-3


def test_dense_attention_matches_reference(rng):
    k = randn(rng, 2, 2, 31, 64)
    v = randn(rng, 2, 2, 31, 64)
    q = randn(rng, 2, 6, 4, 64)
    out = tqattn.dense_attention(q, k, v, mask="causal", softcap=5.0)
    expected, _ = attention_ref(q, k, v, causal=True, softcap=5.0)
    assert rel_err(out, expected) < 1e-5


def test_out_argument_is_written_in_place(rng):
    ks, vs = _states(rng, 1, 2, 17, 64)
    q = randn(rng, 1, 2, 1, 64)
    out = np.full(q.shape, np.nan, dtype=np.float32)
    result = tqattn.scaled_dot_product_attention(q, ks, vs, out=out)
    assert result is out and np.all(np.isfinite(out))


def test_attention_rejects_bad_input(rng):
    ks, vs = _states(rng, 1, 2, 9, 64)
    q = randn(rng, 1, 4, 1, 64)
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        tqattn.scaled_dot_product_attention(q.astype(np.float64), ks, vs)  # dtype
    with pytest.raises(ValueError, match="contiguous"):
        tqattn.scaled_dot_product_attention(randn(rng, 1, 4, 1, 128)[..., ::2], ks, vs)
    with pytest.raises(ValueError):
        tqattn.scaled_dot_product_attention(randn(rng, 1, 4, 1, 32), ks, vs)  # head dim
    with pytest.raises(ValueError):
        tqattn.scaled_dot_product_attention(randn(rng, 1, 3, 1, 64), ks, vs)  # Hq % H_kv
    with pytest.raises(ValueError):
        tqattn.scaled_dot_product_attention(randn(rng, 1, 4, 64), ks, vs)  # rank
    with pytest.raises(ValueError):
        tqattn.scaled_dot_product_attention(q, ks, vs, mask=np.ones((1, 1, 1, 8), dtype=bool))
    with pytest.raises(ValueError, match="causal"):
        tqattn.scaled_dot_product_attention(q, ks, vs, mask="noncausal")
    with pytest.raises(ValueError):
        tqattn.scaled_dot_product_attention(q, ks, vs, window=-1)
    with pytest.raises(ValueError):
        tqattn.scaled_dot_product_attention(randn(rng, 1, 4, 12, 64), ks, vs, mask="causal")
    with pytest.raises(ValueError):
        tqattn.scaled_dot_product_attention(q, ks, vs, sinks=randn(rng, 3))
    with pytest.raises(TypeError):
        tqattn.scaled_dot_product_attention(q.tolist(), ks, vs)
    with pytest.raises(TypeError):
        tqattn.scaled_dot_product_attention(q, ks.state, vs.state)
    other = tqattn.quantize(randn(rng, 1, 2, 9, 96), 4)
    with pytest.raises(ValueError):
        tqattn.scaled_dot_product_attention(q, ks, other)
