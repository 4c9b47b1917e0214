"""Incremental detokenization with stop-string holdback.

Pure Python, no model runtime: a backend feeds the raw bytes of each generated token's piece and
gets back the text that is safe to send now. Two things make this more than ``bytes.decode``:

* A multi-byte UTF-8 character can be split across tokens (byte-fallback tokenizers do this for
  emoji and CJK). The incremental decoder keeps the partial bytes until the character completes,
  so it is emitted whole and once.
* A stop string must never reach the client, even when its first half arrives one token before
  its second half. Any tail of the text that could still grow into a stop string is held back
  until the next token resolves it; on a match only the text before the stop string is emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TextChunk:
    """What one token adds to the output."""

    text: str
    stopped: bool = False  # a stop string matched; ``text`` ends right before it


class StopStringMatcher:
    """Finds stop strings in a growing text and says how much of its tail must be held back."""

    def __init__(self, stop: Iterable[str]) -> None:
        # Empty strings would match everywhere; the front should not send them, but be safe.
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop if s))

    def find(self, text: str) -> tuple[int, str]:
        """Index of the earliest stop string in ``text`` (-1 if none) and which one it is."""
        best, which = -1, ""
        for s in self.stop:
            i = text.find(s)
            if i != -1 and (best == -1 or i < best):
                best, which = i, s
        return best, which

    def holdback(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            # Only prefixes longer than what we already hold back can matter.
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


class DetokStream:
    """Turns a sequence of token pieces (bytes) into safe-to-emit text chunks."""

    def __init__(self, stop: Iterable[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._matcher = StopStringMatcher(stop)
        self._pending = ""  # decoded text not yet emitted: a possible start of a stop string
        self.stopped = False
        self.matched = ""  # the stop string that ended the text

    def feed(self, piece: bytes) -> TextChunk:
        """Add one token's bytes; return the text that can be emitted now."""
        if self.stopped:
            return TextChunk("", stopped=True)
        text = self._pending + self._decoder.decode(piece)
        if not self._matcher.stop:
            self._pending = ""
            return TextChunk(text)
        # Everything emitted earlier was checked not to start a stop string, and any tail that
        # could have started one was kept in ``_pending``; so searching ``text`` alone suffices.
        at, self.matched = self._matcher.find(text)
        if at != -1:
            self.stopped = True
            self._pending = ""
            return TextChunk(text[:at], stopped=True)
        keep = self._matcher.holdback(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return TextChunk(text[: len(text) - keep])

    def flush(self) -> str:
        """End of generation without a stop-string match: release everything still held back.

        Incomplete UTF-8 bytes at the very end become U+FFFD, as ``errors="replace"`` does.
        """
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        # The final bytes could complete a stop string only if they decoded to text; check it.
        at, self.matched = self._matcher.find(text)
        if at != -1:
            self.stopped = True
            return text[:at]
        return text
