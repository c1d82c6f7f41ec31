"""Instrument-disjoint train/valid/test splits that keep near-duplicate instruments together.

Instruments of one (origin, GM program) group (e.g. FluidR3's violin and MuseScore's violin, derived from it) all
land in the same split, or are left out. Every split takes one instrument per group first, so a small test split
still hears many different sounds; train adds copies only to fill its quota.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One renderable instrument: a (soundfont, GM program) pair."""
    soundfont: str
    program: int
    family: str
    source: str
    origin: str
    preset_name: str

    @property
    def group(self) -> tuple[str, int]:
        return self.origin, self.program


def assign_splits(candidates: list[Candidate], per_split: dict[str, int], seed: int) -> dict[str, list[Candidate]]:
    """Pick at most `per_split[split]` instruments per family for each split, group-disjointly and reproducibly.

    Groups are dealt one at a time to the split that is least full relative to its quota (ties: the order of
    `per_split`), so a family with few usable groups still spreads them in proportion to the quotas. Train then
    fills what is left of its quota with the other members (near-duplicates) of its own groups.

    Args:
        candidates: usable instruments (already screened for silence and pitch).
        per_split: e.g. {"test": 3, "valid": 3, "train": 10}.
        seed: the shuffle seed.
    """
    rng = random.Random(seed)
    by_family: dict[str, dict[tuple[str, int], list[Candidate]]] = defaultdict(lambda: defaultdict(list))
    for c in sorted(candidates, key=lambda c: (c.family, c.origin, c.program, c.soundfont)):
        by_family[c.family][c.group].append(c)
    out: dict[str, list[Candidate]] = {s: [] for s in per_split}
    for family in sorted(by_family):
        groups = list(by_family[family].values())
        rng.shuffle(groups)
        for split, members in _deal(groups, per_split).items():
            out[split].extend(members)
    return out


def _deal(groups: list[list[Candidate]], per_split: dict[str, int]) -> dict[str, list[Candidate]]:
    dealt: dict[str, list[list[Candidate]]] = {s: [] for s in per_split}
    for members in groups:
        open_splits = [s for s, q in per_split.items() if len(dealt[s]) < q]
        if not open_splits:
            break
        split = min(open_splits, key=lambda s: len(dealt[s]) / per_split[s])
        dealt[split].append(members)
    chosen = {s: [m[0] for m in dealt[s]] for s in per_split}
    if "train" in per_split:  # near-duplicates only ever join their own group's split
        extras = [c for m in dealt["train"] for c in m[1:]]
        chosen["train"].extend(extras[: per_split["train"] - len(chosen["train"])])
    return chosen
