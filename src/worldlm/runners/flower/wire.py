"""What travels between the coordinator and the nodes, and how many bytes of it are parameters.

A model message is the backbone plus, when key layers are shared, the key layers [L, D]; residuals
travel as their vectors [R, D] and positions [R] (int32), their origins as node names in a
ConfigRecord. Everything numeric is float32 on the wire (`BYTES_PER_VALUE`), so the bytes counted
here equal `message_numel(...) * BYTES_PER_VALUE` of the in-process runner: the test checks it.
Node names, round numbers and logs are metadata and are not counted (as in the in-process runner).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from worldlm.federation.types import FedOptions, Residual, Split


def _array(t: Tensor, dtype: torch.dtype = torch.float32) -> Array:
    # ArrayRecord has no bfloat16; everything numeric goes as float32 (positions as int32)
    return Array(t.detach().to("cpu", dtype).contiguous().numpy())  # from any device


def _tensor(a: Array) -> Tensor:
    return torch.from_numpy(np.array(a.numpy(), copy=True))


def model_record(params: Tensor, split: Split, opts: FedOptions) -> ArrayRecord:
    """A node's model as it leaves the node: backbone, and key layers unless they stay home (FedPer)."""
    arrays = {"backbone": _array(split.backbone(params))}
    if split.key_blocks and opts.share_keys:
        arrays["keys"] = _array(split.keys(params))
    return ArrayRecord(arrays)


def model_from_record(rec: ArrayRecord, base: Tensor, split: Split) -> Tensor:
    """A flat state from a model message; parts that did not travel (FedPer keys) are taken from `base`.

    Those parts are never read by the receiving step (receive_from_parent / aggregate_subtree). The state
    is on `base`'s device (the node's working device).
    """
    backbone = _tensor(rec["backbone"]).to(base.device)
    keys = _tensor(rec["keys"]).to(base.device) if "keys" in rec else split.keys(base)
    return split.join(backbone, keys)


def residuals_into(content: RecordDict, key: str, residuals: list[Residual]) -> None:
    """Add residuals to a message under `key` (arrays) and `key` (origins in the ConfigRecord "meta")."""
    if not residuals:
        return
    content[key] = ArrayRecord(
        {
            "vectors": _array(torch.stack([r.vector for r in residuals])),
            "positions": _array(torch.tensor([r.position for r in residuals]), torch.int32),
        }
    )
    content[f"{key}.origins"] = ConfigRecord({"origins": [r.origin for r in residuals]})


def residuals_from(content: RecordDict, key: str) -> list[Residual]:
    if key not in content.array_records:
        return []
    rec = content.array_records[key]
    origins = content.config_records[f"{key}.origins"]["origins"]
    assert isinstance(origins, list)
    vectors, positions = _tensor(rec["vectors"]), _tensor(rec["positions"])
    return [Residual(v.clone(), int(p), str(o)) for v, p, o in zip(vectors, positions.tolist(), origins, strict=True)]


def copy_residuals(src: RecordDict, src_key: str, dst: RecordDict, dst_key: str) -> None:
    """Forward residuals from one message to another unchanged (the coordinator relays, never decodes)."""
    if src_key in src.array_records:
        dst[dst_key] = src.array_records[src_key]
        dst[f"{dst_key}.origins"] = src.config_records[f"{src_key}.origins"]


def value_bytes(rec: ArrayRecord | None) -> int:
    """Bytes of the values an ArrayRecord carries (the serialisation header is not counted)."""
    if rec is None:
        return 0
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in rec.values())


def json_record(obj: Any) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps(obj)})


def json_from(content: RecordDict, key: str) -> Any:
    if key not in content.config_records:
        return None
    return json.loads(str(content.config_records[key]["json"]))
