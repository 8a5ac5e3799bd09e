"""Knowledge answers: help-centre articles as passages, retrieved by cosine on the intent encoder.

Decisions, and why:
- Articles are data: Markdown files with front matter (`title`, `url`, optional `tags`) in a
  pack's `knowledge/` folder. They are split into passages by heading, then by paragraph (and by
  sentence only when one paragraph alone is too long), so each passage fits the encoder's token
  limit. The article title and the section heading are prepended to the text that is embedded:
  "Opening hours" alone says little; "Stores. Opening hours. ..." places it.
- One embedding path. Passages are embedded at training time by the same `Encoder.tokenize` and
  `mean_pool` as intents, with the serving body (int8 or LoRA-merged, as the bundle serves). At run
  time the query vector IS the vector the intent pass already computed (`Prediction.embedding`),
  so retrieval costs one matrix-vector product over unit vectors (cosine), no second encoder pass.
- Sentences of every passage are embedded at training time too, so the extractive quote (the
  sentences most similar to the question) also costs a dot product, not an encoder pass.
- Articles, not passages, compete: an article scores its best passage (plus, when the bundle was
  trained with known questions, `key_weight` x its best known question), and the answer cites the
  top article's best passage. Two passages of one article are not rivals, so the runner-up that
  matters is the next article.
- Known questions add to an article's score; they do not replace it. The training questions
  (`questions/train.yaml`, through the question map like messages) are the articles' other keys,
  as FAQ matching does, and an article scores best passage + `key_weight` x best known question
  (0.5 in the default recipe, data of the bundle). As a max instead of a sum, a near paraphrase of
  another article's detail won outright and the keys lost on validation; as a sum, a key only tips
  the balance between articles whose passages already fit (docs/knowledge.md).
- Knowing when not to answer: the retrieval floor and the margin (the least lead of the top
  article over the next one) are fitted on validation questions (answerable and unanswerable) at
  training time and stored in `knowledge.json` in the bundle, which is checksummed like every
  other file. The margin is there because a raw score does not tell "clearly this article" from
  "one of two neighbours" (returns vs refunds, wool vs cotton care): on the shop pack's validation
  questions it cut wrong citations from 7.5% to 0.9% of answerable questions (docs/knowledge.md).
  Nothing here holds a threshold.
- A lexical hybrid (BM25) was measured side by side with dense retrieval and not kept
  (docs/knowledge.md, BENCHMARKS.md): retrieval stays dense only.
- The question side learns too, without a second encoder pass: a bundle trained with
  `questions/train.yaml` holds a linear map W (`question_map` in knowledge.safetensors), and a
  message is retrieved as unit(q + q W), one 384 x 384 product on the intent pass's vector. Customers
  word questions unlike articles ("my jumper fits my 6 year old now" against "Why wool shrinks and
  felts"); the map moves questions towards the passages that answer them. It raised recall@1 on the
  shop pack's validation questions from 0.860 to about 0.93 (docs/knowledge.md). Sentences for the
  quote are still compared with the unmapped vector, in the encoder's own space.
- The score arithmetic is the machine's, measured at load. The bundle stores the passage,
  known-question and sentence matrices in float16 (half the bytes). Right after an intent pass they
  are read from memory, not cache, so retrieval time is their bytes on one CPU, and on another the
  speed of its float16 kernels: over 5,000 passages torch's float16 matrix-vector product took 0.43 ms
  against NumPy's float32 0.74 on an AMD EPYC, and 0.68 ms against torch's float32 0.28 on a Xeon with
  AVX-512 FP16 and AMX (docs/knowledge.md). So a loaded knowledge base times both products over its
  own passage matrix (`fastest_dtype`, one thread) and scores in the faster one; float32 when the
  matrix is too small for the difference to matter (then exact, and the choice costs nothing). Training
  fits the floor and margin on float32 scores of the float16-stored vectors, the reference; float16
  scores stay within 2e-3 of them (tests/test_knowledge.py), which moved no shop question's best
  article. Every score is made by one function (`_article_row`), for training's fit, for evaluation
  and for serving; only its dtype varies.
- A late look at sentences reranks the best articles. An article's passage is a blurred summary of
  several sentences; the best `rerank` (3) articles add `sentence_weight` (0.5) x their best
  sentence's cosine with the mapped message (the sentence vectors are already in the bundle for the
  quote). It raised validation utility from 88 to 90 on the shop pack (docs/knowledge.md) and reads
  only the three articles' sentences.
- A bundle whose known questions predate `key_weight` (when a known question's score replaced the
  passage's) is refused at load with one line asking to retrain: its floor and margin were fitted on
  another rule, so serving it with today's would be silently wrong.
- An article is read as UTF-8 with an optional byte order mark (`utf-8-sig`): editors on Windows
  save one, and with it the file did not start with `---` and was refused as "no front matter".
  The front matter is parsed by `bot.fileio.parse_yaml`, so a broken or absurdly nested one is one
  line naming the file (and the file's line), like every other YAML supportbot reads.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .bundle import Bundle, BundleError
from .errors import SupportbotError
from .fileio import parse_yaml, read_yaml

KNOWLEDGE_JSON = "knowledge.json"
KNOWLEDGE_VECTORS = "knowledge.safetensors"
FORMAT = 1
STORE_DTYPE = torch.float16  # the retrieval matrices as stored in the bundle
SCORE_DTYPES = (torch.float32, torch.float16)  # the arithmetics `fastest_dtype` chooses from; float32 is the reference
TIMED_ROWS = 2048  # below this many passage rows a product takes microseconds either way: float32, untimed
MAX_ARTICLE_BYTES = 1 << 20
MAX_ARTICLES = 20_000

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.S)
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9£$€])")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class KnowledgeError(SupportbotError):
    """Articles or questions that cannot be used; the message is one line naming the file and problem."""


@dataclass(frozen=True)
class Article:
    slug: str  # the file stem: questions name their article by it
    title: str
    url: str
    tags: tuple[str, ...]
    body: str


@dataclass(frozen=True)
class Passage:
    """One retrievable piece of an article. `text` is what is quoted; `context_text` is what is embedded."""

    id: str  # "<slug>#<n>"
    article: str
    title: str
    url: str
    heading: str
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.sentences)

    @property
    def context_text(self) -> str:
        """The article title (and heading) as context, then the passage."""
        head = f"{self.title}. {self.heading}." if self.heading and self.heading != self.title else f"{self.title}."
        return f"{head} {self.text}"


@dataclass(frozen=True)
class Question:
    text: str
    article: str | None  # None: no article answers it


@dataclass(frozen=True)
class Source:
    """A cited passage, as replies carry it (`sources`)."""

    title: str
    url: str
    score: float
    passage_id: str


@dataclass(frozen=True)
class Hit:
    """An article's best passage. `score`: the article's score (best passage, + weighted best known question);
    `margin`: its lead over the next article (1.0 when no other article exists)."""

    passage: Passage
    score: float
    rank: int = 0
    margin: float = 1.0
    question_like: bool = False  # the router: the message reads like a help-centre question, not an intent's

    def source(self) -> Source:
        return Source(self.passage.title, self.passage.url, round(float(self.score), 4), self.passage.id)

    def clears(self, floor: float, margin: float) -> bool:
        """Good enough to answer from (the one rule: `clears`)."""
        return bool(clears(self.score, self.margin, floor, margin))


def map_questions(rows: torch.Tensor, question_map: torch.Tensor) -> torch.Tensor:
    """Message vectors (rows) as retrieval compares them through a question map W: unit(q + q W).
    Differentiable in W, so training learns W through this very function (`search` does the same
    product in its own code, `_article_row`; a test holds the two together)."""
    return torch.nn.functional.normalize(rows + rows @ question_map, dim=1)


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch's intra-op work in the calling thread alone while inside. Retrieval's products are small and
    read from memory; a second thread must be woken, and on a busy machine it waits for the other core:
    torch's float16 product over 5,000 passages took 12 ms with two threads on the loaded 2-core machine,
    0.22 ms with one. The count is the calling thread's own (OpenMP's), so threads already running torch
    keep theirs; torch also takes it as the default of a thread that first uses torch while inside (measured:
    such a thread keeps one). The server's model thread first uses torch for the first forward pass, which
    comes before any retrieval (retrieval reads that pass's vectors), so its count is settled by then."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


EVICT_BYTES = 64 * 2**20  # written between timed products: more than a server CPU's last-level cache (32 MiB here)


def product_seconds(matrix: torch.Tensor, repeats: int = 15) -> dict[torch.dtype, float]:
    """Median seconds of one matrix-vector product over `matrix` in each of `SCORE_DTYPES` on this machine
    (`repeats` products each, one thread, after one untimed product), each read from memory, not from
    the cache: a server's product follows an intent pass, which has evicted the passage matrix. Timed
    back to back from the cache instead, float32 won on this EPYC (0.17 against 0.22 ms over 5,000
    passages) while served after intent passes it was the slower (1.9 against 1.1 ms per retrieval);
    from memory, float32 1.0 ms and float16 0.3 ms (docs/knowledge.md)."""
    seconds = {}
    evict = torch.zeros(EVICT_BYTES // 4)
    with _one_thread():
        for dtype in SCORE_DTYPES:
            rows, vector = matrix.to(dtype).contiguous(), matrix[0].to(dtype)
            torch.mv(rows, vector)
            timings = []
            for _ in range(repeats):
                evict.add_(1.0)
                started = time.perf_counter()
                torch.mv(rows, vector)
                timings.append(time.perf_counter() - started)
            seconds[dtype] = statistics.median(timings)
    return seconds


def faster_of(seconds: dict[torch.dtype, float]) -> torch.dtype:
    """The choice between measured products: float16 only when it is at least 10% faster; otherwise float32,
    the reference arithmetic, so a tie within measurement noise keeps the exact scores."""
    return torch.float16 if seconds[torch.float16] < 0.9 * seconds[torch.float32] else torch.float32


_MEASURED: dict[tuple[int, ...], torch.dtype] = {}  # passage matrix shape -> the choice measured in this process


def fastest_dtype(matrix: torch.Tensor, repeats: int = 15) -> torch.dtype:
    """The faster of `SCORE_DTYPES` for products over `matrix` here: float32 untimed below `TIMED_ROWS` rows,
    else `faster_of(product_seconds(...))`, measured once per matrix shape in a process. A server measures
    at start-up, before traffic; a hot reload of a bundle with as many passages reuses that choice instead
    of timing again on cores busy with live requests (the time depends on the shape, not the values)."""
    if matrix.shape[0] < TIMED_ROWS:
        return torch.float32
    shape = tuple(matrix.shape)
    if shape not in _MEASURED:
        _MEASURED[shape] = faster_of(product_seconds(matrix, repeats))
    return _MEASURED[shape]


def clears(score: Any, lead: Any, floor: float, margin: float) -> Any:
    """The answer-or-abstain rule, for one hit (floats) or many (arrays): the article's score clears the
    bundle's fitted floor and leads the next article by its fitted margin. Training fits the pair with
    this rule, evaluation scores it, the policy and `KnowledgeBase.clears` serve it."""
    return (score >= floor) & (lead >= margin)


# ---- reading articles ------------------------------------------------------------------------


def read_articles(folder: str | Path) -> list[Article]:
    """Every `*.md` in `folder` (not recursive), sorted by slug; front matter title and url required."""
    root = Path(folder)
    if not root.is_dir():
        raise KnowledgeError(f"{root}: no such knowledge folder")
    files = sorted(p for p in root.glob("*.md") if p.is_file() and p.name.lower() != "readme.md")
    if not files:
        raise KnowledgeError(f"{root}: no articles (*.md with front matter title and url)")
    if len(files) > MAX_ARTICLES:
        raise KnowledgeError(f"{root}: {len(files)} articles; the limit is {MAX_ARTICLES}")
    return [read_article(p) for p in files]


def read_article(path: Path) -> Article:
    slug = path.stem
    if not _SLUG.match(slug):
        raise KnowledgeError(f"{path}: the file name must be a slug (lowercase letters, digits, - and _)")
    if path.stat().st_size > MAX_ARTICLE_BYTES:
        raise KnowledgeError(f"{path}: larger than {MAX_ARTICLE_BYTES} bytes")
    try:
        raw = path.read_text(encoding="utf-8-sig")  # an editor's byte order mark is not part of the article
    except (OSError, UnicodeDecodeError) as exc:
        raise KnowledgeError(f"{path}: cannot read as UTF-8 text: {exc}") from None
    match = _FRONT_MATTER.match(raw)
    if match is None:
        raise KnowledgeError(f"{path}: no front matter (a '---' block with title and url at the top)")
    # padded with the newlines before it, so a YAML error's line number is the file's
    front_matter = "\n" * raw.count("\n", 0, match.start(1)) + match.group(1)
    meta = parse_yaml(front_matter, where=f"{path}: front matter", error=KnowledgeError)
    if not isinstance(meta, dict):
        raise KnowledgeError(f"{path}: the front matter must be a mapping with title and url")
    title, url, tags = meta.get("title"), meta.get("url"), meta.get("tags") or []
    if not isinstance(title, str) or not title.strip():
        raise KnowledgeError(f"{path}: front matter 'title' must be a non-empty text")
    if not isinstance(url, str) or not re.match(r"^(https?://\S+|/\S*)$", url.strip()):
        raise KnowledgeError(f"{path}: front matter 'url' must be an http(s) URL or a path starting with /")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise KnowledgeError(f"{path}: front matter 'tags' must be a list of texts")
    body = raw[match.end() :]
    if not body.strip():
        raise KnowledgeError(f"{path}: the article has no text")
    return Article(slug, title.strip(), url.strip(), tuple(t.strip() for t in tags), body)


def read_questions(path: str | Path, slugs: Sequence[str] | None = None) -> list[Question]:
    """`questions: [{text, article: slug | null}]`; an article that is not among `slugs` is an error."""
    file = Path(path)
    data = read_yaml(file, error=KnowledgeError, max_bytes=MAX_ARTICLE_BYTES * 8)
    items = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise KnowledgeError(f"{file}: expected 'questions:' with a list of {{text, article}}")
    known = set(slugs) if slugs is not None else None
    out = []
    for n, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise KnowledgeError(f"{file}: question {n}: expected a mapping with a non-empty 'text'")
        article = item.get("article")
        if article is not None and (not isinstance(article, str) or (known is not None and article not in known)):
            raise KnowledgeError(f"{file}: question {n}: article {article!r} is not an article slug")
        out.append(Question(" ".join(item["text"].split()), article))
    return out


# ---- splitting -------------------------------------------------------------------------------


def plain(markdown: str) -> str:
    """Markdown inline syntax removed: links keep their text, emphasis and code marks go."""
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"(\*\*|__|`)", "", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)([^*]+)(?<!\s)\*(?![\w*])", r"\1", text)
    return " ".join(text.split())


def sentences_of(paragraph: str) -> list[str]:
    """A paragraph's sentences; each list item is one sentence (ending punctuation added)."""
    out: list[str] = []
    lines = paragraph.split("\n")
    if any(_BULLET.match(line) for line in lines):
        items: list[str] = []
        for line in lines:
            if _BULLET.match(line) or not items:
                items.append(_BULLET.sub("", line))
            else:
                items[-1] += " " + line.strip()
        for item in items:
            text = plain(item)
            if text:
                out.append(text if text[-1] in ".!?:" else text + ".")
        return out
    for piece in _SENTENCE_END.split(plain(paragraph)):
        if piece.strip():
            out.append(piece.strip())
    return out


