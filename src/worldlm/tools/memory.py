"""How much accelerator memory one node needs to train a preset, planned on the meta device.

The model is built on PyTorch's meta device (shapes only, no memory), so its parameter count P is exact
for any preset. Bytes per training node:

    weights 4P (fp32 master weights, also under bf16 autocast) + gradients 4P + AdamW moments 8P
    + the node's federation state 4P (its flat parameters between visits)
    + server-optimizer state on an inner node: 4 · backbone with momentum (fedavgm, nesterov), 8 · backbone
      for fedadam, nothing for fedavg
    + activations of one micro-batch of b sequences of T tokens (what autograd keeps for the backward pass):
      per token, per block, bf16 autocast: LayerNorm inputs 2 · 4C, the qkv input 2C, q, k, v 6C, the
      attention output and the projection input 2 · 2C, the MLP input 2C, GELU input and output 2 · 8C
      (= 38C bytes; fp32: 68C), plus the final LayerNorm input 4C, the LM head's input 2C (fp32: 4C) and
      the cross-entropy's fp32 log-probabilities 4V. Token ids and LayerNorm statistics are left out.

Fused attention (flash / memory-efficient SDPA on CUDA) keeps no T × T matrix; the CPU's math path does,
so on the CPU activations are larger than planned. Temporary buffers and the allocator's caching are not
counted: leave ~20 % headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worldlm.model import GPT, gpt_config


@dataclass(frozen=True)
class MemoryPlan:
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    node_state: int
    server_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.node_state + self.server_state + self.activations


def meta_parameters(preset: str, vocab: int, seq_len: int, key_blocks: int = 0) -> tuple[int, int, int, int]:
    """(parameters, n_layer, n_embd, backbone size) of `preset`, counted on the meta device."""
    with torch.device("meta"):
        model = GPT(gpt_config(preset, vocab, seq_len))
    total = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    return total, model.cfg.n_layer, model.cfg.n_embd, total - key_blocks * per_block


def memory_plan(
    preset: str,
    vocab: int,
    seq_len: int,
    micro_batch: int,
    bf16: bool = True,
    server_opt: str | None = None,
    key_blocks: int = 0,
) -> MemoryPlan:
    """Bytes one node needs to train `preset` (module docstring); `server_opt`: the kind on an inner node."""
    params, n_layer, c, backbone = meta_parameters(preset, vocab, seq_len, key_blocks)
    server = {None: 0, "fedavg": 0, "fedavgm": 4, "nesterov": 4, "fedadam": 8}[server_opt] * backbone
    per_token = (38 * c * n_layer + 6 * c + 4 * vocab) if bf16 else (68 * c * n_layer + 8 * c + 4 * vocab)
    return MemoryPlan(
        parameters=params,
        weights=4 * params,
        gradients=4 * params,
        optimizer=8 * params,
        node_state=4 * params,
        server_state=server,
        activations=per_token * micro_batch * seq_len,
    )
