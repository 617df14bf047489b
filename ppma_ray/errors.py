"""One line for an exception, the way every message that quotes a library's error shows it."""

from __future__ import annotations


def one_line(e: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of ``e``: its message's first non-blank line, cut at ``limit`` characters
    (marked ``...``), or ``Type`` alone for an empty message, such as the ``EOFError()`` that
    ``torch.load`` raises on a zero-byte file. Indexing ``str(e).splitlines()[0]`` there raised an
    ``IndexError`` in place of the message being written."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
