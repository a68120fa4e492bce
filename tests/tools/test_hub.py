"""A run's models in Hugging Face Transformers (export), text generation, TensorBoard events, and
the `lines` and `hf` source formats.

The run is made from real text (prepared with a trained BPE from `lines` files), so the exported fast
tokenizer and the model are checked against this package's own on the same ids and logits.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from worldlm.cli import main
from worldlm.data.prepare import prepare_sources
from worldlm.data.sources import SourceSpec, read_documents
from worldlm.data.tokenizer import encode
from worldlm.errors import DataError
from worldlm.tools.hub import generate_ids, load_node_model, prompt_ids

transformers = pytest.importorskip("transformers")

WORDS = {
    "a": [
        "le",
        "la",
        "les",
        "un",
        "une",
        "de",
        "des",
        "et",
        "est",
        "dans",
        "pour",
        "avec",
        "sur",
        "pas",
        "plus",
        "comme",
        "mais",
    ],
    "b": [
        "и",
        "в",
        "не",
        "на",
        "я",
        "что",
        "он",
        "с",
        "по",
        "это",
        "как",
        "а",
        "то",
        "все",
        "она",
        "так",
        "его",
        "но",
        "да",
        "ты",
        "к",
        "у",
        "же",
    ],
}

TREE = """
name = "hub"
method = "worldlm"
seed = 0

[data]
path = "{data}"

[model]
preset = "nano"
seq_len = 32
key_blocks = 2

[train]
rounds = 2
local_steps = 3
batch_size = 4
threads = 1

[eval]
batches = 1
batch_size = 4

[[tree.nodes]]
name = "root"

[[tree.nodes]]
name = "a"
parent = "root"
sources = ["a"]

[[tree.nodes]]
name = "b"
parent = "root"
sources = ["b"]
"""


def _lines(path: Path, words: list[str], n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(5, 25))) for _ in range(n)) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hub")
    specs = {
        src: SourceSpec(str(_lines(tmp / f"{src}.txt", w, 600, k)), "lines") for k, (src, w) in enumerate(WORDS.items())
    }
    prepare_sources(specs, tmp / "data", vocab_size=300)
    cfg = tmp / "hub.toml"
    cfg.write_text(TREE.format(data=tmp / "data"))
    out = tmp / "run"
    assert main(["train", str(cfg), "--out", str(out), "--quiet", "--tensorboard"]) == 0
    return out


@pytest.mark.e2e
def test_exported_model_and_tokenizer_equal_ours(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf-a"
    assert main(["export", str(run), "--node", "a", "--out", str(out), "--quiet"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_node_model(run, "a")
    ids = torch.randint(0, ours.model.cfg.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.model(ids), rtol=0, atol=1e-5)
    for text in ("le la des et", "и в не на я", "mixed: le и 42 !?\ttabs  and\nnew lines é ü"):
        assert tok(text, add_special_tokens=False)["input_ids"] == encode(ours.tokenizer, text)
        assert tok.decode(encode(ours.tokenizer, text)) == text
    # greedy generation: ours (worldlm generate) equals Transformers' greedy generate
    start = prompt_ids(ours, "le la")
    mine = generate_ids(ours.model, start, 12, stop=ours.eot)
    theirs = hf.generate(torch.tensor([start]), max_new_tokens=12, do_sample=False)[0, len(start) :].tolist()
    assert mine == theirs


@pytest.mark.e2e
def test_export_all_generate_and_errors(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run), "--all", "--out", str(tmp_path / "all"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a", "b", "root"]
    assert (tmp_path / "all" / "b" / "model.safetensors").is_file()
    # an existing directory is not overwritten without --force
    assert main(["export", str(run), "--node", "a", "--out", str(tmp_path / "all" / "a"), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(run), "--node", "zz", "--out", str(tmp_path / "x")]) == 2
    assert "no model for node 'zz'; its nodes: a, b, root" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--node", "a"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    # sampling is reproducible with a seed; several nodes print one block each
    args = ["generate", str(run), "--node", "a,b", "--prompt", "le", "--temperature", "0.8", "--top-k", "5"]
    assert main([*args, "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--seed", "3"]) == 0
    assert capsys.readouterr().out == first and first.startswith("--- a: le") and "\n--- b: le" in first


@pytest.mark.e2e
def test_tensorboard_events_mirror_metrics_and_survive_resume(run: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
        ea = EventAccumulator(str(path / "tensorboard"))
        ea.Reload()
        return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}

    got = scalars(run)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val_a = [(r["step"], r["ppl"]) for r in records if r.get("split") == "val" and r["node"] == "a"]
    assert got["val/ppl/a"] == [(s, pytest.approx(p, rel=1e-6)) for s, p in val_a]
    assert {"train/loss/root", "attention/root/children/a", "attention/a/parent/root", "bytes/a->root"} <= set(got)
    # resumed from round 1: the events are rebuilt from the records kept, no step twice
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "final")
    shutil.rmtree(sorted((resumed / "checkpoints").glob("round-*"))[-1])
    (resumed / "summary.json").unlink()
    cfg = run.parent / "hub.toml"
    assert main(["train", str(cfg), "--out", str(resumed), "--quiet", "--resume", "--tensorboard"]) == 0
    again = scalars(resumed)
    assert again["val/ppl/a"] == [(s, pytest.approx(p, rel=1e-6)) for s, p in val_a]
    assert len(again["train/loss/a"]) == len(got["train/loss/a"])


def test_lines_and_hf_formats(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    (tmp_path / "one.txt").write_text("first doc\n\n  second doc  \nthird\n")
    assert list(read_documents(SourceSpec(str(tmp_path / "one.txt"), "lines"))) == ["first doc", "second doc", "third"]
    assert list(read_documents(SourceSpec(str(tmp_path / "one.txt"), "text"))) == ["first doc", "second doc  \nthird"]
    ds = datasets.Dataset.from_dict({"body": ["x one", "", None, "y two"], "n": [1, 2, 3, 4]})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert list(read_documents(SourceSpec(str(tmp_path / "saved"), "hf", "body"))) == ["x one", "y two"]
    dd = datasets.DatasetDict({"train": ds, "extra": datasets.Dataset.from_dict({"body": ["z"], "n": [0]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert list(read_documents(SourceSpec(str(tmp_path / "dict"), "hf", "body"))) == ["z", "x one", "y two"]
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))
    assert list(read_documents(SourceSpec(str(arrow[0]), "hf", "body"))) == ["x one", "y two"]
    with pytest.raises(DataError, match="no column 'text' \\(found: body, n\\)"):
        list(read_documents(SourceSpec(str(tmp_path / "saved"), "hf")))
    with pytest.raises(DataError, match="holds int"):
        list(read_documents(SourceSpec(str(tmp_path / "saved"), "hf", "n")))
    with pytest.raises(DataError, match="neither a `save_to_disk` dataset folder"):
        list(read_documents(SourceSpec(str(tmp_path / "one.txt"), "hf")))


def test_a_text_file_without_blank_lines_points_to_lines(tmp_path: Path) -> None:
    (tmp_path / "docs.txt").write_text("one document per line\nanother one\nand a third\n")
    with pytest.raises(DataError, match='format = "lines"'):
        prepare_sources({"s": SourceSpec(str(tmp_path / "docs.txt"), "text")}, tmp_path / "out", vocab_size=300)
