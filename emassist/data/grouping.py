"""Pair search and connected components for the leakage grouping: exact results, no N² Python loop.

* :func:`hamming_pairs`: 64-bit hashes within ``d`` bits, by pigeonhole multi-index hashing. The 64 bits are cut
  into ``d + 1`` chunks; two hashes within ``d`` bits agree exactly on at least one chunk, so the candidates are the
  pairs sharing a chunk value (found by sorting, never by comparing all pairs), each verified by a popcount. For
  random hashes the candidates number about ``(d + 1) · N · M / 2^(64 / (d + 1))``: 0.04 % of all pairs at d = 4.
* :func:`cosine_pairs`: pairs of vectors at or above a cosine similarity, by a faiss range search on L2-normalised
  vectors (scikit-learn's ``NearestNeighbors`` when faiss is not importable). Every pair is re-checked in float64, so
  both back ends return the same set.
* :func:`nearest_hamming` / :func:`nearest_cosine`: the nearest reference item of each query (the leakage audit).
* :func:`components`: connected components over pair lists (scipy), numbered by first appearance.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Iterator, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HASH_BITS = 64
#: Candidates verified per step of the Hamming search: bounds the memory (about 50 bytes per candidate).
CANDIDATE_BATCH = 4_000_000
#: Query rows per faiss / scikit-learn call of the cosine search.
QUERY_BATCH = 4096
#: Similarities within this of the threshold are searched for in float32 and then decided in float64.
_FLOAT32_MARGIN = 1e-4
COSINE_INDEXES: tuple[str, ...] = ("flat", "ivf")


def _faiss() -> types.ModuleType | None:
    """faiss, or None when it is not importable (the scikit-learn / numpy fallbacks take over)."""
    try:
        import faiss  # lazy: optional at run time, and its import costs ~0.2 s
    except ImportError:
        return None
    return faiss


def as_hashes(values: Sequence[str] | np.ndarray) -> np.ndarray:
    """Hex strings (as in the manifest's ``dhash`` column) or integers → a uint64 array."""
    if isinstance(values, np.ndarray) and values.dtype == np.uint64:
        return values
    return np.array([int(v, 16) if isinstance(v, str) else int(v) for v in values], dtype=np.uint64)


def _chunk_bounds(max_distance: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, HASH_BITS, max_distance + 2).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in itertools.pairwise(edges.tolist()) if hi > lo]


