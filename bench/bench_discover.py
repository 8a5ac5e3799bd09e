"""Intent discovery on BANKING77 test, labels hidden and the number of intents not given (finetune/discover.py).

    python bench/bench_discover.py              # BANKING77 test (3,080 messages, 77 intents)
    python bench/bench_discover.py --no-record  # print only
    python bench/bench_discover.py --base models/all-mpnet-base-v2  # another encoder (docs/training.md, 'A larger base')

The messages are embedded once (the frozen base, through the embedding cache, max length 64 as
`discover` does), then clustered two ways on the same vectors:

- discover: each vector averaged with its nearest neighbours (`neighbours_for`: 20 for 3,080 messages), then the
  Ward tree cut at the silhouette's first persistent peak, small clusters as noise, exactly as `supportbot
  discover` (deterministic: no seed, one run); `--neighbours 0` clusters the raw vectors, as before 2026-12-04;
- the baseline: k-means told the true k (77) on the raw vectors, seeds 1, 2, 3.

Scores against the hidden labels: NMI, ARI, and clustering accuracy (each cluster mapped to one
intent by the Hungarian method, scipy.optimize.linear_sum_assignment; noise and unmapped clusters count
as wrong). Appends a section to BENCHMARKS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import append_section, command_line  # noqa: E402
from bot.encoder import DEFAULT_BASE  # noqa: E402
from finetune import data  # noqa: E402
from finetune.discover import DiscoverConfig, cluster_vectors, embed  # noqa: E402

DATA = "../shared/data/banking77:test"
SEEDS = (1, 2, 3)


def clustering_accuracy(truth: np.ndarray, clusters: np.ndarray) -> float:
    """Share of messages whose cluster maps to their intent under the best one-to-one mapping."""
    from scipy.optimize import linear_sum_assignment

    kept = clusters >= 0
    ids = {c: i for i, c in enumerate(sorted(set(clusters[kept].tolist())))}
    counts = np.zeros((len(ids), int(truth.max()) + 1))
    for cluster, label in zip(clusters[kept], truth[kept]):
        counts[ids[int(cluster)], label] += 1
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(truth))


def scores(truth: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"NMI": 100 * normalized_mutual_info_score(truth, clusters), "ARI": 100 * adjusted_rand_score(truth, clusters),
            "ACC": 100 * clustering_accuracy(truth, clusters)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA, help=f"labelled data SPEC (default {DATA})")
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"the encoder, as `discover --base` (default {DEFAULT_BASE})")
    parser.add_argument("--neighbours", type=int, default=None, metavar="N",
                        help="as `discover --neighbours` (default: its rule, neighbours_for; 0: the raw vectors)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()

    from sklearn.cluster import KMeans

    split = data.load(args.data)
    _name, rows = data.evaluation_split(split)
    texts, labels = list(rows["text"]), list(rows["label"])
    names = sorted(set(labels))
    truth = np.array([names.index(label) for label in labels])
    cfg = DiscoverConfig(base=args.base, neighbours=args.neighbours)
    vectors = embed(texts, cfg, progress=True)
    found_by = cluster_vectors(texts, vectors, cfg)  # what `supportbot discover` does with these vectors
    k, neighbours, clusters = found_by.k, found_by.neighbours, found_by.clusters
    found = scores(truth, np.asarray(found_by.assignments))
    noise = 100 * found_by.noise / len(texts)

    baseline = [scores(truth, KMeans(n_clusters=len(names), n_init=10, random_state=seed).fit_predict(vectors)) for seed in SEEDS]
    mean = {m: statistics.mean(b[m] for b in baseline) for m in ("NMI", "ARI", "ACC")}
    sd = {m: statistics.stdev(b[m] for b in baseline) for m in ("NMI", "ARI", "ACC")}

    lines = [
        f"BANKING77 test ({len(texts):,} messages, {len(names)} intents; labels hidden, k not given); encoder {args.base}, "
        f"max length {cfg.max_length}; each vector averaged with its {neighbours} nearest before discover's tree.",
        "",
        "| method | k | NMI | ARI | clustering accuracy | noise |",
        "|---|---:|---:|---:|---:|---:|",
        f"| discover ({neighbours} neighbours' mean, Ward, silhouette first persistent peak; deterministic) | {k} (found; {len(clusters)} kept) | {found['NMI']:.1f} | "
        f"{found['ARI']:.1f} | {found['ACC']:.1f} | {noise:.1f}% |",
        f"| k-means told the true k, seeds {', '.join(map(str, SEEDS))} (mean ± sd) | {len(names)} (given) | "
        f"{mean['NMI']:.1f} ± {sd['NMI']:.1f} | {mean['ARI']:.1f} ± {sd['ARI']:.1f} | {mean['ACC']:.1f} ± {sd['ACC']:.1f} | 0% |",
        "",
        "k-means per seed: " + "; ".join(f"seed {s}: NMI {b['NMI']:.1f}, ARI {b['ARI']:.1f}, ACC {b['ACC']:.1f}"
                                         for s, b in zip(SEEDS, baseline)),
    ]
    print("\n".join(lines))
    if not args.no_record:
        append_section("Intent discovery: BANKING77 test, labels hidden", command_line("bench/bench_discover.py"), "\n".join(lines))


if __name__ == "__main__":
    main()
