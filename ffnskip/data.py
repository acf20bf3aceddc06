"""Where the evaluation data lives: a configurable data directory.

Order: an explicit ``--data-dir``, then ``$FFNSKIP_DATA_DIR``, then ``../shared/data`` next to the
repository (or next to the current directory) when it exists.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA_DIR = "FFNSKIP_DATA_DIR"


class DataError(ValueError):
    """Missing or malformed data (one clear line for the user)."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_dir():
            raise DataError(f"data directory {p} does not exist (--data-dir)")
        return p
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataError(f"data directory {p} does not exist (${ENV_DATA_DIR})")
        return p
    candidates = [
        Path(__file__).resolve().parents[1].parent / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
    ]
    for c in candidates:
        if c.is_dir():
            return c
    raise DataError(
        f"no data directory found: pass --data-dir or set ${ENV_DATA_DIR} "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


def data_file(relative: str, explicit_dir: str | os.PathLike | None = None) -> Path:
    p = data_dir(explicit_dir) / relative
    if not p.is_file():
        raise DataError(f"data file {p} is missing")
    return p


def wikitext2_text(explicit_dir: str | os.PathLike | None = None) -> str:
    """WikiText-2 raw test split as the usual joined string (CRLF normalised), via `datasets`."""
    import datasets

    path = data_file("wikitext2/wikitext-2-raw-v1.test.joined.crlf.txt", explicit_dir)
    ds = datasets.load_dataset("text", data_files=str(path), sample_by="document", split="train")
    return ds[0]["text"].replace("\r\n", "\n")
