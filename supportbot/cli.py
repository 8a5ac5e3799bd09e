"""`supportbot`: train, evaluate, serve, chat, predict (docs/design.md).

Each command imports only what it needs, so `supportbot predict` does not load the web stack.
Errors a user can fix (bad data, a damaged bundle or sessions file, a bad option) are `SupportbotError`s
(bot/errors.py): main() catches that one base, prints one line and exits 2.

Output paths are checked before any work (a training, an evaluation, a clustering): a bundle output with
`bot.bundle.check_output` (a new path, an empty folder or a bundle; nothing else is replaced), a report or
discovery folder with `bot.fileio.check_output_folder` (a folder, or a path one can be created at).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bot import __version__

EPILOG_SPEC = """\
data SPEC: a CSV / JSONL / JSON / YAML file; a folder with train.* and test.* (or train/ dev/ test/
subfolders); a domain pack folder (nlu.yaml, test.yaml, responses.yaml); pack:NAME for a packaged
pack (pack:shop is the default); CLINC150 JSON; hf:NAME (online only). Add :train, :val or :test
to pick one split, e.g. ../shared/data/clinc150/data_full.json:test. Text columns: text, utterance,
instruction, query, message, content; label columns: label, intent, category. The label `oos` means out of scope.
"""


def default_model_dir() -> Path:
    """Where the default model lives: $SUPPORTBOT_MODEL, else models/default (bot.paths)."""
    from bot import paths

    return paths.model_dir()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supportbot",
        description="A customer-service chatbot on a frozen pretrained encoder: train, evaluate, serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="fine-tune on labelled examples and write a model bundle",
        description="Freeze the pretrained base and train a head (head), LoRA adapters plus a head (lora), "
        "or everything (full). Fits a temperature and the fallback/clarify thresholds on validation data "
        "and writes a verified bundle.",
        epilog=EPILOG_SPEC, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", metavar="FILE", help="YAML recipe (configs/*.yaml); defaults train the shop pack with `head`")
    train.add_argument("--data", metavar="SPEC", help="training data (see below); validation is split off (stratified, seeded) unless it has one")
    train.add_argument("--eval-data", metavar="SPEC", help="held-out data scored after training (its test split when it has one)")
    train.add_argument("--strategy", metavar="{head,lora,contrastive,full}",
                       help="what trains: the head only, LoRA adapters + head, LoRA adapters trained contrastively "
                       "then the head (few examples per intent: configs/fewshot.yaml), or everything; "
                       "or the name of another registered strategy (finetune/strategies.py)")
    train.add_argument("--output", metavar="DIR", help="bundle directory to write (replaced atomically)")
    train.add_argument("--seed", type=int, help="random seed (split, init, batches)")
    train.add_argument("--knowledge", metavar="DIR", help="help-centre articles (*.md with front matter title, url) to answer from; "
                       "default: the domain pack's knowledge/ folder when it has one (docs/knowledge.md)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any recipe field, dotted for sections: --set lora.r=8 --set epochs=3")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = sub.add_parser(
        "evaluate", help="offline evaluation report for a bundle",
        description="Score a bundle on labelled data: report.json, report.html and plots in --output; a summary table here.",
        epilog=EPILOG_SPEC, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--model", metavar="DIR", required=True, help="bundle directory")
    evaluate.add_argument("--data", metavar="SPEC", required=True, help="labelled data: its test split when it has one, else validation, else the whole file (with --cv: its train split)")
    evaluate.add_argument("--output", metavar="DIR", default="runs/eval", help="where report.json, report.html and the PNGs go (default: runs/eval)")
    evaluate.add_argument("--compare", metavar="OTHER_DIR", help="a second bundle (e.g. the one in production), evaluated on the same data: side by side, McNemar test, per-intent F1 changes")
    evaluate.add_argument("--cv", type=int, metavar="K", help="retrain the bundle's recipe on K stratified folds of --data and report mean ± sd per metric (no test set needed)")
    evaluate.add_argument("--min-accuracy", type=float, metavar="X", help="exit 1 when accuracy is below X (0-1)")
    evaluate.add_argument("--min-oos-recall", type=float, metavar="Y", help="exit 1 when out-of-scope recall is below Y (0-1)")
    evaluate.add_argument("--questions", metavar="FILE", help="help-centre questions ({text, article: slug|null}) for the knowledge metrics; "
                          "default: the pack's knowledge/questions/test.yaml when --data is a domain pack")
    evaluate.add_argument("--worst", type=int, default=20, metavar="N", help="how many worst errors to list (default 20)")
    evaluate.add_argument("--latency-sample", type=int, default=200, metavar="N",
                          help="how many texts to time one at a time for single-text latency (default 200)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    serve = sub.add_parser(
        "serve", help="run the HTTP service (chat API, web chat page, webhooks)",
        description="Serve a bundle over HTTP. Without --model and $SUPPORTBOT_MODEL, the default shop model is "
        "trained first if it does not exist yet (about a minute on 2 cores).",
    )
    serve.add_argument("--model", metavar="DIR", help="bundle directory (default: $SUPPORTBOT_MODEL or the default shop model)")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument("--config", metavar="FILE", help="serving settings YAML (default configs/serve.yaml when present)")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="processes serving one port (default 1); torch threads are split between them. With "
                            "SUPPORTBOT_DATABASE_URL unset they share the SQLite files in the data folder")

    promote = sub.add_parser(
        "promote", help="make a bundle the model of every replica (fleet)",
        description="Verify a bundle and record it in the database as the fleet's model. Every replica sharing "
        "the database (SUPPORTBOT_DATABASE_URL; unset: the data folder's SQLite) loads it within seconds with "
        "an atomic reload; a replica on which it does not verify keeps its model. DIR must be readable by every "
        "replica (shared storage).",
    )
    promote.add_argument("model", metavar="DIR", help="bundle directory on shared storage")
    promote.add_argument("--config", metavar="FILE", help="serving settings YAML (for database_url and data_dir)")

    review = sub.add_parser(
        "review", help="the review queue: messages the bot did not understand, grouped",
        description="List the review queue from the stored turns (the serving settings' database: "
        "SUPPORTBOT_DATABASE_URL, else the data folder's SQLite): fallbacks, clarify questions, handoffs, "
        "low-margin answers and knowledge answers marked not helpful, near-duplicates grouped on MODEL's "
        "embeddings, the largest group first. Texts already in the corrections file are left out. Label them "
        "on the admin page (/admin/review of `supportbot serve`), then `supportbot retrain`. See docs/review.md.",
    )
    review.add_argument("--model", metavar="DIR", help="bundle to measure margins and group with (default: "
                        "the serving settings' model, else the default shop model)")
    review.add_argument("--config", metavar="FILE", help="serving settings YAML (data_dir, database_url, review_*)")
    review.add_argument("--limit", type=int, default=30, metavar="N", help="messages to show (default 30)")
    review.add_argument("--offset", type=int, default=0, metavar="N", help="messages to skip (default 0)")
    review.add_argument("--group", type=int, metavar="G", help="show only group G")
    from bot.review import ORDERS, ORDERS_HELP  # numpy and yaml only; the model loads when the command runs

    review.add_argument("--order", choices=ORDERS, default=ORDERS[0],
                        help=f"{ORDERS_HELP}; default {ORDERS[0]} (docs/review.md)")
    review.add_argument("--similarity", type=float, metavar="X", help="cosine similarity at which messages group "
                        "(default: the settings' review_similarity, 0.8)")
    review.add_argument("--margin", type=float, metavar="X", help="answers whose top-1 minus top-2 probability is "
                        "below X are queued (default: the bundle's confidence floor)")

    retrain = sub.add_parser(
        "retrain", help="retrain with the review corrections, compare with the serving model, promote if not worse",
        description="Train MODEL's own recipe on its data plus the corrections file (written to OUTPUT.data/), "
        "compare the new bundle with MODEL on the test split with the paired comparison of `supportbot evaluate "
        "--compare` (report in OUTPUT.eval/), and with --promote make it the fleet's model (as `supportbot "
        "promote`) only when its test accuracy is at least MODEL's. Exit 0 when not worse, 1 when worse "
        "(nothing promoted). See docs/review.md.",
        epilog=EPILOG_SPEC, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    retrain.add_argument("--model", metavar="DIR", required=True, help="the serving bundle")
    retrain.add_argument("--corrections", metavar="FILE", required=True, help="corrections file from the review page "
                         "(default place: the data folder's corrections.yaml)")
    retrain.add_argument("--output", metavar="DIR", required=True, help="where the new bundle goes")
    retrain.add_argument("--test", metavar="SPEC", help="test data to compare on (default: the data's test split, "
                         "else the recipe's eval_data)")
    retrain.add_argument("--promote", action="store_true", help="promote the new bundle when it is not worse")
    retrain.add_argument("--config", metavar="FILE", help="serving settings YAML (for --promote: database_url, data_dir)")
    retrain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="change the recipe, e.g. --set epochs=20 (repeatable)")
    retrain.add_argument("--quiet", action="store_true", help="no progress bars")

    knowledge = sub.add_parser(
        "knowledge", help="rebuild a bundle's help-centre articles into a new bundle; the intents are copied",
        description="Embed MODEL's help-centre articles again (edited, added or removed ones; --articles DIR, "
        "default the folder MODEL was trained with) with MODEL's own body and recipe: passages, question map, "
        "known questions, router, and the floor and margin fitted on the folder's questions/validation.yaml. "
        "Every other file (the intents' head, adapter, ONNX graph) is copied as it is, so the intents answer as "
        "before. The new bundle goes to OUTPUT; it serves after `supportbot promote OUTPUT`, or at once with "
        "--promote. See docs/knowledge.md.",
    )
    knowledge.add_argument("--model", metavar="DIR", required=True, help="the serving bundle")
    knowledge.add_argument("--output", metavar="DIR", required=True, help="where the new bundle goes")
    knowledge.add_argument("--articles", metavar="DIR", help="the help-centre folder (*.md articles, questions/); "
                           "default: the one MODEL was trained with")
    knowledge.add_argument("--set", dest="overrides", action="append", default=[], metavar="knowledge.KEY=VALUE",
                           help="change a knowledge setting, e.g. --set knowledge.wrong_answer_cost=2 (repeatable)")
    knowledge.add_argument("--promote", action="store_true", help="make the new bundle the fleet's model (as `supportbot promote`)")
    knowledge.add_argument("--config", metavar="FILE", help="serving settings YAML (for --promote: database_url, data_dir)")
    knowledge.add_argument("--quiet", action="store_true", help="no progress bars")

    db = sub.add_parser("db", help="database maintenance (PostgreSQL schema migrations)",
                        description="`supportbot db upgrade` applies the schema migrations SUPPORTBOT_DATABASE_URL "
                        "lacks (supportbot serve also does this at start-up). A database from a newer supportbot "
                        "is refused.")
    db.add_argument("action", choices=["upgrade"], help="upgrade: apply pending migrations")
    db.add_argument("--config", metavar="FILE", help="serving settings YAML (for database_url)")

    discover = sub.add_parser(
        "discover", help="propose intents from unlabelled messages (clusters + a draft domain pack)",
        description="Embed unlabelled messages with the frozen base, average each vector with its nearest neighbours, cluster them (a Ward tree; the number of intents "
        "is the first persistent peak of the silhouette over k), name each cluster by its key terms and write DIR/assignments.csv "
        "(text,cluster; -1 = noise), DIR/clusters.json, DIR/discovery.png (how k was chosen, the clusters' sizes) and a draft pack DIR/pack that `supportbot train --data "
        "DIR/pack` accepts. Labels in SPEC, if any, are ignored (a CSV, JSONL or JSON table needs only a text column); a .txt file is read as one message a line.",
        epilog=EPILOG_SPEC, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    discover.add_argument("--data", metavar="SPEC", required=True, help="the messages (see below), or a .txt file with one message a line")
    discover.add_argument("--output", metavar="DIR", required=True, help="where assignments.csv, clusters.json and pack/ go")
    discover.add_argument("--known", metavar="MODEL", help="a bundle: messages it answers confidently (at its own fitted "
                          "confidence floor) are set aside in known.csv, so only new intents are proposed")
    discover.add_argument("--base", metavar="NAME_OR_DIR", default=None,
                          help="the encoder to cluster with: a hub id or a model folder (default: the packaged "
                          "all-MiniLM-L6-v2). all-mpnet-base-v2 (docs/training.md, 'A larger base') gives finer "
                          "clusters at about four times the embedding time (docs/review.md)")
    discover.add_argument("--k-min", type=int, default=10, metavar="K", help="fewest clusters tried (default 10)")
    discover.add_argument("--k-max", type=int, default=300, metavar="K", help="most clusters tried (default 300)")
    discover.add_argument("--k-step", type=int, default=10, metavar="N", help="step between the k tried (default 10)")
    discover.add_argument("--neighbours", type=int, default=None, metavar="N",
                          help="average each message's vector with its N nearest before clustering (default: one per 100 "
                          "messages, 5 to 20, as measured in docs/review.md; 0: cluster the raw vectors)")
    discover.add_argument("--min-cluster-size", type=int, default=3, metavar="N",
                          help="smaller clusters are noise, -1 in assignments.csv (default 3)")
    discover.add_argument("--quiet", action="store_true", help="no progress bars")

    export = sub.add_parser(
        "export", help="add the ONNX serving graph to an existing bundle",
        description="Export the bundle's encoder (LoRA merged), pooling and head as one ONNX graph, check that ONNX "
        "Runtime reproduces the PyTorch probabilities on the validation texts (the parity gate), and add the graph "
        "to the bundle (checksummed in bundle.json). The bundle then serves on ONNX Runtime by default. If the "
        "gate fails, the bundle is left as it was and keeps serving on PyTorch (exit 1). `supportbot train` "
        "does this at the end of training.",
        epilog=EPILOG_SPEC, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("model", metavar="DIR", help="bundle directory")
    export.add_argument("--data", metavar="SPEC", help="texts for the parity check (default: the bundle's own validation "
                        "split, re-read from its recipe's data)")
    export.add_argument("--tolerance", type=float, default=1e-4, metavar="X",
                        help="largest allowed |p_onnx - p_torch| over texts and intents (default 1e-4)")

    chat = sub.add_parser("chat", help="talk to the bot in the terminal",
                          description="A terminal conversation; quick replies are shown as numbered options.")
    chat.add_argument("--model", metavar="DIR", help="bundle directory (default: the default shop model, trained if missing)")
    chat.add_argument("--session", default=None, help="session id to continue (default: a new one)")

    predict = sub.add_parser("predict", help="classify texts, one JSON line each",
                             description="Print one JSON line per TEXT: label, calibrated confidence, out-of-scope flag, ranking.")
    predict.add_argument("--model", metavar="DIR", required=True, help="bundle directory")
    predict.add_argument("--top-k", type=int, default=3, help="how many intents to rank (default 3)")
    predict.add_argument("--backend", choices=["onnx", "torch"], help="what runs the model (default: $SUPPORTBOT_BACKEND, "
                         "else onnx when the bundle has a graph)")
    predict.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify ('-' reads lines from stdin)")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from finetune.config import load_config
    from finetune.train import train

    overrides = list(args.overrides)
    for key in ("data", "eval_data", "strategy", "output", "seed"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if args.knowledge is not None:
        overrides.append(f"knowledge.articles={json.dumps(args.knowledge)}")
    cfg = load_config(args.config, overrides)
    check_output(cfg.output, name="--output" if args.output is not None else "output")
    result = train(cfg, progress=not args.quiet, log=lambda msg: print(msg, file=sys.stderr))
    print_summary("training summary", result.summary)
    return 0


def check_output(path: str | Path, *, name: str = "--output") -> None:
    """Refuse, before any work, a bundle output that is not a new path, an empty folder or a bundle (one line)."""
    from bot.bundle import check_output as check_bundle_output

    check_bundle_output(path, name=name)


def check_report_folder(path: str | Path, *, name: str = "--output") -> None:
    """Refuse, before any work, a report folder that is a file or cannot be created (one line)."""
    from bot.fileio import check_output_folder
    from finetune.config import ConfigError

    check_output_folder(path, error=ConfigError, name=name)


def cmd_predict(args: argparse.Namespace) -> int:
    from bot.classifier import IntentClassifier
    from bot.validation import check_message
    from finetune.config import ConfigError

    if args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: expected 1 or more")
    texts = [line.rstrip("\n") for line in sys.stdin] if args.texts == ["-"] else args.texts
    # Blank lines are skipped; any other text must pass the message rule of every entry point.
    texts = [check_message(t, name=f"text {n}") for n, t in enumerate(texts, start=1) if t.strip()]
    classifier = IntentClassifier.from_bundle(args.model, backend=args.backend)
    for text, prediction in zip(texts, classifier.predict(texts, top_k=args.top_k)):
        print(json.dumps({"text": text, **prediction.to_dict(), "model_version": classifier.version}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from finetune.export import ParityError, export_bundle

    if not 0 < args.tolerance < 1:
        print("supportbot export: error: --tolerance must be between 0 and 1", file=sys.stderr)
        return 2
    try:
        _, summary = export_bundle(args.model, data=args.data, tolerance=args.tolerance,
                                   log=lambda msg: print(msg, file=sys.stderr))
    except ParityError as exc:
        print(f"supportbot export: {one_line(exc)}; {args.model} keeps serving on PyTorch", file=sys.stderr)
        return 1
    print_summary("export summary", summary)
    return 0


def check_evaluate_options(args: argparse.Namespace) -> None:
    from finetune.config import ConfigError

    for name in ("min_accuracy", "min_oos_recall"):
        value = getattr(args, name, None)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} {value:g}: expected a share between 0 and 1")
    if args.worst < 0:
        raise ConfigError(f"--worst {args.worst}: expected 0 or more")
    if args.latency_sample < 1:
        raise ConfigError(f"--latency-sample {args.latency_sample}: expected 1 or more")
    if args.cv is not None and args.cv < 2:
        raise ConfigError(f"--cv {args.cv}: cross-validation needs at least 2 folds")
    if args.cv is not None and args.compare:
        raise ConfigError("--cv and --compare cannot be combined: compare two bundles on a test set instead")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """0 when done (and the gates pass), 1 when a gate fails; the report is written either way."""
    check_evaluate_options(args)
    check_report_folder(args.output)
    from finetune import evaluate
    from finetune.report import print_summary, write_outputs
    from finetune.report_model import gate

    evaluation = evaluate.run(
        args.model, args.data, compare=args.compare, cv=args.cv, worst=args.worst, latency_sample=args.latency_sample,
        progress=not args.quiet, require_out_of_scope=args.min_oos_recall is not None, questions=args.questions,
    )
    evaluation.report.gate = gate(evaluation.report, args.min_accuracy, args.min_oos_recall)
    out_dir = write_outputs(Path(args.output), evaluation)
    print_summary(evaluation.report, out_dir)
    if not evaluation.report.gate.passed:
        print(f"supportbot evaluate: gate failed: {evaluation.report.gate.reason}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.server import run  # binds the port before torch is imported (serve/server.py)

    return run(model=ensure_default_model(args.model), host=args.host, port=args.port, config=args.config,
               workers=args.workers)


def _serve_settings(config: str | None) -> Any:
    """Serving settings (serve.settings loads only for the commands that need it)."""
    from serve.settings import load_settings

    return load_settings(config)  # a SettingsError is a SupportbotError: one line, exit 2


def promote_bundle(model: Path, config: str | None) -> tuple[Any, Any]:
    """Record `model` as the fleet's model in the serving settings' database: (record, previous record)."""
    from serve.database import is_postgres, open_database
    from serve.fleet import FLEET_FILE, FleetStore

    settings = _serve_settings(config)
    url = settings.database_url.get_secret_value() if settings.database_url is not None else None
    engine = open_database(url, pool_size=1) if url and is_postgres(url) else None
    if url and engine is None:
        from serve.database import check_url

        check_url(url)
    try:
        store = FleetStore(engine=engine) if engine is not None else FleetStore(
            sqlite_path=settings.data_dir / FLEET_FILE)
        previous = store.get()
        record = store.promote(model)
    finally:
        if engine is not None:
            engine.dispose()
    return record, previous


def cmd_promote(args: argparse.Namespace) -> int:
    record, previous = promote_bundle(Path(args.model), args.config)
    print_summary("promoted", {"model": record.path, "version": record.version, "sha256": record.sha256[:16],
                               "generation": record.generation,
                               "previous version": previous.version if previous else "-"})
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from serve.database import run_upgrade_command

    settings = _serve_settings(args.config)
    url = settings.database_url.get_secret_value() if settings.database_url is not None else None
    print_summary("database upgrade", run_upgrade_command(url))
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from finetune.data import DataError
    from finetune.discover import DiscoverConfig, discover, read_texts, write_outputs

    for name in ("k_min", "k_max", "k_step", "min_cluster_size"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive number")
    if args.neighbours is not None and args.neighbours < 0:
        raise DataError(f"--neighbours {args.neighbours}: expected 0 or more")
    if args.k_min > args.k_max:
        raise DataError(f"--k-min {args.k_min} is above --k-max {args.k_max}")
    if args.known and not (Path(args.known) / "bundle.json").is_file():
        raise DataError(f"--known {args.known}: not a model bundle (no bundle.json)")
    check_report_folder(args.output)
    texts = read_texts(args.data)
    bar: Any = None

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=stage, unit="k", leave=False, disable=None)
        bar.update(done - bar.n)

    cfg = DiscoverConfig(k_min=args.k_min, k_max=args.k_max, k_step=args.k_step, min_cluster_size=args.min_cluster_size,
                         progress=progress, base=args.base or DiscoverConfig.base, neighbours=args.neighbours)
    result = discover(texts, cfg, known_model=args.known, progress=not args.quiet)
    if bar is not None:
        bar.close()
    written = write_outputs(result, Path(args.output))
    print_clusters(result)
    print_summary("discovery summary", {
        "messages": len(texts), "set aside as known": len(result.known), "clustered": len(result.texts),
        "encoder": result.base, "neighbours averaged": result.neighbours, "k chosen (silhouette)": result.k, "silhouette": result.silhouettes[result.k],
        "candidate intents": len(result.clusters), "noise (-1)": result.noise,
        "assignments": str(written["assignments"]), "picture": str(written["picture"]),
        "draft pack": str(written["pack"].parent),
    })
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from bot.classifier import IntentClassifier
    from bot.review import build_queue, locked_corrections
    from finetune.config import ConfigError

    if args.limit < 1 or args.offset < 0 or (args.group is not None and args.group < 0):
        raise ConfigError("--limit must be 1 or more, --offset and --group 0 or more")
    if args.similarity is not None and not 0 < args.similarity <= 1:
        raise ConfigError(f"--similarity {args.similarity:g}: expected a cosine similarity in (0, 1]")
    if args.margin is not None and not 0 <= args.margin <= 1:
        raise ConfigError(f"--margin {args.margin:g}: expected a probability difference in [0, 1]")
    settings = _serve_settings(args.config)
    model = Path(args.model) if args.model else settings.model or ensure_default_model(None)
    if not (Path(model) / "bundle.json").is_file():
        raise ConfigError(f"--model {model}: not a model bundle (no bundle.json)")
    turns = _stored_turns(settings)
    with locked_corrections(settings.corrections_path) as corrections:
        labelled = corrections.labelled()
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(f"measuring and grouping {len(turns):,} stored turns", spinner="dots"):
        classifier = IntentClassifier.from_bundle(model)
        queue = build_queue(turns, classifier, similarity=args.similarity or settings.review_similarity,
                            margin=args.margin, labelled=labelled)
    items = [i for i in queue.listed(args.order) if args.group is None or i.group == args.group]
    shown = items[args.offset: args.offset + args.limit]
    print_queue(shown, len(items))
    print_summary("review queue", {
        "turns read": queue.scanned_turns, "queued messages": len(queue.items), "groups": queue.groups,
        "largest group": queue.items[0].group_size if queue.items else 0,
        "left out (labelled)": queue.labelled, "margin below": queue.margin, "similarity": queue.similarity,
        "model": queue.model_version, "corrections file": str(settings.corrections_path),
    })
    return 0


def _stored_turns(settings: Any) -> list[dict[str, Any]]:
    """The newest review_max_turns turns of the serving settings' session store (PostgreSQL or SQLite)."""
    from bot.sessions import SQLiteSessionStore
    from serve.database import check_url, is_postgres, open_database

    url = settings.database_url.get_secret_value() if settings.database_url is not None else None
    if url:
        if not is_postgres(url):
            check_url(url)
        from serve.postgres import PostgresSessionStore

        engine = open_database(url, upgrade=False, pool_size=1)
        try:
            return PostgresSessionStore(engine).recent_turns(settings.review_max_turns)
        finally:
            engine.dispose()
    if not settings.sessions_path.is_file():
        return []
    with SQLiteSessionStore(settings.sessions_path) as store:
        return store.recent_turns(settings.review_max_turns)


