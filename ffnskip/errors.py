"""The root of the project's errors.

Every error ffnskip, ``tuning`` and ``serve`` raise on purpose (bad input, an unsupported model,
a store or server condition) derives from :class:`FFNSkipError`, so a caller can tell them from
bugs with one ``except``. Each also keeps the built-in base it had (``ValueError`` for bad input,
``RuntimeError`` for a state), so existing ``except ValueError`` code goes on working.
"""

from __future__ import annotations


class FFNSkipError(Exception):
    """Root of every error the project raises on purpose."""


__all__ = ["FFNSkipError"]
