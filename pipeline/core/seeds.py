"""Every derived seed of the pipeline, from the params `seed`: one named stream per use.

Each stream is the first 8 bytes of sha256 over a key that names its use, so streams are
independent of each other, stable across processes and machines, and adding a new one never
moves an old one. Changing a key here resamples what that stream feeds.
"""

from __future__ import annotations

import hashlib


def hashed_seed(key: str, bits: int = 63) -> int:
    """A seed of `bits` bits from the first 8 bytes of sha256(key)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> (64 - bits)


def position_seed(seed: int, start: int) -> int:
    """Seed of the LM samples that complete windows from token index `start` on (Eq. 5's x').

    Distinct per start position so the marginalisations at different t are independent draws,
    and disjoint from the negatives stage's seed (those samples are the t = p + 1 column's).
    """
    return hashed_seed(f"rebm/evaluate/positions/{seed}/{start}")


def log_z_seed(seed: int) -> int:
    """Seed of the LM samples that estimate log Z of every test prefix (Table 1, Figure 2 left)."""
    return hashed_seed(f"rebm/evaluate/log_z/{seed}")


def bootstrap_seed(seed: int, name: str) -> int:
    """Seed of the paired bootstrap over test windows for the quantity `name`."""
    return hashed_seed(f"rebm/evaluate/bootstrap/{seed}/{name}", bits=64)


def stepwise_seed(seed: int, *labels: object) -> int:
    """Appendix A.1's draws: the LM samples searched for contexts ("contexts") and the completions
    of one context's candidates (window id, t), each its own stream."""
    return hashed_seed("rebm/stepwise/" + "/".join(str(x) for x in (seed, *labels)))


def generation_seed(seed: int) -> int:
    """The generate stage's top-k samples: its own stream, apart from the negatives stage's samples."""
    return hashed_seed(f"rebm/generate/{seed}")


def humaneval_seed(seed: int, *labels: str) -> int:
    """A 64-bit seed per (seed, purpose) of the rating sheet: sides, order, attention checks."""
    return hashed_seed(":".join([str(int(seed)), *labels]), bits=64)


def text_key(text: str) -> int:
    """A 56-bit key for a user's prompt: it seeds that prompt's draws as a window id seeds a window's."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
