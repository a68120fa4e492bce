"""Differential privacy for flagged nodes: DPFedAvg clipping and noise, clip bounds, accounting.

Paper §4.2 / Table 3 (docs/design.md, "Differential privacy"). A node flagged `dp = true` never sends its
raw state to its parent. What it sends is rebuilt from a privatised *difference* to what it
received from that parent in the same visit (DPFedAvg, McMahan et al. 2018; paper [49, 1]):

    d        = [B_sent − B_recv | K_sent − K_recv | r.vector − K_recv[r.position] for each residual r]
    d_clip   = d · min(1, C / ‖d‖₂)                  (joint L2 clip of everything that leaves)
    released = recv + d_clip + N(0, σ²C²·I)         (per coordinate)

The parent's own state is public to the parent, so the release is the Gaussian mechanism with L2
sensitivity C and noise multiplier σ on the node's contribution (node-level DP, add-or-remove
adjacency as in DP-FedAvg). Residual vectors are key layers of the node's subtree, so each is
privatised relative to the key layer at its position that the node received. Key layers that never
leave (FedPer) are replaced by the received ones in the message and take no part in the clip.

Clip bound C, per parent (shared by that parent's DP children), one of:
- "median" (paper default): the median raw (pre-clip) L2 norm of the DP updates the parent saw in
  the previous round; `initial_clip` (1.0) in the first round. The raw norms themselves are not
  privatised, so this bound is outside the accounted ε (as in the paper);
- "adaptive": private quantile estimation (Andrew et al. 2021): each DP node also releases its
  centred bit (1[‖d‖ ≤ C] − ½) + N(0, σ_b²); the parent averages them to the noisy fraction b̄
  and updates C ← C · exp(−η_C (b̄ − γ)). The bit is a Gaussian mechanism with sensitivity ½,
  i.e. noise multiplier 2σ_b, and is accounted;
- "fixed": C = `initial_clip` throughout.

Accounting uses Google's `dp-accounting` RDP accountant: one Gaussian event per release (sampling
probability 1: a DP node releases every time it is visited), plus one per noisy bit. ε at δ is
reported per node; with an `epsilon_budget` > 0 a node whose next release would exceed it stops
releasing (the engine then aggregates its parent without it).

Pure tensor code plus small state objects (like server_opt.ServerOpt): no I/O, no config import.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from worldlm.errors import quoted, suggest
from worldlm.federation.types import Residual, Split, Update

__all__ = [
    "CLIP_RULES",
    "Accountant",
    "DPSettings",
    "Privacy",
    "apply_difference",
    "clip_to_norm",
    "gaussian_epsilon",
    "message_difference",
    "privatize_vector",
]

CLIP_RULES = ("median", "adaptive", "fixed")
NOISE = ("local", "central")


@dataclass(frozen=True)
class DPSettings:
    """DP parameters (defaults: paper §4.2; adaptive ones: Andrew et al. 2021)."""

    sigma: float = 0.5  # noise multiplier z: noise std per coordinate = z · C
    delta: float = 1e-5  # δ at which ε is reported
    clip: str = "median"  # one of CLIP_RULES
    initial_clip: float = 1.0  # C in the first round (and throughout with clip = "fixed")
    epsilon_budget: float = 0.0  # > 0: a node stops releasing before its ε would exceed this
    target_quantile: float = 0.5  # adaptive: γ, the fraction of updates meant to fall under C
    clip_lr: float = 0.2  # adaptive: η_C of the geometric update
    bit_sigma: float = 0.5  # adaptive: σ_b, std of the noise on each node's centred clip bit
    noise: str = "local"  # local: each DP node noises its own release; central: its parent noises their sum

    def __post_init__(self) -> None:  # messages name the [dp] key: the config loader reports them as they are
        checks = [
            (0 < self.sigma < math.inf, f"dp.sigma must be > 0 (the noise multiplier), got {self.sigma}"),
            (0 < self.delta < 1, f"dp.delta must be in (0, 1), got {self.delta}"),
            (self.clip in CLIP_RULES, f"dp.clip {quoted(self.clip)} is unknown{suggest(self.clip, CLIP_RULES)}"),
            (self.initial_clip > 0, f"dp.initial_clip must be > 0, got {self.initial_clip}"),
            (self.epsilon_budget >= 0, f"dp.epsilon_budget must be >= 0 (0: no budget), got {self.epsilon_budget}"),
            (0 < self.target_quantile < 1, f"dp.target_quantile must be in (0, 1), got {self.target_quantile}"),
            (self.clip_lr > 0 and self.bit_sigma > 0, "dp.clip_lr and dp.bit_sigma must be > 0"),
            (self.noise in NOISE, f"dp.noise must be local or central, got {quoted(self.noise)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def release_events(self) -> list[float]:
        """Noise multipliers of the Gaussian mechanisms one release runs (update, then the clip bit)."""
        return [self.sigma, 2.0 * self.bit_sigma] if self.clip == "adaptive" else [self.sigma]


# ---------------------------------------------------------------------------- pure functions


def clip_to_norm(diff: Tensor, bound: float) -> tuple[Tensor, float]:
    """Scale `diff` into the L2 ball of radius `bound`. Returns (clipped, raw norm before clipping)."""
    norm = float(torch.linalg.vector_norm(diff.double()))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return diff * scale, norm


def privatize_vector(diff: Tensor, bound: float, sigma: float, gen: torch.Generator) -> tuple[Tensor, float]:
    """DPFedAvg on one joint vector: clip to `bound`, add N(0, (sigma·bound)²) per coordinate.

    Returns (privatised vector, raw norm). The noise is drawn from `gen` in `diff`'s dtype.
    """
    clipped, norm = clip_to_norm(diff, bound)
    noise = torch.randn(diff.shape, generator=gen, dtype=diff.dtype)
    return clipped + noise * (sigma * bound), norm


def message_difference(update: Update, received: Tensor, split: Split, share_keys: bool) -> Tensor:
    """Everything in `update` that leaves the node, minus what it received: [backbone | keys | residuals].

    `received` is the parent's flat state the node got in this visit (steps 2–3). Key layers are
    part of the message only when they are shared; a residual at position l is taken relative to
    the received key layer l.
    """
    parts = [split.backbone(update.params) - split.backbone(received)]
    if split.key_blocks and share_keys:
        parts.append((split.keys(update.params) - split.keys(received)).reshape(-1))
    if update.residuals:
        recv_keys = split.keys(received)  # [L, D]
        parts.extend(r.vector - recv_keys[r.position] for r in update.residuals)
    return torch.cat(parts)


def apply_difference(update: Update, received: Tensor, diff: Tensor, split: Split, share_keys: bool) -> Update:
    """The inverse of `message_difference`: received + `diff`, laid out like `update`.

    Key layers that do not leave the node (FedPer) are replaced by the received ones, so no raw
    value of a DP node sits in the message at all.
    """
    n_b = split.backbone_size
    backbone = split.backbone(received) + diff[:n_b]
    offset = n_b
    keys = split.keys(received) if split.key_blocks else received[n_b:n_b]
    if split.key_blocks and share_keys:
        n_k = split.key_blocks * split.key_size
        keys = keys + diff[offset : offset + n_k].view(split.key_blocks, split.key_size)
        offset += n_k
    residuals = []
    for r in update.residuals:
        d = r.vector.numel()
        residuals.append(Residual(split.keys(received)[r.position] + diff[offset : offset + d], r.position, r.origin))
        offset += d
    assert offset == diff.numel(), "difference vector does not match the message layout"
    return Update(split.join(backbone, keys), residuals)


def gaussian_epsilon(noise_multipliers: Sequence[tuple[float, int]], delta: float) -> float:
    """ε at δ of composed Gaussian mechanisms [(noise multiplier, count), ...], by dp-accounting's RDP accountant.

    Add-or-remove adjacency, sampling probability 1 (every release is a full Gaussian mechanism).
    """
    events = [(z, n) for z, n in noise_multipliers if n > 0]
    if not events:
        return 0.0
    import dp_accounting  # imported lazily: it pulls in scipy (~1 s)
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    for z, n in events:
        accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), n))
    return float(accountant.get_epsilon(delta))


# ---------------------------------------------------------------------------- state


@dataclass
class Accountant:
    """One node's ledger: run-length list of [noise multiplier, count] of the Gaussian mechanisms it ran."""

    ledger: list[tuple[float, int]] = field(default_factory=list)

    def record(self, noise_multiplier: float) -> None:
        if self.ledger and self.ledger[-1][0] == noise_multiplier:
            self.ledger[-1] = (noise_multiplier, self.ledger[-1][1] + 1)
        else:
            self.ledger.append((noise_multiplier, 1))

    def epsilon(self, delta: float, extra: Sequence[float] = ()) -> float:
        """ε spent so far (plus `extra` mechanisms not yet run, to test a budget before releasing)."""
        return gaussian_epsilon([*self.ledger, *((z, 1) for z in extra)], delta)


