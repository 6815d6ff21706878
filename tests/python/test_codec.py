"""Codebooks, packing and codecs against independent numpy derivations of the format."""

import math

import numpy as np
import pytest

import tqattn
from conftest import dequantize_ref, pack_ref, randn, unpack_ref


@pytest.mark.parametrize("dim,bits,expected", [(128, 1, 0.361), (128, 2, 0.116),
                                               (128, 3, 0.0340), (128, 4, 0.00931)])
def test_codebook_distortion_matches_theory(dim, bits, expected):
    c = tqattn.codebook(dim, bits)
    assert c.dtype == np.float32 and c.shape == (1 << bits,)
    assert np.all(np.diff(c) > 0)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-6)  # symmetric
    assert tqattn.codebook_distortion(dim, bits) == pytest.approx(expected, rel=0.01)


def test_codebook_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"tqattn\."):
        tqattn.codebook(128, 9)
    with pytest.raises(ValueError, match=r"tqattn\."):
        tqattn.codebook(1, 3)
    with pytest.raises(TypeError):
        tqattn.codebook(128.0, 3)


def test_pack_golden_docs_example():
    # 3-bit D=32: element j at bits [3j, 3j+3); element 10 straddles words 0 and 1.
    idx = (np.arange(32) * 5 + 3) % 8
    words = tqattn.pack(idx.astype(np.uint8), 3)
    assert words.dtype == np.uint32 and words.shape == (3,)
    expected = [0, 0, 0]
    for j, v in enumerate(idx):
        bit = 3 * j
        expected[bit // 32] |= (int(v) << (bit % 32)) & 0xFFFFFFFF
        if bit % 32 + 3 > 32:
            expected[bit // 32 + 1] |= int(v) >> (32 - bit % 32)
    assert [int(w) for w in words] == expected


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [32, 80, 96, 129])
def test_pack_unpack_identity_and_layout(rng, bits, dim):
    idx = rng.integers(0, 1 << bits, size=(3, 5, dim))
    words = tqattn.pack(idx, bits)  # int64 input: range-checked, converted
    assert words.shape == (3, 5, tqattn.packed_words(dim, bits))
    np.testing.assert_array_equal(words, pack_ref(idx, bits))
    back = tqattn.unpack(words, dim, bits)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, idx)
    np.testing.assert_array_equal(unpack_ref(words, dim, bits), idx)


def test_pack_rejects_out_of_range_and_wrong_types():
    with pytest.raises(ValueError, match="2\\^bits"):
        tqattn.pack(np.array([0, 8], dtype=np.uint8), 3)
    with pytest.raises(ValueError):
        tqattn.pack(np.array([0, 8]), 3)
    with pytest.raises(ValueError):
        tqattn.pack(np.array([0.5, 1.0]), 3)
    with pytest.raises(TypeError):
        tqattn.pack("abc", 3)
    with pytest.raises(ValueError, match="words per vector"):
        tqattn.unpack(np.zeros((2, 4), dtype=np.uint32), 32, 3)
    with pytest.raises(ValueError):
        tqattn.unpack(np.zeros((2, 3), dtype=np.int64), 32, 3)


@pytest.mark.parametrize("mode,bits", [("mse", 1), ("mse", 3), ("mse", 4), ("mse", 8),
                                       ("prod", 2), ("prod", 4)])
@pytest.mark.parametrize("dim", [64, 96, 128])
def test_codec_quantize_follows_the_format(rng, mode, bits, dim):
    codec = tqattn.Codec(dim, bits, mode, seed=3)
    x = randn(rng, 7, 5, dim)
    x[0, 0] = 0.0  # zero vector: norm 0, reconstructs to 0
    state = codec.quantize(x)
    cls = tqattn.ProdState if mode == "prod" else tqattn.MSEState
    assert isinstance(state, cls)
    assert state.norms.shape == (7, 5) and state.norms.dtype == np.float16
    words = codec.index_words
    assert words == math.ceil(dim * codec.index_bits / 32)
    assert state[1].shape == (7, 5, words) and state[1].dtype == np.uint32
    # Norms are fp16(||x||); indices are the nearest centroid of the rotated unit vector.
    np.testing.assert_array_equal(state.norms, np.linalg.norm(x, axis=-1).astype(np.float16))
    unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
    y = unit.astype(np.float64) @ codec.matrix.astype(np.float64).T
    nearest = np.searchsorted(codec.boundaries.astype(np.float64), y, side="left")
    got = unpack_ref(state[1], dim, codec.index_bits)
    mismatch = np.mean(got != nearest)
    assert mismatch < 2e-3  # only float ties at a boundary may differ
    recon = codec.dequantize(state)
    assert recon.shape == x.shape and recon.dtype == np.float32
    np.testing.assert_allclose(recon, dequantize_ref(codec, state), rtol=2e-4, atol=2e-5)
    assert np.all(recon[0, 0] == 0)


def test_codec_round_trip_error_matches_distortion(rng):
    codec = tqattn.Codec(128, 4)
    x = randn(rng, 4000, 128)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    err = np.mean(np.sum((codec.dequantize(codec.quantize(x)) - x) ** 2, axis=-1))
    assert err == pytest.approx(codec.distortion, rel=0.05)


