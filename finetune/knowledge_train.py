"""Knowledge at training time: passages embedded into the bundle, the retrieval floor fitted.

`build()` reads a knowledge folder (articles plus `questions/validation.yaml`), splits the articles
into passages (bot/knowledge.py), embeds passages and their sentences with the body the bundle will
serve, fits the retrieval floor on the validation questions and returns the bundle files
(`knowledge.safetensors`: the passage and sentence matrices; `knowledge.json`: passages, floor,
validation metrics). The bundle checksums them like every other file, so model, answers and
articles are versioned together.

The floor is chosen like the intent floor (finetune/calibrate.py): the value that maximises
right answers minus `wrong_answer_cost` x wrong answers on validation, where a wrong answer is
citing the wrong article or citing anything for a question no article answers. With
`knowledge.fit_margin`, a margin (the top article's least lead over the next article) is fitted
jointly and kept only when it raises that utility cross-validated on the validation questions
(`cross_validated`): in-sample, a second threshold always raises it. Scores are per article (bot/knowledge.py
`KnowledgeBase.article_scores`); `knowledge.question_keys` (on by default) adds train.yaml's
questions, through the question map, as keys of their article: an article scores its best passage
plus `knowledge.key_weight` x its best known question (a sum: as a max they lost on validation;
see docs/knowledge.md), and the best `knowledge.rerank` articles add `knowledge.sentence_weight` x
their best sentence. The floor and margin are fitted on `article_scores`, which is the served code
itself (half-precision products, row by row), and the bundle stores the passage, key and sentence
vectors in half precision, so a loaded bundle scores exactly what was fitted.

With `questions/train.yaml`, `train_question_map` learns a linear map of question vectors
(`knowledge.question_map`, on by default: seconds of training, one 384 x 384 product per message)
before the floor and margin are fitted, so they are fitted on the mapped scores that will serve. A
learned answer-or-abstain rule (logistic, on score, leads, lexical overlap and passage agreement)
was measured against the floor and margin and not kept (bench/bench_knowledge.py, docs/knowledge.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from bot.bundle import Bundle
from bot.encoder import Encoder
from bot.knowledge import (
    FORMAT,
    KNOWLEDGE_JSON,
    KNOWLEDGE_VECTORS,
    STORE_DTYPE,
    Article,
    KnowledgeBase,
    KnowledgeError,
    Passage,
    Question,
    clears,
    map_questions,
    read_articles,
    read_questions,
    split_article,
)
from bot.precision import apply_precision

from .cache import EmbeddingCache, default_cache_dir
from .config import KnowledgeConfig, QuestionMapConfig, TrainConfig
from .strategies import BundleParts, EncoderClassifier, Trained, register_bundle_hook

QUESTIONS_DIR = "questions"

# How texts become vectors: `Encoder.embed` by default; training passes the embedding cache for a frozen base.
Embedder = Callable[[Encoder, Sequence[str]], torch.Tensor]


def plain_embed(encoder: Encoder, texts: Sequence[str]) -> torch.Tensor:
    return encoder.embed(texts)


@dataclass
class KnowledgeBuild:
    base: KnowledgeBase
    meta: dict[str, Any]  # summary for bundle.json
    writers: dict[str, Callable[[Path], None]]
    summary: dict[str, Any]


def knowledge_folder(data_spec: str, configured: str | None) -> Path | None:
    """The articles to use: the configured folder, else the data's domain pack's `knowledge/` when it has one."""
    if configured:
        return Path(configured).expanduser()
    if data_spec.startswith("pack:"):
        from bot.domains import pack_path

        try:
            folder = pack_path(data_spec[5:].rsplit(":", 1)[0]) / "knowledge"
        except KeyError:
            return None
    else:
        plain = Path(data_spec)
        folder = (plain if plain.is_dir() else plain.parent) / "knowledge"
        if not (plain.is_dir() and (plain / "nlu.yaml").is_file()):
            return None  # only a domain pack brings its own knowledge folder
    return folder if folder.is_dir() else None


def passage_encoder(serving: Encoder, max_tokens: int) -> Encoder:
    """The serving encoder's body and tokenizer with the passage token limit (same tokenize, same pooling)."""
    return Encoder(serving.model, serving.tokenizer, max_length=max_tokens)


def token_counter(encoder: Encoder) -> Callable[[str], int]:
    counter = Encoder(encoder.model, encoder.tokenizer, max_length=100_000)

    def count(text: str) -> int:
        return len(counter.tokenize([text], pad=False)["input_ids"][0])

    return count


