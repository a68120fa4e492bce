"""Benchmarks written to files (speed targets live here, not in timed tests).

`worldlm bench` measures, each figure as a ratio within one run where it can:

1. training efficiency: tokens/s of the shared training loop and its FLOP/s (≈ 6·parameters·tokens/s,
   attention scores left out) against this machine's fp32 matmul FLOP/s measured in the same run,
   under fp32, bf16 autocast, torch.compile and thread counts;
2. federation overhead: one round of the 7-node tree (configs/demo.toml's shape) on synthetic
   tokens, split into phases (the runner's `timing.jsonl`), a node's training tokens/s in the round
   against the raw loop's, and the bytes sent against the minimum (every parameter, 4 bytes, once
   down and once up each edge);
3. aggregation: the batched key-layer aggregation and residual pick (A.3.3 step 4.iv C–E) against
   the naive reference (`federation.aggregation_reference`), for 2..64 children and key layers of
   the model presets, results asserted equal;
4. memory: peak RSS of a short run on complete trees of 7, 21 and 85 nodes with node states in
   memory and on disk (`federation.offload_states`), one fresh process per measurement.

Results go to `<out>/results.json` and `<out>/results.md`; `--quick` runs a seconds-long version
(for the test) whose numbers mean nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

import worldlm
from worldlm import config as C
from worldlm.data.prepared import write_token_streams
from worldlm.errors import WorldLMError, quoted
from worldlm.federation import aggregation_reference as naive
from worldlm.federation.aggregation import aggregate_children_batched, most_dissimilar_batched
from worldlm.federation.types import BYTES_PER_VALUE
from worldlm.files import atomic_write_json, atomic_write_text
from worldlm.model import GPT, PRESETS, ParamLayout, gpt_config
from worldlm.training.loop import ClientOptConfig, Schedule, make_client_opt, train_steps

VOCAB = 4096  # the prepared recipes' default
TARGETS = {"in_round_vs_raw": 0.95, "non_training_fraction": 0.05, "aggregation_speedup_at_16": 10.0}
SETTINGS = ("fp32", "bf16-autocast", "fp32-compiled", "fp32-dp-sgd")
T = TypeVar("T")


@dataclass(frozen=True)
class BenchSize:
    preset: str = "nano"  # training efficiency
    steps: int = 20  # timed training steps per setting
    fed_preset: str = "micro"  # federation round
    fed_local_steps: int = 12  # as configs/demo.toml
    batch: int = 8
    seq_len: int = 128
    fed_eval_batches: int = 4
    raw_steps: int = 24  # the raw loop the federation's training is compared with
    children: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    key_presets: tuple[str, ...] = ("nano", "micro")  # key-layer sizes: one block of these presets
    memory_preset: str = "nano"
    memory_trees: tuple[tuple[int, int], ...] = ((2, 3), (4, 3), (4, 4))  # (branching, depth): 7, 21, 85 nodes
    memory_local_steps: int = 1
    compile: bool = True


DEFAULT = BenchSize()
QUICK = BenchSize(
    steps=2,
    fed_preset="nano",
    fed_local_steps=1,
    batch=2,
    seq_len=32,
    fed_eval_batches=1,
    raw_steps=2,
    children=(2, 16),
    key_presets=("nano",),
    memory_trees=((2, 2),),
    compile=False,
)


# ---------------------------------------------------------------------------- helpers


def _best_time(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """The fastest of `repeats` calls (least disturbed by other processes) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    assert out is not None
    return best, out


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _proc_status(field: str) -> int | None:
    """A memory field of /proc/self/status in bytes (Linux), else None."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    line = next((x for x in status.read_text().splitlines() if x.startswith(f"{field}:")), None)
    return None if line is None else int(line.split()[1]) * 1024


def rss() -> int:
    """This process's resident set size in bytes now (Linux; elsewhere its peak so far)."""
    now = _proc_status("VmRSS")
    return now if now is not None else peak_rss()


