"""Writing an evaluation: report.json, predictions.jsonl, the PNGs, a self-contained report.html,
and the summary table printed in the terminal."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from . import plots
from .metrics import LABELS
from .report_model import Evaluation, EvaluationReport

Report = EvaluationReport

CAPTIONS = {
    "confusion_matrix.png": "Confusion matrix, row-normalised and clustered so that intents confused with each other sit together.",
    "reliability_diagram.png": "Reliability: accuracy against confidence, before and after temperature scaling (in-scope messages).",
    "confidence_histogram.png": "Confidence of right and wrong predictions; the dashed line is the bundle's confidence floor.",
    "threshold_sweep.png": "What moving the confidence floor would do to coverage, accuracy and out-of-scope recall.",
    "operating_curve.png": "In-scope answered-and-right against out-of-scope recall across confidence floors; the dot is the bundle's floor.",
}


def write_outputs(out_dir: Path, evaluation: Evaluation) -> Path:
    """Write every file of the report into `out_dir` (created); returns the folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = evaluation.report
    _write_jsonl(out_dir / "predictions.jsonl", evaluation.records)
    for name, records in evaluation.extra_files.items():
        _write_jsonl(out_dir / name, records)
    images = plots.write_all(evaluation.records, report, out_dir)
    report.files = sorted(["report.json", "report.html", "predictions.jsonl", *evaluation.extra_files, *images])
    (out_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(report, images), encoding="utf-8")
    return out_dir


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


# ---- HTML --------------------------------------------------------------------------------------------

CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#1f2328}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
.meta{color:#57606a}table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;vertical-align:top}th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}.bad{color:#cf222e}.good{color:#1a7f37}
figure{margin:1.2rem 0}figure img{max-width:100%;border:1px solid #d0d7de}figcaption{color:#57606a;font-size:.9rem}
.gate-pass{background:#dafbe1;padding:.5rem .8rem;border-radius:6px}.gate-fail{background:#ffebe9;padding:.5rem .8rem;border-radius:6px}
"""


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{html.escape(str(value))}</td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.4f}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value:,}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_rows(report: Report) -> list[tuple[str, str, Any]]:
    """(key, label, value) rows shared by the HTML summary and the terminal table."""
    return [("n", "messages", report.n)] + [(key, LABELS.get(key, key), v) for key, v in report.scalar_metrics().items()]


def _header(report: Report) -> str:
    model = report.model
    title = "Cross-validation report" if report.cross_validation else "Evaluation report"
    data_ = (f"<br>data <code>{html.escape(report.data.spec)}</code>, split {html.escape(report.data.split)}, "
             f"{report.data.n:,} messages") if report.data else ""
    return (
        f"<h1>supportbot: {title}</h1><p class=meta>model <code>{html.escape(model.path)}</code> "
        f"(version {html.escape(report.model_version)}, {html.escape(model.strategy)} on {html.escape(model.base)} ({html.escape(model.precision)}), "
        f"{model.intents} intents; temperature {model.temperature:.3f}, confidence floor {model.confidence_floor:.2f}, "
        f"ambiguity gap {model.ambiguity_gap:.2f}){data_}; created {html.escape(report.created or '')}</p>"
    )


def _gate(report: Report) -> str:
    gate = report.gate
    if gate is None or (gate.min_accuracy is None and gate.min_oos_recall is None):
        return ""
    if gate.passed:
        return '<p class="gate-pass">Gate passed.</p>'
    return f'<p class="gate-fail">Gate failed: {html.escape(gate.reason or "")}</p>'


def _summary(report: Report) -> str:
    compare = report.compare
    if compare is None:
        title = "Summary: all folds' out-of-fold predictions pooled" if report.cross_validation else "Summary"
        return f"<h2>{title}</h2>" + _table(["metric", "value"], [[label, v] for _, label, v in summary_rows(report)])
    other = compare.other
    rows = [[LABELS.get(key, key), m.model, m.other, m.delta] for key, m in compare.metrics.items()]
    test = compare.mcnemar
    return (
        "<h2>Summary: this model against the other</h2>"
        f"<p>other model: <code>{html.escape(compare.other_model)}</code> (version {html.escape(compare.other_version)}, "
        f"{html.escape(other.strategy)}, {other.intents} intents, confidence floor {other.confidence_floor:.2f}, "
        f"ambiguity gap {other.ambiguity_gap:.2f}), evaluated on the same {report.n:,} messages; "
        "delta = this model minus the other.</p>" + _table(["metric", "this model", "other", "delta"], rows)
        + f"<p>McNemar test on the paired predictions ({html.escape(test.method)}): this model alone right on "
        f"{test.model_only_right}, the other alone right on {test.other_only_right}, p = {test.p_value:.4g}: "
        f"<b>{html.escape(test.verdict)}</b>.</p>"
    )


def _compare_intents(report: Report) -> str:
    if report.compare is None:
        return ""
    changes = [[name, c.model, c.other, c.delta] for name, c in report.compare.per_intent_f1.items() if c.delta]
    body = _table(["intent", "F1 this model", "F1 other", "delta"], changes) if changes else "<p>No intent's F1 changed.</p>"
    return "<h2>Per-intent F1 changes (largest drop first)</h2>" + body


def _cross_validation(report: Report) -> str:
    cv = report.cross_validation
    if cv is None:
        return ""
    rows = [[LABELS.get(key, key), cv.mean[key], cv.sd[key]] + [fold[key] for fold in cv.folds] for key in cv.mean]
    header = ["metric", "mean", "sd"] + [f"fold {fold['fold']}" for fold in cv.folds]
    return (
        f"<h2>{cv.k}-fold cross-validation (stratified, seed {cv.seed}, {html.escape(cv.strategy)})</h2>"
        f"<p>{html.escape(cv.note)}.</p>" + _table(header, rows)
    )


def _errors(report: Report) -> str:
    pairs = [[p.a, p.b, p.count, p.a_predicted_as_b, p.b_predicted_as_a] for p in report.confused_pairs]
    worst = [[e.text, e.gold, e.predicted, e.confidence, e.action] for e in report.worst_errors]
    return (
        "<h2>Most confused intent pairs</h2>"
        + (_table(["intent A", "intent B", "errors", "A predicted as B", "B predicted as A"], pairs) if pairs else "<p>None.</p>")
        + f"<h2>The {len(worst)} most confident errors</h2>"
        + (_table(["text", "true", "predicted", "confidence", "bot action"], worst) if worst else "<p>None.</p>")
    )


def _per_intent(report: Report) -> str:
    rows = sorted(report.per_intent.items(), key=lambda item: (item[1].f1, item[0]))
    return "<h2>Per intent (worst F1 first)</h2>" + _table(
        ["intent", "precision", "recall", "F1", "support"],
        [[name, m.precision, m.recall, m.f1, m.support] for name, m in rows],
    )


def _operating_curve(report: Report) -> str:
    oos = report.out_of_scope
    if oos is None or not oos.curve:
        return ""
    auroc = f"{oos.auroc:.4f}" if oos.auroc is not None else "n/a"
    return (
        f"<h2>Out-of-scope operating curve</h2><p>AUROC (in scope vs out of scope by top confidence): <b>{auroc}</b>; "
        f"the bundle's floor is {report.floor_marked:.2f}.</p>"
        + _table(["confidence floor", "in-scope answered and right", "out-of-scope recall"],
                 [[p.floor, p.in_scope_answered_right, p.oos_recall] for p in oos.curve])
    )


def _figures(images: dict[str, Path]) -> str:
    parts = ["<h2>Pictures</h2>"]
    for name, path in images.items():
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{html.escape(CAPTIONS.get(name, name))}</figcaption></figure>"
        )
    return "".join(parts)


def _notes(report: Report) -> str:
    notes = [report.latency_ms.note] if report.latency_ms else []
    if report.out_of_scope:
        notes.append("out of scope: " + report.out_of_scope.rule)
    notes.append(f"calibration: ECE over {report.calibration.n} in-scope messages, {report.calibration.bins} bins")
    handoff = report.model.handoff_intent
    notes.append("actions: what the bot does with each message as the first of a conversation (its dialogue policy "
                 "at the bundle's thresholds)")
    notes.append(f"handoff share: messages handed to a person because the bot answers them with {handoff!r}"
                 if handoff else "handoff share: 0, the model has no handoff intent")
    return "<h2>How these numbers were measured</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"


KNOWLEDGE_ROWS = (
    ("recall_at_1", "recall@1"), ("recall_at_3", "recall@3"), ("mrr", "MRR"), ("floor", "retrieval floor"),
    ("margin", "retrieval margin (lead over the next article)"),
    ("answered_right", "answered and right (answerable)"), ("answered_wrong", "answered wrong (answerable)"),
    ("abstained", "abstained (answerable)"), ("unanswerable_abstained", "abstained on unanswerable"),
    ("dialogue_cited_right", "first reply cites the right article (answerable)"),
    ("dialogue_cited_wrong", "first reply cites a wrong article (all)"),
)


def knowledge_rows(report: Report) -> list[tuple[str, Any]]:
    """(label, value) rows of the knowledge metrics, shared by the HTML report and the terminal."""
    knowledge = report.knowledge
    if knowledge is None:
        return []
    rows: list[tuple[str, Any]] = [("questions (answerable / unanswerable)",
                                    f"{knowledge.n_answerable} / {knowledge.n_unanswerable}")]
    return rows + [(label, getattr(knowledge, key)) for key, label in KNOWLEDGE_ROWS]


def _knowledge(report: Report) -> str:
    knowledge = report.knowledge
    if knowledge is None:
        return ""
    misses = [[m.text, m.article or "(none)", m.cited, m.score, "yes" if m.answered else "no"] for m in knowledge.worst_misses]
    actions = ", ".join(f"{name} {share:.1%}" for name, share in knowledge.dialogue_actions.items())
    return (
        f"<h2>Knowledge answers</h2><p>{knowledge.passages} passages, {html.escape(knowledge.retrieval)} retrieval; "
        f"questions <code>{html.escape(knowledge.questions)}</code>. What the bot does with these questions: "
        f"{html.escape(actions)}.</p>"
        + _table(["metric", "value"], [[label, value] for label, value in knowledge_rows(report)])
        + f"<h3>The {len(misses)} worst misses (most confident first)</h3>"
        + (_table(["question", "right article", "cited", "score", "answered"], misses) if misses else "<p>None.</p>")
        + f"<p>{html.escape(knowledge.note)}.</p>"
    )


def render_html(report: Report, images: dict[str, Path]) -> str:
    """A single self-contained page: tables and the PNGs embedded as base64."""
    sections = [
        _header(report), _gate(report), _summary(report), _cross_validation(report), _compare_intents(report),
        _knowledge(report), _errors(report), _operating_curve(report), _figures(images), _per_intent(report), _notes(report),
    ]
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>supportbot evaluation '
        f"{html.escape(report.model_version)}</title><style>{CSS}</style></head><body>{''.join(sections)}</body></html>\n"
    )


# ---- terminal --------------------------------------------------------------------------------------


def print_summary(report: Report, out_dir: Path) -> None:
    """The summary table (with the other model and the McNemar verdict when comparing), then where the files are."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cv = report.cross_validation
    where = f" on {report.data.spec} ({report.data.split}, n={report.n:,})" if report.data else f" (n={report.n:,})"
    title = f"evaluation of {report.model_version}{where}"
    table = Table(title=title, header_style="bold")
    table.add_column("metric")
    table.add_column("pooled" if cv else "value", justify="right")
    if cv:
        table.add_column("mean ± sd over folds", justify="right")
    compare = report.compare
    if compare:
        table.add_column("other", justify="right")
        table.add_column("delta", justify="right")
    for key, label, value in summary_rows(report):
        row = [label, _fmt(value)]
        if cv:
            row.append(f"{cv.mean[key]:.4f} ± {cv.sd[key]:.4f}" if key in cv.mean else "")
        if compare:
            m = compare.metrics.get(key)
            row += [_fmt(m.other), "" if m.delta is None else f"{m.delta:+.4f}"] if m else ["", ""]
        table.add_row(*row)
    console.print(table)
    if compare:
        test = compare.mcnemar
        console.print(f"McNemar ({test.method}): this model alone right {test.model_only_right}, other alone right "
                      f"{test.other_only_right}, p = {test.p_value:.4g}: {test.verdict}")
    if report.knowledge is not None:
        knowledge_table = Table(title="knowledge answers", header_style="bold")
        knowledge_table.add_column("metric")
        knowledge_table.add_column("value", justify="right")
        for label, value in knowledge_rows(report):
            knowledge_table.add_row(label, _fmt(value))
        console.print(knowledge_table)
        for miss in report.knowledge.worst_misses[:3]:
            console.print(f"miss: {miss.text!r} -> {miss.cited} ({miss.score:.3f}), right: {miss.article}")
    if report.confused_pairs:
        top = ", ".join(f"{p.a} / {p.b} ({p.count})" for p in report.confused_pairs[:3])
        console.print(f"most confused: {top}")
    pictures = sum(name.endswith(".png") for name in report.files)
    console.print(f"written to {out_dir}: report.html, report.json, predictions.jsonl and {pictures} pictures")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)
