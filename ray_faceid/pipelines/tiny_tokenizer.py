"""Tokenizers built offline. CLIP's: byte-level, 514 tokens (256 bytes, 256 end-of-word bytes,
start and end of text), no merges. Every text tokenizes, one token per byte, so the tiny
components run anywhere without downloading a vocabulary."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode mapping."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tiny_tokenizer(folder: str | Path, max_length: int = 32) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
    return folder


def tiny_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp, max_length))


def tiny_t5_tokenizer(max_length: int = 512):
    """A T5 tokenizer built offline for the tiny FLUX base: a unigram vocabulary of printable ASCII
    characters (one token each, words marked by '▁' as SentencePiece marks them), `</s>` after every
    text, `<pad>` 0; anything else is `<unk>`. T5's own vocabulary is a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(chr(c), -2.0) for c in range(33, 127)]
    model = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                           model_max_length=max_length)
