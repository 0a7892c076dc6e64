"""Tasks of the demo pipeline: a small, deterministic stand-in for code generation.

Each "atom" is one function of the feature; generating it takes a moment (as a model
call would), the assembled module is written to the working directory, and a shell step
runs its self-test.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import baton

ATOMS = {
    "slugify": ("text", "'-'.join(text.lower().split())", "slugify('Hello World') == 'hello-world'"),
    "word_count": ("text", "len(text.split())", "word_count('a b c') == 3"),
    "initials": ("text", "''.join(w[0].upper() for w in text.split())", "initials('ada lovelace') == 'AL'"),
    "reverse_words": ("text", "' '.join(reversed(text.split()))", "reverse_words('a b') == 'b a'"),
    "is_palindrome": ("text", "text.lower() == text.lower()[::-1]", "is_palindrome('Level')"),
    "vowels": ("text", "sum(c in 'aeiou' for c in text.lower())", "vowels('baton') == 2"),
}


@baton.task(name="demo.spec")
async def spec(feature: str) -> dict[str, Any]:
    """Break the feature into atoms (one function each)."""
    await asyncio.sleep(0.3)
    return {"feature": feature, "atoms": sorted(ATOMS)}


@baton.task(name="demo.generate", estimate=lambda inputs: 0.6)
async def generate(atom: str, spec: dict[str, Any]) -> dict[str, str]:
    """Write one atom's code and its check."""
    if atom not in spec["atoms"]:
        raise baton.TaskFailed(f"atom {atom!r} is not in the spec")
    await asyncio.sleep(0.2 + 0.1 * (len(atom) % 5))
    arg, body, check = ATOMS[atom]
    code = f"def {atom}({arg}):\n    return {body}\n"
    return {"atom": atom, "code": code, "check": check}


@baton.task(name="demo.assemble")
def assemble(parts: list[dict[str, str]], path: str) -> dict[str, Any]:
    """Join the atoms into one module with a self-test, and write it."""
    checks = "\n".join(f"    assert {p['check']}, {p['check']!r}" for p in parts)
    module = "\n\n".join(p["code"] for p in parts)
    module += "\n\nif __name__ == '__main__':\n" + checks + "\n    print('all checks passed')\n"
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(module, encoding="utf-8")
    return {"path": str(target), "functions": len(parts), "code": module}


@baton.task(name="demo.report")
def report(
    feature: str, module: dict[str, Any], tests: dict[str, Any], notes: dict[str, Any], review: str
) -> str:
    """A short summary of what the pipeline produced."""
    highlights = "\n".join(f"  - {h}" for h in notes["highlights"])
    return (
        f"feature {feature}: {module['functions']} functions in {module['path']}\n"
        f"self-test: {tests['stdout'].strip()}\n"
        f"{notes['title']}:\n{highlights}\n"
        f"review: {' '.join(review.split())}"
    )
