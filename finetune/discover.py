"""Intent discovery: candidate intents from unlabelled messages, on the frozen encoder's embeddings.

`supportbot discover --data SPEC --output DIR [--known MODEL]` embeds every message through the one
embedding path (bot/encoder.py, through finetune's embedding cache), clusters the vectors, names each
cluster by its key terms and writes:

- `DIR/assignments.csv` (`text,cluster`; -1 marks noise: a message in a cluster too small to train on),
- `DIR/clusters.json` (per cluster: name, size, key terms, representative and borderline examples),
- `DIR/discovery.png` (the silhouette of each k tried with the chosen one marked, and the clusters' sizes),
- `DIR/known.csv` with `--known` (messages the existing model answers confidently, set aside),
- `DIR/pack/nlu.yaml`, a draft domain pack that `supportbot train --data DIR/pack` accepts as it is.

How the number of intents is chosen (decision, by measurement; BENCHMARKS.md, "Intent discovery"):
one Ward tree over the vectors (Euclidean on unit vectors, so cosine), cut at k = k_min, k_min + step,
...; each cut is scored by its cosine silhouette and the first persistent peak is kept: the first k
whose silhouette neither of the next two cuts beats. Ward is deterministic (no seed) and one tree
serves every k, so scanning k costs one silhouette per cut. Why:
- The silhouette's global maximum keeps rising with k to the end of any range tried (on BANKING77
  test k-means and Ward both picked k = 140-160, ARI 49), and HDBSCAN left 47% of the messages as
  noise (NMI 59 at min_cluster_size 5).
- The first peak (the first k the next one does not beat), used before, is fragile: on 5,000 random
  BANKING77 train messages it stopped at k = 10 on two draws of five (NMI 55-57), when the curve dips
  once between the first two cuts.
- Four rules were compared on 5,000-message draws of BANKING77 train (draws 1-5) and of CLINC150's
  in-scope train messages (draws 1-3), test not read, the rule set before the run: mean NMI over the
  eight draws 77.1 for the first peak, 82.9 for the first peak after the leading dip, 83.1 for the
  first peak of the curve smoothed over three cuts, 83.3 for the persistent peak, which was kept. It
  finds k = 80-220 for BANKING77's 77 intents and 140-220 for CLINC150's 150 (the first peak after the
  dip, 70-100 and 130-140, with higher ARI: NMI was the criterion set before the run).
Before the tree is built, each vector is replaced by itself plus the mean of its `neighbours` nearest
messages (cosine), made unit length again: a message is read with its neighbourhood, so paraphrases of
one intent draw together and a stray message stops seeding a cluster of its own. Measured (scratch runs,
2026-12-04, test not read; rule set before the run: kept only if the mean NMI over eight draws numbered
as above, drawn again, gains at least 1.0): 20 neighbours raised it from 83.2 to 84.5 (every draw gained; 5, 10 and 10 twice:
83.0, 84.1, 82.9), and on eight fresh 5,000-message draws (BANKING77 draws 6-10, CLINC150 4-6) from 83.0 to
84.4, every draw again, with k closer to the truth (BANKING77 90-160 against 80-200) and ARI up. On small
inputs fewer neighbours do better and the unsmoothed tree over-splits badly: on 500 BANKING77 messages
(three draws) NMI 72.1 unsmoothed, 82.0 with 5 neighbours, 79.4 with 20 (ARI 10 against 40); on 1,000 (three
draws) 77.1 unsmoothed, 81.0 with 4, 81.1 with 20; on slices of
8 or 20 intents x 15 messages, 83.7 unsmoothed, 87.5 with 5, 85.7 with 20. Hence `neighbours_for`: n // 100,
at least 5 and at most 20 (fewer than n). `--neighbours 0` clusters the raw vectors as before.
Measured afterwards and not kept (scratch, 2026-12-04, eight fresh draws: BANKING77 11-15, CLINC150 7-9;
test not read; the same rule, a gain of 1.0): the mean taken twice (20 then 20: 84.2 against 84.2; 10 twice:
83.3), 40 neighbours (83.3), and steps after the cut at the same k: spherical k-means started from the Ward
clusters, on the averaged or the raw vectors (84.2, 84.3), spectral clustering on the 20-nearest graph (83.8)
and k-means on the averaged vectors (83.5). The frozen vectors, not the clustering, set the level.
The encoder is the packaged MiniLM unless `--base` names another. all-mpnet-base-v2 was measured under a
rule set before the run: on the raw vectors +1.8 mean NMI on the same eight draws (every draw gained), but
on BANKING77 test +0.2 NMI with k = 200 and ARI 53.7 -> 46.5; with the neighbours' mean, 86.9 on the draws
against 85.0 raw, and on BANKING77 test NMI 83.4, ARI 56.0, k = 120. It is an option, not the default: it is
not packaged, and embedding takes four times as long.
Names are class-based TF-IDF: each cluster's texts form one document, so a term scores high when it
is frequent in that cluster and rare in the others. Representative examples are the members closest
to their centroid; borderline ones are those whose cosine to their own centroid exceeds the cosine to
the next centroid by the least (the messages a reviewer should check first).

`--known MODEL`: a message MODEL would answer (the bot's own answer rule at that bundle's fitted
confidence floor and ambiguity gap) is understood already and is set aside before clustering, so only
new intents are proposed. Limit, measured (tests/test_discover.py): a closed-set softmax is confident
on much that it never saw, so with a bundle trained without out-of-scope examples about 40% of the
messages of new intents are set aside too (and 98% of the known ones); what is proposed is mostly new.
A bundle trained with `oos` examples has a stricter floor.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel

from bot.encoder import DEFAULT_BASE, Encoder, base_weights_sha256, resolve_base
from bot.fileio import atomic_write_bytes, atomic_write_text

from . import data
from .cache import EmbeddingCache, default_cache_dir

MIN_K = 2
METHOD = "neighbour-mean+ward+silhouette-persistent-peak"
PEAK_LOOKAHEAD = 2  # a silhouette peak counts when the next two cuts both score lower (decision: module docstring)
NOISE_LABEL = -1
NEIGHBOURS_MIN, NEIGHBOURS_MAX, TEXTS_PER_NEIGHBOUR = 5, 20, 100  # neighbours_for (decision: module docstring)
MAX_DISCOVER_TEXTS = 15_000  # Ward linkage keeps all pairwise distances: 15,000 texts take ~0.9 GB


class ClusterInfo(BaseModel):
    """One candidate intent."""

    cluster: int
    name: str
    size: int
    terms: list[str]
    representative: list[str]
    borderline: list[str]


class Discovery(BaseModel):
    """What `discover` found: the chosen k, each k's silhouette, the clusters and per-text assignments."""

    method: str
    base: str  # the encoder whose vectors were clustered (`--base`), as given
    neighbours: int  # each vector was averaged with this many nearest ones before clustering (0: none)
    k: int
    silhouettes: dict[int, float]
    clusters: list[ClusterInfo]
    texts: list[str]  # the texts that were clustered (after --known set some aside)
    assignments: list[int]  # one per text; NOISE_LABEL for noise
    known: list[tuple[str, str, float]] = []  # (text, intent, confidence) set aside by --known

    @property
    def noise(self) -> int:
        """Messages left as noise (NOISE_LABEL): their cluster was smaller than min_cluster_size."""
        return sum(1 for cluster in self.assignments if cluster == NOISE_LABEL)


