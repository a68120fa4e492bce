"""The GPT, its backbone/key split, the LR schedule, the training loop and perplexity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from worldlm.model import GPT, PRESETS, ParamLayout, gpt_config
from worldlm.training.evaluate import evaluate
from worldlm.training.loop import ClientOptConfig, Schedule, make_client_opt, train_steps


def tiny(vocab: int = 64, seq_len: int = 16) -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_config("nano", vocab, seq_len))


def test_shapes_and_presets() -> None:
    model = tiny()
    x = torch.randint(0, 64, (3, 16))
    assert model(x).shape == (3, 16, 64)
    assert model(x, x).dim() == 0
    nano = GPT(gpt_config("nano", 8192, 128)).num_params()
    assert 1.0e6 < nano < 2.0e6
    assert [PRESETS[p].n_embd % PRESETS[p].n_head for p in PRESETS] == [0] * len(PRESETS)


def test_causal_attention_ignores_future_tokens() -> None:
    model = tiny().eval()
    x = torch.randint(0, 64, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 64
    assert torch.allclose(model(x)[0, :10], model(y)[0, :10], atol=1e-6)


@pytest.mark.parametrize("key_blocks", [0, 1, 2, 5])
def test_split_covers_every_parameter_once(key_blocks: int) -> None:
    model = tiny()
    layout = ParamLayout(model, key_blocks)
    assert sorted(layout.names) == sorted(n for n, _ in model.named_parameters())
    assert layout.total == model.num_params()
    flat = layout.flatten(model)
    assert layout.split.backbone(flat).numel() + layout.split.keys(flat).numel() == flat.numel()
    key_params = {n for names in layout.key_param_names for n in names}
    first_key = model.cfg.n_layer - key_blocks
    assert key_params == {
        n for n, _ in model.named_parameters() if n.startswith("blocks.") and int(n.split(".")[1]) >= first_key
    }
    if key_blocks:
        # each key row is exactly one block, flattened
        block = torch.cat([p.detach().reshape(-1) for p in model.blocks[first_key].parameters()])
        assert torch.equal(layout.split.keys(flat)[0], block)


def test_flatten_load_round_trip() -> None:
    a, b = tiny(), GPT(gpt_config("nano", 64, 16))
    layout = ParamLayout(a, 2)
    layout.load(b, layout.flatten(a))
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(a(x), b(x))


def test_schedule_values() -> None:
    s = Schedule(lr_max=1.0, alpha=0.1, warmup=10, total=110)
    assert s.lr(0) == pytest.approx(0.1)
    assert s.lr(5) == pytest.approx(0.55)
    assert s.lr(10) == pytest.approx(1.0)
    assert s.lr(60) == pytest.approx(0.55)  # halfway through the cosine
    assert s.lr(110) == pytest.approx(0.1) and s.lr(500) == pytest.approx(0.1)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(10, 120))


@pytest.mark.e2e
def test_loss_decreases_on_a_repetitive_corpus() -> None:
    model = tiny(vocab=32)
    pattern = torch.arange(32).repeat(4)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, 64, (8,))
        rows = torch.stack([pattern[s : s + 17] for s in starts])
        return rows[:, :-1], rows[:, 1:]

    torch.manual_seed(1)
    opt = make_client_opt(model, ClientOptConfig())
    stats = train_steps(model, opt, batch, Schedule(3e-3, 0.1, 5, 60), 0, 60, grad_clip=1.0)
    assert stats.steps == 60 and stats.tokens == 60 * 8 * 16
    assert stats.last_loss < 0.5 * math.log(32)


def test_perplexity_matches_naive_mean_nll() -> None:
    model = tiny()
    windows = torch.randint(0, 64, (5, 17))
    loss, ppl = evaluate(model, windows, batch_size=2)
    with torch.no_grad():
        nlls = [F.cross_entropy(model(w[None, :-1])[0, t], w[t + 1]).item() for w in windows for t in range(16)]
    naive = sum(nlls) / len(nlls)
    assert loss == pytest.approx(naive, rel=1e-5)
    assert ppl == pytest.approx(math.exp(naive), rel=1e-5)
    assert evaluate(model, windows, 3) == pytest.approx((loss, ppl))  # batching does not change it
