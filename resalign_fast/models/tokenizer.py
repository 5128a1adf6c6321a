"""The real CLIP BPE tokenizer, built offline from the vocabulary file that open-clip-torch ships.

open-clip's `bpe_simple_vocab_16e6.txt.gz` holds CLIP's merges; CLIP's vocabulary is derived from
them (256 byte symbols, the same with `</w>`, one token per merge, two special tokens), which is
exactly what `transformers.CLIPTokenizer` reads from vocab.json + merges.txt. We locate the file
without importing open_clip (importing it needs torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

# CLIP uses the first 49152 - 256 - 2 merges of the file (its SimpleTokenizer does the same).
N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def open_clip_vocab_file() -> Path:
    """Path of open-clip-torch's bundled BPE file."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "open-clip-torch is not installed: `pip install --no-deps open-clip-torch` (it ships "
            "the CLIP BPE vocabulary)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"{path}: CLIP BPE vocabulary missing from open-clip-torch")
    return path


def write_clip_tokenizer_files(out_dir: str | Path) -> tuple[Path, Path]:
    """Write CLIP's vocab.json and merges.txt into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_vocab_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(
        json.dumps({v: i for i, v in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    merges_path.write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return vocab_path, merges_path


def build_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77):
    """A `transformers.CLIPTokenizer` with CLIP's real vocabulary, built offline."""
    from transformers import CLIPTokenizer

    vocab_path, merges_path = write_clip_tokenizer_files(out_dir)
    return CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=model_max_length)
