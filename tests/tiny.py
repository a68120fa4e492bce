"""The tiny world the tests run in: synthetic, learnable, heterogeneous token streams (no prepare run), the
7-node languages tree and its config, a 3-level engine tree with a fake trainer, and node states for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worldlm.data.prepared import write_token_streams
from worldlm.federation.server_opt import ServerOptConfig, make_server_opt
from worldlm.federation.tree import NodeSpec, Tree, build_tree
from worldlm.federation.types import NodeState

SOURCES = ("fr", "it", "uk", "ru")


def markov_stream(seed: int, vocab: int, n: int, offset: int, width: int) -> np.ndarray:
    """A first-order Markov chain over tokens [offset, offset + width): each source its own grammar."""
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(width, 0.1), size=width)
    out = np.empty(n, dtype=np.uint16)
    state = 0
    cum = trans.cumsum(axis=1)
    draws = rng.random(n)
    for i in range(n):
        state = min(int(np.searchsorted(cum[state], draws[i])), width - 1)
        out[i] = offset + state
    return out


def make_prepared(root: Path, vocab: int = 512, sizes: dict[str, int] | None = None) -> Path:
    """Write a prepared directory (manifest.json + tokens) following worldlm.data.prepared's contract."""
    sizes = sizes or {"fr": 60_000, "it": 40_000, "uk": 30_000, "ru": 20_000}
    streams = {}
    for k, (src, n) in enumerate(sizes.items()):
        # fr/it share half their token range, uk/ru the other half: two "language families".
        offset = 1 + (0 if k < 2 else (vocab - 1) // 2)
        width = (vocab - 1) // 2
        stream = markov_stream(100 * k, vocab, n + 8_000, offset, width)
        streams[src] = {"train": stream[:n], "val": stream[n : n + 4_000], "test": stream[n + 4_000 :]}
    write_token_streams(root, streams, vocab)
    return root


LANG_TREE = """
[[tree.nodes]]
name = "root"

[[tree.nodes]]
name = "fr-it"
parent = "root"

[[tree.nodes]]
name = "uk-ru"
parent = "root"

[[tree.nodes]]
name = "fr"
parent = "fr-it"
sources = ["fr"]

[[tree.nodes]]
name = "it"
parent = "fr-it"
sources = ["it"]

[[tree.nodes]]
name = "uk"
parent = "uk-ru"
sources = ["uk"]

[[tree.nodes]]
name = "ru"
parent = "uk-ru"
sources = ["ru"]
"""


def summary_of(run: Path) -> dict[str, Any]:
    """A run's summary.json without its wall-clock time (what equal runs share bit for bit)."""
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("wall_seconds")
    return dict(summary)


def tiny_config(tmp: Path, data: Path, method: str = "worldlm", extra: str = "") -> Path:
    """A config for a 7-node tree on the synthetic data, small enough to run in seconds.

    One thread: tests compare runs bit for bit, across processes too (a killed run and its resume, Flower's
    workers), and at two threads a fresh process on an AVX-512 Xeon now and then rounds the AdamW step's
    square root differently (README, "Same numbers"); at one thread every process agrees."""
    text = (
        f"""
name = "tiny"
method = "{method}"
seed = 0
{extra}
[data]
path = "{data}"

[model]
preset = "nano"
seq_len = 32

[train]
rounds = 2
local_steps = 3
batch_size = 4
lr_max = 3e-3
threads = 1

[eval]
batches = 2
batch_size = 8
"""
        + LANG_TREE
    )
    path = tmp / f"{method}.toml"
    path.write_text(text)
    return path


def train_tiny(tmp: Path, data: Path, method: str, *sets: str, extra: str = "") -> Path:
    """`worldlm train` on the tiny 7-node tree with `--set` overrides; returns the run directory."""
    from worldlm.cli import main

    cfg = tiny_config(tmp, data, method, extra)
    out = tmp / f"run-{method}-{len(list(tmp.iterdir()))}"
    args = ["train", str(cfg), "--out", str(out), "--quiet"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return out


# A 3-level tree for the engine tests: root -> regions A, B -> leaves a1, a2 (source a), b1, b2 (source b).
TREE = build_tree(
    [
        NodeSpec("root", "", ("a", "b")),
        NodeSpec("A", "root"),
        NodeSpec("B", "root"),
        NodeSpec("a1", "A", ("a",)),
        NodeSpec("a2", "A", ("a",)),
        NodeSpec("b1", "B", ("b",)),
        NodeSpec("b2", "B", ("b",)),
    ]
)


class FakeTrainer:
    """Deterministic 'training': add a fixed node-specific direction; records the global clock."""

    def __init__(self, size: int, scale: float = 0.1) -> None:
        gen = torch.Generator().manual_seed(0)
        self.size, self.scale, self.gen = size, scale, gen
        self.directions: dict[str, Tensor] = {}
        self.calls: list[tuple[str, int, int]] = []

    def train(self, node: str, params: Tensor, start_step: int, n_steps: int) -> Tensor:
        if node not in self.directions:
            self.directions[node] = torch.randn(self.size, generator=self.gen, dtype=torch.float64)
        self.calls.append((node, start_step, n_steps))
        return params + self.scale * n_steps * self.directions[node]


def states_for(tree: Tree, size: int, opt: ServerOptConfig) -> dict[str, NodeState]:
    """Every node of `tree` at the same linspace state; inner nodes with a fresh server optimizer."""
    init = torch.linspace(-1, 1, size, dtype=torch.float64)
    return {n: NodeState(init.clone(), make_server_opt(opt) if tree[n].children else None) for n in tree.order}
