"""DAG analysis: topological order, waves, critical path, scheduling priorities.

Works on plain index lists so that a 100,000-step plan stays cheap in time and memory.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass


def dependents_of(needs: Sequence[Sequence[int]]) -> list[list[int]]:
    """The reverse edges: for each node, the nodes that need it."""
    dependents: list[list[int]] = [[] for _ in needs]
    for i, ns in enumerate(needs):
        for j in ns:
            dependents[j].append(i)
    return dependents


def topo_order(
    needs: Sequence[Sequence[int]], dependents: Sequence[Sequence[int]] | None = None
) -> tuple[list[int], list[int]]:
    """Kahn's order of the nodes, and the nodes left over (which lie on or behind cycles)."""
    n = len(needs)
    indegree = [len(ns) for ns in needs]
    if dependents is None:
        dependents = dependents_of(needs)
    order = [i for i in range(n) if not indegree[i]]
    head = 0
    while head < len(order):
        node = order[head]
        head += 1
        for d in dependents[node]:
            indegree[d] -= 1
            if indegree[d] == 0:
                order.append(d)
    placed = set(order)
    return order, [i for i in range(n) if i not in placed]


def find_cycle(needs: Sequence[Sequence[int]], among: Sequence[int]) -> list[int]:
    """One cycle among ``among`` (nodes Kahn could not place), as a closed path a -> ... -> a."""
    candidates = set(among)
    for start in among:
        path: list[int] = []
        on_path: dict[int, int] = {}
        node = start
        # Every leftover node has a need that is also left over, so walking needs must
        # come back to a node already on the path.
        while node not in on_path:
            on_path[node] = len(path)
            path.append(node)
            node = next((j for j in needs[node] if j in candidates), -1)
            if node < 0:
                break
        else:
            cycle = path[on_path[node] :]
            cycle.reverse()  # needs point backwards; show the order work would flow in
            return [*cycle, cycle[0]]
    return []