def _ranges(starts: np.ndarray, counts: np.ndarray, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(query position, reference position) for every query q and reference in ``starts[q] : starts[q]+counts[q]``,
    in batches of about ``batch`` candidates."""
    total = np.cumsum(counts)
    done = 0
    q0 = 0
    n = len(counts)
    while q0 < n:
        q1 = int(np.searchsorted(total, done + batch, side="right"))
        q1 = max(q1, q0 + 1)
        c = counts[q0:q1]
        size = int(c.sum())
        if size:
            q = np.repeat(np.arange(q0, q1), c)
            first = np.cumsum(c) - c  # offset of each query's run inside this batch
            r = np.repeat(starts[q0:q1] - first, c) + np.arange(size)
            yield q, r
        done = int(total[q1 - 1])
        q0 = q1


def hamming_pairs(
    a: Sequence[str] | np.ndarray,
    max_distance: int,
    b: Sequence[str] | np.ndarray | None = None,
    *,
    batch: int = CANDIDATE_BATCH,
) -> np.ndarray:
    """Index pairs of 64-bit hashes that differ in at most ``max_distance`` bits, as an int64 array ``[k, 2]``.

    Without ``b``: every pair ``(i, j)``, ``i < j``, within ``a``. With ``b``: every ``(i, j)`` with ``a[i]`` and
    ``b[j]`` within the distance. Rows sorted; each pair once. Exact (pigeonhole multi-index hashing, see the module).
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    x = as_hashes(a)
    y = x if b is None else as_hashes(b)
    found: list[np.ndarray] = []
    for lo, hi in _chunk_bounds(min(max_distance, HASH_BITS - 1)):
        mask = np.uint64((1 << (hi - lo)) - 1)
        kx = (x >> np.uint64(lo)) & mask
        ky = kx if b is None else (y >> np.uint64(lo)) & mask
        order = np.argsort(ky, kind="stable")
        sorted_keys = ky[order]
        if b is None:
            # Query the sorted items themselves: item at sorted position p pairs with the rest of its run after p.
            queries = order
            starts = np.arange(1, len(x) + 1)
            ends = np.searchsorted(sorted_keys, sorted_keys, side="right")
        else:
            queries = np.arange(len(x))
            starts = np.searchsorted(sorted_keys, kx, side="left")
            ends = np.searchsorted(sorted_keys, kx, side="right")
        counts = np.maximum(ends - starts, 0)
        for q, r in _ranges(starts, counts, batch):
            i, j = queries[q], order[r]
            near = np.bitwise_count(x[i] ^ y[j]) <= max_distance
            i, j = i[near], j[near]
            if b is None:
                i, j = np.minimum(i, j), np.maximum(i, j)
            found.append(np.stack([i, j], axis=1).astype(np.int64))
    return _unique_pairs(found, len(y))


def _unique_pairs(found: list[np.ndarray], width: int) -> np.ndarray:
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    keys = np.unique(pairs[:, 0] * max(width, 1) + pairs[:, 1])
    return np.stack([keys // max(width, 1), keys % max(width, 1)], axis=1)


def _normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero (similar to nothing)."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array [n, d], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1), dtype=np.float32)


def cosine_pairs(
    vectors: np.ndarray,
    threshold: float,
    *,
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
) -> np.ndarray:
    """Index pairs ``(i, j)``, ``i < j``, whose cosine similarity is at least ``threshold``, int64 ``[k, 2]``, sorted.

    ``index="flat"`` (exact): a faiss inner-product range search (BLAS; no Python loop over pairs), or scikit-learn's
    brute-force radius search when faiss is missing. ``index="ivf"`` (approximate, for millions of vectors): a faiss
    inverted-file index of ``nlist`` cells (default ``4·√n``) probing ``nprobe`` of them per query; it may miss pairs
    that fall in cells it does not probe (bench/bench_grouping.py measures its recall). Every candidate is
    re-checked in float64, so ``flat`` gives the same set with either back end.
    """
    if index not in COSINE_INDEXES:
        raise ValueError(f"index must be one of {COSINE_INDEXES}, got {index!r}")
    x = _normalised(vectors)
    n, dim = x.shape
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    radius = float(threshold) - _FLOAT32_MARGIN
    faiss = _faiss()
    found: list[np.ndarray] = []
    if faiss is None:
        if index == "ivf":
            raise RuntimeError("cosine_pairs(index='ivf') needs faiss (pip install faiss-cpu)")
        from sklearn.neighbors import NearestNeighbors  # lazy: only the fallback needs it

        nn = NearestNeighbors(radius=max(0.0, 1.0 - radius), metric="cosine", algorithm="brute").fit(x)
        for start in range(0, n, QUERY_BATCH):
            hits = nn.radius_neighbors(x[start : start + QUERY_BATCH], return_distance=False)
            counts = np.array([len(h) for h in hits])
            i = np.repeat(np.arange(start, start + len(hits)), counts)
            j = np.concatenate(hits).astype(np.int64) if len(i) else np.empty(0, dtype=np.int64)
            found.append(np.stack([i, j], axis=1))
    else:
        if index == "flat":
            search = faiss.IndexFlatIP(dim)
        else:
            cells = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))  # faiss wants >= 39 training points per cell
            quantizer = faiss.IndexFlatIP(dim)
            search = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(0).choice(n, size=min(n, 64 * cells), replace=False)
            search.train(x[np.sort(sample)])
            search.nprobe = min(nprobe, cells)
        search.add(x)
        for start in range(0, n, QUERY_BATCH):
            lims, _, hits = search.range_search(x[start : start + QUERY_BATCH], radius)
            i = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
            found.append(np.stack([i, hits.astype(np.int64)], axis=1))
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    pairs = pairs[pairs[:, 0] < pairs[:, 1]]
    keep = _similarity(x, pairs) >= threshold
    return _unique_pairs([pairs[keep]], n)


def _similarity(x: np.ndarray, pairs: np.ndarray, batch: int = 1 << 16) -> np.ndarray:
    """float64 cosine similarity of each pair of unit rows (the final word on the threshold)."""
    out = np.empty(len(pairs))
    for s in range(0, len(pairs), batch):
        p = pairs[s : s + batch]
        out[s : s + batch] = np.einsum("ij,ij->i", x[p[:, 0]].astype(np.float64), x[p[:, 1]].astype(np.float64))
    return out


def nearest_hamming(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash, the index of the nearest reference hash and its Hamming distance (int64 arrays).

    faiss' exact binary index when available, else a blocked numpy popcount. Ties go to the lowest index.
    """
    q, ref = as_hashes(queries), as_hashes(reference)
    if len(ref) == 0:
        raise ValueError("nearest_hamming: the reference set is empty")
    if len(q) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    faiss = _faiss()
    if faiss is not None:
        index = faiss.IndexBinaryFlat(HASH_BITS)
        index.add(ref.view(np.uint8).reshape(-1, 8))
        dist, idx = index.search(q.view(np.uint8).reshape(-1, 8), 1)
        return idx[:, 0].astype(np.int64), dist[:, 0].astype(np.int64)
    best_i = np.empty(len(q), dtype=np.int64)
    best_d = np.empty(len(q), dtype=np.int64)
    step = max(1, (1 << 22) // len(ref))
    for s in range(0, len(q), step):
        d = np.bitwise_count(q[s : s + step, None] ^ ref[None, :])
        best_i[s : s + step] = d.argmin(axis=1)
        best_d[s : s + step] = d.min(axis=1)
    return best_i, best_d


def nearest_cosine(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query vector, the index of the most similar reference vector and their cosine similarity."""
    q, ref = _normalised(queries), _normalised(reference)
    if len(ref) == 0:
        raise ValueError("nearest_cosine: the reference set is empty")
    if len(q) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    faiss = _faiss()
    if faiss is not None:
        index = faiss.IndexFlatIP(ref.shape[1])
        index.add(ref)
        _, idx = index.search(q, 1)
        idx = idx[:, 0].astype(np.int64)
    else:
        from sklearn.neighbors import NearestNeighbors  # lazy: only the fallback needs it

        nn = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(ref)
        idx = nn.kneighbors(q, return_distance=False)[:, 0].astype(np.int64)
    sim = np.einsum("ij,ij->i", q.astype(np.float64), ref[idx].astype(np.float64))
    return idx, sim


def components(n: int, *pair_lists: np.ndarray) -> np.ndarray:
    """Connected component of each of ``n`` nodes over the union of the pair lists (int64 ``[k, 2]`` arrays of node
    ids, which may exceed ``n`` for helper nodes), numbered 0.. in order of each component's first node < ``n``."""
    pairs = [np.asarray(p, dtype=np.int64).reshape(-1, 2) for p in pair_lists]
    edges = np.concatenate(pairs) if pairs else np.empty((0, 2), dtype=np.int64)
    size = max(n, int(edges.max()) + 1 if len(edges) else 0)
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(size, size))
    _, labels = connected_components(graph, directed=False)
    labels = labels[:n]
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse]
