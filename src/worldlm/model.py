"""A decoder-only GPT in one file (nanoGPT style) and its backbone / key-layer split.

Shapes: B = batch, T = sequence length, C = n_embd, H = n_head, V = vocab.

The WorldLM split (paper §3.2): the key layers K are the last `key_blocks` transformer
blocks, each treated as one flat vector; everything else (embeddings, the other blocks, final
norm, tied LM head) is the backbone B. `ParamLayout` orders all parameters as
[backbone..., key block 0..., key block 1...] so that a node's whole state is one flat tensor,
its backbone a prefix and its keys a [L, D] view of the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldlm.federation.types import Split


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int = 8192
    seq_len: int = 128
    mlp_ratio: int = 4


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_embd: int
    n_head: int


# Parameter counts in the README are for vocab 8192 (small presets) / 50304 (paper sizes).
PRESETS: dict[str, Preset] = {
    "nano": Preset(n_layer=6, n_embd=96, n_head=4),  # ~1.5 M with an 8k vocab (0.7 M in blocks)
    "micro": Preset(n_layer=8, n_embd=224, n_head=7),  # ~6.7 M
    "small": Preset(n_layer=12, n_embd=384, n_head=6),  # ~24 M
    "75m": Preset(n_layer=10, n_embd=640, n_head=10),
    "125m": Preset(n_layer=12, n_embd=768, n_head=12),
    "250m": Preset(n_layer=16, n_embd=1024, n_head=16),
    "400m": Preset(n_layer=22, n_embd=1152, n_head=18),
}


def gpt_config(preset: str, vocab_size: int, seq_len: int) -> GPTConfig:
    p = PRESETS[preset]
    return GPTConfig(n_layer=p.n_layer, n_embd=p.n_embd, n_head=p.n_head, vocab_size=vocab_size, seq_len=seq_len)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)  # 3 x (B, T, C)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        out: Tensor = self.proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return out


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.proj(F.gelu(self.fc(x)))
        return out


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        out: Tensor = x + self.mlp(self.ln2(x))
        return out


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.apply(self._init)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so depth does not blow up activations.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        """idx (B, T) -> logits (B, T, V), or the mean cross-entropy if targets (B, T) are given."""
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied LM head: (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ParamLayout:
    """Where each parameter lives in a node's flat state vector: backbone first, then key blocks."""

    def __init__(self, model: GPT, key_blocks: int) -> None:
        n_layer = model.cfg.n_layer
        if not 0 <= key_blocks < n_layer:
            raise ValueError(f"key_blocks must be in [0, {n_layer - 1}], got {key_blocks}")
        first_key = n_layer - key_blocks
        named = list(model.named_parameters())
        key_names = [[n for n, _ in named if n.startswith(f"blocks.{i}.")] for i in range(first_key, n_layer)]
        flat_keys = {n for names in key_names for n in names}
        self.names: list[str] = [n for n, _ in named if n not in flat_keys] + [n for ns in key_names for n in ns]
        shapes = dict((n, p.shape) for n, p in named)
        self.shapes = [shapes[n] for n in self.names]
        self.numels = [math.prod(s) for s in self.shapes]
        self.key_blocks = key_blocks
        self.key_size = sum(self.numels[len(self.names) - len(flat_keys) :]) // max(key_blocks, 1)
        self.total = sum(self.numels)
        self.backbone_size = self.total - key_blocks * self.key_size
        self.key_param_names = key_names

    def flatten(self, model: nn.Module) -> Tensor:
        params = dict(model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])  # a new tensor: cat never aliases

    def load(self, model: nn.Module, flat: Tensor) -> None:
        """Copy a flat state vector into the model's parameters (in place)."""
        if flat.numel() != self.total:
            raise ValueError(f"state has {flat.numel()} values, the model {self.total}")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, chunk, shape in zip(self.names, torch.split(flat, self.numels), self.shapes, strict=True):
                params[name].copy_(chunk.view(shape))

    def key_matrix_mask(self) -> Tensor:
        """[key_size] bool over one key block's flat layout: True on weight matrices (2-D parameters), False
        on LayerNorm gains and biases (the `federation.similarity_on = "matrices"` selection)."""
        if not self.key_blocks:
            raise ValueError("the layout has no key blocks")
        shapes = dict(zip(self.names, self.shapes, strict=True))
        names = self.key_param_names[0]
        return torch.cat([torch.full((math.prod(shapes[n]),), len(shapes[n]) >= 2) for n in names])

    @property
    def split(self) -> Split:
        """The engine's view of this layout: backbone prefix, then `key_blocks` rows of `key_size`."""
        return Split(self.backbone_size, self.key_blocks, self.key_size)
