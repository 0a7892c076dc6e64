"""Plans: the model, loading and validation, DAG analysis."""

from baton.plan.analysis import analyze
from baton.plan.dag import Dag
from baton.plan.model import Budget, Complexity, Plan, Policy, RetryPolicy, Step
from baton.plan.validate import load_plan, parse_plan, validate_plan

__all__ = [
    "Budget",
    "Complexity",
    "Dag",
    "Plan",
    "Policy",
    "RetryPolicy",
    "Step",
    "analyze",
    "load_plan",
    "parse_plan",
    "validate_plan",
]
