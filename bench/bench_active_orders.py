"""Active learning: which labelling order to try? Selection orders compared on VALIDATION data.

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_active_orders.py                  # seeds 11-13, validation
    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_active_orders.py --seeds 1 2 3 --strats kc_all_a1 --test
    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_active_orders.py --seeds 11 12 13 14 15 16 --balanced

The same simulation as bench/bench_active.py (a 10-shot `head` model, a 2,000-message stream, 300
labelled, retrained with the same recipe), but for choosing an order: seeds other than the reported
ones (11-13 by default) and scored on 3,000 BANKING77 train messages outside the 10-shot set and the
stream (seeded), never on test unless --test. With --balanced the validation rows are 30 per intent instead
(seeded), as test is balanced (40 per intent) while the 3,000 follow train's skew: on seeds 11-16 the
queue's gain over random was +2.17 on the skewed rows and +1.82 on balanced ones, nearer test's +1.51 over
six seeds (BANKING77 test seeds 1-6), so balanced rows are the closer proxy. Each order picks 300 stream positions from the frozen
vectors (X), the start model's calibrated probabilities (P) and margins (m); no grouping, every pick
costs one label. Rows are appended to --out as JSON lines; BENCHMARKS.md History has the table.

Orders: random, margin (smallest), cm_* (Cluster-Margin: k-means with k = 300 on the whole stream or
on the 2x/3x smallest margins, the least certain per cluster), agg* (average-linkage topics at cosine
0.5, round-robin), kc_* (greedy: (1 - margin)^a x cosine distance to the nearest pick; _ent/_lc:
entropy / least confidence; _init: the 10-shot set as picks already made; _sq: distance squared;
_pool2: within the 600 smallest margins), badge (k-means++ seeding on last-layer gradient
embeddings; _greedy: farthest point), dens_b1 (margin x mean similarity to the 10 nearest).
In rounds (`_rN`: N labelling rounds with a retrain between them, bench.bench_active.in_rounds, the
product's label -> retrain loop): margin_rN, kc_r3 (the picks so far as centres), and
queue_<order>_rN (the review queue rebuilt by each round's model from the stored turns and walked as
the product lists it in bot.review's ORDERS: queue_label_r3 is the reported protocol). The queue's
orders measured and replaced are in BENCHMARKS.md History under their names then (queue_rr: the
previous `label` order, each group's least certain message round-robin; queue_shown: `group`;
queue_rru: queue_rr with equal-size groups' leads least certain first; queue_spread: the present
`label` order; queue_spreadl: it with the labelled texts as messages listed already).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench.bench_active as ba  # noqa: E402
from bot.encoder import DEFAULT_BASE, Encoder, base_weights_sha256, resolve_base  # noqa: E402
from bot.review import ORDERS, group_vectors  # noqa: E402
from finetune import data  # noqa: E402
from finetune.cache import EmbeddingCache, default_cache_dir  # noqa: E402

B = 300
RETRAINS = itertools.count()  # a fresh folder for every retrain between rounds


BALANCED_PER_INTENT = 30


def balanced_rows(rows, per_intent, seed):
    """`per_intent` rows of each label (all of a label with fewer), seeded: a validation set balanced like test."""
    by_label = {}
    for text, label in rows:
        by_label.setdefault(label, []).append((text, label))
    rng = random.Random(seed)
    return [row for label in sorted(by_label) for row in rng.sample(by_label[label], min(per_intent, len(by_label[label])))]


def by_margin(m, idx=None):
    idx = np.arange(len(m)) if idx is None else np.asarray(idx)
    return [int(i) for i in idx[np.argsort(m[idx], kind="stable")]]


def fill(chosen, m):
    seen = set(chosen)
    return chosen + [i for i in by_margin(m) if i not in seen][: B - len(chosen)]


def cm_pool(ctx, factor, k=B):
    from sklearn.cluster import KMeans
    m, X = ctx["m"], ctx["X"]
    pool = np.array(by_margin(m)[: int(factor * B)]) if factor else np.arange(len(m))
    km = KMeans(k, n_init=3, random_state=ctx["seed"]).fit(X[pool])
    picks = []
    for c in range(k):
        members = pool[km.labels_ == c]
        if len(members):
            picks.append(int(members[np.argmin(m[members])]))
    picks = by_margin(m, picks)[:B]
    return fill(picks, m)


def agglo_pool(ctx, factor, sim):
    m, X = ctx["m"], ctx["X"]
    pool = np.array(by_margin(m)[: int(factor * B)]) if factor else np.arange(len(m))
    labels = group_vectors(X[pool], sim)
    # round-robin: every group's least certain member (groups ordered by their lead's margin), then seconds
    keyed = []
    for g in np.unique(labels):
        members = pool[labels == g]
        members = members[np.argsort(m[members], kind="stable")]
        for rank, i in enumerate(members):
            keyed.append((rank, m[members[0]], int(i)))
    order = [i for _r, _mm, i in sorted(keyed)]
    return order[:B], len(np.unique(labels))


def kcenter_unc(ctx, factor, alpha, unc="margin", power=1.0, init=False):
    """Greedy: argmax (1 - margin)^alpha * distance to the nearest picked (in the pool)."""
    m, X, P = ctx["m"], ctx["X"], ctx["P"]
    pool = np.array(by_margin(m)[: int(factor * B)]) if factor else np.arange(len(m))
    V = X[pool]
    if unc == "margin":
        u = (1 - m[pool]) ** alpha
    elif unc == "entropy":
        Pp = P[pool]
        u = (-(Pp * np.log(np.clip(Pp, 1e-12, 1))).sum(1) / np.log(P.shape[1])) ** alpha
    else:
        u = (1 - P[pool].max(1)) ** alpha
    dist = np.full(len(pool), 2.0)
    if init:
        dist = np.minimum(dist, (1 - V @ ctx["L"].T).min(1))
    dist = dist ** power
    picks = []
    for _ in range(B):
        score = u * dist
        score[picks] = -1
        j = int(np.argmax(score))
        picks.append(j)
        dist = np.minimum(dist, np.maximum(1 - V @ V[j], 0) ** power)
    return [int(pool[j]) for j in picks]


def badge(ctx):
    """k-means++ seeding on last-layer gradient embeddings (p - onehot(argmax)) x embedding."""
    P, X = ctx["P"], ctx["X"]
    A = P.copy()
    A[np.arange(len(P)), P.argmax(1)] -= 1
    an = (A * A).sum(1)
    xn = (X * X).sum(1)
    sq = an * xn
    rng = np.random.default_rng(ctx["seed"])
    first = int(np.argmax(sq))
    picks = [first]
    d2 = sq + sq[first] - 2 * (A @ A[first]) * (X @ X[first])
    d2 = np.maximum(d2, 0)
    for _ in range(B - 1):
        p = d2 / d2.sum()
        j = int(rng.choice(len(p), p=p))
        picks.append(j)
        d2 = np.minimum(d2, np.maximum(sq + sq[j] - 2 * (A @ A[j]) * (X @ X[j]), 0))
        d2[picks] = 0
    return picks


def badge_greedy(ctx):
    """Deterministic BADGE: farthest-point (k-center) order on the gradient embeddings, largest norm first."""
    P, X = ctx["P"], ctx["X"]
    A = P.copy()
    A[np.arange(len(P)), P.argmax(1)] -= 1
    sq = (A * A).sum(1) * (X * X).sum(1)
    first = int(np.argmax(sq))
    picks = [first]
    d2 = np.maximum(sq + sq[first] - 2 * (A @ A[first]) * (X @ X[first]), 0)
    for _ in range(B - 1):
        d2[picks] = -1
        j = int(np.argmax(d2))
        picks.append(j)
        d2 = np.minimum(d2, np.maximum(sq + sq[j] - 2 * (A @ A[j]) * (X @ X[j]), 0))
    return picks


def density_margin(ctx, beta, knn=10):
    m, X = ctx["m"], ctx["X"]
    S = X @ X.T
    np.fill_diagonal(S, -1)
    dens = np.sort(S, axis=1)[:, -knn:].mean(1)
    score = (1 - m) * np.clip(dens, 1e-6, None) ** beta
    return [int(i) for i in np.argsort(-score)[:B]]


def kc_next(ctx, clf, taken, k):
    """k more k-center picks ((1 - margin under clf) x distance to the nearest pick), the picks so far as centres."""
    X = ctx["X"]
    u = 1 - ba.stream_margins(clf, ctx["texts"])
    dist = np.full(len(X), 2.0)
    for j in taken:
        dist = np.minimum(dist, np.maximum(1 - X @ X[j], 0))
    picks = []
    for _ in range(k):
        score = u * dist
        score[list(taken) + picks] = -1
        j = int(np.argmax(score))
        picks.append(j)
        dist = np.minimum(dist, np.maximum(1 - X @ X[j], 0))
    return picks


def rounds(ctx, pick, n):
    """The picks of `pick` over n labelling rounds with a retrain between them (ba.in_rounds)."""
    return ba.in_rounds(pick, ctx["clf"], ctx["retrain"], n, B)


def smallest(ctx):
    return lambda clf, taken, k: ba.fill_by_margin([], ba.stream_margins(clf, ctx["texts"]), k, taken)


def queue(ctx, order):
    return lambda clf, taken, k: ba.walk_queue(clf, ctx["stream"], taken, k, order)


STRATS = {
    "random": lambda c: random.Random(c["seed"]).sample(range(len(c["m"])), B),
    "margin": lambda c: by_margin(c["m"])[:B],
    "cm_all": lambda c: cm_pool(c, 0),
    "cm_pool2": lambda c: cm_pool(c, 2),
    "cm_pool3": lambda c: cm_pool(c, 3),
    "agg2_s5": lambda c: agglo_pool(c, 2, 0.5)[0],
    "agg_all_s5": lambda c: agglo_pool(c, 0, 0.5)[0],
    "kc_all_a1": lambda c: kcenter_unc(c, 0, 1.0),
    "kc_all_a3": lambda c: kcenter_unc(c, 0, 3.0),
    "badge": badge,
    "badge_greedy": badge_greedy,
    "kc_all_a05": lambda c: kcenter_unc(c, 0, 0.5),
    "kc_all_a2": lambda c: kcenter_unc(c, 0, 2.0),
    "dens_b1": lambda c: density_margin(c, 1.0),
    "kc_ent_a1": lambda c: kcenter_unc(c, 0, 1.0, unc="entropy"),
    "kc_lc_a1": lambda c: kcenter_unc(c, 0, 1.0, unc="lc"),
    "kc_init_a1": lambda c: kcenter_unc(c, 0, 1.0, init=True),
    "kc_sq_a1": lambda c: kcenter_unc(c, 0, 1.0, power=2.0),
    "kc_pool2_a1": lambda c: kcenter_unc(c, 2, 1.0),
    # labelling rounds with a retrain between them; queue_*: the product's review queue, walked in the
    # order it lists (bot.review.ORDERS)
    "margin_r3": lambda c: rounds(c, smallest(c), 3),
    "margin_r6": lambda c: rounds(c, smallest(c), 6),
    "kc_r3": lambda c: rounds(c, lambda clf, taken, k: kc_next(c, clf, taken, k), 3),
    **{f"queue_{order}_r{n}": (lambda c, order=order, n=n: rounds(c, queue(c, order), n))
       for order in ORDERS for n in (1, 3, 6, 10, 15)},
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    p.add_argument("--strats", nargs="+", default=list(STRATS))
    p.add_argument("--out", default="active_orders.jsonl")
    p.add_argument("--test", action="store_true", help="score on test instead of validation")
    p.add_argument("--balanced", action="store_true", help="validation rows: 30 per intent (as test is balanced), not 3,000 drawn")
    args = p.parse_args()
    splits = data.load(ba.BANKING)
    train_rows = list(zip(splits["train"]["text"], splits["train"]["label"]))
    encoder = Encoder.load(DEFAULT_BASE, max_length=ba.MAX_LENGTH)
    cache = EmbeddingCache(default_cache_dir(), base_weights_sha256(resolve_base(DEFAULT_BASE)), ba.MAX_LENGTH)
    cache.embed(encoder, [t for t, _ in train_rows] + list(splits["test"]["text"]), progress=False)
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            seed_rows, pool = ba.few_shot_rows(train_rows, ba.Protocol.shots, seed)
            base = ba.train_on(seed_rows, seed, folder, f"base-{seed}")
            clf = ba.classifier_of(base, cache, encoder)
            stream = ba.make_stream(pool, clf, seed, ba.Protocol.stream)
            in_stream = set(stream.texts)
            rest = [(t, lb) for t, lb in pool if t not in in_stream]
            val_rows = balanced_rows(rest, BALANCED_PER_INTENT, 1000 + seed) if args.balanced else random.Random(1000 + seed).sample(rest, 3000)
            evalset = splits["test"] if args.test else {"text": [t for t, _ in val_rows], "label": [lb for _, lb in val_rows]}
            texts = stream.texts
            emb, logits = clf.embed_and_logits(texts)
            P = clf.probabilities(logits).numpy().astype(np.float64)
            top = np.sort(P, axis=1)
            L = cache.embed(encoder, [t for t, _ in seed_rows], progress=False)[0].float().numpy().astype(np.float64)

            def retrain(chosen, seed=seed, seed_rows=seed_rows, stream=stream, folder=folder):
                rows = seed_rows + [stream.rows[i] for i in chosen]
                return ba.classifier_of(ba.train_on(rows, seed, folder, f"round-{seed}-{next(RETRAINS)}"), cache, encoder)

            ctx = {"L": L, "seed": seed, "X": emb.float().numpy().astype(np.float64), "P": P, "m": top[:, -1] - top[:, -2],
                   "clf": clf, "texts": texts, "stream": stream, "retrain": retrain}
            gold = np.array([lb for _, lb in stream.rows])
            pred = np.array([clf.labels[i] for i in P.argmax(1)])
            res = {"seed": seed, "base": ba.accuracy(clf, evalset),
                   "eval": "test" if args.test else "val_balanced" if args.balanced else "val"}
            print(json.dumps(res), flush=True)
            for name in args.strats:
                t0 = time.time()
                chosen = STRATS[name](ctx)
                assert len(set(chosen)) == B, (name, len(set(chosen)))
                chosen_arr = np.array(chosen)
                err = float((gold[chosen_arr] != pred[chosen_arr]).mean())
                ncls = len(set(gold[chosen_arr]))
                bundle = ba.train_on(seed_rows + [stream.rows[i] for i in chosen], seed, folder, f"{name}-{seed}")
                acc = ba.accuracy(ba.classifier_of(bundle, cache, encoder), evalset)
                row = {"seed": seed, "strat": name, "acc": round(100 * acc, 2), "err_rate": round(err, 3),
                       "classes": ncls, "s": round(time.time() - t0, 1), "eval": res["eval"]}
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