@dataclass
class DiscoverConfig:
    """Knobs of a discovery run; the defaults are the ones measured in BENCHMARKS.md."""

    k_min: int = 10
    k_max: int = 300
    k_step: int = 10
    min_cluster_size: int = 3  # smaller clusters are noise: too few examples to train and validate on
    examples: int = 3  # representative and borderline examples shown per cluster
    terms: int = 3
    base: str = DEFAULT_BASE
    max_length: int = 64  # the training recipe's default, so discovery and `head` training share cached vectors
    neighbours: int | None = None  # each vector is averaged with this many nearest ones before clustering; None: neighbours_for(n), 0: off
    cache_dir: str | None = None
    progress: Callable[[str, int, int], None] | None = field(default=None, repr=False)  # (stage, done, total)


def read_texts(spec: str) -> list[str]:
    """Unlabelled messages from a data SPEC: a .txt file (one message a line), a table with a text
    column and no label column (a chat log export), or any labelled SPEC (finetune/data.py) whose
    labels are ignored. Duplicates are kept once, in first-seen order."""
    path = Path(spec).expanduser()
    if path.suffix == ".txt" and path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise data.DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc
        for number, line in enumerate(lines, start=1):
            if len(line) > data.MAX_TEXT_CHARS:
                raise data.DataError(f"{path}: line {number}: longer than {data.MAX_TEXT_CHARS} characters")
        texts = [line.strip() for line in lines]
    else:
        splits = data.load(spec, labelled=False)
        texts = [str(t).strip() for name in splits for t in splits[name]["text"]]
    unique = list(dict.fromkeys(t for t in texts if t))
    if len(unique) < 2 * MIN_K:
        raise data.DataError(f"{spec}: {len(unique)} distinct messages; discovery needs at least {2 * MIN_K}")
    if len(unique) > MAX_DISCOVER_TEXTS:
        raise data.DataError(f"{spec}: {len(unique):,} messages; discover takes at most {MAX_DISCOVER_TEXTS:,} (sample them)")
    return unique


