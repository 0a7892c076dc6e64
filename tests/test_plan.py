"""Plans: loading (YAML, JSON, Python), references, validation, DAG analysis, policies."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from baton import Engine, Plan, Policy, Registry, RetryPolicy, Step, TaskContext
from baton.errors import PlanError, Problem, UsageError
from baton.plan import Dag, analyze, load_plan, parse_plan
from baton.plan.refs import Ref, parse_ref, resolve
from baton.plan.validate import read_plan_text
from baton.store import MemoryStore, SQLiteStore

# -- helpers ------------------------------------------------------------------------------


def summarize(ctx: TaskContext, text: str, max_words: int = 50) -> dict[str, Any]:
    """A user task with one required and one optional input, for signature checks."""
    return {"summary": " ".join(text.split()[:max_words])}


@pytest.fixture
def registry() -> Registry:
    reg = Registry.default()
    reg.add(summarize, name="summarize")
    return reg


def problems_of(raw: Any, registry: Registry) -> list[Problem]:
    with pytest.raises(PlanError) as info:
        parse_plan(raw, registry)
    return info.value.problems


def problems_of_text(text: str, registry: Registry) -> list[Problem]:
    with pytest.raises(PlanError) as info:
        parse_plan(read_plan_text(text), registry)
    return info.value.problems


def has(problems: list[Problem], where: str, *fragments: str) -> bool:
    return any(p.where == where and all(f in p.message for f in fragments) for p in problems)


def step(id: str, task: str = "echo", **fields: Any) -> dict[str, Any]:
    return {"id": id, "task": task, **fields}


FEATURE_YAML = """\
name: feature-x
description: spec, code, check
policy:
  max_parallel: 4
  timeout_s: 60
  retry: {attempts: 3, backoff_s: 0.5}
  barrier: wave
steps:
  - id: spec
    task: echo
    with: {prompt: "Write a spec"}
  - id: code
    task: echo
    needs: [spec]
    with:
      prompt: "Implement: ${{ steps.spec.output.prompt }}"
    retry: {attempts: 4, temperatures: [0.7, 0.5, 0.3, 0.3]}
    validate: [{kind: not_empty}]
  - id: wait
    task: sleep
    needs: [code]
    role: tester
    with: {seconds: 0.5}
    timeout_s: 120
