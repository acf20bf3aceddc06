"""Progress bars of the evaluation passes (on stderr; off with ``progress=False``)."""

from __future__ import annotations

import sys


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr, leave=False, dynamic_ncols=True)