def peak_rss() -> int:
    """This process's peak resident set size in bytes since it started or `reset_peak_rss()`.

    Linux: VmHWM. Not ru_maxrss, which in a child process includes its parent's peak at the fork
    (Linux carries it over exec). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    peak = _proc_status("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> None:
    """Start `peak_rss` afresh from the current RSS (Linux >= 4.0; a no-op elsewhere)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def complete_tree(branching: int, depth: int) -> list[C.NodeConfig]:
    """A complete tree of `depth` levels; leaf k holds the synthetic source `s<k>`."""
    nodes = [C.NodeConfig(name="n0")]
    frontier = ["n0"]
    for _ in range(depth - 1):
        below = []
        for parent in frontier:
            for _ in range(branching):
                below.append(f"n{len(nodes)}")
                nodes.append(C.NodeConfig(name=below[-1], parent=parent))
        frontier = below
    for k, node in enumerate(n for n in nodes if n.name in frontier):
        node.sources = [f"s{k}"]
    return nodes


def synthetic_config(
    root: Path,
    nodes: list[C.NodeConfig],
    preset: str,
    seq_len: int,
    batch: int,
    local_steps: int,
    rounds: int,
    eval_batches: int,
    eval_batch_size: int = 16,
    offload: bool = False,
) -> C.Config:
    """A WorldLM run on uniform random tokens (one source per leaf), written under `root`."""
    rng = np.random.default_rng(0)
    sources = [s for n in nodes for s in n.sources]

    def tokens(n: int) -> np.ndarray:
        return rng.integers(1, VOCAB, n, dtype=np.uint16)

    streams = {s: {"train": tokens(40_000), "val": tokens(8_000), "test": tokens(8_000)} for s in sources}
    write_token_streams(root / "data", streams, VOCAB)
    cfg = C.Config(
        name="bench",
        data=C.DataConfig(path=str(root / "data")),
        model=C.ModelConfig(preset=preset, seq_len=seq_len),
        train=C.TrainConfig(rounds=rounds, local_steps=local_steps, batch_size=batch, lr_max=6e-3),
        federation=C.FederationConfig(offload_states=offload),
        eval=C.EvalConfig(batches=eval_batches, batch_size=eval_batch_size),
        tree=C.TreeConfig(nodes=nodes),
    )
    C.validate(cfg)
    return cfg


# ---------------------------------------------------------------------------- 1. training efficiency