"""


# -- loading ------------------------------------------------------------------------------


def test_yaml_text_becomes_a_typed_plan(registry: Registry) -> None:
    plan = parse_plan(read_plan_text(FEATURE_YAML), registry)

    assert plan.name == "feature-x"
    assert plan.description == "spec, code, check"
    assert plan.policy.max_parallel == 4
    assert plan.policy.timeout_s == 60
    assert plan.policy.retry == RetryPolicy(attempts=3, backoff_s=0.5)
    assert plan.policy.barrier == "wave"
    assert [s.id for s in plan.steps] == ["spec", "code", "wait"]
    code = plan.steps[1]
    assert code.needs == ["spec"]
    assert code.inputs == {"prompt": "Implement: ${{ steps.spec.output.prompt }}"}
    assert code.retry is not None and code.retry.attempts == 4
    assert code.retry.temperatures == [0.7, 0.5, 0.3, 0.3]
    assert [v.kind for v in code.validate_] == ["not_empty"]
    wait = plan.steps[2]
    assert (wait.task, wait.role, wait.timeout_s, wait.inputs) == ("sleep", "tester", 120, {"seconds": 0.5})


def test_json_text_gives_the_same_plan_as_yaml(registry: Registry) -> None:
    raw = yaml.safe_load(FEATURE_YAML)
    from_yaml = parse_plan(read_plan_text(FEATURE_YAML), registry)
    from_json = parse_plan(read_plan_text(json.dumps(raw, indent=2)), registry)
    assert from_json == from_yaml


async def test_engine_loads_plan_text_yaml_and_json(registry: Registry) -> None:
    raw = yaml.safe_load(FEATURE_YAML)
    async with Engine("memory://", registry=registry) as engine:
        assert engine.load(FEATURE_YAML).name == "feature-x"
        assert engine.load(json.dumps(raw, indent=2)).name == "feature-x"
        assert engine.load(raw).name == "feature-x"


async def test_engine_loads_compact_single_line_json_text(registry: Registry) -> None:
    # json.dumps() output is one line; a realistic plan is longer than a file name may be.
    raw = yaml.safe_load(FEATURE_YAML)
    text = json.dumps(raw)
    assert "\n" not in text and len(text) > 300
    async with Engine("memory://", registry=registry) as engine:
        plan = engine.load(text)
    assert plan == parse_plan(raw, registry)


async def test_plan_files_load_by_path(tmp_path: Path, registry: Registry) -> None:
    raw = yaml.safe_load(FEATURE_YAML)
    yaml_file = tmp_path / "plan.yaml"
    yaml_file.write_text(FEATURE_YAML, encoding="utf-8")
    json_file = tmp_path / "plan.json"
    json_file.write_text(json.dumps(raw, indent=2), encoding="utf-8")

    expected = parse_plan(raw, registry)
    assert load_plan(yaml_file, registry) == expected
    assert load_plan(json_file, registry) == expected
    async with Engine("memory://", registry=registry) as engine:
        assert engine.load(yaml_file) == expected
        assert engine.load(str(json_file)) == expected


def test_missing_plan_file_is_a_plan_error(tmp_path: Path, registry: Registry) -> None:
    with pytest.raises(PlanError) as info:
        load_plan(tmp_path / "nope.yaml", registry)
    assert "no such file" in info.value.problems[0].message


def test_bad_plan_file_names_the_file(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsteps: []\n", encoding="utf-8")
    with pytest.raises(PlanError) as info:
        load_plan(path, registry)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)


async def test_python_built_plan_matches_the_file_form(registry: Registry) -> None:
    plan = Plan(
        name="feature-x",
        description="spec, code, check",
        policy=Policy(
            max_parallel=4, timeout_s=60, retry=RetryPolicy(attempts=3, backoff_s=0.5), barrier="wave"
        ),
        steps=[
            Step(id="spec", task="echo", inputs={"prompt": "Write a spec"}),
            Step(
                id="code",
                task="echo",
                needs=["spec"],
                inputs={"prompt": "Implement: ${{ steps.spec.output.prompt }}"},
                retry=RetryPolicy(attempts=4, temperatures=[0.7, 0.5, 0.3, 0.3]),
                validate_=[{"kind": "not_empty"}],
            ),
            Step(
                id="wait", task="sleep", needs=["code"], role="tester", inputs={"seconds": 0.5}, timeout_s=120
            ),
        ],
    )
    async with Engine("memory://", registry=registry) as engine:
        assert engine.load(plan) == plan
    assert plan == parse_plan(read_plan_text(FEATURE_YAML), registry)

    # The file form uses the file spellings, and reading it back gives the same plan
    # (this is how a run's plan is stored and reloaded on resume).
    as_file = plan.to_dict()
    assert as_file["steps"][1]["with"] == {"prompt": "Implement: ${{ steps.spec.output.prompt }}"}
    assert as_file["steps"][1]["validate"] == [{"kind": "not_empty"}]
    assert "inputs" not in as_file["steps"][1] and "validate_" not in as_file["steps"][1]
    assert Plan.model_validate(as_file) == plan
    assert Plan.model_validate(json.loads(json.dumps(as_file))) == plan


def test_python_spellings_accepted_in_plain_data(registry: Registry) -> None:
    plan = parse_plan(
        {
            "name": "p",
            "steps": [{"id": "a", "task": "echo", "inputs": {"x": 1}, "validate_": [{"kind": "json"}]}],
        },
        registry,
    )
    assert plan.steps[0].inputs == {"x": 1}
    assert plan.steps[0].validate_[0].kind == "json"


async def test_python_built_plan_is_validated_with_every_problem(registry: Registry) -> None:
    plan = Plan(
        name="p",
        steps=[
            Step(id="a", task="echo", needs=["c"]),
            Step(id="b", task="echo", needs=["a"]),
            Step(id="c", task="echo", needs=["b"]),
            Step(id="d", task="no.such.task", inputs={"v": "${{ steps.ghost.output }}"}),
        ],
    )
    async with Engine("memory://", registry=registry) as engine:
        with pytest.raises(PlanError) as info:
            engine.load(plan)
    problems = info.value.problems
    assert any(p.message.startswith("cycle: ") for p in problems)
    assert has(problems, "steps[3].task", "unknown task 'no.such.task'")
    assert has(problems, "steps[3].with.v", "unknown step 'ghost'")


async def test_python_built_plan_without_steps_is_rejected(registry: Registry) -> None:
    async with Engine("memory://", registry=registry) as engine:
        with pytest.raises(PlanError) as info:
            engine.load(Plan(name="empty", steps=[]))
    assert has(info.value.problems, "steps", "at least one step")


# -- references ---------------------------------------------------------------------------

OUTPUTS: dict[str, Any] = {
    "a": {"items": [{"name": "first"}, {"name": "second"}], "n": 3, "obj": {"k": "v"}, "first": "Ada"},
    "b": {"last": "Lovelace"},
}


def lookup(ref: Ref) -> Any:
    return ref.pick(OUTPUTS[ref.step])


def test_reference_syntax_parses_fields_and_indexes() -> None:
    ref = parse_ref("steps.a.output.items[1].name")
    assert ref.step == "a"
    assert ref.path == ("items", 1, "name")
    assert ref.pick(OUTPUTS["a"]) == "second"
    assert parse_ref("steps.a.output").path == ()


def test_whole_value_reference_keeps_the_json_type() -> None:
    assert resolve("${{ steps.a.output.items }}", lookup) == OUTPUTS["a"]["items"]
    assert resolve("${{ steps.a.output.n }}", lookup) == 3
    assert resolve("${{steps.a.output.obj}}", lookup) == {"k": "v"}
    assert resolve("${{ steps.a.output.items[0] }}", lookup) == {"name": "first"}
    assert resolve("${{ steps.a.output }}", lookup) == OUTPUTS["a"]


def test_embedded_reference_is_interpolated_as_text() -> None:
    text = (
        "n=${{ steps.a.output.n }}; name=${{ steps.a.output.items[0].name }}; obj=${{ steps.a.output.obj }}"
    )
    assert resolve(text, lookup) == 'n=3; name=first; obj={"k": "v"}'


def test_two_references_making_up_a_whole_string_are_both_interpolated() -> None:
    text = "${{ steps.a.output.first }} ${{ steps.b.output.last }}"
    assert resolve(text, lookup) == "Ada Lovelace"
    assert resolve("${{ steps.a.output.n }}${{ steps.a.output.n }}", lookup) == "33"


def test_references_resolve_inside_nested_inputs() -> None:
    inputs = {
        "list": ["${{ steps.a.output.n }}", "x"],
        "map": {"deep": "<${{ steps.b.output.last }}>"},
        "k": 1,
    }
    assert resolve(inputs, lookup) == {"list": [3, "x"], "map": {"deep": "<Lovelace>"}, "k": 1}
    assert resolve("no refs here", lookup) == "no refs here"


def test_missing_part_of_an_output_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        resolve("${{ steps.a.output.nope }}", lookup)
    with pytest.raises(KeyError):
        resolve("${{ steps.a.output.n[0] }}", lookup)


def test_reference_to_a_transitive_need_is_valid(registry: Registry) -> None:
    plan = parse_plan(
        {
            "name": "p",
            "steps": [
                step("a"),
                step("b", needs=["a"]),
                step(
                    "c", needs=["b"], **{"with": {"v": "${{ steps.a.output.x }} and ${{ steps.b.output }}"}}
                ),
            ],
        },
        registry,
    )
    assert plan.steps[2].needs == ["b"]


# -- validation: one problem of each kind -------------------------------------------------


def cycle_edges(message: str) -> list[tuple[str, str]]:
    assert message.startswith("cycle: ")
    nodes = message.removeprefix("cycle: ").split(" -> ")
    assert nodes[0] == nodes[-1], "a cycle path is closed"
    return list(itertools.pairwise(nodes))


def test_cycle_is_reported_with_its_path(registry: Registry) -> None:
    # Work flows a -> b -> c -> a: b needs a, c needs b, a needs c.
    problems = problems_of(
        {"name": "p", "steps": [step("a", needs=["c"]), step("b", needs=["a"]), step("c", needs=["b"])]},
        registry,
    )
    cycles = [p for p in problems if p.message.startswith("cycle: ")]
    assert len(cycles) == 1
    edges = cycle_edges(cycles[0].message)
    assert len(edges) == 3
    assert set(edges) == {("a", "b"), ("b", "c"), ("c", "a")}


def test_cycle_path_leaves_out_steps_that_only_hang_off_it(registry: Registry) -> None:
    problems = problems_of(
        {
            "name": "p",
            "steps": [
                step("root"),
                step("x", needs=["y", "root"]),
                step("y", needs=["x"]),
                step("tail", needs=["y"]),
            ],
        },
        registry,
    )
    [cycle] = [p for p in problems if p.message.startswith("cycle: ")]
    assert set(cycle_edges(cycle.message)) == {("x", "y"), ("y", "x")}


def test_step_needing_itself(registry: Registry) -> None:
    problems = problems_of({"name": "p", "steps": [step("a", needs=["a"])]}, registry)
    assert has(problems, "steps[0].needs", "'a' needs itself")


def test_unknown_needs(registry: Registry) -> None:
    problems = problems_of({"name": "p", "steps": [step("a"), step("b", needs=["a", "zz"])]}, registry)
    assert problems == [Problem("steps[1].needs", "unknown step 'zz' in needs of 'b'")]


def test_duplicate_ids(registry: Registry) -> None:
    problems = problems_of({"name": "p", "steps": [step("a"), step("b"), step("a")]}, registry)
    assert has(problems, "steps[2].id", "duplicate step id 'a'", "steps[0]")


def test_unknown_task(registry: Registry) -> None:
    problems = problems_of(
        {"name": "p", "steps": [step("a", "llm.nothing"), step("b", "llm.other")]}, registry
    )
    assert [p.where for p in problems] == ["steps[0].task", "steps[1].task"]
    first, second = (p.message for p in problems)
    # The first one says what is known and how a @baton.task becomes known; once is enough.
    assert first.startswith("unknown task 'llm.nothing' in step 'a' (known: aggregate, echo, fail, filter, ")
    known = first.split("(known: ", 1)[1].split(";", 1)[0].split(", ")
    assert {"aggregate", "echo", "fail", "filter", "python", "shell", "sleep", "transform"} <= set(known)
    assert known == sorted(known)
    assert "--import MODULE" in first
    assert second == "unknown task 'llm.other' in step 'b'"


def test_a_step_with_a_type_error_still_gets_its_task_checked(registry: Registry) -> None:
    problems = problems_of({"name": "p", "steps": [step("a", "nope", timeout_s="x")]}, registry)
    assert [p.where for p in problems] == ["steps[0].timeout_s", "steps[0].task"]


def test_reference_to_a_step_that_is_not_needed(registry: Registry) -> None:
    problems = problems_of(
        {"name": "p", "steps": [step("a"), step("b", **{"with": {"v": "${{ steps.a.output }}"}})]}, registry
    )
    assert has(problems, "steps[1].with.v", "'b' references 'a'", "does not (transitively) need it")


def test_reference_to_an_unknown_step(registry: Registry) -> None:
    problems = problems_of(
        {"name": "p", "steps": [step("a", **{"with": {"deep": ["ok", "${{ steps.ghost.output.x }}"]}})]},
        registry,
    )
    assert has(problems, "steps[0].with.deep[1]", "unknown step 'ghost'")


@pytest.mark.parametrize(
    "expr",
    ["foo", "steps.a.outputs", "steps.a", "steps.A.output", "steps.a.output.[0]", "steps.a.output[x]", ""],
)
def test_malformed_reference_syntax(expr: str, registry: Registry) -> None:
    text = f"prefix ${{{{ {expr} }}}} suffix"
    problems = problems_of(
        {"name": "p", "steps": [step("a"), step("b", needs=["a"], **{"with": {"v": text}})]}, registry
    )
    assert has(problems, "steps[1].with.v", "cannot read reference")


@pytest.mark.parametrize(
    ("fields", "where", "fragment"),
    [
        ({"timeout_s": "x"}, "steps[0].timeout_s", "number"),
        ({"timeout_s": 0}, "steps[0].timeout_s", "greater than 0"),
        ({"retry": {"attempts": 0}}, "steps[0].retry.attempts", "greater than or equal to 1"),
        ({"retry": {"backoff_s": -1}}, "steps[0].retry.backoff_s", "greater than or equal to 0"),
        ({"id": "Bad Id"}, "steps[0].id", "pattern"),
        ({"id": ""}, "steps[0].id", ""),
        ({"needs": "a"}, "steps[0].needs", "list"),
        ({"role": "wizard"}, "steps[0].role", "coder"),
        ({"timeout": 3}, "steps[0].timeout", "Extra inputs"),
        ({"with": ["not", "a", "mapping"]}, "steps[0].with", "dictionary"),
    ],
)
def test_wrong_step_types(fields: dict[str, Any], where: str, fragment: str, registry: Registry) -> None:
    problems = problems_of({"name": "p", "steps": [{"id": "s", "task": "echo", **fields}]}, registry)
    assert has(problems, where, fragment), problems


@pytest.mark.parametrize(
    ("header", "where"),
    [
        ({"policy": {"max_parallel": 0}}, "policy.max_parallel"),
        ({"policy": {"complexity": "huge"}}, "policy.complexity"),
        ({"policy": {"mode": "turbo"}}, "policy.mode"),
        ({"policy": {"barrier": "sometimes"}}, "policy.barrier"),
        ({"budget": {"usd": -1}}, "budget.usd"),
        ({"stepz": []}, "stepz"),
        ({"name": ""}, "name"),
    ],
)
def test_wrong_plan_header_types(header: dict[str, Any], where: str, registry: Registry) -> None:
    problems = problems_of({"name": "p", "steps": [step("a")], **header}, registry)
    assert any(p.where == where for p in problems), problems


def test_missing_and_unknown_task_inputs(registry: Registry) -> None:
    problems = problems_of(
        {
            "name": "p",
            "steps": [
                step("nap", "sleep"),
                step("nap2", "sleep", **{"with": {"seconds": 1, "minutes": 2}}),
                step("sum", "summarize", **{"with": {"max_words": 3, "style": "terse"}}),
                step("ok", "summarize", **{"with": {"text": "x"}}),
            ],
        },
        registry,
    )
    assert has(problems, "steps[0].with", "missing input 'seconds'", "'nap'")
    assert has(problems, "steps[1].with", "unknown input 'minutes'", "seconds")
    assert has(problems, "steps[2].with", "missing input 'text'")
    assert has(problems, "steps[2].with", "unknown input 'style'")
    # The context parameter is not an input.
    assert not any("ctx" in p.message for p in problems)
    assert not any(p.where.startswith("steps[3]") for p in problems)


def test_echo_takes_any_inputs(registry: Registry) -> None:
    plan = parse_plan({"name": "p", "steps": [step("a", **{"with": {"anything": 1, "at": "all"}})]}, registry)
    assert plan.steps[0].inputs == {"anything": 1, "at": "all"}


def test_validator_declarations(registry: Registry) -> None:
    problems = problems_of(
        {
            "name": "p",
            "steps": [
                step(
                    "a",
                    validate=[
                        {"kind": "json"},
                        {"kind": "telepathy"},
                        {"kind": "regex"},
                        {"kind": "regex", "pattern": "("},
                    ],
                )
            ],
        },
        registry,
    )
    assert not any(p.where == "steps[0].validate[0]" for p in problems)
    assert has(problems, "steps[0].validate[1]", "unknown validator kind 'telepathy'")
    assert has(problems, "steps[0].validate[2]", "needs a string 'pattern'")
    assert has(problems, "steps[0].validate[3]", "does not compile")


def test_yaml_syntax_error(registry: Registry) -> None:
    problems = problems_of_text("name: x\nsteps: [\n  - id: a\n", registry)
    assert len(problems) == 1
    assert problems[0].message.startswith("not valid YAML")
    assert "line 3" in problems[0].message


def test_json_syntax_error(registry: Registry) -> None:
    problems = problems_of_text('{"name": "x", "steps": [}', registry)
    assert len(problems) == 1
    assert problems[0].message.startswith("not valid JSON")


@pytest.mark.parametrize(
    ("text", "where", "fragment"),
    [
        ("name: x\nsteps: []\n", "steps", "at least one step"),
        ("name: x\n", "steps", "required"),
        ("name: x\nsteps: {a: 1}\n", "steps", "list"),
        ("- a\n- b\n", "", "must be a mapping"),
        ("", "", "must be a mapping"),
        ("steps:\n  - {id: a, task: echo}\n", "name", "required"),
    ],
)
def test_empty_or_shapeless_plans(text: str, where: str, fragment: str, registry: Registry) -> None:
    problems = problems_of_text(text, registry)
    assert any(p.where == where and fragment in p.message.lower() for p in problems), problems


def test_plan_error_is_a_usage_error_with_exit_code_2(registry: Registry) -> None:
    with pytest.raises(PlanError) as info:
        parse_plan({"name": "p", "steps": [step("a", "nope"), step("b", needs=["zz"])]}, registry)
    error = info.value
    assert isinstance(error, UsageError)
    assert error.exit_code == 2
    assert error.code == "invalid_plan"
    assert "2 problem(s)" in str(error)
    assert "steps[0].task: unknown task 'nope'" in str(error)
    body = error.to_dict()
    assert body["problems"] == [{"where": p.where, "message": p.message} for p in error.problems]


def test_every_problem_is_reported_at_once(registry: Registry) -> None:
    text = """\
