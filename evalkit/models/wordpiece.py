"""A tiny BERT WordPiece tokenizer built offline, for the tiny stand-ins of BERT-tokenized models (BLIP, SBERT).

The vocabulary holds BERT's special tokens, every lowercase letter, digit and common punctuation mark both as a
word start and as a `##` continuation, so any lowercase ASCII text tokenizes without [UNK] (letter by letter).
"""

from __future__ import annotations

import functools
import string
import tempfile
from pathlib import Path

from transformers import BertTokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_PIECES = list(string.ascii_lowercase + string.digits + ".,?!'-/")


@functools.cache
def _vocabulary_file(extra_tokens: tuple[str, ...]) -> str:
    vocab = SPECIAL_TOKENS + _PIECES + [f"##{piece}" for piece in _PIECES] + list(extra_tokens)
    folder = Path(tempfile.mkdtemp(prefix="evalkit-wordpiece-"))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return str(folder / "vocab.txt")


def tiny_wordpiece_tokenizer(extra_tokens: tuple[str, ...] = (), **kwargs) -> BertTokenizer:
    """An uncased BertTokenizer over the tiny vocabulary, `extra_tokens` appended (e.g. BLIP's "[DEC]")."""
    return BertTokenizer(_vocabulary_file(tuple(extra_tokens)), do_lower_case=True, **kwargs)
