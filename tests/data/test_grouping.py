"""The index-based pair searches return exactly the brute-force pairs; components; the fallbacks; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from emassist.data import grouping
from emassist.data.grouping import components, cosine_pairs, hamming_pairs, nearest_cosine, nearest_hamming


def _hashes(n: int, seed: int) -> np.ndarray:
    """Random 64-bit hashes with planted near copies (1-6 bits off) and exact repeats."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    for k in range(n // 10):
        src, dst = rng.integers(0, n, 2)
        bits = rng.choice(64, size=int(rng.integers(1, 7)), replace=False)
        x[dst] = x[src] ^ np.uint64(sum(1 << int(b) for b in bits))
        if k % 50 == 0:
            x[rng.integers(0, n)] = x[src]
    return x


def _brute_hamming(a: np.ndarray, d: int, b: np.ndarray | None = None) -> np.ndarray:
    dist = np.bitwise_count(a[:, None] ^ (a if b is None else b)[None, :])
    near = dist <= d
    if b is None:
        near = np.triu(near, 1)
    return np.argwhere(near)


@pytest.mark.parametrize("d", [0, 1, 4, 9])
def test_hamming_pairs_equal_brute_force(d: int) -> None:
    x = _hashes(3000, seed=d)
    found = hamming_pairs(x, d, batch=5000)  # a small batch: several verification steps
    expected = _brute_hamming(x, d)
    assert len(expected) >= (150 if d >= 4 else 1)
    np.testing.assert_array_equal(found, expected)


def test_hamming_pairs_between_two_sets_equal_brute_force() -> None:
    x = _hashes(2000, seed=11)
    y = np.concatenate([x[:300] ^ np.uint64(0b101), _hashes(700, seed=12)])
    np.testing.assert_array_equal(hamming_pairs(x, 4, y), _brute_hamming(x, 4, y))


def test_hamming_pairs_accept_hex_strings_and_reject_a_negative_distance() -> None:
    assert hamming_pairs(["00000000000000ff", "00000000000000fe", "ff00000000000000"], 1).tolist() == [[0, 1]]
    assert hamming_pairs(np.empty(0, dtype=np.uint64), 4).shape == (0, 2)
    with pytest.raises(ValueError, match="max_distance"):
        hamming_pairs(["00"], -1)


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    src = rng.choice(n, size=n // 20, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), size=n // 20, replace=False)
    v[dst] = v[src] + rng.normal(scale=0.2, size=(len(src), dim)).astype(np.float32)  # cosine ~0.98
    v[dst[:10]] = 3 * v[src[:10]]  # same direction, other length: cosine 1
    return v


def _brute_cosine(v: np.ndarray, threshold: float) -> np.ndarray:
    u = v.astype(np.float64) / np.linalg.norm(v.astype(np.float64), axis=1, keepdims=True)
    return np.argwhere(np.triu(u @ u.T >= threshold, 1))


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_cosine_pairs_equal_brute_force(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "sklearn":
        monkeypatch.setattr(grouping, "_faiss", lambda: None)
    elif grouping._faiss() is None:
        pytest.skip("faiss is not installed")
    v = _vectors(2000, 48, seed=3)
    expected = _brute_cosine(v, 0.94)
    assert len(expected) >= 90
    np.testing.assert_array_equal(cosine_pairs(v, 0.94), expected)


def test_cosine_ivf_index_finds_the_planted_pairs() -> None:
    if grouping._faiss() is None:
        pytest.skip("faiss is not installed")
    v = _vectors(3000, 48, seed=4)
    expected = {tuple(p) for p in _brute_cosine(v, 0.94)}
    found = {tuple(p) for p in cosine_pairs(v, 0.94, index="ivf", nprobe=8)}
    assert found <= expected  # approximate: never a false pair
    assert len(found) >= 0.95 * len(expected)


def test_cosine_pairs_bad_inputs() -> None:
    with pytest.raises(ValueError, match="2-D"):
        cosine_pairs(np.zeros(5), 0.9)
    with pytest.raises(ValueError, match="NaN"):
        cosine_pairs(np.array([[1.0, np.nan], [1.0, 0.0]]), 0.9)
    with pytest.raises(ValueError, match="index"):
        cosine_pairs(np.eye(3), 0.9, index="hnsw")
    # A zero vector is similar to nothing; a single vector has no pairs.
    assert cosine_pairs(np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]), 0.5).tolist() == [[1, 2]]
    assert cosine_pairs(np.ones((1, 4)), 0.5).shape == (0, 2)


@pytest.mark.parametrize("backend", ["faiss", "numpy"])
def test_nearest_searches_equal_brute_force(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "numpy":
        monkeypatch.setattr(grouping, "_faiss", lambda: None)
    elif grouping._faiss() is None:
        pytest.skip("faiss is not installed")
    x = _hashes(800, seed=5)
    q, ref = x[:200], x[200:]
    idx, dist = nearest_hamming(q, ref)
    brute = np.bitwise_count(q[:, None] ^ ref[None, :])
    np.testing.assert_array_equal(dist, brute.min(axis=1))
    np.testing.assert_array_equal(brute[np.arange(len(q)), idx], brute.min(axis=1))
    v = _vectors(600, 16, seed=6)
    idx, sim = nearest_cosine(v[:100], v[100:])
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    s = u[:100].astype(np.float64) @ u[100:].astype(np.float64).T
    np.testing.assert_allclose(sim, s.max(axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        nearest_hamming(q, np.empty(0, dtype=np.uint64))


def test_components_join_chains_through_helper_nodes_in_first_appearance_order() -> None:
    labels = components(6, np.array([[5, 1], [1, 8]]), np.array([[3, 8], [2, 4]]))
    assert labels.tolist() == [0, 1, 2, 1, 2, 1]
    assert components(3).tolist() == [0, 1, 2]
