"""DAG analysis: topological order, waves, critical path, scheduling priorities.

Works on plain index lists so that a 100,000-step plan stays cheap in time and memory.
"""

from __future__ import annotations

from collections.abc import Sequence
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