def print_queue(items: list[Any], total: int) -> None:
    """The queue as a table: group, size, why, the model's intent now, margin, text, when."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"review queue ({len(items)} of {total} messages)", header_style="bold")
    for column in ("group", "size", "why", "predicted", "margin", "message", "at"):
        table.add_column(column, justify="right" if column in ("group", "size", "margin") else "left")
    for item in items:
        table.add_row(str(item.group), str(item.group_size), item.reason.replace("_", " "), item.predicted or "",
                      f"{item.margin:.2f}", item.text, item.at[:16].replace("T", " "))
    Console().print(table)


def cmd_retrain(args: argparse.Namespace) -> int:
    """0 when the new bundle is not worse (promoted with --promote), 1 when it is worse."""
    from finetune.config import ConfigError
    from finetune.retrain import check_retrain_outputs, retrain

    for name in ("model", "corrections"):
        if not Path(getattr(args, name)).exists():
            raise ConfigError(f"--{name} {getattr(args, name)}: no such file or folder")
    if not (Path(args.model) / "bundle.json").is_file():
        raise ConfigError(f"--model {args.model}: not a model bundle (no bundle.json)")
    check_retrain_outputs(Path(args.output))  # the bundle, OUTPUT.data/ and OUTPUT.eval/: before any training
    if args.promote:
        _serve_settings(args.config)  # a bad settings file fails now, not after training

    def promote(path: Path) -> int:
        record, _previous = promote_bundle(path, args.config)
        return int(record.generation)

    result = retrain(args.model, args.corrections, args.output, test=args.test, overrides=args.overrides,
                     promote=promote if args.promote else None, progress=not args.quiet,
                     log=lambda msg: print(msg, file=sys.stderr))
    print_summary("retrain summary", result.summary)
    if not result.not_worse:
        print(f"supportbot retrain: the new bundle is worse on {result.test_spec} ({result.accuracy:.4f} < "
              f"{result.serving_accuracy:.4f}); nothing promoted", file=sys.stderr)
        return 1
    return 0


def cmd_knowledge(args: argparse.Namespace) -> int:
    from finetune.config import ConfigError
    from finetune.knowledge_refresh import refresh

    if not (Path(args.model) / "bundle.json").is_file():
        raise ConfigError(f"--model {args.model}: not a model bundle (no bundle.json)")
    check_output(args.output)
    if args.promote:
        _serve_settings(args.config)  # a bad settings file fails now, not after the build
    result = refresh(args.model, args.output, articles=args.articles, overrides=args.overrides, progress=not args.quiet,
                     log=lambda msg: print(msg, file=sys.stderr))
    for what, slugs in (("added", result.changes.added), ("removed", result.changes.removed),
                        ("changed", result.changes.changed)):
        if slugs:
            print(f"articles {what}: {', '.join(slugs)}", file=sys.stderr)
    summary = dict(result.summary)
    if args.promote:
        record, _previous = promote_bundle(result.bundle.path, args.config)
        summary["promoted"] = f"yes (generation {record.generation})"
    print_summary("knowledge summary", summary)
    return 0


def print_clusters(result: Any, limit: int = 30) -> None:
    """The largest candidate intents: name, size, key terms, one representative and one borderline example."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"candidate intents (largest {min(limit, len(result.clusters))} of {len(result.clusters)})",
                  header_style="bold")
    for column in ("cluster", "name", "size", "representative", "borderline"):
        table.add_column(column, justify="right" if column in ("cluster", "size") else "left")
    for info in result.clusters[:limit]:
        table.add_row(str(info.cluster), info.name, str(info.size), info.representative[0] if info.representative else "",
                      info.borderline[0] if info.borderline else "")
    Console().print(table)


def cmd_chat(args: argparse.Namespace) -> int:
    from bot.terminal import run

    return run(model=ensure_default_model(args.model), session_id=args.session)


def ensure_default_model(model: str | None) -> Path:
    """The bundle to use: the one named, or the default shop model (trained now when missing)."""
    if model:
        return Path(model)
    path = default_model_dir()
    if not (path / "bundle.json").is_file():
        from finetune.config import load_config
        from finetune.train import train

        check_output(path, name="the default model folder")
        print(f"No model at {path}: training the default shop model (head strategy, about a minute)...", file=sys.stderr)
        result = train(load_config(None, [f"output={json.dumps(str(path))}"]), log=lambda msg: print(msg, file=sys.stderr))
        print_summary("default model", result.summary)
    return path


def print_summary(title: str, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        table.add_row(key, str(value))
    Console(stderr=False).print(table)


# How idle OpenMP threads wait while serving (read once, when torch loads OpenMP). Spinning without
# end made one forward pass ~10x slower on a busy 2-core machine: the spinning threads took the
# cores from the event loop. Sleeping at once (PASSIVE alone) made every op of a forward pass wake
# its threads: an int8 single message took 10.2 ms. A short spin (libgomp, which torch's Linux
# wheels use) keeps the threads awake between the ops of one pass only: 4.8 ms (BENCHMARKS.md).
SERVING_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}


def set_serving_openmp() -> None:
    """Set SERVING_OPENMP where the environment does not already choose; call before importing torch."""
    for name, value in SERVING_OPENMP.items():
        os.environ.setdefault(name, value)


def one_line(exc: BaseException) -> str:
    """The error's message on one line (a message that spans lines is joined, never cut)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


COMMANDS = {"train": cmd_train, "export": cmd_export, "predict": cmd_predict, "evaluate": cmd_evaluate, "serve": cmd_serve, "chat": cmd_chat,
            "promote": cmd_promote, "db": cmd_db, "discover": cmd_discover, "review": cmd_review, "retrain": cmd_retrain,
            "knowledge": cmd_knowledge}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        set_serving_openmp()

    from bot.errors import SupportbotError

    try:
        return COMMANDS[args.command](args)
    except SupportbotError as exc:  # every error a user can fix: one line, exit 2 (bot/errors.py)
        print(f"supportbot {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"supportbot {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
