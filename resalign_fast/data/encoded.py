"""Data sets encoded once for training: UNet-space inputs (latents or pixels) and text embeddings.

Encoding (VAE, text encoder) happens once per run, never per batch; with `cache_dir` the result is
also kept on disk, keyed by a hash of the model source and the data, so that later runs skip it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from resalign_fast.data.sets import PromptImageSet

log = logging.getLogger("resalign_fast.data")


@dataclass
class EncodedSet:
    """x0: (N, C, h, w) UNet inputs; emb: (N, L, D) text embeddings; prompts: N captions."""

    x0: torch.Tensor
    emb: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return self.x0.shape[0]

    def sample(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch (with replacement when the set is smaller than the batch)."""
        n = len(self)
        idx = (
            torch.randperm(n, generator=generator)[:batch_size]
            if n >= batch_size
            else torch.randint(0, n, (batch_size,), generator=generator)
        )
        idx = idx.to(self.x0.device)
        return self.x0[idx], self.emb[idx]


def _key(model_id: str, data: PromptImageSet) -> str:
    h = hashlib.sha256(model_id.encode())
    h.update(data.images.numpy().tobytes())
    h.update("\n".join(data.prompts).encode())
    return h.hexdigest()[:24]


def encode_set(
    model,
    data: PromptImageSet,
    device: torch.device,
    cache_dir: Path | None = None,
    batch_size: int = 16,
) -> EncodedSet:
    """Encode images to UNet inputs and prompts to embeddings (see module doc for caching).

    The cache key covers the model's weights and frozen dtype (`model.fingerprint`; the source path
    when empty) and the images and prompts. A cache file that cannot be read is re-encoded.
    """
    path = (
        Path(cache_dir) / f"{_key(getattr(model, 'fingerprint', '') or model.source, data)}.pt"
        if cache_dir
        else None
    )
    if path is not None and path.is_file():
        try:
            d = torch.load(path, weights_only=True)
            if d["x0"].shape[0] == len(data) == d["emb"].shape[0]:
                log.info("loaded encoded data from %s", path)
                return EncodedSet(d["x0"].to(device), d["emb"].to(device), data.prompts)
            log.warning("%s: cache does not match the data, re-encoding", path)
        except Exception as e:  # a damaged cache file is rebuilt, never trusted
            log.warning("%s: unreadable cache (%s), re-encoding", path, e)
    xs = []
    vae_dev = next(model.vae.parameters()).device if model.vae is not None else device
    for i in range(0, len(data), batch_size):
        xs.append(model.to_latents(data.images[i : i + batch_size].to(vae_dev)).to(device))
    enc = EncodedSet(
        torch.cat(xs).float(), model.encode_prompts(data.prompts).to(device).float(), data.prompts
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # unique per process: ranks may write at once
        torch.save({"x0": enc.x0.cpu(), "emb": enc.emb.cpu()}, tmp)
        tmp.replace(path)
    return enc
