"""Exact and near-duplicate text detection (MinHash + LSH banding, verified by Jaccard).

The StableLLaVA release has only 23% unique prompts; raypipe rejects repeats before any
GPU time is spent on them (:class:`raypipe.generate.prompts.DedupStage`, decided by the
planner), and the evaluation set's overlap check uses the same index. Near duplicates are prompts whose word-shingle sets have a
Jaccard similarity at or above a threshold. MinHash signatures bucketed by bands give
candidate pairs in near-linear time; each candidate is confirmed with the exact Jaccard.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
_MERSENNE = (1 << 61) - 1


def normalize_prompt(prompt: str) -> str:
    """Lower-case words only: `((Crimson)) car,  street` == `crimson car street`."""
    return " ".join(_WORD.findall(prompt.lower()))


def shingles(prompt: str, n: int = 2) -> frozenset[str]:
    words = normalize_prompt(prompt).split()
    if len(words) < n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class NearDuplicateIndex:
    """Remembers accepted prompts; ``check`` says whether a new one repeats one of them.

    ``threshold`` is the Jaccard similarity of word bigram sets at which two prompts count
    as near duplicates (1.0 = exact repeats only, after normalisation).
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, bands: int = 16, seed: int = 0):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.threshold = threshold
        self.bands, self.rows = bands, num_perm // bands
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, _MERSENNE, size=num_perm, dtype=np.uint64)
        self._b = rng.integers(0, _MERSENNE, size=num_perm, dtype=np.uint64)
        self._exact: dict[str, str] = {}
        self._sets: dict[str, frozenset[str]] = {}
        self._buckets: list[dict[bytes, list[str]]] = [defaultdict(list) for _ in range(bands)]

    def __len__(self) -> int:
        return len(self._exact)

    def _signature(self, sh: frozenset[str]) -> np.ndarray:
        hashes = np.array(
            [
                int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") >> 4
                for s in sh
            ]
            or [0],
            dtype=np.uint64,
        )
        # (a*h + b) mod p, computed in Python ints' range via float-free uint64 wraparound
        # is not exact; use object arithmetic on the small matrix instead.
        mat = (
            np.outer(self._a.astype(object), hashes.astype(object))
            + self._b.astype(object)[:, None]
        ) % _MERSENNE
        return mat.min(axis=1).astype(np.uint64)

    def check(self, key: str, prompt: str) -> tuple[str, str] | None:
        """(reason, other key) if ``prompt`` repeats an accepted prompt, else None."""
        norm = normalize_prompt(prompt)
        if norm in self._exact:
            return "duplicate_prompt", self._exact[norm]
        if self.threshold >= 1.0:
            return None
        sh = shingles(prompt)
        sig = self._signature(sh)
        seen: set[str] = set()
        for band in range(self.bands):
            bucket = sig[band * self.rows : (band + 1) * self.rows].tobytes()
            for other in self._buckets[band].get(bucket, ()):
                if other in seen:
                    continue
                seen.add(other)
                if jaccard(sh, self._sets[other]) >= self.threshold:
                    return "near_duplicate_prompt", other
        return None

    def add(self, key: str, prompt: str) -> None:
        norm = normalize_prompt(prompt)
        self._exact.setdefault(norm, key)
        if self.threshold >= 1.0:
            return
        sh = shingles(prompt)
        self._sets[key] = sh
        sig = self._signature(sh)
        for band in range(self.bands):
            self._buckets[band][sig[band * self.rows : (band + 1) * self.rows].tobytes()].append(
                key
            )

    def check_and_add(self, key: str, prompt: str) -> tuple[str, str] | None:
        hit = self.check(key, prompt)
        if hit is None:
            self.add(key, prompt)
        return hit