name: many-problems
policy: {max_parallel: 0}
steps:
  - id: a
    task: echo
    needs: [c]
  - id: b
    task: echo
    needs: [a]
  - id: c
    task: echo
    needs: [b]
  - id: a
    task: echo
  - id: lonely
    task: does.not.exist
    needs: [ghost]
  - id: refs
    task: echo
    with:
      y: "${{ steps.nobody.output }}"
      z: "${{ not a reference }}"
  - id: nap
    task: sleep
    with: {seconds: 1, extra: 2}
    validate: [{kind: vibes}]
"""
    problems = problems_of_text(text, registry)
    expected = [
        ("policy.max_parallel", "greater than or equal to 1"),
        ("steps[3].id", "duplicate step id 'a'"),
        ("steps[4].needs", "unknown step 'ghost'"),
        ("steps", "cycle: "),
        ("steps[4].task", "unknown task 'does.not.exist'"),
        ("steps[5].with.y", "unknown step 'nobody'"),
        ("steps[5].with.z", "cannot read reference"),
        ("steps[6].with", "unknown input 'extra'"),
        ("steps[6].validate[0]", "unknown validator kind 'vibes'"),
    ]
    missing = [(w, f) for w, f in expected if not has(problems, w, f)]
    assert not missing, f"not reported: {missing}; got {problems}"
    assert len(problems) == len(expected)


def test_a_cycle_does_not_hide_a_reference_to_a_step_that_is_not_needed(registry: Registry) -> None:
    problems = problems_of(
        {
            "name": "p",
            "steps": [
                step("a", needs=["b"]),
                step("b", needs=["a"]),
                step("src"),
                step("use", **{"with": {"v": "${{ steps.src.output }}"}}),
            ],
        },
        registry,
    )
    assert any(p.message.startswith("cycle: ") for p in problems)
    assert has(problems, "steps[3].with.v", "'use' references 'src'", "does not (transitively) need it"), (
        problems
    )


def test_problem_locations_point_at_the_original_steps_after_a_type_error(registry: Registry) -> None:
    # steps[1] has a type problem; the problems of later steps must still name their own index.
    problems = problems_of(
        {
            "name": "p",
            "steps": [
                step("a"),
                step("b", timeout_s="soon"),
                step("c", "nope"),
                step("d", "sleep"),
                step("a"),
            ],
        },
        registry,
    )
    assert has(problems, "steps[1].timeout_s", "number")
    assert has(problems, "steps[2].task", "unknown task 'nope' in step 'c'"), problems
    assert has(problems, "steps[3].with", "missing input 'seconds' in step 'd'"), problems
    assert has(problems, "steps[4].id", "duplicate step id 'a'"), problems


def test_a_step_with_a_type_error_is_still_a_known_step(registry: Registry) -> None:
    # Only the timeout is wrong: "b" exists, so neither "needs: [b]" nor a reference to it
    # is a second, misleading problem.
    problems = problems_of(
        {
            "name": "p",
            "steps": [
                step("a"),
                step("b", needs=["a"], timeout_s="soon"),
                step("c", needs=["b"], **{"with": {"v": "${{ steps.b.output }}"}}),
            ],
        },
        registry,
    )
    assert problems == [Problem("steps[1].timeout_s", problems[0].message)], problems


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_a_bad_plan_writes_nothing(backend: str, tmp_path: Path, registry: Registry) -> None:
    store = MemoryStore() if backend == "memory" else SQLiteStore(tmp_path / "baton.db")
    bad = "name: bad\nsteps:\n  - {id: a, task: echo, needs: [b]}\n  - {id: b, task: nope}\n"
    async with Engine(store, registry=registry) as engine:
        with pytest.raises(PlanError):
            await engine.submit(bad)
        with pytest.raises(PlanError):
            await engine.submit({"name": "bad", "steps": []})
        with pytest.raises(PlanError):
            await engine.run(Plan(name="bad", steps=[Step(id="a", task="echo", needs=["a"])]))
        assert await store.list_runs() == []
        # A good plan afterwards is the only run.
        record = await engine.run({"name": "good", "steps": [step("a")]})
        assert [r.id for r in await store.list_runs()] == [record.id]


# -- DAG analysis ---------------------------------------------------------------------------


def dag_of(raw: dict[str, Any], registry: Registry) -> Dag:
    return analyze(parse_plan(raw, registry), registry)


def test_waves_are_dag_depths(registry: Registry) -> None:
    dag = dag_of(
        {
            "name": "p",
            "steps": [
                step("d", needs=["b", "c"]),
                step("a"),
                step("b", needs=["a"]),
                step("c", needs=["a"]),
                step("solo"),
                step("e", needs=["a", "d"]),
            ],
        },
        registry,
    )
    assert [sorted(w) for w in dag.waves] == [["a", "solo"], ["b", "c"], ["d"], ["e"]]
    assert dict(zip(dag.ids, dag.wave, strict=True)) == {"d": 2, "a": 0, "b": 1, "c": 1, "solo": 0, "e": 3}


def test_critical_path_follows_the_heaviest_chain(registry: Registry) -> None:
    dag = dag_of(
        {
            "name": "p",
            "steps": [
                step("a", estimate_s=1),
                step("fast", needs=["a"], estimate_s=1),
                step("slow", needs=["a"], estimate_s=5),
                step("join", needs=["fast", "slow"], estimate_s=1),
                step("side", estimate_s=6),
            ],
        },
        registry,
    )
    assert dag.critical_path() == ["a", "slow", "join"]
    assert dag.critical_path_weight() == 7
    remaining = dict(zip(dag.ids, dag.remaining, strict=True))
    assert remaining == {"a": 7, "fast": 2, "slow": 6, "join": 1, "side": 6}


def test_task_estimates_weigh_the_critical_path(registry: Registry) -> None:
    # sleep estimates its own duration; steps without an estimate weigh the median.
    dag = dag_of(
        {
            "name": "p",
            "steps": [
                step("nap", "sleep", **{"with": {"seconds": 10}}),
                step("x"),
                step("y", needs=["x"]),
                step("short", "sleep", **{"with": {"seconds": 2}}),
            ],
        },
        registry,
    )
    remaining = dict(zip(dag.ids, dag.remaining, strict=True))
    assert remaining == {"nap": 10, "x": 12, "y": 6, "short": 2}  # x, y weigh median(10, 2) = 6
    assert dag.critical_path() == ["x", "y"]
    assert dag.critical_path_weight() == 12


def test_unweighted_critical_path_is_the_longest_chain(registry: Registry) -> None:
    dag = dag_of(
        {
            "name": "p",
            "steps": [step("short"), step("l1"), step("l2", needs=["l1"]), step("l3", needs=["l2"])],
        },
        registry,
    )
    assert dag.critical_path() == ["l1", "l2", "l3"]
    assert dag.critical_path_weight() == 3


def test_dag_build_refuses_a_cycle() -> None:
    with pytest.raises(ValueError, match="cycle"):
        Dag.build(["a", "b"], [[1], [0]], [1.0, 1.0])
    empty = Dag.build([], [], [])
    assert (empty.waves, empty.critical_path(), empty.critical_path_weight()) == ([], [], 0.0)


# -- policies -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("complexity", "max_parallel", "timeout_s"),
    [("simple", 1, 25), ("medium", 2, 30), ("complex", 3, 30), ("crisis", 5, 20)],
)
def test_complexity_presets(complexity: str, max_parallel: int, timeout_s: float) -> None:
    policy = Policy.model_validate({"complexity": complexity})
    assert policy.effective_max_parallel() == max_parallel
    assert policy.effective_timeout_s() == timeout_s
    explicit = Policy.model_validate({"complexity": complexity, "max_parallel": 7, "timeout_s": 3})
    assert explicit.effective_max_parallel() == 7
    assert explicit.effective_timeout_s() == 3


def test_policy_defaults() -> None:
    assert Policy().effective_max_parallel() == 8
    assert Policy().effective_max_parallel(default=4) == 4
    assert Policy().effective_timeout_s() is None
    assert Policy().barrier == "none"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"mode": "single"}, 1),
        ({"mode": "sequential"}, 1),
        ({"mode": "parallel"}, 8),
        ({"mode": "sequential", "complexity": "crisis"}, 1),
        ({"mode": "parallel", "complexity": "complex"}, 3),
        ({"mode": "parallel", "max_parallel": 6}, 6),
    ],
)
def test_mode_spellings(fields: dict[str, Any], expected: int) -> None:
    assert Policy.model_validate(fields).effective_max_parallel() == expected


def test_retry_delay_is_exponential_without_jitter() -> None:
    retry = RetryPolicy(attempts=6, backoff_s=0.5, jitter=0)
    assert [retry.delay(n, 0.9) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_retry_delay_jitter_bounds() -> None:
    retry = RetryPolicy(attempts=5, backoff_s=1.0, jitter=0.2)
    for n, base in [(1, 1.0), (2, 2.0), (3, 4.0)]:
        assert retry.delay(n, 0.0) == pytest.approx(base * 0.8)
        assert retry.delay(n, 0.5) == pytest.approx(base)
        assert retry.delay(n, 0.999999) == pytest.approx(base * 1.2, rel=1e-5)
        for i in range(100):
            assert base * 0.8 <= retry.delay(n, i / 100) < base * 1.2


def test_retry_delay_is_capped() -> None:
    retry = RetryPolicy(attempts=100, backoff_s=1.0, max_backoff_s=5.0, jitter=0)
    assert retry.delay(3, 0.5) == 4.0
    assert retry.delay(4, 0.5) == 5.0
    assert retry.delay(99, 0.5) == 5.0
    jittered = RetryPolicy(attempts=100, backoff_s=1.0, max_backoff_s=5.0, jitter=0.2)
    for i in range(100):
        assert 4.0 <= jittered.delay(50, i / 100) <= 6.0
    assert RetryPolicy(backoff_s=0).delay(3, 0.7) == 0.0


def test_default_retry_is_a_single_attempt() -> None:
    assert RetryPolicy().attempts == 1


def test_step_id_pattern_is_shared_with_references() -> None:
    # A valid step id can be referenced; the reference grammar accepts every id character.
    for sid in ["a", "step_1", "fetch-data", "0"]:
        assert re.fullmatch(r"[a-z0-9_-]+", sid)
        assert parse_ref(f"steps.{sid}.output").step == sid
