"""The agent layer's benchmark: classification of task descriptions.

Prints one JSON document.

    python bench/agents.py [--data /work/shared/data/task_types_dev.jsonl]

Classification is measured on real commit subjects (the vuejs/core history in shared/data,
their conventional-commit prefix stripped and kept as the label: bugfix, documentation,
testing, refactoring, performance, devops). The labels are noisy by nature ("fix typo" is
documentation because its author said so), so the classifier is compared with a plain
keyword baseline on the same file, not with 100%:

- ``baseline``: the first of the six label words found in the text (test, fix, doc,
  refactor, perf, ci/build), else no answer;
- ``classifier``: baton.agents.classify limited to the file's six types (rules, then the
  embeddings when no rule is sure, else ``general``, which counts as wrong);
- ``rules_only``: the same without the embeddings;
- ``all_types``: the classifier free to answer any of its 14 types (api_endpoint, ...).

Reported: accuracy, per-type precision and recall, and the accuracy among the quarter of
lines the classifier is most confident about. Targets: accuracy at least 1.5 times the
baseline's, and at least 0.65 on that most-confident quarter. Nothing was tuned on
individual lines of the file.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from baton.agents.classify import classify

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "task_types_dev.jsonl"
KEYWORDS = {
    "testing": r"\btest",
    "bugfix": r"\bfix",
    "documentation": r"\bdoc",
    "refactoring": r"\brefactor",
    "performance": r"\bperf",
    "devops": r"\b(?:ci|build)\b",
}


def baseline(text: str) -> str:
    for label, pattern in KEYWORDS.items():
        if re.search(pattern, text, re.I):
            return label
    return "none"


def figures(labels: list[str], guesses: list[str], confidences: list[float] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "accuracy": round(sum(a == b for a, b in zip(labels, guesses, strict=True)) / len(labels), 4)
    }
    per_type = {}
    for t in sorted(set(labels)):
        hits = sum(a == t and b == t for a, b in zip(labels, guesses, strict=True))
        said = sum(b == t for b in guesses)
        per_type[t] = {
            "precision": round(hits / said, 3) if said else None,
            "recall": round(hits / sum(a == t for a in labels), 3),
        }
    out["per_type"] = per_type
    if confidences is not None:
        ranked = sorted(zip(confidences, labels, guesses, strict=True), key=lambda x: -x[0])[
            : len(labels) // 4
        ]
        out["accuracy_most_confident_quarter"] = round(sum(a == b for _, a, b in ranked) / len(ranked), 4)
    return out


def classification(data: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [r["type"] for r in rows]
    types = sorted(set(labels))
    out: dict[str, Any] = {"lines": len(rows), "types": types}
    out["baseline"] = figures(labels, [baseline(r["text"]) for r in rows])
    for name, among, semantic in (
        ("classifier", types, True),
        ("rules_only", types, False),
        ("all_types", None, True),
    ):
        started = time.perf_counter()
        results = [classify(r["text"], among=among, semantic=semantic) for r in rows]
        seconds = time.perf_counter() - started
        out[name] = figures(labels, [c.type for c in results], [c.confidence for c in results])
        out[name]["methods"] = {
            m: sum(c.method == m for c in results) for m in ("rules", "prototypes", "fallback")
        }
        out[name]["ms_per_line"] = round(1000 * seconds / len(rows), 3)
    ratio = out["classifier"]["accuracy"] / out["baseline"]["accuracy"]
    confident = out["classifier"]["accuracy_most_confident_quarter"]
    out["target"] = {
        "accuracy_over_baseline": round(ratio, 3),
        "at_least": 1.5,
        "most_confident_quarter_at_least": 0.65,
        "met": ratio >= 1.5 and confident >= 0.65,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    print(json.dumps({"classification": classification(args.data)}, indent=2))


if __name__ == "__main__":
    main()
