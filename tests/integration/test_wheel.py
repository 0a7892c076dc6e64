"""baton installed from its wheel, not from the source tree: the files it reads at run time
(each backend's ``queries.sql`` and migrations) must be inside the wheel.

The wheel is built offline (``--no-build-isolation --no-index``, with this venv's
setuptools) from a copy of the project, so no ``build/`` or ``*.egg-info`` left behind by an
earlier build can supply a file the package data leaves out. It is installed without its
dependencies into a fresh venv, which sees them through a ``.pth`` naming this venv's
site-packages. A path line in a ``.pth`` only extends ``sys.path``; the ``.pth`` files in that
folder, the editable install's (a path to this tree's src/) among them, are not processed, so the fresh
venv imports baton from the wheel alone (asserted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import PG_URL

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "baton"
TIMEOUT_S = 120

PLAN = """\
name: from-the-wheel
steps:
  - id: fetch
    task: echo
    with: {text: "shipped"}
  - id: left
    task: echo
    needs: [fetch]
    with: {text: "${{ steps.fetch.output.text }}"}
  - id: right
    task: echo
    needs: [fetch]
    with: {text: "right"}
"""


def _ignored(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__" or name.endswith((".pyc", ".egg-info"))


def _sh(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATON_DB", "PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@dataclass
class Installed:
    wheel: Path
    venv: Path
    site_packages: Path

    def baton(self, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
        """The installed console script, not ``python -m baton`` of this interpreter."""
        return _sh(self.venv / "bin" / "baton", *args, cwd=cwd)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    project = base / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(
        PACKAGE, project / "src" / "baton", ignore=lambda _, names: [n for n in names if _ignored(n)]
    )
    dist = base / "dist"
    pip = (sys.executable, "-m", "pip")
    built = _sh(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, project)
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("baton-*.whl")

    venv = base / "venv"
    made = _sh(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = _sh(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    assert purelib.returncode == 0, purelib.stderr
    site_packages = Path(purelib.stdout.strip())
    done = _sh(*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    assert done.returncode == 0, done.stderr
    (site_packages / "_baton_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return Installed(wheel, venv, site_packages)


def test_every_file_of_the_package_is_in_the_wheel(installed: Installed) -> None:
    in_source = {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and not any(_ignored(part) for part in path.relative_to(PACKAGE.parent).parts)
    }
    with zipfile.ZipFile(installed.wheel) as wheel:
        in_wheel = set(wheel.namelist())
    assert "baton/store/postgres/queries.sql" in in_source
    assert sorted(in_source - in_wheel) == []


def test_the_venv_imports_baton_from_the_wheel(installed: Installed, tmp_path: Path) -> None:
    where = _sh(installed.venv / "bin" / "python", "-c", "import baton; print(baton.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == installed.site_packages / "baton" / "__init__.py"


def _run_completes(installed: Installed, db: str, cwd: Path) -> None:
    plan = cwd / "plan.yaml"
    plan.write_text(PLAN)
    ran = installed.baton("run", plan, "--db", db, "--json", cwd=cwd)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    run_id = json.loads(ran.stdout)["id"]
    shown = installed.baton("show", run_id, "--db", db, "--json", cwd=cwd)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    run = json.loads(shown.stdout)
    assert run["status"] == "completed"
    assert {s["id"]: (s["status"], s["output"]) for s in run["steps"]} == {
        "fetch": ("succeeded", {"text": "shipped"}),
        "left": ("succeeded", {"text": "shipped"}),
        "right": ("succeeded", {"text": "right"}),
    }


def test_a_plan_runs_on_sqlite(installed: Installed, tmp_path: Path) -> None:
    _run_completes(installed, str(tmp_path / "baton.db"), tmp_path)


def test_a_plan_runs_on_postgres(installed: Installed, pg_schema: str, tmp_path: Path) -> None:
    separator = "&" if "?" in PG_URL else "?"
    _run_completes(installed, f"{PG_URL}{separator}schema={pg_schema}", tmp_path)
