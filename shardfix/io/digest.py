"""A device-side tensor checksum, computed with torch ops wherever the tensor lives.

With ``--device cuda`` the transforms run on the GPU and so does checking: each output tensor's
digest is taken on the GPU before it is copied to the host and written, and the verify pass
re-reads the written file, moves each tensor back to the GPU and compares digests. The digest
is a 64-bit multilinear hash of the tensor's bytes (as little-endian 64-bit words, zero-padded)
with per-position odd multipliers; integer sums wrap modulo 2**64, so the value does not depend
on the reduction order and is the same on every device. It guards against a corrupted copy or
write, not against an adversary; the report's checksums stay xxh3 of the bytes on disk.
"""

from __future__ import annotations

import torch

_K1 = 0x9E3779B97F4A7C15 - (1 << 64)  # golden-ratio constant as a signed int64
_K2 = 0x632BE59BD9B4E019
_CHUNK = 1 << 24  # words per step: bounds the temporaries at 3 x 128 MiB


def _words(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=t.device)
    b = flat.view(torch.uint8)
    pad = -b.numel() % 8
    if pad:
        b = torch.cat([b, torch.zeros(pad, dtype=torch.uint8, device=b.device)])
    return b.view(torch.int64)


def tensor_digest(t: torch.Tensor) -> str:
    """16 hex digits identifying ``t``'s dtype, shape and bytes; computed on ``t.device``."""
    w = _words(t)
    acc = torch.zeros((), dtype=torch.int64, device=w.device)
    for start in range(0, w.numel(), _CHUNK):
        part = w[start : start + _CHUNK]
        idx = torch.arange(start, start + part.numel(), dtype=torch.int64, device=w.device)
        mult = (idx * _K1 + _K2) | 1
        acc = acc + (part * mult).sum(dtype=torch.int64)
    h = int(acc.item()) & ((1 << 64) - 1)
    meta = hash_meta(str(t.dtype), tuple(t.shape), t.numel() * t.element_size())
    return f"{(h ^ meta) & ((1 << 64) - 1):016x}"


def hash_meta(dtype: str, shape: tuple[int, ...], nbytes: int) -> int:
    """A stable 64-bit value for the tensor's dtype, shape and byte count (FNV-1a)."""
    h = 0xCBF29CE484222325
    for byte in f"{dtype}|{','.join(map(str, shape))}|{nbytes}".encode():
        h = ((h ^ byte) * 0x100000001B3) & ((1 << 64) - 1)
    return h
