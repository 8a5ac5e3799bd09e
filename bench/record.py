"""Appending a benchmark run to BENCHMARKS.md: command, machine, date, commit, figures.

BENCHMARKS.md holds one current table per benchmark at the top and every run below its `## History`
heading, oldest first. A run is appended at the end of the file as a `### title` entry under History
(the heading is added when the file has none), never rewritten: choosing which run is current is a
judgement (same settings? a quiet machine?), so the current table's row is updated by hand.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HISTORY = "## History"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_section(title: str, command: str, body: str) -> None:
    """Add `### title` with command, machine, date and commit, then `body` (markdown), to BENCHMARKS.md's History."""
    if not BENCHMARKS.exists():
        BENCHMARKS.write_text("# Benchmarks\n\nFigures recorded by the scripts in bench/.\n")
    text = BENCHMARKS.read_text(encoding="utf-8")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"\n### {title}\n\n"
        f"- command: `{command}`\n- machine: {machine()}\n- date: {stamp}, commit {_commit()}\n\n{body.rstrip()}\n"
    )
    if HISTORY not in text.splitlines():
        section = f"\n{HISTORY}\n\nEvery run as its script recorded it, oldest first.\n" + section
    with open(BENCHMARKS, "a", encoding="utf-8") as handle:
        handle.write(section)


def command_line(script: str) -> str:
    """How this benchmark was run: `python SCRIPT` and the arguments it was given."""
    return f"python {script}" + "".join(f" {arg}" for arg in sys.argv[1:])