def split_all(articles: Sequence[Article], encoder: Encoder, max_tokens: int) -> list[Passage]:
    count = token_counter(encoder)
    passages: list[Passage] = []
    for article in articles:
        passages += split_article(article, count, max_tokens)
    return passages


# ---- measuring retrieval ---------------------------------------------------------------------


def ranks(scores: torch.Tensor, articles: Sequence[str], questions: Sequence[Question]) -> np.ndarray:
    """Rank (0 = first) of the right article per question (`scores`: (questions, articles), columns
    named by `articles`); -1 when unanswerable."""
    order = scores.argsort(dim=1, descending=True).numpy()
    names = np.array(list(articles))
    out = np.full(len(questions), -1)
    for q, question in enumerate(questions):
        if question.article is not None:
            hits = np.nonzero(names[order[q]] == question.article)[0]
            out[q] = int(hits[0]) if len(hits) else len(names)
    return out


def top_and_lead(scores: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per question: the best article's score and its lead over the second (1.0 with one article)."""
    if scores.shape[0] == 0:
        return np.zeros(0), np.zeros(0)
    if scores.shape[1] < 2:
        return scores[:, 0].numpy(), np.ones(scores.shape[0])
    two = scores.topk(2, dim=1).values
    return two[:, 0].numpy(), (two[:, 0] - two[:, 1]).numpy()


def retrieval_metrics(
    scores: torch.Tensor, articles: Sequence[str], questions: Sequence[Question], floor: float, margin: float = 0.0,
) -> dict[str, Any]:
    """recall@1/@3 and MRR on answerable questions; at the floor and margin, answered-right/-wrong/abstained
    (answerable), and abstention on unanswerable questions. `scores`: (questions, articles)."""
    rank = ranks(scores, articles, questions)
    top, lead = top_and_lead(scores)
    answerable = rank >= 0
    answered = clears(top, lead, floor, margin)
    right = answerable & (rank == 0)
    n_ans, n_un = int(answerable.sum()), int((~answerable).sum())
    out: dict[str, Any] = {
        "n_answerable": n_ans,
        "n_unanswerable": n_un,
        "floor": float(floor),
        "margin": float(margin),
        "recall_at_1": float((rank[answerable] == 0).mean()) if n_ans else 0.0,
        "recall_at_3": float((rank[answerable] < 3).mean()) if n_ans else 0.0,
        "mrr": float((1.0 / (rank[answerable] + 1)).mean()) if n_ans else 0.0,
        "answered_right": float((answered & right)[answerable].mean()) if n_ans else 0.0,
        "answered_wrong": float((answered & ~right)[answerable].mean()) if n_ans else 0.0,
        "abstained": float((~answered)[answerable].mean()) if n_ans else 0.0,
        "unanswerable_abstained": float((~answered)[~answerable].mean()) if n_un else 1.0,
    }
    return out


def _floor_for(top: np.ndarray, gain: np.ndarray) -> tuple[float, float]:
    """(floor, utility): the floor maximising the summed gain of the questions answered; between two
    candidate scores, their midpoint; ties keep the fewest answers."""
    order = np.argsort(-top, kind="stable")
    cumulative = np.concatenate([[0.0], np.cumsum(gain[order])])  # answer the k most confident
    k = int(np.argmax(cumulative))  # first maximum: the fewest answers for the best utility
    sorted_top = top[order]
    if k == 0:
        return float(min(1.0, sorted_top[0] + 1e-4)), 0.0
    if k == len(sorted_top):
        return float(max(-1.0, sorted_top[-1] - 1e-4)), float(cumulative[k])
    return float((sorted_top[k - 1] + sorted_top[k]) / 2), float(cumulative[k])


def _fit_pair(
    scores: torch.Tensor, articles: Sequence[str], questions: Sequence[Question], cost: float, margin: bool
) -> tuple[float, float, float]:
    """(floor, margin, utility) maximising right - cost x wrong on `questions` themselves (in-sample);
    without `margin`, or when no margin raises that utility, the margin is 0."""
    rank = ranks(scores, articles, questions)
    top, lead = top_and_lead(scores)
    gain = np.where(rank == 0, 1.0, -cost)  # answering question q gains this
    floor, best = _floor_for(top, gain)
    chosen = 0.0
    if margin:
        leads = np.unique(lead)
        for candidate in (leads[1:] + leads[:-1]) / 2:
            keep = lead >= candidate
            if not keep.any():
                break
            f, utility = _floor_for(top[keep], gain[keep])
            if utility > best + 1e-9:
                floor, best, chosen = f, utility, float(candidate)
    return floor, chosen, best


def cross_validated(
    scores: torch.Tensor, articles: Sequence[str], questions: Sequence[Question], cost: float, *, margin: bool,
    folds: int = 5, repeats: int = 10, seed: int = 0,
) -> dict[str, float]:
    """How the rule fitted on these questions does on questions it was not fitted on, from the
    questions alone: fitted on all folds but one and scored on that one (at most `folds` folds, one
    question each below that), the held-out counts summed per shuffle. Returns the mean over
    `repeats` shuffles of answered_right / answered_wrong (of answerable questions), unanswerable_cited
    and utility (right - cost x wrong, in questions), and utility_sd across shuffles."""
    rank = ranks(scores, articles, questions)
    top, lead = top_and_lead(scores)
    answerable, right = rank >= 0, rank == 0
    rng = np.random.default_rng(seed)
    totals = []
    for _ in range(repeats):
        order = rng.permutation(len(questions))
        answered = np.zeros(len(questions), dtype=bool)
        for held in np.array_split(order, min(folds, len(questions))):
            rest = np.setdiff1d(order, held)
            floor, lead_needed, _ = _fit_pair(scores[rest], articles, [questions[i] for i in rest], cost, margin)
            answered[held] = clears(top[held], lead[held], floor, lead_needed)
        totals.append([(answered & right).sum(), (answered & answerable & ~right).sum(), (answered & ~answerable).sum()])
    r, w, c = np.array(totals, dtype=float).T
    utility = r - cost * (w + c)
    n_ans, n_un = max(int(answerable.sum()), 1), max(int((~answerable).sum()), 1)
    return {"answered_right": float(r.mean() / n_ans), "answered_wrong": float(w.mean() / n_ans),
            "unanswerable_cited": float(c.mean() / n_un), "utility": float(utility.mean()),
            "utility_sd": float(utility.std(ddof=1)) if repeats > 1 else 0.0}


@dataclass(frozen=True)
class FloorFit:
    """What `fit_floor` chose, and the evidence: `held_out` is each rule's `cross_validated` figures
    ("floor alone", "floor + margin") when a margin was weighed, else empty. Training writes it into
    knowledge.json's validation figures, so a bundle says why it does or does not carry a margin."""

    floor: float
    margin: float
    held_out: dict[str, dict[str, float]]


def fit_floor(
    scores: torch.Tensor, articles: Sequence[str], questions: Sequence[Question], cost: float, *, margin: bool = False
) -> FloorFit:
    """(floor, margin) maximising right - cost x wrong over validation questions (wrong: a wrong article,
    or any citation for an unanswerable question). Answering needs the best article's score >= floor
    and, with `margin`, its lead over the second article >= the margin; margin candidates are the
    midpoints between validation leads. A second threshold always raises the utility on the questions
    it is fitted on, so the margin is kept only when it also raises the utility cross-validated on
    them (`cross_validated`): otherwise 0, no margin rule, and the floor alone."""
    if not questions:
        raise KnowledgeError("no validation questions to fit the retrieval floor on")
    floor, chosen, _ = _fit_pair(scores, articles, questions, cost, margin)
    held_out: dict[str, dict[str, float]] = {}
    if chosen and len(questions) > 1:
        held_out = {rule: cross_validated(scores, articles, questions, cost, margin=with_margin)
                    for rule, with_margin in (("floor alone", False), ("floor + margin", True))}
        if held_out["floor + margin"]["utility"] <= held_out["floor alone"]["utility"] + 1e-9:
            floor, chosen, _ = _fit_pair(scores, articles, questions, cost, False)
    return FloorFit(floor, chosen, held_out)


# ---- the bundle files ----------------------------------------------------------------------


@register_bundle_hook
def knowledge_parts(trained: Trained) -> BundleParts:
    """The bundle hook: the pack's (or --knowledge) articles embedded by the body that will serve."""
    run, cfg = trained.run, trained.run.cfg
    folder = knowledge_folder(cfg.data, cfg.knowledge.articles)
    if folder is None:
        return BundleParts()
    if isinstance(trained.serving_model, EncoderClassifier):
        body = trained.serving_model.body  # lora / full (at int8: the converted copy calibration used)
    else:  # head strategy: the frozen base at the serving precision
        body = apply_precision(run.encoder.model, cfg.precision) if cfg.precision != "fp32" else run.encoder.model
    body.eval()
    serving = Encoder(body, run.encoder.tokenizer, cfg.max_length)

    embed = serving_embedder(cfg, run.base_sha256, progress=run.progress)
    built = build(cfg.knowledge, folder, serving, embed=embed, adapter_body=run.encoder.model if cfg.strategy == "head" else None,
                  precision=cfg.precision, progress=run.progress, log=run.log, messages=list(run.prepared.train["text"]))
    return BundleParts(built.writers, {"knowledge": built.meta})


def serving_embedder(cfg: TrainConfig, base_sha256: str, *, progress: bool) -> Embedder:
    """How the knowledge build embeds texts for a recipe: a `head` recipe serves the frozen base, whose vectors
    the embedding cache keeps (by the base's sha256, length and precision); a trained body has nothing to reuse."""

    def embed(encoder: Encoder, texts: Sequence[str]) -> torch.Tensor:
        if cfg.strategy != "head":
            return encoder.embed(texts, batch_size=cfg.embed_batch_size, progress=progress)
        cache = EmbeddingCache(cfg.cache_dir or default_cache_dir(), base_sha256, encoder.max_length, cfg.precision)
        try:
            return cache.embed(encoder, texts, batch_size=cfg.embed_batch_size, progress=progress)[0]
        finally:
            cache.close()

    return embed


def knowledge_summary(written: Bundle) -> dict[str, Any]:
    """Rows for the training summary table: passages, floor, validation figures."""
    meta = written.meta.get("knowledge")
    if not isinstance(meta, dict):
        return {}
    out: dict[str, Any] = {"knowledge_passages": meta["passages"], "knowledge_floor": meta["floor"],
                           "knowledge_margin": meta.get("margin", 0.0)}
    validation = meta.get("validation") or {}
    for key in ("recall_at_1", "answered_right", "answered_wrong", "unanswerable_abstained"):
        if key in validation:
            out[f"knowledge_val_{key}"] = validation[key]
    return out


def build(
    cfg: KnowledgeConfig, folder: Path, serving: Encoder, *, embed: Embedder = plain_embed,
    adapter_body: torch.nn.Module | None = None, precision: str = "fp32", progress: bool = False,
    log: Callable[[str], None] = print, messages: Sequence[str] = (),
) -> KnowledgeBuild:
    """Split, embed, fit the floor; the bundle's knowledge files and a summary.

    `adapter_body`: the fp32 frozen body the optional retrieval adapter trains on (None: no adapter possible).
    `messages`: the intents' training examples, the router's negatives (none: no router).
    """
    articles = read_articles(folder)
    slugs = [a.slug for a in articles]
    passages = split_all(articles, serving, cfg.max_tokens)
    retrieval = f"dense, passages + {cfg.key_weight:g} x known questions" if cfg.question_keys else "dense, passages"
    train_file = folder / QUESTIONS_DIR / "train.yaml"
    mapped = cfg.question_map.enabled and train_file.is_file()
    if mapped:
        retrieval += "; questions through the learned question map"
    if cfg.sentence_weight:
        retrieval += f"; the best {cfg.rerank} articles reranked by {cfg.sentence_weight:g} x their best sentence"
    log(f"knowledge: {len(articles)} articles, {len(passages)} passages (<= {cfg.max_tokens} tokens each)")
    passage_side, passage_embed, adapter = serving, embed, None
    if cfg.adapter.enabled:
        passage_side, adapter = _adapted(cfg, folder, serving, passages, slugs, adapter_body, precision, progress, log)
        passage_embed = plain_embed  # adapted vectors are not the frozen base's: nothing to cache
    vectors = passage_embed(passage_encoder(passage_side, cfg.max_tokens), [p.context_text for p in passages])
    # sentences are compared with the message's vector: the question side, never adapted
    sentence_vectors = embed(passage_encoder(serving, cfg.max_tokens), [s for p in passages for s in p.sentences])
    # train.yaml's questions, read and embedded once: the question map learns from them, the router learns
    # them as help-centre questions and, with `question_keys`, they are the articles' known questions. Embedded as messages are (the serving
    # encoder, its length), because both compare them with messages.
    examples = _train_questions(folder, slugs) if (mapped or cfg.question_keys or cfg.router.enabled) else []
    example_vectors = embed(serving, [q.text for q in examples]) if examples else torch.zeros(0, vectors.shape[1])
    known = examples if cfg.question_keys else []
    keys = example_vectors if known else torch.zeros(0, vectors.shape[1])
    key_articles = tuple(str(q.article) for q in known)
    question_map: torch.Tensor | None = None
    map_meta: dict[str, Any] | None = None
    if mapped:
        started = time.perf_counter()
        if not examples:
            raise KnowledgeError(f"{train_file}: no question with an article to learn the question map from")
        question_map = train_question_map(example_vectors, [str(q.article) for q in examples], passages, vectors,
                                          cfg.question_map)
        seconds = round(time.perf_counter() - started, 1)
        map_meta = {**cfg.question_map.model_dump(), "train_questions": len(examples), "seconds": seconds}
        log(f"knowledge: question map learned from {len(examples)} questions in {seconds} s")
        if known:  # known questions are compared with mapped messages: they go through the same map
            keys = map_questions(keys, question_map)
    router: torch.Tensor | None = None
    router_meta: dict[str, Any] | None = None
    if cfg.router.enabled and examples and messages:
        router = train_router(example_vectors, embed(serving, list(messages)), cfg.router.c)
        router_meta = {**cfg.router.model_dump(), "questions": len(examples), "messages": len(messages)}
        log(f"knowledge: router learned from {len(examples)} help-centre questions against {len(messages)} intent examples")
    # the bundle stores the passage, key and sentence matrices in float16: the floor and margin below are fitted on
    # those stored values, scored in float32 (the reference; a server scores in float32 or float16, whichever is
    # faster on its CPU, bot/knowledge.py `fastest_dtype`)
    vectors, keys = vectors.to(STORE_DTYPE).float(), keys.to(STORE_DTYPE).float()
    sentence_vectors = sentence_vectors.to(STORE_DTYPE).float()
    scoring: dict[str, Any] = {"keys": keys, "key_articles": key_articles, "key_weight": cfg.key_weight, "question_map": question_map,
               "sentence_weight": cfg.sentence_weight, "rerank": cfg.rerank, "score_dtype": torch.float32}
    unfitted = KnowledgeBase(passages, vectors, sentence_vectors, 1.0, **scoring)
    questions_file = folder / QUESTIONS_DIR / "validation.yaml"
    validation: dict[str, Any] | None = None
    margin = 0.0
    if cfg.floor is not None:
        floor, method = float(cfg.floor), "configured"
    elif questions_file.is_file():
        questions = read_questions(questions_file, slugs)
        query_vectors = embed(serving, [q.text for q in questions])  # as queries are embedded when serving
        scores = unfitted.article_scores(query_vectors)
        fit = fit_floor(scores, unfitted.articles, questions, cfg.wrong_answer_cost, margin=cfg.fit_margin)
        floor, margin = fit.floor, fit.margin
        method = "fitted on validation questions"
        validation = {**retrieval_metrics(scores, unfitted.articles, questions, floor, margin), "held_out": fit.held_out}
    else:
        raise KnowledgeError(
            f"{folder}: no {QUESTIONS_DIR}/validation.yaml to fit the retrieval floor on; "
            "write some validation questions or set knowledge.floor"
        )
    knowledge_meta = {
        "format": FORMAT,
        "floor": floor,
        "margin": margin,
        "floor_method": method,
        "max_tokens": cfg.max_tokens,
        "wrong_answer_cost": cfg.wrong_answer_cost,
        "retrieval": retrieval,
        "key_weight": cfg.key_weight,
        "score_dtype": "float32",  # the arithmetic the floor and margin were fitted in
        "sentence_weight": cfg.sentence_weight,
        "rerank": cfg.rerank,
        "adapter": adapter["meta"] if adapter else None,
        "question_map": map_meta,
        "router": router_meta,
        "articles": [{"slug": a.slug, "title": a.title, "url": a.url, "tags": list(a.tags)} for a in articles],
        "passages": [
            {"id": p.id, "article": p.article, "title": p.title, "url": p.url, "heading": p.heading,
             "sentences": list(p.sentences)}
            for p in passages
        ],
        "keys": [{"article": q.article, "text": q.text} for q in known],
        "validation": validation,
    }
    tensors = {"passages": vectors.to(STORE_DTYPE).contiguous(), "sentences": sentence_vectors.to(STORE_DTYPE).contiguous()}
    if known:
        tensors["keys"] = keys.to(STORE_DTYPE).contiguous()
    if question_map is not None:
        tensors["question_map"] = question_map.contiguous()
    if router is not None:
        tensors["router"] = router.contiguous()
    writers: dict[str, Callable[[Path], None]] = {
        KNOWLEDGE_JSON: lambda p: _write_json(p, knowledge_meta),
        KNOWLEDGE_VECTORS: lambda p: save_file(tensors, str(p)),
    }
    if adapter:
        state = adapter["state"]
        writers[ADAPTER_FILE] = lambda p: save_file(state, str(p))
    base = KnowledgeBase(passages, vectors, sentence_vectors, floor, knowledge_meta, margin=margin, router=router,
                         router_threshold=cfg.router.threshold, **scoring)
    meta = {"articles": len(articles), "passages": len(passages), "keys": len(known), "floor": floor, "margin": margin,
            "floor_method": method, "max_tokens": cfg.max_tokens, "retrieval": retrieval,
            "adapter": adapter["meta"] if adapter else None, "question_map": map_meta, "router": router_meta,
            "validation": validation}
    summary: dict[str, Any] = {"knowledge_passages": len(passages), "knowledge_floor": floor, "knowledge_margin": margin}
    if validation is not None:
        summary["knowledge_val_recall_at_1"] = validation["recall_at_1"]
        summary["knowledge_val_answered_right"] = validation["answered_right"]
        summary["knowledge_val_unanswerable_abstained"] = validation["unanswerable_abstained"]
    return KnowledgeBuild(base, meta, writers, summary)


def _train_questions(folder: Path, slugs: Sequence[str]) -> list[Question]:
    """questions/train.yaml's questions with an article ([] without the file)."""
    train_file = folder / QUESTIONS_DIR / "train.yaml"
    if not train_file.is_file():
        return []
    return [q for q in read_questions(train_file, slugs) if q.article is not None]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- the router: a help-centre question, or a message for an intent? ---------------------------


def train_router(questions: torch.Tensor, messages: torch.Tensor, c: float) -> torch.Tensor:
    """A logistic regression on unit message vectors: train.yaml's help-centre questions (1) against the
    intents' training examples (0). Returned as one row [weights..., bias]; `KnowledgeBase.help_question`
    applies it to the vector of the intent pass (no encoder pass). Why (docs/knowledge.md): a confident intent
    took about half of the help-centre questions with a text that mostly did not answer them."""
    from sklearn.linear_model import LogisticRegression

    rows = torch.nn.functional.normalize(torch.cat([questions, messages]).float(), dim=1).numpy()
    target = np.r_[np.ones(len(questions)), np.zeros(len(messages))]
    model = LogisticRegression(C=c, max_iter=2000).fit(rows, target)
    return torch.tensor(np.r_[model.coef_[0], model.intercept_], dtype=torch.float32)


# ---- the question map (question side, no encoder pass) ---------------------------------------


def train_question_map(
    questions: torch.Tensor, articles: Sequence[str], passages: Sequence[Passage], passage_vectors: torch.Tensor,
    settings: QuestionMapConfig,
) -> torch.Tensor:
    """W (dim x dim) such that unit(q + q W) ranks the article that answers q first.

    Loss: cross-entropy over every article (an article scores its best passage, as at run time),
    the logits `scale` x cosine, plus `l2` x |W|^2, which keeps questions near where the encoder put
    them (W = 0 is the identity). Full batch over the training questions, Adam from W = 0: the
    result is deterministic on one machine. Adam's epsilon is 1e-4, not torch's 1e-8: most of W's
    147,456 weights get gradients near 0, and Adam at 1e-8 steps each by about `lr` in the sign of
    that gradient, which rounding decides; the map then moved by 5e-3 and the fitted floor by 0.01
    when the questions' vectors moved by 1e-6 (another CPU's arithmetic). The passages stay fixed
    (frozen, or the adapter's when it is on).
    """
    # clones: vectors embedded under torch.inference_mode cannot take part in autograd
    base = KnowledgeBase(list(passages), passage_vectors.clone().float(),
                         torch.zeros(sum(len(p.sentences) for p in passages), passage_vectors.shape[1]), 1.0,
                         score_dtype=torch.float32)
    column = {slug: i for i, slug in enumerate(base.articles)}
    target = torch.tensor([column[a] for a in articles])
    rows = questions.clone().float()
    weights = torch.zeros(rows.shape[1], rows.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=settings.lr, eps=settings.eps)
    for _ in range(settings.steps):
        mapped = map_questions(rows, weights)
        logits = settings.scale * base.aggregate(mapped @ base.vectors.T)
        loss = torch.nn.functional.cross_entropy(logits, target) + settings.l2 * (weights**2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return weights.detach().contiguous()


# ---- the retrieval adapter (passage side) ----------------------------------------------------

ADAPTER_FILE = "knowledge_adapter.safetensors"  # kept for the record: the passage vectors already carry it


def _adapted(
    cfg: KnowledgeConfig, folder: Path, serving: Encoder, passages: Sequence[Passage], slugs: Sequence[str],
    body: torch.nn.Module | None, precision: str, progress: bool, log: Callable[[str], None],
) -> tuple[Encoder, dict[str, Any]]:
    """Train the passage-side adapter; (the encoder that embeds passages, its weights and summary)."""
    from peft import get_peft_model_state_dict

    if body is None:
        raise KnowledgeError("knowledge.adapter needs the head strategy: it adapts passages to the frozen base's questions")
    train_file = folder / QUESTIONS_DIR / "train.yaml"
    if not train_file.is_file():
        raise KnowledgeError(f"{folder}: knowledge.adapter needs {QUESTIONS_DIR}/train.yaml (questions with their article)")
    questions = read_questions(train_file, slugs)
    settings = cfg.adapter.model_dump()
    started = time.perf_counter()
    model = train_passage_adapter(
        body, serving, passages, questions, settings, max_tokens=cfg.max_tokens, epochs=cfg.adapter.epochs,
        batch_size=cfg.adapter.batch_size, lr=cfg.adapter.lr, progress=progress,
    )
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    merged: torch.nn.Module = model.merge_and_unload()
    merged.eval()
    if precision != "fp32":
        merged = apply_precision(merged, precision)
    seconds = round(time.perf_counter() - started, 1)
    log(f"knowledge: retrieval adapter trained on {len(questions)} questions in {seconds} s")
    meta = {**settings, "train_questions": len(questions), "seconds": seconds}
    return Encoder(merged, serving.tokenizer, serving.max_length), {"state": state, "meta": meta}



def train_passage_adapter(
    body: torch.nn.Module,
    serving: Encoder,
    passages: Sequence[Passage],
    questions: Sequence[Question],
    settings: dict[str, Any],
    *,
    max_tokens: int,
    epochs: int = 4,
    batch_size: int = 16,
    lr: float = 5e-4,
    scale: float = 20.0,
    seed: int = 42,
    progress: bool = False,
) -> Any:
    """LoRA on a copy of the fp32 `body`, trained so that passages move towards the questions they answer.

    Only the passage side adapts: questions are embedded once by the serving encoder (the intent
    pass serves them), so serving cost does not change. Loss: cross-entropy over in-batch
    passages (each question's positive passage plus its hardest wrong passage under the frozen
    model), passages of the question's own article masked out of the negatives.
    Returns the peft-wrapped body (a peft PeftModel: call `.merge_and_unload()` to embed with it).
    """
    import copy
    import random

    from peft import get_peft_model
    from tqdm.auto import tqdm

    from bot.strategies import lora_config

    answerable = [q for q in questions if q.article is not None]
    if not answerable:
        raise KnowledgeError("no training questions with an article to train the retrieval adapter on")
    query_vectors = serving.embed([q.text for q in answerable])
    frozen_passages = passage_encoder(serving, max_tokens).embed([p.context_text for p in passages])
    articles = np.array([p.article for p in passages])
    scores = (query_vectors @ frozen_passages.T).numpy()
    positives, negatives = [], []
    for i, question in enumerate(answerable):
        own = articles == question.article
        positives.append(int(np.argmax(np.where(own, scores[i], -np.inf))))
        negatives.append(int(np.argmax(np.where(own, -np.inf, scores[i]))))
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(body).float(), lora_config(settings))
    model.train()
    encoder = Encoder(model, serving.tokenizer, max_length=max_tokens)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    order = list(range(len(answerable)))
    bar = tqdm(total=epochs * ((len(order) + batch_size - 1) // batch_size), desc="retrieval adapter", unit="step",
               disable=None if progress else True)
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids = list(dict.fromkeys([positives[i] for i in batch] + [negatives[i] for i in batch]))
            features = encoder.tokenize([passages[j].context_text for j in ids])
            vectors = encoder.forward(model, features)
            logits = scale * query_vectors[batch] @ vectors.T
            column = {j: c for c, j in enumerate(ids)}
            same = torch.tensor([[articles[j] == answerable[i].article for j in ids] for i in batch])
            target = torch.tensor([column[positives[i]] for i in batch])
            keep = torch.nn.functional.one_hot(target, len(ids)).bool()
            logits = logits.masked_fill(same & ~keep, float("-inf"))
            loss = torch.nn.functional.cross_entropy(logits, target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model


# ---- evaluation ------------------------------------------------------------------------------


def evaluate_knowledge(model: str | Path, questions_file: Path, *, worst: int = 20) -> dict[str, Any] | None:
    """Knowledge metrics of a bundle on held-out questions, through the serving path; None without articles.

    Retrieval alone (recall@1/@3, MRR; at the bundle's floor: answered-right / answered-wrong /
    abstained, and abstention on unanswerable questions), the dialogue's action for each question
    as the first message of a conversation (an intent may answer it before the articles are asked),
    and the worst misses: the most confident wrong citations.
    """
    from bot.chatbot import load_domain
    from bot.classifier import IntentClassifier
    from bot.policy import DialoguePolicy
    from bot.sessions import SessionState

    classifier = IntentClassifier.from_bundle(model)
    base = KnowledgeBase.from_bundle(classifier.bundle)
    if base is None:
        return None
    questions = read_questions(questions_file, sorted({p.article for p in base.passages}))
    texts = [q.text for q in questions]
    vectors, logits = classifier.embed_and_logits(texts) if texts else (torch.zeros(0, 1), torch.zeros(0, 1))
    scores = base.article_scores(vectors) if texts else torch.zeros(0, len(base.articles))
    metrics = retrieval_metrics(scores, base.articles, questions, base.floor, base.margin)
    rank = ranks(scores, base.articles, questions)
    predictions = classifier.predictions_from_logits(logits, embeddings=vectors) if texts else []
    policy = DialoguePolicy(load_domain(classifier.bundle), floor=classifier.confidence_floor,
                            gap=classifier.ambiguity_gap, knowledge_floor=base.floor, knowledge_margin=base.margin)
    actions: dict[str, int] = {}
    cited = {"right": 0, "wrong": 0}  # first replies that cite an article: the right one / any other (any, if none answers)
    misses: list[dict[str, Any]] = []
    for i, (question, prediction) in enumerate(zip(questions, predictions)):
        hit = base.best(vectors[i])
        decision, _ = policy.step(SessionState(), question.text, prediction, hit)
        actions[decision.action] = actions.get(decision.action, 0) + 1
        quoted = base.passage(decision.passage) if decision.action == "knowledge" and decision.passage else None
        if quoted is not None:
            cited["right" if quoted.article == question.article else "wrong"] += 1
        assert hit is not None
        answered = base.clears(hit)
        wrong = answered and (question.article is None or hit.passage.article != question.article)
        if wrong or (question.article is not None and rank[i] != 0):
            misses.append({
                "text": question.text, "article": question.article, "cited": hit.passage.article,
                "passage_id": hit.passage.id, "score": round(hit.score, 4), "margin": round(hit.margin, 4),
                "answered": bool(answered),
                "rank_of_right_article": int(rank[i]) + 1 if question.article is not None else None,
            })
    misses.sort(key=lambda m: (not m["answered"], -float(m["score"])))
    n = max(len(questions), 1)
    return {
        "questions": str(questions_file),
        "n": len(questions),
        "passages": len(base.passages),
        "retrieval": base.meta.get("retrieval", "dense, passages"),
        **metrics,
        "dialogue_actions": {action: count / n for action, count in sorted(actions.items())},
        "dialogue_cited_right": cited["right"] / max(metrics["n_answerable"], 1),
        "dialogue_cited_wrong": cited["wrong"] / n,
        "worst_misses": misses[:worst],
        "note": "retrieval metrics score the top article (its best passage, plus the bundle's key_weight x its best "
        "known question; the best `rerank` articles plus sentence_weight x their best sentence); answered = its "
        "score >= the bundle's retrieval floor and its lead over the next article >= the bundle's margin (both "
        "fitted on validation questions); dialogue_actions: what the bot does with each "
        "question as a first message (intents answer confidently before the articles are asked); dialogue_cited_right: "
        "the answerable questions whose first reply cites their article; dialogue_cited_wrong: the questions whose first "
        "reply cites another article (any article, for a question none answers)",
    }
