"""Dependency context: at most three needs' outputs, the most relevant first, within budget."""

from __future__ import annotations

from baton.llm import tokens
from baton.llm.context import needs_context, rank, shorten


def test_most_relevant_first_and_at_most_three() -> None:
    outputs = {
        "fetch_logs": {"text": "GET /health 200 in 3 ms"},
        "design_schema": {"text": "CREATE TABLE invoices (id int, customer text, total numeric)"},
        "pick_language": "python",
        "list_endpoints": ["/invoices", "/customers"],
    }
    prompt = "Write the SQL query that sums the invoices total per customer."
    ranked = [p.step_id for p in rank(outputs, prompt)]
    assert ranked[0] == "design_schema"  # shares invoices, total, customer with the prompt
    assert ranked[1] == "list_endpoints"  # shares only "invoices"
    block, quoted = needs_context(outputs, prompt)
    assert quoted == ranked[:3]
    assert block.count("## ") == 3
    assert block.index("## design_schema") < block.index("## list_endpoints")


def test_ties_keep_the_order_of_needs_and_quoted_outputs_are_not_repeated() -> None:
    outputs = {"a": "alpha result", "b": "bravo result", "c": {"text": "Use port 8080."}}
    prompt = "Configure the server. Use port 8080."  # c's output is already in the prompt
    assert [p.step_id for p in rank(outputs, prompt)] == ["a", "b"]
    assert needs_context({"x": None}, prompt) == ("", [])


def test_long_outputs_are_cut_in_the_middle_within_the_budget() -> None:
    text = "BEGIN " + "lorem ipsum dolor sit amet " * 400 + " END"
    short = shorten(text, 100)
    assert short.startswith("BEGIN") and short.endswith("END")
    assert "tokens cut" in short
    assert tokens.count(short) <= 110
    block, _ = needs_context({"a": text, "b": text + " again"}, "summarize", max_tokens=200)
    assert tokens.count(block) <= 260  # two shares of 100, headers and the cut notes