def embed(texts: Sequence[str], cfg: DiscoverConfig, *, progress: bool = False) -> np.ndarray:
    """L2-normalised sentence vectors of the frozen base, through the embedding cache."""
    encoder = Encoder.load(cfg.base, max_length=cfg.max_length)
    cache = EmbeddingCache(cfg.cache_dir or default_cache_dir(), base_weights_sha256(resolve_base(cfg.base)), cfg.max_length)
    try:
        vectors, _computed = cache.embed(encoder, texts, progress=progress)
    finally:
        cache.close()
    return vectors.numpy().astype(np.float32)


def neighbours_for(count: int, cfg: DiscoverConfig) -> int:
    """How many nearest messages each vector is averaged with: cfg.neighbours if set, else count // 100 kept
    within 5..20; always fewer than the other messages."""
    wanted = cfg.neighbours if cfg.neighbours is not None else min(NEIGHBOURS_MAX, max(NEIGHBOURS_MIN, count // TEXTS_PER_NEIGHBOUR))
    return max(0, min(wanted, count - 1))


def neighbour_mean(vectors: np.ndarray, neighbours: int, *, block: int = 2048) -> np.ndarray:
    """unit(v + mean of v's `neighbours` nearest other vectors by cosine), for unit rows; 0 neighbours: the
    vectors as they are. Scored in blocks of rows, so memory stays at block x n similarities."""
    if neighbours <= 0:
        return vectors
    rows = vectors.astype(np.float32)
    out = np.empty_like(rows)
    for start in range(0, len(rows), block):
        similarity = rows[start : start + block] @ rows.T
        similarity[np.arange(len(similarity)), np.arange(start, start + len(similarity))] = -np.inf  # not itself
        nearest = np.argpartition(-similarity, neighbours - 1, axis=1)[:, :neighbours]
        out[start : start + block] = rows[start : start + block] + rows[nearest].mean(axis=1)
    out /= np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-9)
    return out


def choose_k(vectors: np.ndarray, cfg: DiscoverConfig) -> tuple[int, np.ndarray, dict[int, float]]:
    """Cut one Ward tree at each k of the range, score each cut by its cosine silhouette, and keep the
    first persistent peak: the first k whose silhouette neither of the next `PEAK_LOOKAHEAD` cuts beats
    (at the end of the range, those there are; the last k when the curve only rises)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from sklearn.metrics import silhouette_score

    n = len(vectors)
    ks = [k for k in range(max(MIN_K, cfg.k_min), min(cfg.k_max, n - 1) + 1, cfg.k_step)] or [max(MIN_K, min(n - 1, cfg.k_min))]
    tree = linkage(vectors.astype(np.float64), method="ward")
    scores: dict[int, float] = {}
    cuts: dict[int, np.ndarray] = {}
    chosen: int | None = None
    for done, k in enumerate(ks):
        labels = fcluster(tree, k, criterion="maxclust").astype(int) - 1
        cuts[k] = labels
        scores[k] = round(float(silhouette_score(vectors, labels, metric="cosine")) if len(set(labels)) > 1 else -1.0, 5)
        if cfg.progress:
            cfg.progress("clustering", done + 1, len(ks))
        peak = persistent_peak([scores[c] for c in ks[: done + 1]], complete=done == len(ks) - 1)
        if peak is not None:
            chosen = ks[peak]
            break
    assert chosen is not None  # persistent_peak always finds one on the complete curve
    return chosen, cuts[chosen], scores


def persistent_peak(curve: Sequence[float], *, complete: bool) -> int | None:
    """Index of the first value that none of the next `PEAK_LOOKAHEAD` values beats; while the curve is
    still being scored (`complete` false) only values with all their successors scored can qualify; on the
    complete curve the last ones are judged by the successors they have (the last value always qualifies)."""
    for i, value in enumerate(curve):
        after = curve[i + 1 : i + 1 + PEAK_LOOKAHEAD]
        if (complete or len(after) == PEAK_LOOKAHEAD) and all(other < value for other in after):
            return i
    return None


def key_terms(texts: Sequence[str], labels: np.ndarray, clusters: Sequence[int], count: int) -> dict[int, list[str]]:
    """Class-based TF-IDF: the terms most particular to each cluster's texts against the others'."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    documents = [" ".join(t for t, c in zip(texts, labels) if c == cluster) for cluster in clusters]
    vectorizer = TfidfVectorizer(stop_words="english", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b")
    try:
        matrix = vectorizer.fit_transform(documents).toarray()
    except ValueError:  # nothing but stop words
        return {cluster: [] for cluster in clusters}
    vocabulary = vectorizer.get_feature_names_out()
    terms: dict[int, list[str]] = {}
    for row, cluster in zip(matrix, clusters):
        chosen: list[str] = []
        for index in np.argsort(-row):
            if row[index] <= 0 or len(chosen) == count:
                break
            term = str(vocabulary[index])
            if any(term in c or c in term for c in chosen):  # "card" after "lost card" adds nothing
                continue
            chosen.append(term)
        terms[cluster] = chosen
    return terms


def _name(terms: list[str], cluster: int, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "_", "_".join(terms[:2]).lower()).strip("_") or "cluster"
    name = f"{base}_{cluster}" if base in taken or base == "cluster" else base
    taken.add(name)
    return name


def describe(texts: Sequence[str], vectors: np.ndarray, labels: np.ndarray, cfg: DiscoverConfig) -> tuple[list[ClusterInfo], np.ndarray]:
    """Clusters of at least min_cluster_size members, named and with examples; smaller ones become noise."""
    labels = labels.copy()
    ids, sizes = np.unique(labels, return_counts=True)
    for cluster, size in zip(ids, sizes):
        if size < cfg.min_cluster_size:
            labels[labels == cluster] = NOISE_LABEL
    kept = sorted({int(c) for c in labels if c != NOISE_LABEL}, key=lambda c: (-int((labels == c).sum()), c))
    if not kept:
        return [], labels
    centroids = np.stack([vectors[labels == c].mean(axis=0) for c in kept])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True).clip(min=1e-9)
    similarity = vectors @ centroids.T  # cosine (rows are unit vectors)
    terms = key_terms(texts, labels, kept, cfg.terms)
    taken: set[str] = set()
    infos: list[ClusterInfo] = []
    for column, cluster in enumerate(kept):
        members = np.flatnonzero(labels == cluster)
        own = similarity[members, column]
        others = np.delete(similarity[members], column, axis=1)
        margin = own - (others.max(axis=1) if others.shape[1] else 0.0)
        representative = [texts[i] for i in members[np.argsort(-own)][: cfg.examples]]
        borderline = [texts[i] for i in members[np.argsort(margin)][: cfg.examples] if texts[i] not in representative]
        infos.append(ClusterInfo(cluster=cluster, name=_name(terms[cluster], cluster, taken), size=len(members),
                                 terms=terms[cluster], representative=representative, borderline=borderline))
    return infos, labels


def set_aside_known(texts: list[str], model: str | Path) -> tuple[list[str], list[tuple[str, str, float]]]:
    """Split texts into those MODEL would not answer and those it would: the bot's own answer rule
    (bot.policy.decision_masks) at the bundle's fitted confidence floor and ambiguity gap."""
    from bot.classifier import IntentClassifier
    from bot.policy import decision_masks

    classifier = IntentClassifier.from_bundle(model)
    predictions = classifier.predict(texts, top_k=2)
    top1 = [p.confidence for p in predictions]
    top2 = [p.ranking[1][1] if len(p.ranking) > 1 else 0.0 for p in predictions]
    _clarify, answer = decision_masks(top1, top2, classifier.confidence_floor, classifier.ambiguity_gap)
    unknown = [t for t, yes in zip(texts, answer) if not yes]
    known = [(t, p.label, round(p.confidence, 4)) for t, p, yes in zip(texts, predictions, answer) if yes]
    return unknown, known


def discover(texts: list[str], cfg: DiscoverConfig, *, known_model: str | Path | None = None, progress: bool = False) -> Discovery:
    """Set aside what `known_model` understands, embed the rest, choose k, cluster, name, describe."""
    known: list[tuple[str, str, float]] = []
    if known_model is not None:
        texts, known = set_aside_known(texts, known_model)
        if len(texts) < 2 * MIN_K:
            raise data.DataError(f"only {len(texts)} messages are not understood by {known_model}: too few to cluster")
    return cluster_vectors(texts, embed(texts, cfg, progress=progress), cfg, known=known)


def cluster_vectors(texts: list[str], vectors: np.ndarray, cfg: DiscoverConfig, *,
                    known: list[tuple[str, str, float]] | None = None) -> Discovery:
    """Discovery on embedded texts (unit rows, one per text): average each with its neighbours, choose k on
    the Ward tree, name and describe the clusters. `discover` and bench/bench_discover.py both call it."""
    neighbours = neighbours_for(len(texts), cfg)
    averaged = neighbour_mean(vectors, neighbours)
    k, labels, scores = choose_k(averaged, cfg)
    clusters, labels = describe(texts, averaged, labels, cfg)
    return Discovery(method=METHOD, base=cfg.base, neighbours=neighbours, k=k, silhouettes=scores, clusters=clusters,
                     texts=texts, assignments=[int(c) for c in labels], known=known or [])


def draft_pack(discovery: Discovery) -> dict[str, object]:
    """nlu.yaml content: one intent per cluster, every member an example, key terms as the description."""
    by_cluster: dict[int, list[str]] = {}
    for text, cluster in zip(discovery.texts, discovery.assignments):
        by_cluster.setdefault(cluster, []).append(text)
    intents = {
        info.name: {"description": f"draft from discovery; key terms: {', '.join(info.terms) or '-'}",
                    "examples": by_cluster[info.cluster]}
        for info in discovery.clusters
    }
    return {"version": 1, "language": "en", "intents": intents}


def write_outputs(discovery: Discovery, output: Path) -> dict[str, Path]:
    """assignments.csv, clusters.json, discovery.png, known.csv (with --known) and pack/nlu.yaml, each written
    atomically."""
    import io

    from .plots import discovery_png

    output.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def table(rows: list[list[object]]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        return buffer.getvalue()

    written["assignments"] = output / "assignments.csv"
    atomic_write_text(written["assignments"], table([["text", "cluster"], *[[t, c] for t, c in zip(discovery.texts, discovery.assignments)]]))
    written["clusters"] = output / "clusters.json"
    atomic_write_text(written["clusters"], discovery.model_dump_json(include={"method", "base", "neighbours", "k", "silhouettes", "clusters"}, indent=2) + "\n")
    written["picture"] = output / "discovery.png"
    atomic_write_bytes(written["picture"], discovery_png(discovery.silhouettes, discovery.k,
                                                         [c.size for c in discovery.clusters], discovery.noise))
    if discovery.known:
        written["known"] = output / "known.csv"
        atomic_write_text(written["known"], table([["text", "intent", "confidence"], *[list(row) for row in discovery.known]]))
    pack = output / "pack"
    pack.mkdir(exist_ok=True)
    written["pack"] = pack / "nlu.yaml"
    header = "# Draft domain pack written by `supportbot discover`: review the names and examples before training.\n"
    atomic_write_text(written["pack"], header + yaml.safe_dump(draft_pack(discovery), sort_keys=False, allow_unicode=True))
    return written
