"""How many intra-op threads this process takes: one rule for torch, ONNX Runtime and `--workers`.

Torch-free on purpose: the `--workers` supervisor splits the cores between its processes before any of
them loads a model, and importing torch there would cost it seconds and memory it never uses.
"""

from __future__ import annotations

import os


def serving_threads(num_threads: int | None = None) -> int:
    """This process's share of the cores: `num_threads`, else $SUPPORTBOT_THREADS, else $OMP_NUM_THREADS, else the
    CPUs it may run on.

    $OMP_NUM_THREADS is the knob PyTorch and ONNX Runtime users already set to share a machine; setting torch's
    threads from the CPU count alone overrode it, and two processes meant to run at one thread each ran at two,
    oversubscribed (several times slower on two cores). Its first entry counts (OpenMP allows "4,2" for nesting).
    """
    if num_threads:
        return num_threads
    configured = int(os.environ.get("SUPPORTBOT_THREADS", "0") or 0)
    if configured > 0:
        return configured
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
