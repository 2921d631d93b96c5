"""One way to derive a seed: ``derive_seed(base_seed, "stage", step, ...)``.

Every random stream of a run (initial weights, batch order, prompt picks, sampling, labeler noise) is
a pure function of the run's seed and a *name path* naming that stream, so

- two streams never share a seed by accident (``seed + 1`` of one stream is not ``seed`` of another, as
  with ad-hoc arithmetic like ``seed * 7919 + epoch``), and
- a stream is the same in every process and on every resume: the path is hashed with BLAKE2b over a
  canonical JSON encoding, not with Python's ``hash`` (salted per process for strings).

The result fits every consumer: ``torch.Generator.manual_seed``, ``numpy.random.default_rng``,
``np.random.seed`` (< 2**32) and the proto's ``int64`` sampling seed.
"""

from __future__ import annotations

import hashlib
import json
import operator

SEED_BITS = 31  # < 2**31: a valid seed for numpy's legacy API, torch, int32/int64 fields and the sampler


def derive_seed(base_seed: int, *path: str | int) -> int:
    """A seed in ``[0, 2**31)`` determined by ``base_seed`` and the names/numbers in ``path``.

    >>> derive_seed(7, "pretrain", "batch", 3) == derive_seed(7, "pretrain", "batch", 3)
    True
    """
    parts: list[str | int] = [operator.index(base_seed)]
    for p in path:
        if isinstance(p, str):
            parts.append(p)
            continue
        try:  # ints and numpy integers; floats and bools would make the path ambiguous
            if isinstance(p, bool):
                raise TypeError
            parts.append(operator.index(p))
        except TypeError:
            raise TypeError(f"derive_seed: path parts are names (str) or integers, got {p!r}") from None
    digest = hashlib.blake2b(json.dumps(parts, separators=(",", ":")).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)
