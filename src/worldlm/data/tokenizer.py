"""Byte-level BPE (the GPT-2 scheme) trained with `tokenizers`, and the helpers around it.

Byte-level means every string is encodable (no unknown token) and `decode(encode(s)) == s`.
`<|endoftext|>` is the first special token, so a tokenizer trained here gives it id 0; it
terminates every document in the token streams.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from worldlm.errors import DataError
from worldlm.files import atomic_write_text

EOT = "<|endoftext|>"
MIN_VOCAB = 257  # the 256 byte symbols plus <|endoftext|>
_BATCH = 512  # documents per encode_batch call: big enough for the Rust side to parallelise


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE of (at most) `vocab_size` tokens on `texts`; `length` only drives progress."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size {vocab_size} is too small for byte-level BPE; use at least {MIN_VOCAB}")
    tokenizer = Tokenizer(models.BPE())
    # No normaliser: the byte-level round trip must give back exactly the text it was given.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    atomic_write_text(path, tokenizer.to_str())


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizers` JSON file; DataError if it is missing or not a tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} is missing; re-run `worldlm prepare` or fix the path")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for any parse error
        raise DataError(f"{path} is not a `tokenizers` JSON file ({exc}); point at a tokenizer.json") from exc


def eot_id(tokenizer: Tokenizer) -> int:
    """Id of `<|endoftext|>`; DataError for a user tokenizer that lacks it."""
    token_id = tokenizer.token_to_id(EOT)
    if token_id is None:
        raise DataError(f"the tokenizer has no '{EOT}' token; add it as a special token to the tokenizer")
    return int(token_id)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def decode(tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray) -> str:
    return str(tokenizer.decode([int(i) for i in ids], skip_special_tokens=False))


def encode_documents(tokenizer: Tokenizer, documents: Sequence[str], dtype: np.dtype) -> np.ndarray:
    """One flat stream: each document's ids followed by `<|endoftext|>`."""
    eot = eot_id(tokenizer)
    ids: list[int] = []
    for start in range(0, len(documents), _BATCH):
        batch = list(documents[start : start + _BATCH])
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.append(eot)
    return np.array(ids, dtype=dtype)
