"""The data mtp_occ ships, and the one place that decides where data files are read from.

`benchmarks/<name>.jsonl` (the six evaluation sets) and `train/dapo-math-17k.jsonl.gz` live beside this file
and are installed with the package; `SOURCES.md` gives each file's origin repository, commit, licence and
normalisation, `licenses/` the licences. `data_root()` is `$MTP_OCC_DATA` when set (a dir with the same
`benchmarks/` and `train/` layout, compressed or not), else this package dir. `data_file(rel)` resolves a
path under it, taking `rel + ".gz"` when only the compressed copy is there; configs reach it through the
`${data_file:train/dapo-math-17k.jsonl}` resolver.
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def data_root() -> Path:
    """`$MTP_OCC_DATA`, or the data shipped with the package."""
    return Path(os.environ.get("MTP_OCC_DATA") or ASSETS_DIR)


def data_file(rel: str) -> Path:
    """`data_root()/rel`, or its gzip-compressed copy `rel.gz` when only that exists (then the plain
    path, so that the caller's not-found error names the file asked for)."""
    path = data_root() / rel
    packed = path.with_name(path.name + ".gz")
    return packed if not path.exists() and packed.exists() else path
