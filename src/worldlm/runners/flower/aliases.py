"""How a federation names the origins of residuals that cross its border (nested deployments).

Residuals travel with the name of the node whose key layer they were (A.3.7 needs it: `route_to_origin`
keeps a residual out of the subtree it came from). Across federations a name would tell a coordinator
about nodes outside its own federation, so a coordinator renames origins at its border:

- a region sending residuals up hides every origin inside its subtree (but itself) as `<region>#<k>`;
- a coordinator sending residuals down into a region hides every origin outside that region's subtree
  as `<its own node>#<k>`;
- each side resolves its own aliases when the residuals come back.

An alias `<node>#<k>` stands for a node of `<node>`'s subtree, or for one outside the receiving region,
which is exactly what the origin test asks (`federation.worldlm.origin_node`), so routing is unchanged.
Each coordinator keeps its table (`aliases.json` in its part of the run directory).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import cast

from flwr.app import ConfigRecord, RecordDict

from worldlm.federation.steps import origin_node
from worldlm.files import atomic_write_json

ALIASES = "aliases.json"


class Aliases:
    """The aliases `<owner>#<k>` one coordinator gave to origins, persisted so a restarted one keeps them."""

    def __init__(self, owner: str, path: Path, fresh: bool = False) -> None:
        self.owner, self.path = owner, path
        if fresh:
            path.unlink(missing_ok=True)
        self.table: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
        self._alias = {origin: alias for alias, origin in self.table.items()}

    def hide(self, origin: str) -> str:
        if origin not in self._alias:
            alias = f"{self.owner}#{len(self.table) + 1}"
            self.table[alias], self._alias[origin] = origin, alias
            atomic_write_json(self.path, self.table)
        return self._alias[origin]

    def hide_inside(self, subtree: Collection[str], keep: str) -> Callable[[str], str]:
        """Hide the origins inside `subtree` except `keep` (a region's members, as it sends residuals up)."""
        return lambda o: self.hide(o) if o != keep and origin_node(o) in subtree else o

    def hide_outside(self, subtree: Collection[str]) -> Callable[[str], str]:
        """Hide the origins outside `subtree` (what a coordinator sends down into a region)."""
        return lambda o: o if origin_node(o) in subtree else self.hide(o)

    def reveal(self, origin: str) -> str:
        return self.table.get(origin, origin)


def rename_origins(content: RecordDict, key: str, rename: Callable[[str], str]) -> None:
    """Rename the origins of the residuals under `key` in a message (vectors and positions untouched)."""
    meta = f"{key}.origins"
    if meta in content.config_records:
        origins = cast(list[str], content.config_records[meta]["origins"])
        content[meta] = ConfigRecord({"origins": [rename(str(o)) for o in origins]})