def strong_components(needs: Sequence[Sequence[int]]) -> list[list[int]]:
    """Tarjan's strongly connected components, without recursion, each listed after every
    component it needs (so in an order work could flow in, were each one a node)."""
    n = len(needs)
    number = [-1] * n
    low = [0] * n
    on_stack = [False] * n
    stack: list[int] = []
    out: list[list[int]] = []
    counter = 0
    for root in range(n):
        if number[root] >= 0:
            continue
        number[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack[root] = True
        work = [(root, 0)]
        while work:
            node, i = work[-1]
            if i < len(needs[node]):
                work[-1] = (node, i + 1)
                j = needs[node][i]
                if number[j] < 0:
                    number[j] = low[j] = counter
                    counter += 1
                    stack.append(j)
                    on_stack[j] = True
                    work.append((j, 0))
                elif on_stack[j] and number[j] < low[node]:
                    low[node] = number[j]
                continue
            work.pop()
            if work and low[node] < low[work[-1][0]]:
                low[work[-1][0]] = low[node]
            if low[node] == number[node]:
                members: list[int] = []
                while True:
                    j = stack.pop()
                    on_stack[j] = False
                    members.append(j)
                    if j == node:
                        break
                out.append(members)
    return out


#: reachability is worked out for at most this many asked-about steps per pass, as the
#: bits of one integer per step (so 512 bytes a step at most, for the steps in the pass)
REACH_CHUNK = 4096


def transitive_needs(
    needs: Sequence[Sequence[int]], pairs: Sequence[tuple[int, int]], order: Sequence[int] | None = None
) -> list[bool]:
    """For each ``(node, other)``: whether ``other`` is among the transitive needs of ``node``.

    Near-linear for the shapes plans take: a cycle's members all need each other (the graph
    is condensed into strongly connected components when it has one), a direct need answers
    at once, and the rest are answered together, by passes that carry one bit per step
    asked about, REACH_CHUNK of them at a time, along the stretch of a topological order
    between the steps asked about and those asking. The pass runs from the asking side when
    fewer steps ask than are asked about (a fan-in that references every branch).
    ``order``: a topological order of the whole graph, when the caller has one.
    """
    leftover: Sequence[int] = ()
    if order is None or len(order) < len(needs):
        order, leftover = topo_order(needs)
    comp: Sequence[int] = range(len(needs))
    graph = needs
    looped: list[bool] = []
    if leftover:
        components = strong_components(needs)
        comp = [0] * len(needs)
        for c, members in enumerate(components):
            for node in members:
                comp[node] = c
        graph = [
            sorted({comp[j] for node in members for j in needs[node]} - {c})
            for c, members in enumerate(components)
        ]
        looped = [len(m) > 1 or m[0] in needs[m[0]] for m in components]
        order = list(range(len(components)))
    out = [False] * len(pairs)
    pending: list[tuple[int, int]] = []
    asked: list[int] = []
    wide: dict[int, set[int]] = {}  # the needs of nodes with many, to look up in
    for q, (node, other) in enumerate(pairs):
        if comp[node] == comp[other]:
            out[q] = bool(looped) and looped[comp[node]]
            continue
        mine: Container[int] = needs[node]
        if len(needs[node]) > 8:
            mine = wide.get(node) or wide.setdefault(node, set(needs[node]))
        if other in mine:
            out[q] = True
        else:
            pending.append((comp[node], comp[other]))
            asked.append(q)
    if pending:
        if len({a for a, _ in pending}) < len({b for _, b in pending}):
            answers = _reach(dependents_of(graph), order[::-1], [(b, a) for a, b in pending])
        else:
            answers = _reach(graph, order, pending)
        for q, answer in zip(asked, answers, strict=True):
            out[q] = answer
    return out


def _reach(
    before: Sequence[Sequence[int]], order: Sequence[int], pairs: Sequence[tuple[int, int]]
) -> list[bool]:
    """For each ``(node, other)`` of an acyclic graph: whether ``other`` reaches ``node`` along
    ``before`` (each node's predecessors; ``order`` lists predecessors first)."""
    position = [0] * len(order)
    for p, node in enumerate(order):
        position[node] = p
    by_target: dict[int, list[int]] = {}
    for q, (_, other) in enumerate(pairs):
        by_target.setdefault(other, []).append(q)
    targets = sorted(by_target, key=position.__getitem__)
    out = [False] * len(pairs)
    for first in range(0, len(targets), REACH_CHUNK):
        chunk = targets[first : first + REACH_CHUNK]
        bit = {t: 1 << k for k, t in enumerate(chunk)}
        queries = [q for t in chunk for q in by_target[t]]
        # nothing before the first target can be reached from the chunk, and nothing after
        # the last step asking matters
        last = max(position[pairs[q][0]] for q in queries)
        bits: dict[int, int] = {}
        for node in order[position[chunk[0]] : last + 1]:
            acc = bit.get(node, 0)
            for j in before[node]:
                got = bits.get(j)
                if got:
                    acc |= got
            if acc:
                bits[node] = acc
        for q in queries:
            node, other = pairs[q]
            out[q] = bool(bits.get(node, 0) & bit[other])
    return out


@dataclass(slots=True)
class Dag:
    """Index form of a plan's graph with the numbers the scheduler and the CLI need."""

    ids: list[str]
    needs: list[list[int]]
    dependents: list[list[int]]
    order: list[int]
    wave: list[int]
    #: longest weighted path from the node to any sink, node included.
    remaining: list[float]

    @classmethod
    def build(cls, ids: Sequence[str], needs: Sequence[Sequence[int]], weights: Sequence[float]) -> Dag:
        dependents = dependents_of(needs)
        order, leftover = topo_order(needs, dependents)
        if leftover:
            raise ValueError("graph has a cycle")
        n = len(ids)
        wave = [0] * n
        for node in order:
            depth = 0
            for j in needs[node]:
                if wave[j] >= depth:
                    depth = wave[j] + 1
            wave[node] = depth
        remaining = [0.0] * n
        for node in reversed(order):
            tail = 0.0
            for d in dependents[node]:
                if remaining[d] > tail:
                    tail = remaining[d]
            remaining[node] = weights[node] + tail
        return cls(list(ids), [list(ns) for ns in needs], dependents, order, wave, remaining)

    @property
    def waves(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(max(self.wave, default=-1) + 1)]
        for node in self.order:
            out[self.wave[node]].append(self.ids[node])
        return out

    def critical_path(self) -> list[str]:
        """The heaviest source-to-sink path (by the weights the Dag was built with)."""
        if not self.ids:
            return []
        node = max(
            (i for i in range(len(self.ids)) if not self.needs[i]),
            key=lambda i: self.remaining[i],
        )
        path = [node]
        while self.dependents[node]:
            node = max(self.dependents[node], key=lambda d: self.remaining[d])
            path.append(node)
        return [self.ids[i] for i in path]

    def critical_path_weight(self) -> float:
        return max(self.remaining, default=0.0)
