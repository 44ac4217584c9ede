"""Local, seeded random generators: every random choice names its seed and what it is for."""
import zlib

import torch


def derive_seed(seed: int, *tags) -> int:
    """A stable 63-bit seed from a base seed and tags (same on every machine and Python run)."""
    text = ":".join(str(t) for t in (seed,) + tags)
    hi, lo = zlib.crc32(text.encode()), zlib.adler32(text.encode())
    return ((hi << 32) | lo) & ((1 << 63) - 1)


def generator(seed: int, *tags, device="cpu") -> torch.Generator:
    """A torch.Generator for one purpose, e.g. generator(cfg.seed, "noise")."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *tags))
    return g
