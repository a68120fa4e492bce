"""Is a Flower run the in-process run? Compares two run directories; exit 0 iff they are equal.

    python scripts/flower_equal.py FLOWER_RUN_DIR IN_PROCESS_RUN_DIR

Equal means: summary.json identical apart from wall_seconds, the final personal models
(checkpoints/final/*.safetensors) byte-identical, and metrics.jsonl identical up to record order
(nodes answer in parallel on Flower) and its wall-clock fields.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TIMINGS = ("seconds", "tokens_per_s")


def summary(run: Path) -> dict[str, Any]:
    return dict(json.loads((run / "summary.json").read_text()))


def records(run: Path) -> list[str]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return sorted(
        json.dumps({k: v for k, v in json.loads(x).items() if k not in TIMINGS}, sort_keys=True) for x in lines
    )


def main(flower: Path, local: Path) -> int:
    a, b = summary(flower), summary(local)
    wall_a, wall_b = a.pop("wall_seconds"), b.pop("wall_seconds")
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    models = sorted((local / "checkpoints" / "final").glob("*.safetensors"))
    same = [m.read_bytes() == (flower / "checkpoints" / "final" / m.name).read_bytes() for m in models]
    ra, rb = records(flower), records(local)
    print(f"summary.json (all keys but wall_seconds): {'identical' if not diff else f'DIFFERENT in {diff}'}")
    print(f"mean personalised test perplexity: Flower {a['mean_ppl']!r}, in-process {b['mean_ppl']!r}")
    print(f"bytes on tree edges: Flower {a['bytes_total']}, in-process {b['bytes_total']}")
    print(f"wall seconds: Flower {wall_a}, in-process {wall_b}")
    print(f"final personal models byte-identical: {sum(same)} of {len(same)}")
    print(f"metrics.jsonl records without timings: {len(ra)} vs {len(rb)}, {'identical' if ra == rb else 'DIFFERENT'}")
    return 0 if not diff and same and all(same) and ra == rb else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
