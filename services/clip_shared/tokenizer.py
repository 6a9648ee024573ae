"""The real CLIP BPE tokenizer, built offline from the vocabulary open_clip ships.

No hub download is possible here, but open_clip bundles CLIP's byte-pair merges
(``bpe_simple_vocab_16e6.txt.gz``). From them we write the ``vocab.json`` / ``merges.txt`` pair that
transformers' ``CLIPTokenizer`` reads; the ids are identical to open_clip's and to OpenAI's CLIP
(49408 entries, start 49406, end 49407). The files are built once per process into a cache directory.

transformers 5 trap: constructing ``CLIPTokenizer(vocab_file=..., merges_file=...)`` directly maps
every token to end-of-text; loading the directory with ``from_pretrained`` works.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 49408
START_OF_TEXT_ID = VOCAB_SIZE - 2
"""Id of ``<|startoftext|>`` in CLIP's vocabulary (49406)."""
END_OF_TEXT_ID = VOCAB_SIZE - 1
"""Id of ``<|endoftext|>`` (49407); CLIP pools its text at the first one."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode character table (a fixed, published bijection)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _bundled_merges() -> list[str]:
    import open_clip.tokenizer

    with gzip.open(open_clip.tokenizer.default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return lines[1 : NUM_MERGES + 1]


def write_clip_tokenizer_files(out_dir: str | Path, *, pad_token: str = END_OF_TEXT) -> Path:
    """Write vocab.json, merges.txt and tokenizer/special-token configs for CLIPTokenizer into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = _bundled_merges()
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += [START_OF_TEXT, END_OF_TEXT]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": START_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


@functools.cache
def _cached_dir(pad_token: str) -> Path:
    root = Path(os.environ.get("E2PO_CACHE", Path(tempfile.gettempdir()) / "e2po-cache"))
    target = root / f"clip-tokenizer-{'eot' if pad_token == END_OF_TEXT else 'pad' + str(ord(pad_token[0]))}"
    if not (target / "tokenizer_config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root))
        write_clip_tokenizer_files(tmp, pad_token=pad_token)
        try:
            tmp.rename(target)  # atomic: concurrent builders never see half-written files
        except OSError:  # another process won the race; its files are identical
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def clip_tokenizer(*, model_max_length: int = 77, pad_token: str = END_OF_TEXT):
    """A transformers ``CLIPTokenizer`` with CLIP's real vocabulary, built without network access."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_cached_dir(pad_token), model_max_length=model_max_length)