def matmul_flops(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an fp32 n×n matmul (2n³ FLOP), best of `repeats`: what this CPU's BLAS delivers."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    with _threads(threads):
        a @ b  # warm-up
        seconds, _ = _best_time(lambda: a @ b, repeats)
    return 2 * n**3 / seconds


def training_throughput(
    preset: str, vocab: int, seq_len: int, batch: int, steps: int, threads: int, setting: str
) -> tuple[float, float]:
    """(tokens/s, warm-up seconds) of the shared training loop on random tokens; 2 warm-up steps first.

    setting: fp32 | bf16-autocast | fp32-compiled (torch.compile; its compilation is in the warm-up) |
    fp32-dp-sgd (a record-level DP node's step: per-example gradients, clip, noise; the whole batch sampled).
    """
    torch.manual_seed(0)
    model = GPT(gpt_config(preset, vocab, seq_len))
    opt = make_client_opt(model, ClientOptConfig())
    x = torch.randint(0, vocab, (batch, seq_len + 1))

    def batch_fn() -> tuple[Tensor, Tensor]:
        return x[:, :-1], x[:, 1:]

    step_model = torch.compile(model) if setting == "fp32-compiled" else model
    private = None
    if setting == "fp32-dp-sgd":  # the DP-SGD step of a DP node: its cost against plain fp32
        from worldlm.privacy.record import RecordDP

        private = RecordDP(1.0, 1.0, batch, 1.0, seed=0).backward
    bf16 = setting == "bf16-autocast"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    schedule = Schedule(1e-3, 0.1, 1, steps + 2)
    with _threads(threads), autocast:
        t0 = time.perf_counter()
        train_steps(step_model, opt, batch_fn, schedule, 0, 2, 1.0, private=private)
        warmup = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = train_steps(step_model, opt, batch_fn, schedule, 2, steps, 1.0, private=private)
    return stats.tokens / (time.perf_counter() - t0), warmup


def training_efficiency(size: BenchSize, say: Callable[[str], None]) -> dict[str, Any]:
    cores = torch.get_num_threads()
    thread_counts = sorted({1, cores})
    peak = {t: matmul_flops(t) for t in thread_counts}
    params = GPT(gpt_config(size.preset, VOCAB, size.seq_len)).num_params()
    rows = []
    for threads in thread_counts:
        for setting in SETTINGS:
            if setting == "fp32-compiled" and (not size.compile or threads != cores):
                continue
            say(f"training loop: {size.preset}, {threads} thread(s), {setting}")
            row: dict[str, Any] = {"preset": size.preset, "threads": threads, "setting": setting, "steps": size.steps}
            try:
                tps, warmup = training_throughput(
                    size.preset, VOCAB, size.seq_len, size.batch, size.steps, threads, setting
                )
            except Exception as exc:  # torch.compile needs a working compiler toolchain: record why it failed
                row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                rows.append(row)
                continue
            flops = 6 * params * tps
            row |= {
                "tokens_per_s": round(tps, 1),
                "flops_per_s": flops,
                "matmul_fraction": round(flops / peak[threads], 4),
                "warmup_s": round(warmup, 2),
            }
            rows.append(row)
    timed = [r for r in rows if "tokens_per_s" in r]
    best = max(timed, key=lambda r: r["tokens_per_s"])
    return {
        "parameters": params,
        "matmul_flops_per_s": {str(t): f for t, f in peak.items()},
        "rows": rows,
        "fastest": {k: best[k] for k in ("threads", "setting", "tokens_per_s")},
    }


# ---------------------------------------------------------------------------- 2. federation overhead


def edge_bytes_of_round(metrics: Path, rnd: int) -> int:
    records = (json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines())
    return sum(int(r["bytes"]) for r in records if r.get("event") == "edge" and r["round"] == rnd)


def federation_round(size: BenchSize, work: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Two rounds of the 7-node tree at `fed_preset`; round 1 is reported (round 0 creates optimizer states)."""
    from worldlm.runners.local import LocalRun
    from worldlm.runners.planning import steps_per_round

    nodes = complete_tree(2, 3)
    cfg = synthetic_config(
        work, nodes, size.fed_preset, size.seq_len, size.batch, size.fed_local_steps, 2, size.fed_eval_batches
    )
    say(f"federation: 2 rounds of the 7-node tree at {size.fed_preset}, {size.fed_local_steps} local steps")
    run = LocalRun(cfg, work / "run")
    run.execute()
    timing = dict(run.round_seconds[-1])
    total = float(timing.pop("seconds"))
    rnd = int(timing.pop("round"))
    tokens = steps_per_round(run.feds) * size.batch * size.seq_len
    trainer_seconds = timing["training"] + timing.get("serialisation", 0.0)  # what a node's visit costs
    say(f"federation: raw training loop at {size.fed_preset} for {size.raw_steps} steps")
    raw, _ = training_throughput(
        size.fed_preset, VOCAB, size.seq_len, size.batch, size.raw_steps, torch.get_num_threads(), "fp32"
    )
    in_round = tokens / trainer_seconds
    sent = edge_bytes_of_round(run.out / "metrics.jsonl", rnd)
    minimum = run.layout.total * BYTES_PER_VALUE * 2 * (len(nodes) - 1)
    return {
        "preset": size.fed_preset,
        "nodes": len(nodes),
        "local_steps": size.fed_local_steps,
        "round": rnd,
        "round_seconds": total,
        "phases": timing,
        "non_training_fraction": round(1 - timing["training"] / total, 4),
        # evaluation every round is a config choice (eval.every_round, eval.batches); the rest is the federation's
        "non_training_without_evaluation": round(1 - (timing["training"] + timing.get("evaluation", 0.0)) / total, 4),
        "training": {
            "raw_tokens_per_s": round(raw, 1),
            "in_round_tokens_per_s": round(in_round, 1),
            "in_round_vs_raw": round(in_round / raw, 4),
        },
        "bytes": {
            "sent": sent,
            "minimum": minimum,
            "ratio": round(sent / minimum, 4),
            "parameters": run.layout.total,
            "messages": 2 * (len(nodes) - 1),
        },
    }


# ---------------------------------------------------------------------------- 3. aggregation


def aggregation_case(n_children: int, key_blocks: int, key_size: int, repeats: int = 3) -> dict[str, Any]:
    """Step 4.iv C–E at one node (ν = 1): batched vs the naive reference on the same float32 key layers."""
    g = torch.Generator().manual_seed(n_children)
    members = torch.randn(n_children + 1, key_blocks, key_size, generator=g)  # [M, L, D], member 0 = the node

    def batched() -> tuple[Tensor, list[list[int]]]:
        pooled, _ = aggregate_children_batched(members)
        idx, _ = most_dissimilar_batched(pooled, members[1:], 1)
        return pooled, idx.tolist()

    def reference() -> tuple[Tensor, list[list[int]]]:
        pooled, _ = naive.children(members)
        return pooled, naive.most_dissimilar(pooled, members[1:], 1)

    batched()  # warm-up
    t_batched, (pooled, picks) = _best_time(batched, repeats)
    t_naive, (ref_pooled, ref_picks) = _best_time(reference, 1)
    diff = float((pooled.double() - ref_pooled).abs().max())
    if diff > 1e-5 or picks != ref_picks:
        raise WorldLMError(
            f"batched aggregation disagrees with the naive reference ({n_children} children, D={key_size}): "
            f"max |difference| {diff:.3g}, picks {picks} vs {ref_picks}"
        )
    return {
        "children": n_children,
        "key_blocks": key_blocks,
        "key_size": key_size,
        "batched_s": t_batched,
        "naive_s": t_naive,
        "speedup": round(t_naive / t_batched, 2),
        "max_abs_diff": diff,
        "same_picks": True,
    }


def key_split(preset: str) -> tuple[int, int]:
    """(L, D) of a preset's key layers: round(0.3 · n_layer) blocks of one block's parameters."""
    n_layer = PRESETS[preset].n_layer
    split = ParamLayout(GPT(gpt_config(preset, 256, 8)), round(0.3 * n_layer)).split
    return split.key_blocks, split.key_size


def aggregation(size: BenchSize, say: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for preset in size.key_presets:
        blocks, d = key_split(preset)
        for n in size.children:
            say(f"aggregation: {n} children, key layers {blocks} x {d:,} ({preset})")
            rows.append({"preset": preset, **aggregation_case(n, blocks, d)})
    return rows


# ---------------------------------------------------------------------------- 4. memory


def memory_probe(
    branching: int, depth: int, preset: str, seq_len: int, batch: int, local_steps: int, offload: bool
) -> dict[str, Any]:
    """One round (with checkpoint, test and final models) on a complete tree, in this process: peak RSS.

    Runs in a fresh process (see `memory`) with its peak reset just before the run, so the peak is
    this run's alone. `before_mb`: RSS when the run starts (Python, torch, the synthetic data);
    `state_mb`: the bytes of every node's state as checkpointed (parameters, AdamW moments,
    server-optimizer state, residuals).
    """
    from worldlm.runners.local import LocalRun

    with tempfile.TemporaryDirectory() as tmp:
        nodes = complete_tree(branching, depth)
        # evaluation on 2 windows per node: its memory is the training's at most, its time would dominate
        cfg = synthetic_config(Path(tmp), nodes, preset, seq_len, batch, local_steps, 1, 1, 2, offload)
        before = rss()
        reset_peak_rss()
        t0 = time.perf_counter()
        LocalRun(cfg, Path(tmp) / "run").execute()
        seconds = time.perf_counter() - t0
        peak = peak_rss()
        checkpoint = Path(tmp) / "run" / "checkpoints" / "round-0001"
        state = sum(p.stat().st_size for p in checkpoint.iterdir() if p.name.startswith(("node-", "adam-")))
    mb = 2**20
    return {
        "nodes": len(nodes),
        "branching": branching,
        "depth": depth,
        "offload": offload,
        "peak_rss_mb": round(peak / mb, 1),
        "before_mb": round(before / mb, 1),
        "state_mb": round(state / mb, 1),
        "seconds": round(seconds, 2),
    }


def memory(size: BenchSize, say: Callable[[str], None]) -> list[dict[str, Any]]:
    src = str(Path(worldlm.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    rows = []
    for branching, depth in size.memory_trees:
        for offload in (False, True):
            args = {
                "branching": branching,
                "depth": depth,
                "preset": size.memory_preset,
                "seq_len": size.seq_len,
                "batch": size.batch,
                "local_steps": size.memory_local_steps,
                "offload": offload,
            }
            say(f"memory: branching {branching}, depth {depth}, offload_states={offload} (own process)")
            proc = subprocess.run(
                [sys.executable, "-m", "worldlm.tools.bench", json.dumps(args)], env=env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise WorldLMError(f"memory measurement {args} failed:\n{proc.stderr.strip()[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


# ---------------------------------------------------------------------------- driver and report


def run_bench(
    out: Path,
    quick: bool = False,
    preset: str | None = None,
    steps: int | None = None,
    note: str = "",
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run every measurement; write `out/results.json` and `out/results.md`; return the results."""
    size = QUICK if quick else DEFAULT
    if preset is not None:
        if preset not in PRESETS:
            raise WorldLMError(f"unknown preset {quoted(preset)}; valid: {', '.join(PRESETS)}")
        size = dataclasses.replace(size, preset=preset)
    if steps is not None:
        if steps < 1:
            raise WorldLMError(f"--steps must be >= 1, got {steps}")
        size = dataclasses.replace(size, steps=steps)
    t0 = time.perf_counter()
    cores = torch.get_num_threads()
    result: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": cores,
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "quick": quick,
        "note": note,
        "targets": TARGETS,
    }
    result["training_efficiency"] = training_efficiency(size, say)
    with tempfile.TemporaryDirectory() as tmp:
        result["federation"] = federation_round(size, Path(tmp), say)
    result["aggregation"] = aggregation(size, say)
    result["memory"] = memory(size, say)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", render(result))
    return result


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def render(r: dict[str, Any]) -> str:
    """results.md: one table per measurement, targets beside the figures."""
    m, te, fed = r["machine"], r["training_efficiency"], r["federation"]
    lines = [
        "# worldlm bench",
        "",
        f"{m['cpu']}, {m['cores']} threads, torch {m['torch']} ({m['cpu_capability']}); {r['seconds']:.0f} s"
        + (" — QUICK run: sizes too small for the numbers to mean anything" if r["quick"] else ""),
    ]
    if r["note"]:
        lines += ["", f"Note: {r['note']}"]
    peaks = ", ".join(f"{t} thread(s) {f / 1e9:.1f} GFLOP/s" for t, f in te["matmul_flops_per_s"].items())
    lines += ["", "## Training efficiency", "", f"fp32 matmul (1024²): {peaks}; model {te['parameters']:,} parameters."]
    lines += [""]
    rows = []
    for row in te["rows"]:
        if "error" in row:
            rows.append([row["preset"], str(row["threads"]), row["setting"], "failed", "", "", row["error"]])
        else:
            rows.append(
                [
                    row["preset"],
                    str(row["threads"]),
                    row["setting"],
                    f"{row['tokens_per_s']:,.0f}",
                    f"{row['flops_per_s'] / 1e9:.2f}",
                    f"{100 * row['matmul_fraction']:.1f}%",
                    f"warm-up {row['warmup_s']:.1f} s",
                ]
            )
    lines += _table(["preset", "threads", "setting", "tokens/s", "GFLOP/s (6N)", "of matmul", ""], rows)
    f = te["fastest"]
    lines += ["", f"Fastest: {f['setting']} with {f['threads']} thread(s)."]

    phases = fed["phases"]
    total = fed["round_seconds"]
    lines += [
        "",
        f"## One federation round ({fed['preset']}, {fed['nodes']} nodes, {fed['local_steps']} local steps, "
        f"round {fed['round']})",
        "",
    ]
    rows = [[name, f"{s:.3f}", f"{100 * s / total:.1f}%"] for name, s in sorted(phases.items(), key=lambda kv: -kv[1])]
    rows.append(["total", f"{total:.3f}", "100%"])
    lines += _table(["phase", "seconds", "share"], rows)
    tr, by = fed["training"], fed["bytes"]
    target = r["targets"]
    lines += [
        "",
        f"Non-training share of the round: {100 * fed['non_training_fraction']:.1f}% "
        f"(target ≤ {100 * target['non_training_fraction']:.0f}%); without evaluation (every round here, "
        f"as eval.every_round; its size is eval.batches): {100 * fed['non_training_without_evaluation']:.1f}%.",
        f"Training inside the round: {tr['in_round_tokens_per_s']:,.0f} tokens/s (training + serialisation) vs the "
        f"raw loop's {tr['raw_tokens_per_s']:,.0f}: ratio {tr['in_round_vs_raw']:.3f} "
        f"(target ≥ {target['in_round_vs_raw']}).",
        f"Bytes sent in the round: {by['sent']:,} vs the minimum {by['minimum']:,} "
        f"({by['parameters']:,} parameters × {BYTES_PER_VALUE} B × {by['messages']} messages): "
        f"ratio {by['ratio']:.4f}.",
        "",
        "## Aggregation (step 4.iv C–E at one node): batched vs naive reference",
        "",
    ]
    rows = [
        [
            a["preset"],
            str(a["children"]),
            f"{a['key_blocks']} × {a['key_size']:,}",
            f"{1e3 * a['batched_s']:.2f}",
            f"{1e3 * a['naive_s']:.1f}",
            f"{a['speedup']:.1f}×",
            f"{a['max_abs_diff']:.1e}",
        ]
        for a in r["aggregation"]
    ]
    lines += _table(["key layers of", "children", "L × D", "batched ms", "naive ms", "speedup", "max |diff|"], rows)
    speedup = target["aggregation_speedup_at_16"]
    lines += ["", f"Target: ≥ {speedup:.0f}× at 16 children; picks identical in every case."]
    lines += ["", "## Peak memory (one round, checkpoint, test, final models; own process each)", ""]
    rows = [
        [
            str(x["nodes"]),
            f"{x['branching']}^{x['depth'] - 1}",
            "disk" if x["offload"] else "memory",
            f"{x['peak_rss_mb']:.0f}",
            f"{x['before_mb']:.0f}",
            f"{x['peak_rss_mb'] - x['before_mb']:.0f}",
            f"{x['state_mb']:.0f}",
            f"{x['seconds']:.1f}",
        ]
        for x in r["memory"]
    ]
    header = ["nodes", "tree", "node states in", "peak RSS MB", "before run MB", "growth MB", "node states MB", "s"]
    lines += _table(header, rows)
    lines += [
        "",
        "before run: RSS when the run starts (Python, torch, data); growth: peak minus that (the working model, "
        "its activations and optimizer temporaries, and the node states held in memory); node states: their "
        "exact checkpointed bytes (parameters, AdamW moments, server-optimizer state, residuals).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # one memory measurement in a fresh process (see `memory`)
    print(json.dumps(memory_probe(**json.loads(sys.argv[1]))))