def _sections(body: str) -> list[tuple[str, list[str]]]:
    """(heading, paragraphs) in order; text before the first heading has heading ""."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    block: list[str] = []

    def flush() -> None:
        if block and any(line.strip() for line in block):
            sections[-1][1].append("\n".join(line.rstrip() for line in block).strip())
        block.clear()

    for line in body.splitlines():
        heading = _HEADING.match(line)
        if heading:
            flush()
            sections.append((plain(heading.group(2)), []))
        elif not line.strip():
            flush()
        else:
            block.append(line)
    flush()
    return [(h, paras) for h, paras in sections if paras]


def split_article(article: Article, count_tokens: Callable[[str], int], max_tokens: int) -> list[Passage]:
    """Passages of at most `max_tokens` (title and heading included): whole sections when they fit,
    else consecutive paragraphs, else consecutive sentences of an oversized paragraph."""
    passages: list[Passage] = []
    for heading, paragraphs in _sections(article.body):
        units = [sentences_of(p) for p in paragraphs]
        pending: list[str] = []

        def emit(sentences: list[str], heading: str = heading) -> None:
            if sentences:
                pid = f"{article.slug}#{len(passages)}"
                passages.append(Passage(pid, article.slug, article.title, article.url, heading, tuple(sentences)))

        def fits(sentences: list[str], heading: str = heading) -> bool:
            probe = Passage("", article.slug, article.title, article.url, heading, tuple(sentences))
            return count_tokens(probe.context_text) <= max_tokens

        for unit in units:
            if fits(pending + unit):
                pending += unit
                continue
            emit(pending)
            pending = []
            if fits(unit):
                pending = list(unit)
                continue
            for sentence in unit:  # one paragraph alone is too long: pack its sentences
                if pending and not fits([*pending, sentence]):
                    emit(pending)
                    pending = []
                pending.append(sentence)  # a single over-long sentence stays whole (the encoder truncates it)
        emit(pending)
    return passages


# ---- the runtime knowledge base ------------------------------------------------------------


@dataclass
class KnowledgeBase:
    """Passages with their unit vectors, known questions as extra keys of their article, the sentences'
    vectors for quoting, and the fitted floor and margin."""

    passages: list[Passage]
    vectors: torch.Tensor  # (passages, dim), unit rows
    sentence_vectors: torch.Tensor  # (all sentences, dim), unit rows, passage by passage in order
    floor: float
    meta: dict[str, Any] = field(default_factory=dict)
    keys: torch.Tensor | None = None  # (known questions, dim), unit rows: extra retrieval keys of their article
    key_articles: tuple[str, ...] = ()  # the article of each key row
    key_weight: float = 1.0  # an article scores its best passage + key_weight x its best known question
    margin: float = 0.0  # the least lead over the runner-up article to answer; 0: no such rule
    question_map: torch.Tensor | None = None  # (dim, dim) W: a message is retrieved as unit(q + q W); None: q itself
    sentence_weight: float = 0.0  # the top `rerank` articles add this x their best sentence; 0: no reranking
    rerank: int = 3  # how many of the best articles the sentence score reranks
    score_dtype: torch.dtype | None = None  # the products' arithmetic (`SCORE_DTYPES`); None: `fastest_dtype` at load
    router: torch.Tensor | None = None  # (dim + 1): [weights..., bias] of the help-centre-question router; None: none
    router_threshold: float = 0.5
    articles: list[str] = field(init=False)  # article slugs in passage order: the columns of `article_scores`
    _offsets: list[int] = field(init=False, repr=False)
    _index: dict[str, int] = field(init=False, repr=False)
    _passage_columns: torch.Tensor = field(init=False, repr=False)  # each passage's article column
    _key_columns: torch.Tensor = field(init=False, repr=False)
    _matrix: torch.Tensor = field(init=False, repr=False)  # `vectors` grouped by article, then `keys` so, `score_dtype`
    _map_t: torch.Tensor | None = field(init=False, repr=False)  # `question_map` transposed (q W = W^T q), `score_dtype`
    _by_article: np.ndarray = field(init=False, repr=False)  # passage indices grouped by article (column order)
    _starts: np.ndarray = field(init=False, repr=False)  # where each article's group starts in `_by_article`
    _key_starts: np.ndarray = field(init=False, repr=False)  # where each group of keys starts
    _key_owners: np.ndarray = field(init=False, repr=False)  # the article column of each group of keys
    _sentence_matrix: torch.Tensor = field(init=False, repr=False)  # sentence rows grouped by article, `score_dtype`
    _sentence_bounds: np.ndarray = field(init=False, repr=False)  # (articles + 1): each article's sentence rows

    def __post_init__(self) -> None:
        offsets, total = [], 0
        for passage in self.passages:
            offsets.append(total)
            total += len(passage.sentences)
        if total != self.sentence_vectors.shape[0] or len(self.passages) != self.vectors.shape[0]:
            raise ValueError("knowledge vectors do not match the passages")
        self._offsets = offsets
        self._index = {p.id: i for i, p in enumerate(self.passages)}
        self.articles = list(dict.fromkeys(p.article for p in self.passages))
        column = {slug: i for i, slug in enumerate(self.articles)}
        column_of = np.array([column[p.article] for p in self.passages], dtype=np.int64)
        self._passage_columns = torch.from_numpy(column_of)
        keys = self.keys if self.keys is not None else torch.zeros(0, self.vectors.shape[1])
        if keys.shape[0] != len(self.key_articles) or any(a not in column for a in self.key_articles):
            raise ValueError("knowledge keys do not match their articles")
        self.keys = keys.float()
        self.vectors = self.vectors.float().contiguous()
        self._key_columns = torch.tensor([column[a] for a in self.key_articles], dtype=torch.long)
        # search reduces scores per article with np.maximum.reduceat, which needs each article's rows together:
        # the scoring matrices are stored grouped by article, so no gather follows the product
        self._by_article = np.argsort(column_of, kind="stable")
        self._starts = np.searchsorted(column_of[self._by_article], np.arange(len(self.articles)))
        key_order = np.argsort(self._key_columns.numpy(), kind="stable")
        self._key_owners, self._key_starts = np.unique(self._key_columns.numpy()[key_order], return_index=True)
        # The scoring matrices in `score_dtype`, chosen by measuring unless given (training gives float32, the
        # reference the floor and margin are fitted on). Every score is computed by `_article_row`.
        if self.score_dtype is None:
            self.score_dtype = fastest_dtype(self.vectors)
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"knowledge scores are computed in one of {SCORE_DTYPES}, not {self.score_dtype}")
        dtype = self.score_dtype
        # passages and known questions in one matrix: one product per message, not two (each torch call costs
        # microseconds of its own, a tenth of a search over 5,000 passages in all)
        self._matrix = torch.cat([self.vectors[torch.from_numpy(self._by_article)],
                                  self.keys[torch.from_numpy(key_order)]]).to(dtype).contiguous()
        if self.question_map is not None:
            dim = self.vectors.shape[1]
            if tuple(self.question_map.shape) != (dim, dim):
                raise ValueError("the knowledge question map does not match the vectors")
            self.question_map = self.question_map.float().contiguous()
        self._map_t = self.question_map.T.to(dtype).contiguous() if self.question_map is not None else None
        if self.router is not None:
            if tuple(self.router.shape) != (self.vectors.shape[1] + 1,):
                raise ValueError("the knowledge router does not match the vectors")
            self.router = self.router.float().contiguous()
        if self.rerank < 2 and self.sentence_weight:
            raise ValueError("the sentence reranker needs at least the two best articles (rerank >= 2)")
        sentence_columns = np.repeat(column_of, [len(p.sentences) for p in self.passages])
        sentence_order = np.argsort(sentence_columns, kind="stable")
        self._sentence_bounds = np.searchsorted(sentence_columns[sentence_order], np.arange(len(self.articles) + 1))
        self.sentence_vectors = self.sentence_vectors.float()
        self._sentence_matrix = self.sentence_vectors[torch.from_numpy(sentence_order)].to(dtype).contiguous()

    @classmethod
    def from_bundle(cls, bundle: Bundle, score_dtype: torch.dtype | None = None) -> KnowledgeBase | None:
        """The bundle's knowledge base, or None when it was trained without articles. `score_dtype`: the
        products' arithmetic; None measures which is faster here (`fastest_dtype`)."""
        meta_path, vectors_path = bundle.file(KNOWLEDGE_JSON), bundle.file(KNOWLEDGE_VECTORS)
        if meta_path is None or vectors_path is None:
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(str(vectors_path))
            passages = [
                Passage(p["id"], p["article"], p["title"], p["url"], p["heading"], tuple(p["sentences"]))
                for p in meta["passages"]
            ]
            key_articles = tuple(str(k["article"]) for k in meta.get("keys") or [])
            keys = tensors["keys"].float() if "keys" in tensors else None
            if (keys is not None or key_articles) and "key_weight" not in meta:
                # made before key_weight existed, when a known question's score replaced the passage's
                # (a max); its floor and margin were fitted on those scores, not on today's sum
                raise BundleError(f"bundle {bundle.path}: its known questions were scored by an older rule "
                                  "(no key_weight in knowledge.json); retrain it with supportbot train")
            question_map = tensors["question_map"].float() if "question_map" in tensors else None
            router = tensors["router"].float() if "router" in tensors else None
            return cls(passages, tensors["passages"].float(), tensors["sentences"].float(), float(meta["floor"]), meta,
                       keys=keys, key_articles=key_articles, key_weight=float(meta.get("key_weight", 0.0)),
                       margin=float(meta.get("margin") or 0.0), question_map=question_map,
                       sentence_weight=float(meta.get("sentence_weight", 0.0)), rerank=int(meta.get("rerank", 3)),
                       score_dtype=score_dtype, router=router,
                       router_threshold=float(meta["router"]["threshold"]) if router is not None else 0.5)
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise BundleError(f"bundle {bundle.path}: {KNOWLEDGE_JSON} is not usable: {exc}") from None

    def passage(self, passage_id: str) -> Passage | None:
        index = self._index.get(passage_id)
        return None if index is None else self.passages[index]

    def retrieval_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Message vectors (rows, unit length) as retrieval compares them: through the learned question map
        when the bundle has one, unit(q + q W), else unchanged."""
        rows = queries.reshape(-1, self.vectors.shape[1]).float()
        if self.question_map is None:
            return rows
        return map_questions(rows, self.question_map)

    def aggregate(self, passage_scores: torch.Tensor, key_scores: torch.Tensor | None = None) -> torch.Tensor:
        """(queries, articles): each article's best passage score, plus `key_weight` x its best known
        question's score when key scores are given (0 for an article without known questions)."""
        rows = passage_scores.shape[0]
        out = torch.full((rows, len(self.articles)), -1.0)  # no cosine is below -1
        # out of place, so that training the question map can differentiate through it
        out = out.scatter_reduce(1, self._passage_columns.expand(rows, -1), passage_scores.float(), "amax")
        if key_scores is not None and key_scores.shape[1]:
            best_key = torch.zeros_like(out).scatter_reduce(
                1, self._key_columns.expand(rows, -1), key_scores.float(), "amax", include_self=False)
            out = out + self.key_weight * best_key
        return out

    def article_scores(self, queries: torch.Tensor) -> torch.Tensor:
        """(queries, articles), columns as `articles`: an article scores its best passage (+ `key_weight` x its
        best known question, when the bundle has known questions). Row by row through `_article_row`, the
        code `search` serves: with float32 scores, those a floor is fitted on, the served ones bit for bit."""
        rows = queries.reshape(-1, self.vectors.shape[1])
        out = np.zeros((rows.shape[0], len(self.articles)), dtype=np.float32)
        for i in range(rows.shape[0]):
            out[i] = self._article_row(rows[i])[1]
        return torch.from_numpy(out)

    def reference_scores(self, queries: torch.Tensor) -> torch.Tensor:
        """`article_scores` in float32 throughout (torch products over `vectors`, `keys` and `sentence_vectors`):
        the reference the float16 scores are held to (tests/test_knowledge.py states the tolerance)."""
        assert self.keys is not None
        rows = self.retrieval_queries(queries)
        scores = self.aggregate(rows @ self.vectors.T, rows @ self.keys.T)
        if not self.sentence_weight:
            return scores
        sentences = rows @ self.sentence_vectors.T  # sentences in passage order, as `_offsets` counts them
        columns = self._passage_columns.repeat_interleave(
            torch.tensor([len(p.sentences) for p in self.passages], dtype=torch.long))
        best = torch.full_like(scores, -1.0).scatter_reduce(1, columns.expand(rows.shape[0], -1), sentences, "amax")
        top = scores.topk(min(self.rerank, scores.shape[1]), dim=1).indices
        reranked = scores - self.sentence_weight
        return reranked.scatter(1, top, scores.gather(1, top) + self.sentence_weight * best.gather(1, top))

    def _article_row(self, query: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One message vector's passage scores (grouped by article, as `_matrix`) and article scores.
        The products in `score_dtype` (float16 ones accumulate in float32; the question map's too, added to the
        message vector in float32), the per-article max (np.maximum.reduceat) and the weighted sums in float32;
        all in the calling thread (`_one_thread`)."""
        with _one_thread():
            vector = query.reshape(-1).float()
            if self._map_t is not None:  # one (dim x dim) product: q + q W, no encoder pass
                vector = vector + torch.mv(self._map_t, vector.to(self._map_t.dtype)).float()
                vector = vector / vector.norm().clamp_min(1e-12)
            cast = vector.to(self._matrix.dtype)
            scores = torch.mv(self._matrix, cast).float().numpy()
            passage = scores[: len(self.passages)]
            articles = np.maximum.reduceat(passage, self._starts)
            if len(self._key_owners):
                best_key = np.zeros_like(articles)
                keys = scores[len(self.passages) :]
                best_key[self._key_owners] = np.maximum.reduceat(keys, self._key_starts)
                articles = articles + np.float32(self.key_weight) * best_key
            if self.sentence_weight:
                articles = self._reranked(articles, cast)
        return passage, articles

    def _reranked(self, articles: np.ndarray, vector: torch.Tensor) -> np.ndarray:
        """The sentence reranker: each of the `rerank` best articles adds `sentence_weight` x its best sentence's
        cosine with the (mapped) message, a late look at the article at a finer grain than its passages. The
        other articles add the least it could be (x -1, the least cosine), so they still rank below every
        reranked one, in their own order: the scores stay one total order for ranking and leads."""
        weight = np.float32(self.sentence_weight)
        reranked = articles - weight
        count = min(self.rerank, len(articles))
        for column in np.argpartition(-articles, count - 1)[:count].tolist():
            start, end = int(self._sentence_bounds[column]), int(self._sentence_bounds[column + 1])
            if end > start:
                best = float(torch.mv(self._sentence_matrix[start:end], vector).max())
                reranked[column] = articles[column] + weight * np.float32(best)
        return reranked

    def search(self, query: torch.Tensor, k: int = 3) -> list[Hit]:
        """The k best articles for one query vector, best first, each as its best passage (no floor applied).
        The scores of `article_scores` (the same `_article_row`): one product over the
        passages (and one over the known questions), then a max per article over its group of rows."""
        if not self.passages:
            return []
        passage, articles = self._article_row(query)
        wanted = min(k + 1, len(self.articles))  # the k articles and the runner-up that sets the last lead
        columns = np.argsort(-articles, kind="stable")[:wanted]
        ends = [*self._starts[1:].tolist(), len(passage)]
        best = []
        for column in columns.tolist():
            start = int(self._starts[column])
            best.append((int(self._by_article[start + int(np.argmax(passage[start : ends[column]]))]),
                         float(articles[column])))
        return self._hits(best, k)

    def _hits(self, ranked: list[tuple[int, float]], k: int) -> list[Hit]:
        """Hits from (passage index, article score) best first; each lead is over the next article."""
        return [
            Hit(self.passages[index], score, rank, score - ranked[rank + 1][1] if rank + 1 < len(ranked) else 1.0)
            for rank, (index, score) in enumerate(ranked[:k])
        ]

    def best(self, query: torch.Tensor) -> Hit | None:
        """The top article's best passage for one query vector, floor or not (`clears` applies the floor),
        marked `question_like` when the router reads the message as a help-centre question."""
        hits = self.search(query, 1)
        return replace(hits[0], question_like=self.help_question(query)) if hits else None

    def help_question(self, query: torch.Tensor) -> bool:
        """The router (finetune/knowledge_train.py `train_router`): does this message vector read like one of
        train.yaml's help-centre questions rather than an intent's example? False without a router."""
        if self.router is None:
            return False
        # sigmoid(w.q/|q| + b) >= t, compared as logits in NumPy: a 384-long dot product, where five small torch
        # operations took 0.12 ms of a 0.7 ms search over 5,000 passages
        vector = query.detach().float().reshape(-1).numpy()
        weights = self.router.numpy()
        logit = float(vector @ weights[:-1]) / max(float(np.linalg.norm(vector)), 1e-12) + float(weights[-1])
        return logit >= math.log(self.router_threshold / (1 - self.router_threshold))

    def clears(self, hit: Hit | None) -> bool:
        """Good enough to answer from: the score clears the fitted floor and leads the next article by the margin."""
        return hit is not None and hit.clears(self.floor, self.margin)

    def quote(self, hit: Hit, query: torch.Tensor, *, max_sentences: int = 2, max_chars: int = 480) -> str:
        """The passage's sentences most similar to the question, in the passage's order (extractive).
        `query` is the message vector of the intent pass: sentences are compared in the encoder's own
        space (the question map is fitted to passages, not sentences)."""
        index = self._index[hit.passage.id]
        start, sentences = self._offsets[index], hit.passage.sentences
        similarity = self.sentence_vectors[start : start + len(sentences)] @ query.reshape(-1).float()
        ranked = similarity.argsort(descending=True).tolist()
        chosen: list[int] = []
        for i in ranked:
            if len(chosen) == max_sentences:
                break
            if chosen and sum(len(sentences[j]) + 1 for j in chosen) + len(sentences[i]) > max_chars:
                continue
            chosen.append(i)
        return " ".join(sentences[i] for i in sorted(chosen))
