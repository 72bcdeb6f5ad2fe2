"""Benchmark the leakage grouping's pair searches on synthetic hashes and embeddings, against the old N² dHash loop.

Synthetic data, each with 1 % planted near copies (so the searches have pairs to find):

* hashes: uniform random 64-bit dHashes; near copies 1-4 bits off. Measured: the plain dHash pair search, the
  dihedral search (8 views of each image against every image's plain hash: 8N × N) and the full grouping
  (pairs + connected components), all with ``split.near_dup_distance`` = 4.
* embeddings: Gaussian vectors (the NFFA size, 21k, at Xception's 2048 dimensions; a million at 256 dimensions, the
  size one would reduce them to by PCA before indexing that many); near copies at cosine ~0.98; threshold 0.94.
  Exact flat faiss search at 21k; at 1M the IVF index (its recall against exact search on a sample of queries is
  printed), and the exact search's time extrapolated (N²) from 100k.
* baseline: the N² dHash loop the split used before (``near_duplicate_pairs`` at commit 1e14775), timed at 21k and
  extrapolated (N²) to 1M from 21k.

Prints a Markdown table: min / median / max of ``--repeats`` runs.

    python bench/bench_grouping.py --repeats 3            # 21k and 1M
    python bench/bench_grouping.py --sizes 21000 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from emassist.data.grouping import components, cosine_pairs, hamming_pairs, nearest_cosine
from emassist.data.splitting import dihedral_pairs

DISTANCE = 4
THRESHOLD = 0.94
NEAR_SHARE = 0.01


def old_near_duplicate_pairs(hashes: Sequence[str], max_distance: int, chunk: int = 2048) -> list[tuple[int, int]]:
    """The split's dHash pair search before issue 13 (verbatim): every block against all later items."""
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(values), chunk):
        block = values[start : start + chunk]
        rest = values[start:]
        dist = np.bitwise_count(block[:, None] ^ rest[None, :])
        ii, jj = np.nonzero(dist <= max_distance)
        keep = jj > ii
        pairs.extend(zip((ii[keep] + start).tolist(), (jj[keep] + start).tolist(), strict=True))
    return pairs


def synthetic_hashes(n: int, seed: int) -> np.ndarray:
    """[n, 8] uint64: random plain hashes (column 0) and random other views; 1 % near copies of another image."""
    rng = np.random.default_rng(seed)
    views = rng.integers(0, np.iinfo(np.int64).max, (n, 8), dtype=np.int64).astype(np.uint64) << np.uint64(1)
    views |= rng.integers(0, 2, (n, 8), dtype=np.int64).astype(np.uint64)
    m = int(n * NEAR_SHARE)
    src, dst = rng.choice(n, m, replace=False), rng.choice(n, m, replace=False)
    flips = np.zeros(m, dtype=np.uint64)
    for _ in range(DISTANCE):
        flips |= np.uint64(1) << rng.integers(0, 64, m).astype(np.uint64)
    views[dst, 0] = views[src, 0] ^ flips  # a re-encoded copy
    half = m // 2
    views[dst[:half], 0] = views[src[:half], 4] ^ flips[:half]  # ... or a flipped one (seen only by the views)
    return views


def synthetic_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim), dtype=np.float32)
    m = int(n * NEAR_SHARE)
    src, dst = rng.choice(n, m, replace=False), rng.choice(n, m, replace=False)
    v[dst] = v[src] + 0.2 * rng.standard_normal((m, dim), dtype=np.float32)
    return v


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    runs, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return runs, out


def row(what: str, n: str, runs: Sequence[float], found: str, note: str = "") -> str:
    lo, med, hi = min(runs), statistics.median(runs), max(runs)
    return f"| {what} | {n} | {lo:.2f} | {med:.2f} | {hi:.2f} | {found} | {note} |"


