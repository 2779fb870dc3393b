"""Token ids → text deltas: UTF-8 safe incremental decoding, and stop strings.

With byte-level BPE one character can span several tokens (a Chinese character is 3
bytes, an emoji 4), and decoding a token alone may yield half a character, which the
decoder shows as U+FFFD. `IncrementalDetokenizer` decodes a short window of recent tokens
and only releases text once it no longer ends in U+FFFD (the method of vLLM and TGI), so a
stream never shows a broken character and the deltas add up to the decoded whole.

`StopStrings` holds back any text that could still turn into a stop string, so that a stop
string never reaches the user, not even its first characters.
"""

from __future__ import annotations

from ling.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4
"""prompt tokens decoded along with the first new ones: tokenizers whose decoding depends
on the previous token (SentencePiece's leading space) then give the right first delta"""


class IncrementalDetokenizer:
    """Feed generated token ids one by one; get back the text each one completes."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        """start of the window decoded for context"""
        self.read_offset = len(self.ids)
        """tokens before this one have been released as text"""

    def push(self, token_id: int) -> str:
        """Add a token; return the new complete text (maybe empty while a character is split)."""
        self.ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is still held at the end (a character left incomplete shows as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        text = decode(self.ids[self.prefix_offset :])
        if len(text) <= len(prefix) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]


class StopStrings:
    """Text filter that ends output before the first stop string and never shows any of it."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        """text that could be the start of a stop string; released once it cannot"""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add new text; return what can be shown. After a stop string, `stopped` is True
        and nothing more is shown."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        pending = self.pending + text
        found = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self.pending = True, ""
            return pending[: min(found)]
        hold = self._held_suffix(pending)
        self.pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]

    def flush(self) -> str:
        """At the end of generation, the held text is no stop string: release it."""
        text, self.pending = self.pending, ""
        return text

    def _held_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = min(len(text), max(len(s) for s in self.stops) - 1)
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
