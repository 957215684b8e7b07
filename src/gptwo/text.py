"""Text out of tokens: stop strings and streaming deltas, with no torch (the server's protocol layer uses it).

`StopMatcher` finds stop strings in text fed piece by piece in linear time; `TextStream` turns one
sequence's tokens into whole-character text deltas cut at the first stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gptwo.errors import GptwoError

if TYPE_CHECKING:
    from gptwo.tokenizer import Tokenizer


MAX_STOPS = 16  # stop strings per request or command
MAX_STOP_CHARS = 1024  # characters in one stop string


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """A command-line string with \\n, \\t, \\r and \\\\ read as newline, tab, carriage return and one backslash
    (a shell passes "\\n" as a backslash and an n); any other backslash stays as it is."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def check_stops(stop: Sequence[str]) -> None:
    """Reject more than MAX_STOPS stop strings, or one longer than MAX_STOP_CHARS (matching cost stays bounded)."""
    if len(stop) > MAX_STOPS:
        raise GptwoError(f"{len(stop)} stop strings is more than {MAX_STOPS}", f"give at most {MAX_STOPS}")
    for s in stop:
        if len(s) > MAX_STOP_CHARS:
            raise GptwoError(
                f"a stop string has {len(s)} characters, more than {MAX_STOP_CHARS}",
                f"use stop strings of at most {MAX_STOP_CHARS} characters",
            )
        why = invalid_text(s)
        if why:
            raise GptwoError(f"a stop string is not valid text: {why}", "pass UTF-8 text")


def _failure(pattern: str) -> list[int]:
    """KMP failure table: fail[j] = length of the longest proper prefix of pattern[:j+1] that is also its suffix."""
    fail, k = [0] * len(pattern), 0
    for j in range(1, len(pattern)):
        while k and pattern[j] != pattern[k]:
            k = fail[k - 1]
        k += pattern[j] == pattern[k]
        fail[j] = k
    return fail


class StopMatcher:
    """Finds stop strings in text fed piece by piece, in time linear in the text (one KMP automaton per stop).

    `state[i]` is how much of stop i the text seen so far ends with, so the text that may still become
    a stop string is the last `max(state)` characters: nothing older needs to be kept or searched.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)
        self.chars = frozenset("".join(self.stops))

    @property
    def held(self) -> int:
        """Characters at the end of the text that are the start of some stop string."""
        return max(self.state, default=0)

    def feed(self, piece: str) -> tuple[int, int] | None:
        """Take more text; if a stop string ends in it, return (its end in `piece`, its length).

        The first stop string to be completed wins (the longest, if several end at the same character),
        so the answer does not depend on how the text was split into pieces.
        """
        if not self.stops or not piece:
            return None
        if self.chars.isdisjoint(piece):  # common case: no character of any stop string
            self.state = [0] * len(self.stops)
            return None
        for end, char in enumerate(piece, 1):
            found = 0
            for i, stop in enumerate(self.stops):
                at = self.state[i]
                while at and stop[at] != char:
                    at = self.fail[i][at - 1]
                at += stop[at] == char
                if at == len(stop):
                    found, at = max(found, at), self.fail[i][at - 1]
                self.state[i] = at
            if found:
                return end, found
        return None


@dataclass
class TextStream:
    """Turns one row's tokens into text deltas: whole UTF-8 characters only, cut at the first stop string.

    Only undelivered text is kept: at most the longest stop string's length, plus the last token's text.
    """

    tokenizer: Tokenizer
    stop: Sequence[str] = ()
    stop_at_eot: bool = True
    skip_eot: bool = False  # when not stopping there, end-of-text adds no text (vLLM's skip_special_tokens)
    pending: str = ""  # decoded text not yet handed out (it may be the start of a stop string)
    finished: bool = False
    finish_reason: str | None = None
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    _matcher: StopMatcher = field(init=False)

    def __post_init__(self) -> None:
        self._matcher = StopMatcher(self.stop)

    def push(self, token_id: int) -> str:
        """Feed one token; return the new text that is safe to show."""
        if self.finished:
            return ""
        if token_id == self.tokenizer.eot_token and (self.stop_at_eot or self.skip_eot):
            return self._finish("stop") if self.stop_at_eot else ""
        if self._add(self._decoder.decode(self.tokenizer.token_bytes(token_id))):
            return self._finish("stop")
        return self._take(len(self.pending) - self._matcher.held)

    def close(self, reason: str = "length") -> str:
        """No more tokens: flush what is held back."""
        if self.finished:
            return ""
        self._add(self._decoder.decode(b"", final=True))
        return self._finish(reason)

    def _add(self, piece: str) -> bool:
        """Append `piece` to the pending text; on a stop string, cut the text before it and return True."""
        before = len(self.pending)
        self.pending += piece
        match = self._matcher.feed(piece)
        if match is not None:
            end, length = match
            self.pending = self.pending[: before + end - length]
        return match is not None

    def _finish(self, reason: str) -> str:
        self.finished, self.finish_reason = True, reason
        return self._take(len(self.pending))

    def _take(self, upto: int) -> str:
        piece, self.pending = self.pending[:upto], self.pending[upto:]
        return piece


def invalid_text(text: str) -> str | None:
    """Why `text` is not Unicode text that UTF-8 can encode (a lone surrogate, or a byte that was not UTF-8),
    or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        char = text[err.start]
        if "\udc80" <= char <= "\udcff":  # how Python carries an undecodable byte (surrogateescape)
            return f"it is not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x} at character {err.start})"
        return f"it holds a lone surrogate U+{ord(char):04X} at character {err.start}, which is not a character"


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; an empty prompt or one that is not valid text is a GptwoError."""
    if not prompt:
        raise GptwoError("the prompt is empty", "give some text (or '<|endoftext|>' for an unconditional sample)")
    why = invalid_text(prompt)
    if why:
        raise GptwoError(f"the prompt is not valid text: {why}", "pass UTF-8 text")
    return tokenizer.encode(prompt)
