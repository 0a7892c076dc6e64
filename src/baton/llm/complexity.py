"""How demanding a request is: baton's four levels, estimated from the request itself.

A step whose plan gives no complexity is routed by this estimate when the LLM config has
``routing``. It reads what a person deciding which model to pay for would read:

- the **answer asked for**: a bound on its size ("in one word", "yes or no", "just the
  name", "one sentence", "two sentences", "about 80 words", a small ``max_tokens``) caps
  the level, whatever the question is about;
- the **work asked for**: labelling, picking or extracting is simple; explaining,
  summarising, rewriting, translating or writing a short piece or a small script is
  medium; an analysis, a comparison, a recommendation among options, a plan, a design, a
  proof, research with sources — two such demands, or one in a long request — is complex;
- the **stakes**: a decision (or an incident under way) with legal, medical, financial,
  security or safety consequences, under time pressure, is ``crisis``, and so is complex
  work that must weigh the risks;
- the **input's size**: a long document needs at least a capable model.

It is a heuristic, and says why it chose (``reasons``). Its figures on a held-out set of
labelled requests it was not written against (tests/llm/data/complexity_heldout.jsonl,
the second half) and on bench/llm.py's workload are in bench/README.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from baton.llm import tokens
from baton.llm.types import ChatRequest

LEVELS = ("simple", "medium", "complex", "crisis")

_FLAGS = re.I | re.X
#: a bound on the answer that keeps it to a word, a value or a line
_ONE_LINE = re.compile(
    r"""\b(?: (?:in|with|using|as) \s+ (?:one|a \s+ single|1|a) \s+ (?:word|line|sentence|label|number|letter)
        | (?:one|single|1)[- ](?:word|line|sentence)\b
        | (?:reply|answer|respond) \s+ (?:only \s+ )?(?:with \s+ )?
          (?:yes \s+ or \s+ no | (?:a|the) \s+ (?:single \s+ )?(?:word|number|label|letter)
          | the \s+ \w+ \s+ only)
        | \bas \s+ \w+ (?: , \s* \w+ )+ ,? \s+ or \s+ \w+ \s* [:.?]
        | yes \s* (?:/|or) \s* no | true \s+ or \s+ false
        | (?:just|only) \s+ (?:the \s+ |a \s+ )?(?:\w+ \s+ )?
          (?:name|number|answer|label|word|value|category|date)
        | nothing \s+ else | no \s+ explanation )""",
    _FLAGS,
)
#: a bound that keeps it to a few sentences or a paragraph
_FEW_LINES = re.compile(
    r"""\b(?: (?:two|three|four|a \s+ few|2|3|4)[- ](?:[\w-]+ \s+ )?
          (?:sentences?|lines|bullet \s+ points|bullets)
        | (?:a|one) \s+ (?:short \s+ |brief \s+ |single \s+ )?paragraph
        | (?:a \s+ )?short \s+ (?:answer|reply|post|note) | briefly | concise(?:ly)? | tl;?dr
        | (?:under|at \s+ most|no \s+ more \s+ than|within|about|around|~) \s* \d{1,3}[- ]words? )""",
    _FLAGS,
)
_SIMPLE_WORK = re.compile(
    r"""\b(?: classif(?:y|ication) | categori[sz]e | category | tag | label | pick | choose | select
        | extract | identify \s+ the | detect | which \s+ (?:one|of) | is \s+ (?:this|it) \s+ (?:a|an) )\b""",
    _FLAGS,
)
_MEDIUM_WORK = re.compile(
    r"""\b(?: explain | summar(?:y|ise|ize) | describe | rewrite | rephrase | translate | outline | draft
        | what(?:'s| \s+ is) \s+ the \s+ difference | how \s+ (?:does|do|can) | turn \s+ (?:this|these)
        | what \s+ (?:causes | caused | (?:are|were) \s+ the \s+ (?:main \s+ )?causes)
        | write \s+ (?:\S+ \s+){0,3}?
          (?:function|tests?|script|query|email|reply|message|post|description|summary|letter)
        | implement | refactor | debug | fix \s+ (?:the|this) \s+ (?:bug|code|error) | answer )\b""",
    _FLAGS,
)
#: demands of complex work, each enough on its own
_DEEP_WORK = re.compile(
    r"""\b(?: detailed | in[- ]depth | comprehensive | thorough(?:ly)? | exhaustive | report | essay
        | white \s* paper | literature \s+ review | design | architecture | prove | derive | research
        | complete \s+ implementation | (?:build|write) \s+ a \s+ complete )\b""",
    _FLAGS,
)
#: demands that make work complex when there are two of them, or one in a long request
_SOME_DEPTH = re.compile(
    r"""\b(?: analy[sz](?:e|is|es) | compare | comparison | contrast | evaluate | assess(?:ment)?
        | trade[- ]offs? | pros \s+ and \s+ cons | recommend(?:ation)? | options | alternatives | plan
        | roadmap | milestones | strategy | investigate | hypothes[ie]s | experiments? | segment
        | prioriti[sz]ed | build \s+ (?:vs\.?|versus|or) \s+ buy | forecast | model \s+ for \s+ each
        | sources | citations? | cite | citing | references | bibliography )\b""",
    _FLAGS,
)
#: what a mistake would cost: money, law, health, security, the business itself
_STAKES = re.compile(
    r"""(?: \$ \s? \d[\d,.]* \s? (?:k|m|bn?|million|billion)\b | \b\d[\d,.]* \s? (?:million|billion)\b
        | \b(?: legal | lawsuit | sued | su(?:e|ing) | litigation | injunction | liabilit(?:y|ies)
        | penalt(?:y|ies)
        | regulators? | regulatory | complian(?:ce|t) | audit \s+ committee | fda | sec | gdpr | hipaa
        | medical | clinical | patients? | overdose | poison(?:ing|ed)? | swallowed | bleeding | infants?
        | injur(?:y|ies) | recall | safety | life[- ]threatening
        | breach | ransomware | attackers? | exploited | zero[- ]day | leak(?:ed)? | wrong \s+ customers
        | outage | incident | (?:is|are|went|been) \s+ down | double[- ]charg\w* | bankruptcy | insolven\w*
        | board | trustees | ceo | cfo | earnings | harassment | emergency | crisis )\b )""",
    _FLAGS,
)
#: a decision to make, or an incident to handle, now
_PRESSURE = re.compile(
    r"""\b(?: today | tonight | tomorrow | this \s+ (?:morning|afternoon|evening|week) | right \s+ now
        | immediately | urgent(?:ly)? | asap | deadline | (?:within|in) \s+ \d+ \s+ (?:hours?|days?)
        | (?:an? | \d+) \s+ hours? \s+ ago | minutes \s+ ago | since \s+ the | so \s+ far
        | (?:is|are) \s+ (?:coming \s+ in|being \s+ exploited|spreading)
        | what \s+ (?:do|should) \s+ (?:we|i) \s+ do | what \s+ are \s+ our \s+ options
        | (?:monday|tuesday|wednesday|thursday|friday|saturday|sunday) )\b""",
    _FLAGS,
)
#: a call to make, where being wrong costs
_DECISION = re.compile(
    r"""\b(?: should \s+ (?:we|i) | do \s+ we | what \s+ (?:do|should) \s+ (?:we|i)
        | how \s+ (?:do|should) \s+ (?:we|i) \s+ (?:handle|respond) | roll \s* back \s+ or
        | what(?:'s| \s+ is) \s+ the \s+ management | escalate | options | obligations )\b""",
    _FLAGS,
)
#: complex work that must weigh what could go wrong
_RISKS = re.compile(r"\b(?:the \s+ )?risks\b | \brisk \s+ assessment\b", _FLAGS)
#: a request this long (words) with one demand of complex work is complex
DEMANDING_WORDS = 25
#: inputs this long (tokens) need at least a medium model; and at least a complex one
LONG_INPUT = 3_000
VERY_LONG_INPUT = 12_000
#: an answer limited to this many tokens is a line; to this many, a paragraph
ONE_LINE_TOKENS = 32
FEW_LINES_TOKENS = 256


@dataclass(frozen=True, slots=True)
class Estimate:
    level: str
    reasons: tuple[str, ...]


def estimate(request: ChatRequest) -> Estimate:
    """The level of ``request``, and the signals it was read from."""
    text = "\n".join(m.content for m in request.messages if m.role in ("system", "user"))
    reasons: list[str] = []
    bound = len(LEVELS) - 1
    if _ONE_LINE.search(text) or (request.max_tokens is not None and request.max_tokens <= ONE_LINE_TOKENS):
        bound = 0
        reasons.append("answer bounded to a line")
    elif _FEW_LINES.search(text) or (
        request.max_tokens is not None and request.max_tokens <= FEW_LINES_TOKENS
    ):
        bound = 1
        reasons.append("answer bounded to a few sentences")
    deep = {m.group(0).lower() for m in _DEEP_WORK.finditer(text)}
    demands = deep | {m.group(0).lower() for m in _SOME_DEPTH.finditer(text)}
    level = 0
    if deep or len(demands) >= 2 or (demands and len(text.split()) >= DEMANDING_WORDS):
        level = 2
        reasons.append("asks for " + ", ".join(sorted(demands)))
    elif _MEDIUM_WORK.search(text) and not (_SIMPLE_WORK.search(text) and bound == 0):
        level = 1
        reasons.append("asks for an explanation or a piece of writing")
    elif _SIMPLE_WORK.search(text):
        reasons.append("asks for a label or a pick")
    size = tokens.count(text)
    if size >= VERY_LONG_INPUT and level < 2:
        level = 2
        reasons.append(f"a very long input ({size} tokens)")
    elif size >= LONG_INPUT and level < 1:
        level = 1
        reasons.append(f"a long input ({size} tokens)")
    stakes, pressing = _STAKES.search(text), _PRESSURE.search(text) or _DECISION.search(text)
    if stakes and pressing:
        level = 3
        reasons.append(f"much at stake ({stakes.group(0).strip()}) and a call to make ({pressing.group(0)})")
    elif level == 2 and _RISKS.search(text):
        level = 3
        reasons.append("must weigh the risks")
    level = min(level, bound)
    return Estimate(LEVELS[level], tuple(reasons))


__all__ = ["LEVELS", "Estimate", "estimate"]