def test_codec_prod_inner_products_unbiased(rng):
    dim, trials = 64, 300
    errors = []
    for t in range(trials):
        codec = tqattn.Codec(dim, 3, "prod", seed=t)
        x = randn(rng, 1, dim)
        q = randn(rng, dim)
        errors.append(float(codec.dequantize(codec.quantize(x))[0] @ q - x[0] @ q))
    errors = np.array(errors)
    assert abs(errors.mean()) < 3 * errors.std(ddof=1) / math.sqrt(trials)


def test_codec_caller_pieces_are_used(rng):
    dim = 64
    signs = np.where(rng.random(dim) < 0.5, -1.0, 1.0).astype(np.float32)
    centroids = np.sort(rng.uniform(-0.3, 0.3, 8)).astype(np.float32)
    codec = tqattn.Codec(dim, 3, signs=signs, centroids=centroids)
    assert codec.rotation == "hadamard"
    np.testing.assert_array_equal(codec.signs, signs)
    np.testing.assert_array_equal(codec.centroids, centroids)
    h = np.array([[1.0]])
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    np.testing.assert_allclose(codec.matrix, h * signs[None, :] / math.sqrt(dim), atol=1e-6)
    q, _ = np.linalg.qr(randn(rng, 48, 48).astype(np.float64))
    dense = tqattn.Codec(48, 2, matrix=q.astype(np.float32))
    assert dense.rotation == "dense"
    np.testing.assert_allclose(dense.matrix, q, atol=1e-6)
    s = randn(rng, 48, 48)
    prod = tqattn.Codec(48, 3, "prod", qjl_matrix=s)
    np.testing.assert_array_equal(prod.qjl_matrix, s)


def test_codec_norm_correction_keeps_norms(rng):
    codec = tqattn.Codec(128, 2, norm_correction=True)
    x = randn(rng, 50, 128)
    recon = codec.dequantize(codec.quantize(x))
    np.testing.assert_allclose(np.linalg.norm(recon, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=2e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=128, bits=0), "bits"),
    (dict(dim=128, bits=9), "bits"),
    (dict(dim=1, bits=3), "dim"),
    (dict(dim=128, bits=1, mode="prod"), "bits"),
    (dict(dim=128, bits=3, mode="fancy"), "mode"),
    (dict(dim=96, bits=3, rotation="hadamard"), "power-of-two"),
    (dict(dim=64, bits=3, rotation="spiral"), "rotation"),
    (dict(dim=64, bits=3, signs=np.ones(63)), "signs"),
    (dict(dim=64, bits=3, centroids=np.ones(8)), "ascending"),
    (dict(dim=64, bits=3, mode="prod", norm_correction=True), "norm_correction"),
])
def test_codec_rejects_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tqattn.Codec(**kwargs)


def test_codec_quantize_rejects_bad_input(rng):
    codec = tqattn.Codec(64, 3)
    with pytest.raises(ValueError, match="dtype"):
        codec.quantize(randn(rng, 4, 64, dtype=np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        codec.quantize(randn(rng, 64, 8).T)
    with pytest.raises(ValueError):
        codec.quantize(randn(rng, 4, 63))
    bad = randn(rng, 4, 64)
    bad[1, 3] = np.nan
    with pytest.raises(ValueError):
        codec.quantize(bad)
    with pytest.raises(TypeError):
        codec.quantize([[1.0] * 64])
    state = codec.quantize(randn(rng, 4, 64))
    with pytest.raises(ValueError, match="shape"):
        codec.dequantize(tqattn.MSEState(state.norms[:3], state.indices))
    with pytest.raises(ValueError, match="dtype"):
        codec.dequantize(tqattn.MSEState(state.norms.astype(np.float32), state.indices))


def test_quantizer_split_parts(rng):
    x = randn(rng, 1, 2, 40, 64)
    x[..., [3, 17]] *= 30
    q = tqattn.Quantizer.calibrate(x, 2.5)
    assert q.is_split and q.dim == 64
    (low_ch, low), (high_ch, high) = q.parts
    assert (low.bits, high.bits) == (2, 3)
    assert len(high_ch) == 32 and {3, 17} <= set(high_ch.tolist())
    assert sorted(np.concatenate([low_ch, high_ch]).tolist()) == list(range(64))
    assert q.bits_per_coordinate == pytest.approx(2.5)
    states = q.quantize(x)
    assert isinstance(states.state, tqattn.SplitState)
    from conftest import states_dequantize_ref

    np.testing.assert_allclose(states.dequantize(), states_dequantize_ref(states), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("mode,bits,dim", [("mse", 3, 128), ("mse", 4, 96), ("mse", 8, 128),
                                           ("prod", 4, 64), ("prod", 3, 80)])
def test_batched_quantize_equals_the_scalar_cpp_codec(rng, mode, bits, dim):
    """The package quantizes through the batched (SIMD, threaded) quantize_tensor; the C++
    Codec::quantize is the plain single-vector API. Same words, but for float ties."""
    codec = tqattn.Codec(dim, bits, mode, seed=2)
    x = randn(rng, 400, dim)
    state = codec.quantize(x)
    indices, norms, residual_norms, signs = tqattn._tqattn.codec_quantize_scalar(codec._native, x)
    np.testing.assert_array_equal(state.norms, norms.view(np.float16))
    assert np.mean(state[1] == indices) > 0.999
    if mode == "prod":
        np.testing.assert_allclose(state.residual_norms.astype(np.float32),
                                   residual_norms.view(np.float16).astype(np.float32), rtol=2e-3)
        assert np.mean(state.qjl_signs == signs) > 0.99