def ivf_recall(v: np.ndarray, pairs: np.ndarray, sample: int, seed: int) -> float:
    """Share of the exact pairs (cosine >= threshold) of ``sample`` random queries that the IVF search found."""
    rng = np.random.default_rng(seed)
    queries = rng.choice(len(v), sample, replace=False)
    found = {tuple(p) for p in pairs.tolist()}
    exact = 0
    hit = 0
    # Exact neighbours of the sampled queries, by brute force against all vectors in blocks.
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    for q in queries:
        sim = u @ u[q]
        for j in np.nonzero(sim >= THRESHOLD)[0].tolist():
            if j != q:
                exact += 1
                hit += (min(q, j), max(q, j)) in found
    return hit / exact if exact else 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/bench_grouping.py", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[21_000, 1_000_000], help="numbers of images")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (min/median/max)")
    parser.add_argument("--dim-small", type=int, default=2048, help="embedding dimensions up to 100k images")
    parser.add_argument("--dim-large", type=int, default=256, help="embedding dimensions above 100k images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.sizes) < 100:
        parser.error("--repeats must be >= 1 and every size >= 100")

    lines = []
    load_before = os.getloadavg()[0]
    baseline_21k: tuple[int, float] | None = None
    for n in args.sizes:
        views = synthetic_hashes(n, args.seed)
        hexes = [f"{h:016x}" for h in views[:, 0].tolist()] if n <= 100_000 else None
        label = f"{n:,}"
        if hexes is not None:
            runs, out = timed(lambda h=hexes: old_near_duplicate_pairs(h, DISTANCE), args.repeats)
            lines.append(row("old N² dHash loop (baseline)", label, runs, f"{len(out)} pairs"))
            baseline_21k = (n, statistics.median(runs))
        elif baseline_21k is not None:
            n0, t0 = baseline_21k
            est = t0 * (n / n0) ** 2
            lines.append(f"| old N² dHash loop (baseline) | {label} | | ~{est:,.0f} | | | extrapolated N² from {n0:,}: "
                         f"~{est / 3600:.1f} h |")  # fmt: skip
        runs, out = timed(lambda v=views: hamming_pairs(v[:, 0], DISTANCE), args.repeats)
        lines.append(row("dHash pairs (multi-index hashing)", label, runs, f"{len(out)} pairs"))
        runs, out = timed(lambda v=views: dihedral_pairs(v, DISTANCE), args.repeats)
        n_pairs, plain = len(out[0]), int(out[1].sum())
        lines.append(row("dihedral pairs (8 views × N)", label, runs, f"{n_pairs} pairs ({n_pairs - plain} flip-only)"))

        def grouping(v: np.ndarray = views) -> np.ndarray:
            return components(len(v), dihedral_pairs(v, DISTANCE)[0])

        runs, out = timed(grouping, args.repeats)
        lines.append(row("full grouping: dihedral pairs + components", label, runs, f"{len(set(out.tolist()))} groups"))
        del views, hexes

        dim = args.dim_small if n <= 100_000 else args.dim_large
        vectors = synthetic_vectors(n, dim, args.seed)
        if n <= 100_000:
            runs, out = timed(lambda v=vectors: cosine_pairs(v, THRESHOLD), args.repeats)
            lines.append(row(f"cosine pairs, exact (faiss flat), {dim}-d", label, runs, f"{len(out)} pairs"))
        else:
            sub = 100_000
            runs_sub, _ = timed(lambda v=vectors[:sub]: cosine_pairs(v, THRESHOLD), 1)
            est = runs_sub[0] * (n / sub) ** 2
            lines.append(f"| cosine pairs, exact (faiss flat), {dim}-d | {label} | | ~{est:,.0f} | | | "
                         f"extrapolated N² from {sub:,} ({runs_sub[0]:.0f} s): ~{est / 60:.0f} min |")  # fmt: skip
            runs, out = timed(lambda v=vectors: cosine_pairs(v, THRESHOLD, index="ivf"), args.repeats)
            recall = ivf_recall(vectors, out, sample=200, seed=args.seed)
            lines.append(row(f"cosine pairs, IVF (faiss, nprobe 16), {dim}-d", label, runs, f"{len(out)} pairs",
                             f"recall {recall:.3f} on 200 sampled queries"))  # fmt: skip
        if n <= 100_000:  # the audit's nearest-train query (exact): 10 % test against 70 % train
            test, train = vectors[: n // 10], vectors[n - int(n * 0.7) :]
            runs, _ = timed(lambda q=test, r=train: nearest_cosine(q, r), 1)
            lines.append(row(f"audit: nearest train by cosine ({len(test):,} × {len(train):,})", label, runs, "",
                             "1 run"))  # fmt: skip
        del vectors
        print(f"done {n:,}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]

    print(f"\n### Leakage grouping benchmark (d = {DISTANCE} bits, cosine >= {THRESHOLD}, {NEAR_SHARE:.0%} planted)\n")
    print(f"{os.cpu_count()} cores; {args.repeats} runs each (seconds); 1-min load average {load_before:.1f} before, "
          f"{load_after:.1f} after\n")  # fmt: skip
    print("| step | images | min s | median s | max s | found | note |")
    print("|---|---:|---:|---:|---:|---|---|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
