"""Small pieces every training loop shares: seeding, a CSV loss log, thread settings."""
from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator seeded the same for data sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class CSVLog:
    """Appends one row of named scalars per call; the header comes from the first row. Survives resume."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fields: list[str] | None = None
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                self._fields = next(csv.reader(f), None)

    def write(self, **row: float | int | str) -> None:
        if self._fields is None:
            self._fields = list(row)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self._fields)
        elif set(row) - set(self._fields):  # a resumed run logs a new column: widen the header, keep the rows
            self._widen([k for k in row if k not in self._fields])
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self._fields])

    def _widen(self, new_fields: list[str]) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        self._fields = self._fields + new_fields
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([self._fields] + [r + [""] * len(new_fields) for r in rows])
        tmp.replace(self.path)


def set_threads(n: int | None) -> None:
    """Use n intra-op threads (None: leave torch's default). One thread is steadier when the machine is shared."""
    if n:
        torch.set_num_threads(n)
