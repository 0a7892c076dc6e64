"""The demo that `make demo` runs, run the same way (in a copy of examples/)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_demo_pipeline_completes_with_its_model_steps(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    argv = [sys.executable, "-m", "baton", "run", "examples/feature_pipeline.yaml", "--db", ".baton/demo.db"]
    argv += ["--import", "examples.demo_tasks", "--llm", "examples/llm.yaml"]
    text = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert text.returncode == 0, text.stdout + text.stderr
    assert (
        # priced as gpt-4o-mini: $0.15 / $0.60 per million tokens in / out
        "model calls: 3 (1 rejected and retried), $0.000297 — gpt-4o-mini: 3 calls, 1,410 in + 143 out tokens"
        in text.stdout
    )
    assert "run budget: $0.000297 of $0.050000, 1,553 of 200,000 tokens spent" in text.stdout
    assert "self-test: all checks passed" in text.stdout
    assert (tmp_path / ".baton" / "demo" / "text_utils.py").exists()

    shown = subprocess.run(
        [sys.executable, "-m", "baton", "show", text.stdout.split()[1], "--db", ".baton/demo.db", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    run = json.loads(shown.stdout)
    notes = [a for a in run["attempts"] if a["step"] == "release-notes"]
    assert [(a["attempt"], a["status"]) for a in notes] == [(1, "failed"), (2, "succeeded")]
    assert notes[0]["error"].startswith("the answer is not JSON")
    assert notes[1]["detail"]["temperature"] == 0.5
    assert "Your previous answer was rejected:\n- the answer is not JSON" in notes[1]["detail"]["prompt"]
