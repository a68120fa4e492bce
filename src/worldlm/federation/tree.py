"""The tree of federations as data: nodes, parents, children, data sources, flags.

Any depth. Validation turns every structural problem (cycle, unknown parent, zero or several
roots, duplicate names, a node without data) into one `ConfigError` line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from worldlm.errors import ConfigError, quoted

NAME = re.compile(r"[A-Za-z0-9_.-]+")  # node names: no '#' (region aliases), '/', '@', ':', '>' (message keys)


@dataclass(frozen=True)
class NodeSpec:
    """A node as the user writes it; `sources` may be empty on inner nodes (then: the subtree's)."""

    name: str
    parent: str = ""
    sources: tuple[str, ...] = ()
    dp: bool = False


@dataclass(frozen=True)
class TreeNode:
    name: str
    parent: str | None
    children: tuple[str, ...]
    sources: tuple[str, ...]
    dp: bool
    level: int  # 0 at the root
    trains: bool = True  # False only for the synthetic FL server, which holds no data


@dataclass(frozen=True)
class Tree:
    nodes: dict[str, TreeNode]
    root: str
    order: tuple[str, ...]  # breadth-first, children in declaration order

    def __getitem__(self, name: str) -> TreeNode:
        return self.nodes[name]

    def is_leaf(self, name: str) -> bool:
        return not self.nodes[name].children

    @property
    def depth(self) -> int:
        return 1 + max(n.level for n in self.nodes.values())

    @property
    def levels(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in range(self.depth)]
        for name in self.order:
            out[self.nodes[name].level].append(name)
        return out

    @property
    def training_nodes(self) -> list[str]:
        return [n for n in self.order if self.nodes[n].trains]

    def subtree(self, name: str) -> list[str]:
        """`name` and all its descendants, breadth-first."""
        out, frontier = [name], [name]
        while frontier:
            frontier = [c for n in frontier for c in self.nodes[n].children]
            out.extend(frontier)
        return out

    def path_to_root(self, name: str) -> list[str]:
        out = [name]
        while (parent := self.nodes[out[-1]].parent) is not None:
            out.append(parent)
        return out


def build_tree(specs: Sequence[NodeSpec]) -> Tree:
    """Validate the user's node list and build the tree (inner nodes default to their subtree's sources)."""
    if not specs:
        raise ConfigError("the tree has no nodes; add [[tree.nodes]] entries")
    names = [s.name for s in specs]
    for s in specs:
        if not s.name:
            raise ConfigError("a tree node has an empty name; give every [[tree.nodes]] a unique name")
    for s in specs:
        if not NAME.fullmatch(s.name):
            raise ConfigError(
                f"tree node name {quoted(s.name)} has characters other than letters, digits, '_', '.' and '-'; "
                "rename it (names appear in file names, edges 'a->b' and messages)"
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"duplicate tree node name(s): {', '.join(dupes)}; node names must be unique")
    by_name = {s.name: s for s in specs}
    for s in specs:
        if s.parent and s.parent not in by_name:
            raise ConfigError(
                f"tree node {quoted(s.name)} has unknown parent {quoted(s.parent)}; declare it or fix the name"
            )
        if s.parent == s.name:
            raise ConfigError(f"tree node {quoted(s.name)} is its own parent (a cycle); point it at another node")
    roots = [s.name for s in specs if not s.parent]
    if not roots:
        raise ConfigError("the tree has no root (every node has a parent, so there is a cycle); leave one parent empty")
    if len(roots) > 1:
        raise ConfigError(f"the tree has several roots ({', '.join(roots)}); give all but one a parent")
    children: dict[str, list[str]] = {n: [] for n in names}
    for s in specs:
        if s.parent:
            children[s.parent].append(s.name)
    levels, order, frontier = {roots[0]: 0}, [roots[0]], [roots[0]]
    while frontier:
        nxt = [c for n in frontier for c in children[n]]
        for c in nxt:
            levels[c] = levels[by_name[c].parent] + 1
        order.extend(nxt)
        frontier = nxt
    unreachable = [n for n in names if n not in levels]
    if unreachable:
        raise ConfigError(
            f"tree nodes {', '.join(unreachable)} form a cycle (not connected to root {quoted(roots[0])}); "
            "fix their parents"
        )

    def sources_of(name: str) -> tuple[str, ...]:
        own = by_name[name].sources
        if own or not children[name]:
            return tuple(dict.fromkeys(own))
        return tuple(dict.fromkeys(src for c in children[name] for src in sources_of(c)))

    nodes: dict[str, TreeNode] = {}
    for name in order:
        srcs = sources_of(name)
        if not srcs:
            raise ConfigError(f'tree node {quoted(name)} has no data; list its sources (e.g. sources = ["fr"])')
        spec = by_name[name]
        nodes[name] = TreeNode(
            name=name,
            parent=spec.parent or None,
            children=tuple(children[name]),
            sources=srcs,
            dp=spec.dp,
            level=levels[name],
        )
    return Tree(nodes=nodes, root=roots[0], order=tuple(order))


FL_SERVER = "_server"


def flat_tree(tree: Tree) -> Tree:
    """Standard FL (the baseline of paper §4.2): one data-less server, every data-holding node a client."""
    clients = tree.training_nodes
    nodes = {FL_SERVER: TreeNode(FL_SERVER, None, tuple(clients), (), False, 0, trains=False)}
    for name in clients:
        n = tree.nodes[name]
        nodes[name] = TreeNode(name, FL_SERVER, (), n.sources, n.dp, 1)
    return Tree(nodes=nodes, root=FL_SERVER, order=(FL_SERVER, *clients))
