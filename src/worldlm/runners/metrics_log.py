"""TensorBoard event files beside metrics.jsonl (`log.tensorboard`).

The events are a view of metrics.jsonl: every record written is also written as scalars, and when a run
resumes the view is rebuilt from the records the checkpoint kept, so TensorBoard never shows a round
twice. The x axis is the sequential step (records without a step of their own, such as attention and
bytes, take the latest step reached). Tags:

    train/loss/<node>, val/ppl/<node>, test/ppl/<node> (and val_ft, test_ft: "+ local fine-tuning"),
    attention/<node>/parent/<member>, attention/<node>/children/<child> (the child's share),
    bytes/<src>-><dst> (per round), privacy/epsilon/<node>
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from worldlm.errors import WorldLMError
from worldlm.files import JsonlWriter

TB_DIR = "tensorboard"


def _summary_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises ImportError when the tensorboard package is missing
        raise WorldLMError("log.tensorboard needs TensorBoard: pip install 'worldlm[tensorboard]'") from exc
    return SummaryWriter(log_dir=str(path))


class TensorBoardJsonl(JsonlWriter):
    """metrics.jsonl, with every record also written as TensorBoard scalars under <run>/tensorboard/."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        tb = self.path.parent / TB_DIR
        shutil.rmtree(tb, ignore_errors=True)  # a resumed run: rebuilt from the records kept
        self._tb = _summary_writer(tb)
        self._step = 0
        self._round: int | None = None
        self._bytes: dict[str, int] = {}
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                self._scalars(json.loads(line))

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        self._scalars(record)

    def sync(self) -> None:
        super().sync()
        self._tb.flush()

    def close(self) -> None:
        self._flush_bytes()
        self._tb.close()
        super().close()

    def _flush_bytes(self) -> None:
        for edge, n in self._bytes.items():
            self._tb.add_scalar(f"bytes/{edge}", n, self._step)
        self._bytes = {}

    def _scalars(self, rec: dict[str, Any]) -> None:
        rnd = rec.get("round")
        if isinstance(rnd, int) and rnd != self._round:
            self._flush_bytes()  # one point per edge and round
            self._round = rnd
        if isinstance(rec.get("step"), int):
            self._step = max(self._step, int(rec["step"]))
        add = self._tb.add_scalar
        split, event = rec.get("split"), rec.get("event")
        if split == "train":
            add(f"train/loss/{rec['node']}", rec["loss"], rec["step"])
        elif split is not None:
            add(f"{split}/ppl/{rec['node']}", rec["ppl"], rec["step"])
        elif event == "attention" and rec["kind"] == "parent":
            for j, member in enumerate(rec["members"]):  # mean over the key positions where it takes part
                ws = [row[j] for row in rec["weights"] if row[j] > 0]
                if ws:
                    add(f"attention/{rec['node']}/parent/{member}", sum(ws) / len(ws), self._step)
        elif event == "attention":
            for child, share in zip(rec["members"][1:], rec.get("shares", []), strict=False):
                add(f"attention/{rec['node']}/children/{child}", share, self._step)
        elif event == "edge":
            edge = f"{rec['src']}->{rec['dst']}"
            self._bytes[edge] = self._bytes.get(edge, 0) + int(rec["bytes"])
        elif event == "privacy":
            add(f"privacy/epsilon/{rec['node']}", rec["epsilon"], self._step)


def metrics_writer(path: Path, tensorboard: bool) -> JsonlWriter:
    """The run's metrics.jsonl writer; with `tensorboard`, one that also writes TensorBoard events."""
    return TensorBoardJsonl(path) if tensorboard else JsonlWriter(path)
