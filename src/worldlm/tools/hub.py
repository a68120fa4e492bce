"""Use a run's models outside this package: export to Hugging Face Transformers, generate text.

A run keeps, per tree node, the model the method delivers to it in `checkpoints/final/<node>.safetensors`
(this package's state dict). `export_hf` maps one onto GPT-2 (`GPT2LMHeadModel`: Conv1D weights are the
transposes of our Linear weights, the biases our Linear layers do not have are zero, the LM head is tied to
the token embedding, exact GELU, LayerNorm ε 1e-5) and writes it with a fast tokenizer built from the run's
`tokenizer.json`, so `AutoModelForCausalLM.from_pretrained(DIR)` computes the same logits. `generate`
samples a continuation from a node's model with this package alone.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import Tensor

from worldlm import config as C
from worldlm.data.prepared import load_prepared
from worldlm.data.tokenizer import EOT, decode, encode, load_tokenizer
from worldlm.errors import WorldLMError, quoted
from worldlm.model import GPT, gpt_config


@dataclass(frozen=True)
class NodeModel:
    """One node's final model of a run, with the run's config and tokenizer."""

    node: str
    cfg: C.Config
    model: GPT
    tokenizer: Tokenizer
    eot: int


def run_nodes(run: Path) -> list[str]:
    """The nodes with a final model in `run` (sorted); WorldLMError when `run` is not a finished run."""
    if not (run / "config.toml").is_file():
        raise WorldLMError(f"{run} is not a run directory (no config.toml); pass the directory `worldlm train` wrote")
    final = run / "checkpoints" / "final"
    nodes = sorted(p.stem for p in final.glob("*.safetensors"))
    if not nodes:
        raise WorldLMError(
            f"{run} has no final models ({final} is empty); finish the run first (worldlm train --resume)"
        )
    return nodes


def load_node_model(run: Path, node: str) -> NodeModel:
    """The model `run` delivers to `node` (eval mode, CPU, fp32) with its config and tokenizer."""
    nodes = run_nodes(run)
    if node not in nodes:
        raise WorldLMError(f"run {run} has no model for node {quoted(node)}; its nodes: {', '.join(nodes)}")
    cfg = C.load_config(run / "config.toml")
    data = load_prepared(cfg.data.path)  # DataError (one line) when the prepared data is not here
    model = GPT(gpt_config(cfg.model.preset, data.vocab_size, cfg.model.seq_len))
    state = load_file(str(run / "checkpoints" / "final" / f"{node}.safetensors"))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WorldLMError(f"{run}: the final model of {quoted(node)} does not match its config ({exc})") from exc
    model.eval()
    return NodeModel(node, cfg, model, load_tokenizer(data.tokenizer_file), data.eot_id)


# ---------------------------------------------------------------------------- generation


def prompt_ids(m: NodeModel, prompt: str) -> list[int]:
    """What generation starts from: `<|endoftext|>` (a document starts after it, as in training) then the prompt."""
    return [m.eot, *encode(m.tokenizer, prompt)]


@torch.no_grad()
def generate_ids(
    model: GPT,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop: int | None = None,
) -> list[int]:
    """Continue `ids` by up to `max_new_tokens` tokens (the context cropped to the model's seq_len).

    temperature 0: greedy (the first maximum on ties, as torch.argmax); > 0: sample from softmax(logits / T),
    restricted to the `top_k` most likely tokens when top_k > 0, with a generator seeded by `seed`.
    Stops after `stop` (e.g. `<|endoftext|>`) if it is generated. Returns the new tokens only.
    """
    if max_new_tokens < 0 or temperature < 0 or top_k < 0:
        raise WorldLMError("--max-new-tokens, --temperature and --top-k must be >= 0")
    gen = torch.Generator().manual_seed(seed)
    seq = list(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        context = torch.tensor([seq[-model.cfg.seq_len :]])
        logits = model(context)[0, -1].float()
        if temperature == 0:
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
        seq.append(nxt)
        out.append(nxt)
        if nxt == stop:
            break
    return out


def generate(
    m: NodeModel, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, seed: int = 0
) -> str:
    """The node model's continuation of `prompt` as text (without the prompt and the final `<|endoftext|>`)."""
    new = generate_ids(m.model, prompt_ids(m, prompt), max_new_tokens, temperature, top_k, seed, stop=m.eot)
    return decode(m.tokenizer, [i for i in new if i != m.eot])


# ---------------------------------------------------------------------------- Hugging Face export


def hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """Our state dict under GPT-2's names and layouts (Conv1D: [in, out]; zero biases where we have none)."""
    ours = {k: v.detach().float() for k, v in model.state_dict().items()}
    expected = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    out = {
        "transformer.wte.weight": ours["wte.weight"],
        "transformer.wpe.weight": ours["wpe.weight"],
        "transformer.ln_f.weight": ours["ln_f.weight"],
        "transformer.ln_f.bias": ours["ln_f.bias"],
    }
    for i in range(model.cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours_name, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            for p in ("weight", "bias"):
                out[f"{h}{theirs}.{p}"] = ours[f"{b}{ours_name}.{p}"]
                expected.add(f"{b}{ours_name}.{p}")
        for ours_name, theirs in (
            ("attn.qkv", "attn.c_attn"),
            ("attn.proj", "attn.c_proj"),
            ("mlp.fc", "mlp.c_fc"),
            ("mlp.proj", "mlp.c_proj"),
        ):
            w = ours[f"{b}{ours_name}.weight"]  # Linear: [out, in]
            out[f"{h}{theirs}.weight"] = w.t().contiguous()
            out[f"{h}{theirs}.bias"] = torch.zeros(w.shape[0])
            expected.add(f"{b}{ours_name}.weight")
    extra = sorted(set(ours) - expected)
    if extra:  # something GPT-2 has no place for: refuse rather than export a model that computes differently
        raise WorldLMError(f"the model has parameters GPT-2 cannot hold ({', '.join(extra)}); it cannot be exported")
    return out


def hf_config(m: NodeModel) -> Any:
    from transformers import GPT2Config

    c = m.model.cfg
    return GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.seq_len,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.mlp_ratio * c.n_embd,
        activation_function="gelu",  # exact (erf) GELU, as F.gelu; GPT-2's own is the tanh approximation
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's default
        scale_attn_weights=True,  # 1/sqrt(head dim), as scaled_dot_product_attention
        tie_word_embeddings=True,
        bos_token_id=m.eot,
        eos_token_id=m.eot,
    )


def export_hf(run: Path, node: str, out: Path, force: bool = False) -> Path:
    """Write `node`'s final model of `run` as a Transformers GPT-2 model directory with its fast tokenizer.

    The directory is assembled beside `out` and moved into place, so `out` is never half-written.
    """
    try:
        from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise WorldLMError("export needs Hugging Face Transformers: pip install 'worldlm[hf]'") from exc
    if out.exists() and any(out.iterdir()) and not force:
        raise WorldLMError(f"{out} already exists and is not empty; pass --force to replace it or choose --out")
    hf_logging.disable_progress_bar()
    m = load_node_model(run, node)
    hf = GPT2LMHeadModel(hf_config(m))
    missing, unexpected = hf.load_state_dict(hf_state_dict(m.model), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # lm_head is tied to wte
        raise WorldLMError(f"GPT-2 layout mismatch (missing {missing}, unexpected {unexpected}); cannot export")
    hf.tie_weights()
    hf.eval()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=m.tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        model_max_length=m.model.cfg.seq_len,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
