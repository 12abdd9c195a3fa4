"""Generated token ids turned into text deltas, safe to send one by one.

A partial UTF-8 character is held back until its last token arrives, and so
is any tail that could be the start of a ``stop`` string; a stop string
itself is never sent.
"""

from __future__ import annotations

import threading
from typing import Any


class TextAssembler:
    """Turns generated token ids into text deltas, holding back partial characters and possible stop strings."""

    def __init__(self, tokenizer: Any, stop: list[str], lock: threading.Lock | None = None) -> None:
        self.tokenizer = tokenizer
        self.lock = lock or threading.Lock()
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def add(self, token: int) -> str:
        """Add one token; return the text that is now safe to send."""
        self.ids.append(token)
        with self.lock:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        self.text = text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._advance(min(hits))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._advance(len(text) - hold)

    def finish(self) -> str:
        """The text still held back once generation has ended without a stop string."""
        return "" if self.stopped else self._advance(len(self.text))

    def _advance(self, upto: int) -> str:
        """The text from what was already sent up to ``upto``, now marked as sent."""
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta
