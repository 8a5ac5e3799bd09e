"""Appending a benchmark section to BENCHMARKS.md: command, machine, date, figures."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


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
    """Add `## title` with command, machine, date and commit, then `body` (markdown), to BENCHMARKS.md."""
    if not BENCHMARKS.exists():
        BENCHMARKS.write_text("# Benchmarks\n\nFigures recorded by the scripts in bench/; newest sections last.\n")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"\n## {title}\n\n"
        f"- command: `{command}`\n- machine: {machine()}\n- date: {stamp}, commit {_commit()}\n\n{body.rstrip()}\n"
    )
    with open(BENCHMARKS, "a", encoding="utf-8") as handle:
        handle.write(section)


def command_line(script: str) -> str:
    """How this benchmark was run: `python SCRIPT` and the arguments it was given."""
    return f"python {script}" + "".join(f" {arg}" for arg in sys.argv[1:])
