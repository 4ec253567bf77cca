"""Text: the one incremental decoder, and what stop strings and streaming build on it.

The engine works in token ids; text concerns plug in here. `IncrementalDecoder` turns one row's
tokens into text as they arrive, at a cost independent of the row's length; `StopStringMatcher`
(does the continuation contain a stop string yet?) and `TextStreamer` (write the continuation while
it is generated) both read their text from it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

# tokens held back while they end in an incomplete UTF-8 character, before giving up and taking
# the replacement character as text (a model can emit invalid bytes forever)
_MAX_HELD_TOKENS = 16


class IncrementalDecoder:
    """One row's text, decoded as its tokens arrive at a cost independent of the row's length.

    Each push decodes only a short window: the text of ids[prefix:] minus that of ids[prefix:read],
    where ids[prefix:read] are the tokens of the previous step, kept as context so that tokenizers
    whose pieces depend on a neighbour (a leading space) decode as in the whole sequence. While the
    window ends in an incomplete UTF-8 character (U+FFFD), its text is held back (`held`).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read]: context; ids[read:]: not yet committed
        self.held = ""  # decoded text of the held-back tokens (ending in U+FFFD)

    def push(self, token: int) -> str:
        """Add one token; return the newly committed text (empty while a character is incomplete)."""
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        new = after[len(before):]
        if new.endswith("\ufffd") and len(self.ids) - self.read < _MAX_HELD_TOKENS:
            self.held = new
            return ""
        self.prefix, self.read, self.held = self.read, len(self.ids), ""
        return new


def first_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> int:
    """The index in `text` of the earliest stop string found at or after `start`, or -1."""
    found = [i for i in (text.find(s, start) for s in stop_strings if s) if i >= 0]
    return min(found, default=-1)


class StopStringMatcher:
    """Whether one row's continuation contains a stop string yet, fed one token at a time.

    Only the newly decoded text and the last (longest stop string - 1) characters before it are
    searched: a stop string made of any number of tokens (CJK or emoji as byte tokens) is found
    on the token that completes it, exactly when decoding the whole continuation would find it.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_strings = [s for s in stop_strings if s]
        self.keep = max((len(s) for s in self.stop_strings), default=1) - 1
        self.tail = ""  # the last `keep` characters of the committed text

    def push(self, token: int) -> bool:
        text = self.tail + self.decoder.push(token)
        self.tail = text[-self.keep:] if self.keep else ""
        # as in decoding the whole continuation now: the held-back text counts, U+FFFD included
        return first_stop(text + self.decoder.held, self.stop_strings) >= 0


def continuation_text(tokenizer, ids: list[int], eos_ids: Sequence[int], stop_strings: Sequence[str]) -> str:
    """A row's generated text: without its final EOS, cut before the first stop string."""
    if ids and ids[-1] in eos_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    cut = first_stop(text, stop_strings)
    return text if cut < 0 else text[:cut]


class TextStreamer:
    """A `stream` callback that writes one row's continuation as text while it is generated.

    Decodes the row's tokens incrementally (`IncrementalDecoder`) and writes what is new, holding
    back an incomplete UTF-8 character and any tail that could still become a stop string, so the
    terminal never shows the stop string or a half character. Tokens in `skip_token_ids` (EOS,
    <|im_end|>) are not written. Call `finish()` after generation to flush what was held back.
    """

    def __init__(self, tokenizer, write: Callable[[str], object] | None = None, row: int = 0,
                 stop_strings: Sequence[str] = (), skip_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer, self.row = tokenizer, row
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.stop_strings = [s for s in stop_strings if s]
        self.longest = max((len(s) for s in self.stop_strings), default=0)
        self.skip = set(skip_token_ids)
        self.decoder = IncrementalDecoder(tokenizer)
        self.text = ""  # the committed text (without the decoder's held-back characters)
        self.written = 0  # characters of it already written
        self.stopped = False

    def __call__(self, tokens: torch.Tensor, emitted: torch.Tensor) -> None:
        if not bool(emitted[self.row]) or self.stopped:
            return
        token = int(tokens[self.row])
        if token in self.skip:
            self.stopped = True
            return
        self.text += self.decoder.push(token)
        self._flush(final=False)

    def finish(self) -> str:
        """Write the rest (cut at a stop string); returns the full text written."""
        if not self.stopped:
            self.text += self.decoder.held
        return self._flush(final=True)

    def _flush(self, final: bool) -> str:
        text = self.text
        # nothing written holds a stop string's start: search from just before the written text
        cut = first_stop(text, self.stop_strings, max(self.written - self.longest, 0))
        if cut >= 0:
            text, self.text, self.stopped = text[:cut], text[:cut], True
        end = len(text)
        if not final and cut < 0:
            for s in self.stop_strings:  # hold back a tail that is a prefix of a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        if end > self.written:
            self.write(text[self.written:end])
            self.written = end
        return text[:self.written]
