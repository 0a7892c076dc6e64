"""Process-level settings for processes that run baton (the CLI, workers, benchmarks)."""

from __future__ import annotations

import gc

#: (gen0, gen1, gen2) thresholds of the cyclic garbage collector while executing.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """Run the cyclic garbage collector less often.

    Executing a plan allocates a few short-lived objects per step, and a large plan keeps
    tens of thousands of long-lived ones; with CPython's default thresholds (700, 10, 10)
    the collector then runs every few hundred steps and scans them all each time, which
    costs a quarter of the engine's throughput on a 10,000-step plan. Raising the gen-0
    threshold, as many Python servers do, keeps collection but makes it rare. The CLI calls
    this; an application embedding the Engine may call it too. It never lowers a threshold.
    """
    if gc.get_threshold()[0] < GC_THRESHOLDS[0]:
        gc.set_threshold(*GC_THRESHOLDS)
