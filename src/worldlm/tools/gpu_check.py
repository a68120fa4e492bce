"""The prepared GPU check: `worldlm gpu-check` / scripts/gpu_check.sh.

On a CUDA machine (at most ~8 minutes on one GPU) it measures
1. the device's bf16 matmul peak (best of several 8192² matmuls),
2. the shared training loop's tokens/s and model FLOP/s utilisation (6 · parameters · tokens/s against
   that peak) at `75m`, `125m` and `250m` under bf16 autocast,
3. WorldLM against FL on the 7-node languages tree at `75m` for a fixed sequential-step budget under the
   paper's protocol (deliverable evaluation, FL rounds as in A.1.2), on `data/languages` when it is
   prepared, else on synthetic tokens (then the perplexities only show that it runs),
and writes `<out>/results.json` and `<out>/results.md`. Without CUDA it says so in one line and runs the
same code as a CPU dry run (tiny preset, a few steps, fp32) whose numbers mean nothing.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worldlm import config as C
from worldlm.data.prepared import write_token_streams
from worldlm.files import atomic_write_json, atomic_write_text
from worldlm.model import GPT, gpt_config
from worldlm.training.device import Compute
from worldlm.training.loop import ClientOptConfig, Schedule, make_client_opt, train_steps

VOCAB = 50304  # the paper sizes' vocabulary (GPT-2's, padded)
DEMO = Path(__file__).resolve().parents[3] / "configs" / "demo.toml"  # the 7-node languages tree (a checkout)


@dataclass(frozen=True)
class CheckSize:
    presets: tuple[str, ...]
    seq_len: int
    batch: int
    steps: int
    matmul: int  # n of the n×n peak matmul
    tree_preset: str
    rounds: int
    local_steps: int
    tree_batch: int


GPU = CheckSize(("75m", "125m", "250m"), 1024, 16, 20, 8192, "75m", 4, 25, 16)
DRY = CheckSize(("nano",), 32, 4, 2, 256, "nano", 1, 2, 4)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of an n×n matmul in `dtype` on `device` (2n³ FLOP each), best of `repeats`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(preset: str, compute: Compute, size: CheckSize, vocab: int) -> dict[str, Any]:
    """Tokens/s of the shared training loop (`train_steps`) at `preset` after 2 warm-up steps."""
    torch.manual_seed(0)
    model = GPT(gpt_config(preset, vocab, size.seq_len)).to(compute.device)
    opt = make_client_opt(model, ClientOptConfig())
    x = torch.randint(0, vocab, (size.batch, size.seq_len + 1))

    def batch() -> tuple[Tensor, Tensor]:
        return x[:, :-1], x[:, 1:]

    schedule = Schedule(1e-4, 0.1, 1, size.steps + 2)
    train_steps(model, opt, batch, schedule, 0, 2, 1.0, compute=compute)
    _sync(compute.device)
    t0 = time.perf_counter()
    stats = train_steps(model, opt, batch, schedule, 2, size.steps, 1.0, compute=compute)
    _sync(compute.device)
    tps = stats.tokens / (time.perf_counter() - t0)
    return {"preset": preset, "parameters": model.num_params(), "tokens_per_s": round(tps, 1)}


def tree_runs(size: CheckSize, device: str, precision: str, work: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """WorldLM and FL on the 7-node languages tree at equal sequential steps (the paper's protocol)."""
    from worldlm.runners.local import run

    data = Path("data/languages")
    synthetic = not (data / "manifest.json").is_file()
    if synthetic:  # the same shapes on random tokens: shows it runs, not how well
        rng = np.random.default_rng(0)
        streams = {
            s: {
                sp: rng.integers(1, 4096, n).astype(np.uint16)
                for sp, n in (("train", 400_000), ("val", 20_000), ("test", 20_000))
            }
            for s in ("fr", "it", "uk", "ru")
        }
        write_token_streams(work / "data", streams, 4096)
        data = work / "data"
    out: dict[str, Any] = {"data": "synthetic tokens" if synthetic else str(data), "methods": {}}
    for method in ("worldlm", "fl"):
        sets = [
            f'method="{method}"',
            f'data.path="{data}"',
            f'model.preset="{size.tree_preset}"',
            f"model.seq_len={min(size.seq_len, 512)}",
            f"train.rounds={size.rounds}",
            f"train.local_steps={size.local_steps}",
            f"train.batch_size={size.tree_batch}",
            f'train.device="{device}"',
            f'train.precision="{precision}"',
            "eval.batches=2",
            "eval.every_round=false",
        ]
        cfg = C.load_config(DEMO, sets)
        say(f"tree: {method} at {size.tree_preset}, {size.rounds} rounds × {size.local_steps} local steps")
        t0 = time.perf_counter()
        summary = run(cfg, work / method)
        out["methods"][method] = {
            "mean_ppl": summary["mean_ppl"],
            "sequential_steps": summary["sequential_steps"],
            "train_tokens": summary["train_tokens"],
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }
    return out


def gpu_check(out: Path, dry_run: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Run the check (module docstring); writes results.json / results.md under `out`."""
    size = DRY if dry_run else GPU
    device = torch.device("cpu") if dry_run else torch.device("cuda")
    dtype = torch.float32 if dry_run else torch.bfloat16
    compute = Compute(device, None if dry_run else torch.bfloat16, 1)
    say(f"matmul peak: {size.matmul}² in {dtype}")
    peak = matmul_peak(device, dtype, size.matmul)
    rows = []
    for preset in size.presets:
        say(f"training loop: {preset}")
        row = throughput(preset, compute, size, VOCAB if not dry_run else 512)
        row["mfu"] = round(6 * row["parameters"] * row["tokens_per_s"] / peak, 4)
        rows.append(row)
    with tempfile.TemporaryDirectory() as tmp:
        tree = tree_runs(size, device.type, "fp32" if dry_run else "bf16", Path(tmp), say)
    result = {
        "dry_run": dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "matmul_peak_flops": peak,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "throughput": rows,
        "tree": tree,
    }
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# worldlm gpu-check" + (" (CPU dry run: the numbers mean nothing)" if r["dry_run"] else ""),
        "",
        f"{r['device']}, torch {r['torch']}, {r['date']}; {r['matmul_dtype']} matmul peak "
        f"{r['matmul_peak_flops'] / 1e12:.1f} TFLOP/s (measured).",
        "",
        "| preset | parameters | tokens/s | model FLOP/s utilisation |",
        "|---|---:|---:|---:|",
        *(
            f"| {x['preset']} | {x['parameters']:,} | {x['tokens_per_s']:,.0f} | {x['mfu']:.1%} |"
            for x in r["throughput"]
        ),
        "",
        f"7-node languages tree ({r['tree']['data']}):",
        "",
        "| method | mean ppl | sequential steps | training tokens | wall s |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {m} | {v['mean_ppl']:.1f} | {v['sequential_steps']} | {v['train_tokens']:,} | {v['wall_seconds']} |"
            for m, v in r["tree"]["methods"].items()
        ),
        "",
    ]
    return "\n".join(lines)


def cli(out: Path, dry_run: bool, quiet: bool) -> int:
    say: Callable[[str], None] = (lambda _m: None) if quiet else (lambda m: print(f"gpu-check: {m}", flush=True))
    if not dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; running the CPU dry run of the same code instead")
        with tempfile.TemporaryDirectory() as tmp:
            gpu_check(Path(tmp), True, say)
        return 0
    result = gpu_check(out, dry_run, say)
    if not quiet:
        print(json.dumps({"throughput": result["throughput"], "tree": result["tree"]["methods"]}, indent=1))
    return 0
