"""The real CLIP BPE tokenizer of Stable Diffusion, built offline from the vocabulary inside open_clip.

open_clip ships OpenAI's `bpe_simple_vocab_16e6.txt.gz`; OpenAI CLIP (and so SD 1.x's tokenizer) derives its
49,408-token vocabulary from it. Building the Hugging Face tokenizer from that file gives the same ids as
`openai/clip-vit-large-patch14` without any download, so token indices match the real models.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

# OpenAI's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of the file (after its version line).
_NUM_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=1)
def _vocabulary_files() -> tuple[str, str]:
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="evalkit-clip-bpe-"))
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """SD-1.x's tokenizer by default: padding with <|endoftext|>, 77 positions (OWL-ViT/OWLv2 pad with "!" to 16)."""
    vocab_file, merges_file = _vocabulary_files()
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=model_max_length, pad_token=pad_token)