class Privacy:
    """DP state of one federation: which nodes are private, clip bounds per parent, noise, accountants.

    The engine (`federation.worldlm.run_round`) calls `applies` and `release`; the runner calls
    `end_round` after every global round and checkpoints `state_dict`.
    """

    def __init__(
        self,
        settings: DPSettings,
        parents: Mapping[str, str],
        seeds: Mapping[str, int],
        parent_seeds: Mapping[str, int] | None = None,
    ) -> None:
        """`parents`: DP node -> its parent; `seeds`: DP node -> seed of its noise generator; `parent_seeds`:
        parent -> seed of the generator it draws the central noise from (dp.noise = "central")."""
        self.settings = settings
        self.parents = dict(parents)
        self.generators = {n: torch.Generator().manual_seed(seeds[n]) for n in self.parents}
        central = settings.noise == "central"
        self.central_generators = (
            {p: torch.Generator().manual_seed((parent_seeds or {})[p]) for p in set(self.parents.values())}
            if central
            else {}
        )
        self.accountants = {n: Accountant() for n in self.parents}
        self.releases = dict.fromkeys(self.parents, 0)
        self.clip = {p: settings.initial_clip for p in set(self.parents.values())}  # C per parent
        self.last_clip = {n: settings.initial_clip for n in self.parents}  # the C a node last used
        self.stopped: set[str] = set()
        self.events: list[dict[str, object]] = []  # budget stops, drained by the runner
        self._norms: dict[str, list[float]] = {p: [] for p in self.clip}  # this round's raw norms
        self._bits: dict[str, list[float]] = {p: [] for p in self.clip}  # this round's noisy centred bits
        self._noted: dict[str, int] = {}  # parent -> the round of its pending statistics (`note`)
        self._eps_cache: dict[str, float] = {}

    def applies(self, node: str) -> bool:
        return node in self.parents

    def epsilon(self, node: str) -> float:
        if node not in self._eps_cache:
            self._eps_cache[node] = self.accountants[node].epsilon(self.settings.delta)
        return self._eps_cache[node]

    def release(self, node: str, update: Update, received: Tensor, split: Split, share_keys: bool) -> Update | None:
        """What DP node `node` sends its parent instead of `update`; None once its budget is spent."""
        s = self.settings
        if node in self.stopped:
            return None
        events = s.release_events()
        if s.epsilon_budget > 0:
            would_be = self.accountants[node].epsilon(s.delta, events)
            if would_be > s.epsilon_budget:
                self.stopped.add(node)
                self.events.append(
                    {
                        "event": "dp_budget_exhausted",
                        "node": node,
                        "epsilon": self.epsilon(node),
                        "next_epsilon": would_be,
                        "budget": s.epsilon_budget,
                        "releases": self.releases[node],
                    }
                )
                return None
        parent, gen = self.parents[node], self.generators[node]
        bound = self.clip[parent]
        diff = message_difference(update, received, split, share_keys)
        if s.noise == "central":  # clipped only: the parent noises the sum of its DP children's (`combine`)
            private, norm = clip_to_norm(diff, bound)
        else:
            private, norm = privatize_vector(diff, bound, s.sigma, gen)
        self._norms[parent].append(norm)
        if s.clip == "adaptive":  # Andrew et al. 2021, Alg. 1: noisy indicator of "under the bound"
            bit = (1.0 if norm <= bound else 0.0) - 0.5
            self._bits[parent].append(bit + s.bit_sigma * float(torch.randn((), generator=gen, dtype=torch.float64)))
        for z in events:
            self.accountants[node].record(z)
        self._eps_cache.pop(node, None)
        self.releases[node] += 1
        self.last_clip[node] = bound
        return apply_difference(update, received, private, split, share_keys)

    def combine(
        self,
        parent: str,
        senders: Sequence[str],
        updates: Sequence[Update],
        sent: Tensor,
        split: Split,
        share_keys: bool,
    ) -> list[Update]:
        """dp.noise = "central" at `parent` (as DP-FedAvg's and Flower's server-side wrappers do): its DP
        children's clipped releases become one noised mean, (Σ clip(d_i) + N(0, σ²C²)) / n, which replaces
        each of them (so no single DP child's update is used or passed on); local noise: `updates` unchanged.

        `sent`: the parent's state its children received. The sum has L2 sensitivity C per DP child, so each
        DP child's release is still one Gaussian mechanism with noise multiplier σ in its accountant; the
        trust differs: the DP children trust their parent with their clipped updates.
        """
        dp = [i for i, s in enumerate(senders) if self.parents.get(s) == parent]
        if self.settings.noise != "central" or not dp:
            return list(updates)
        if any(updates[i].residuals for i in dp):
            raise ValueError("central DP noise needs DP nodes without residuals to send up (leaves)")
        total = sum(message_difference(updates[i], sent, split, share_keys) for i in dp)
        assert isinstance(total, Tensor)
        gen = self.central_generators[parent]
        noise = torch.randn(total.shape, generator=gen, dtype=total.dtype) * (self.settings.sigma * self.clip[parent])
        group = apply_difference(updates[dp[0]], sent, (total + noise) / len(dp), split, share_keys)
        out = list(updates)
        for i in dp:
            out[i] = Update(group.params.clone(), [])
        return out

    def end_round(self) -> None:
        """Set every parent's bound for the next round from this round's releases (paper §4.2 / Andrew et al.)."""
        for parent in self.clip:
            self.end_parent(parent)

    def end_parent(self, parent: str) -> None:
        """Set `parent`'s bound for the next round from the releases of its DP children it saw this round."""
        s = self.settings
        norms, bits = self._norms[parent], self._bits[parent]
        if s.clip == "median" and norms:
            median = statistics.median(norms)
            if median > 0:  # all-zero updates (nothing trained) would collapse the bound for good
                self.clip[parent] = median
        elif s.clip == "adaptive" and bits:
            below = statistics.fmean(bits) + 0.5  # b̄: noisy fraction of updates under C
            self.clip[parent] *= math.exp(-s.clip_lr * (below - s.target_quantile))
        norms.clear()
        bits.clear()

    # A deployment where each node is its own process (the Flower runner) moves what the bound needs along
    # the tree's edges: a DP node `drain`s the statistics of its release and sends them up with it, its parent
    # `note`s them and `begin`s each visit (ending the last round's there), and sends its bound down with its
    # model (`set_bound`).

    def drain(self, node: str) -> tuple[list[float], list[float]]:
        """Right after DP node `node` released: what that release added to its parent's round (its raw norm,
        and its noisy bit with adaptive clipping), taken back out of this process's lists to be sent up."""
        parent = self.parents[node]
        bits = [self._bits[parent].pop()] if self.settings.clip == "adaptive" else []
        return [self._norms[parent].pop()], bits

    def note(self, parent: str, rnd: int, norms: Sequence[float], bits: Sequence[float]) -> None:
        """At `parent` in round `rnd`: the statistics one of its DP children sent with its release (`drain`)."""
        self._norms[parent].extend(norms)
        self._bits[parent].extend(bits)
        self._noted[parent] = rnd

    def begin(self, parent: str, rnd: int) -> None:
        """At `parent` as it starts a visit in round `rnd`: what it noted in an earlier round sets its bound
        now, as `end_round` would have at that round's end (a parent may be visited more than once a round)."""
        if self._noted.get(parent, rnd) < rnd:
            self.end_parent(parent)
            del self._noted[parent]

    def set_bound(self, node: str, bound: float) -> None:
        """At DP node `node`: the clip bound its parent sent down with its model."""
        self.clip[self.parents[node]] = bound

    def records(self) -> list[dict[str, object]]:
        """Per DP node: ε so far at δ, σ, the clip bound it used last, releases, whether it stopped."""
        return [
            {
                "node": n,
                "epsilon": self.epsilon(n),
                "delta": self.settings.delta,
                "sigma": self.settings.sigma,
                "clip": self.last_clip[n],
                "releases": self.releases[n],
                "stopped": n in self.stopped,
            }
            for n in self.parents
        ]

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors: noise generator states, JSON-able rest: ledgers, bounds, counters)."""
        tensors = {f"gen/{n}": g.get_state() for n, g in self.generators.items()}
        tensors.update({f"gen-central/{p}": g.get_state() for p, g in self.central_generators.items()})
        state: dict[str, Any] = {
            "ledger": {n: [list(e) for e in a.ledger] for n, a in self.accountants.items()},
            "releases": self.releases,
            "clip": self.clip,
            "last_clip": self.last_clip,
            "stopped": sorted(self.stopped),
            "norms": self._norms,
            "bits": self._bits,
            "noted": self._noted,
        }
        return tensors, state

    def load_state_dict(self, tensors: Mapping[str, Tensor], state: Mapping[str, Any]) -> None:
        for n, g in self.generators.items():
            g.set_state(tensors[f"gen/{n}"].clone())
        for p, g in self.central_generators.items():
            g.set_state(tensors[f"gen-central/{p}"].clone())
        for n, a in self.accountants.items():
            a.ledger = [(float(z), int(c)) for z, c in state["ledger"][n]]
        self.releases = {n: int(state["releases"][n]) for n in self.parents}
        self.clip = {p: float(state["clip"][p]) for p in self.clip}
        self.last_clip = {n: float(state["last_clip"][n]) for n in self.parents}
        self.stopped = set(state["stopped"])
        self._norms = {p: [float(v) for v in state["norms"][p]] for p in self.clip}
        self._bits = {p: [float(v) for v in state["bits"][p]] for p in self.clip}
        self._noted = {p: int(r) for p, r in state.get("noted", {}).items()}  # absent in earlier checkpoints
        self._eps_cache.clear()
