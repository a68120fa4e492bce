"""Record-level differential privacy at a node: DP-SGD (`dp.unit = "record"`).

Every DP node trains with DP-SGD (Abadi et al. 2016), so everything it sends anywhere is record-level DP
whatever the other nodes do (inter-silo record-level DP). A *record* is one training window: the node's
shards are cut into non-overlapping windows of seq_len + 1 tokens. Each step

1. samples every window independently with probability q = batch_size / N (Poisson sampling; the batch
   size varies, possibly 0);
2. computes each sampled window's gradient (per-example gradients with `torch.func`: vmap over grad of
   the model called functionally; Opacus' module hooks miss the tied LM head, which reads the token
   embedding through F.linear, so they would get the embedding's per-example gradients wrong);
3. clips each to L2 norm C (`dp.max_grad_norm`, over all parameters together), sums them, adds
   N(0, σ²C²) per coordinate and divides by the expected batch size q·N;
4. takes the AdamW step with that gradient (the node's one training loop, `train.train_steps`).

σ is calibrated once, before training, so that after the node's planned steps of the whole run ε at
`dp.delta` equals `dp.target_epsilon` (Opacus' `get_noise_multiplier`, RDP accountant); ε so far comes
from Opacus' `RDPAccountant` after every step. A document longer than a window spans several records:
its protection is that of a group of that many records (roughly ε times the number of windows).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from worldlm.errors import WorldLMError


def _opacus() -> Any:
    try:
        import opacus.accountants as accountants
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError as exc:
        raise WorldLMError("dp.unit = 'record' needs Opacus: pip install 'worldlm[dp]'") from exc
    return accountants.RDPAccountant, get_noise_multiplier


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier σ giving ε = target_epsilon at δ after `steps` Poisson-sampled steps at rate q."""
    _, get_noise_multiplier = _opacus()
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser, still valid bound
        warnings.simplefilter("ignore", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=max(1, steps),
                accountant="rdp",
            )
        )


def per_example_grads(model: nn.Module, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Each example's gradient of its own mean token loss ({name: [b, *shape]}) and its loss [b]."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        loss: Tensor = functional_call(model, p, (xi.unsqueeze(0), yi.unsqueeze(0)))
        return loss

    with warnings.catch_warnings():  # CPU attention has no batching rule: a loop inside vmap, same numbers
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        grads, losses = vmap(grad_and_value(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return grads, losses


class RecordDP:
    """DP-SGD state of one node: σ, q, C, the noise generator and Opacus' accountant (module docstring)."""

    def __init__(
        self,
        noise_multiplier: float,
        sample_rate: float,
        n_records: int,
        max_grad_norm: float,
        seed: int,
        delta: float = 1e-5,
        budget: float = 0.0,
    ) -> None:
        """`budget` > 0: the node stops taking steps before its ε at `delta` would exceed it (dp.epsilon_budget)."""
        accountant_cls, _ = _opacus()
        self.delta, self.budget = delta, budget
        self.stopped = False
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.expected_batch = sample_rate * n_records
        self.max_grad_norm = max_grad_norm
        self.gen = torch.Generator().manual_seed(seed)
        self.accountant = accountant_cls()

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> float:
        """Set every parameter's .grad to the privatised gradient of this Poisson sample; return its mean loss.

        Past the ε budget no gradient is set (AdamW then leaves the parameters as they are); the loss is the
        model's on the sample, as it stands.
        """
        named = list(model.named_parameters())
        if self.budget > 0 and (self.stopped or self._epsilon_after_one_more() > self.budget):
            self.stopped = True
            for _, p in named:
                p.grad = None
            with torch.no_grad():
                return float(model(x, y)) if x.shape[0] else float("nan")
        if x.shape[0]:
            grads, losses = per_example_grads(model, x, y)
            sq = sum(g.reshape(g.shape[0], -1).square().sum(dim=1) for g in grads.values())
            factor = (self.max_grad_norm / (torch.as_tensor(sq).sqrt() + 1e-6)).clamp(max=1.0)  # [b]
            loss = float(losses.mean())
        else:  # an empty sample: the release is noise alone
            grads, factor, loss = {}, torch.zeros(0), float("nan")
        for name, p in named:
            total = (
                torch.einsum("b,b...->...", factor.to(p.device), grads[name]) if name in grads else torch.zeros_like(p)
            )
            noise = torch.randn(p.shape, generator=self.gen).to(p.device) * (self.noise_multiplier * self.max_grad_norm)
            p.grad = (total + noise) / self.expected_batch
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return loss

    def _epsilon_after_one_more(self) -> float:
        accountant_cls, _ = _opacus()
        probe = accountant_cls()
        probe.history = [*self.accountant.history, (self.noise_multiplier, self.sample_rate, 1)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(probe.get_epsilon(self.delta))

    def epsilon(self, delta: float) -> float:
        if not self.accountant.history:
            return 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(self.accountant.get_epsilon(delta))

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        meta = {"history": [list(h) for h in self.accountant.history], "stopped": self.stopped}
        return {"gen": self.gen.get_state()}, meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.gen.set_state(tensors["gen"])
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in meta["history"]]
        self.stopped = bool(meta["stopped"])
