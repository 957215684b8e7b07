"""Progress on stderr: a live tqdm bar on a terminal; off one (CI, `> log`), a plain line now and then.

tqdm redraws its bar with `\\r` many times a second, which in a log file becomes one huge line. When
stderr is not a terminal, `progress_bar` returns a `PlainProgress` instead: it has the tqdm methods
the package uses (update, set_postfix_str, write, close, a context manager) and prints one line,
without `\\r`, every `every_fraction` of the total or every `every_seconds`, whichever comes first:

    train: step 300/3000 (10%) | loss 3.214 | 52,000 tok/s | elapsed 1:02 | ETA 9:18
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

PLAIN_EVERY_FRACTION = 0.1
PLAIN_EVERY_SECONDS = 30.0


def progress_bar(
    desc: str,
    total: float | None = None,
    initial: float = 0,
    unit: str = "it",
    enabled: bool = True,
    file: TextIO | None = None,
    **tqdm_options,
):
    """A tqdm bar on a terminal, a `PlainProgress` elsewhere; disabled (prints nothing) when not `enabled`."""
    file = file or sys.stderr
    if enabled and not _is_terminal(file):
        return PlainProgress(desc, total, initial, unit, file)
    from tqdm import tqdm

    return tqdm(
        desc=desc,
        total=total,
        initial=initial,
        unit=unit,
        disable=not enabled,
        file=file,
        dynamic_ncols=True,
        **tqdm_options,
    )


def _is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _amount(value: float) -> str:
    return f"{value:,.0f}" if value < 1e6 else f"{value / 1e6:,.1f}M"


class PlainProgress:
    """Progress as a plain line every `every_fraction` of `total` or `every_seconds` (for logs and CI)."""

    def __init__(
        self,
        desc: str,
        total: float | None,
        initial: float = 0,
        unit: str = "it",
        file: TextIO | None = None,
        every_fraction: float = PLAIN_EVERY_FRACTION,
        every_seconds: float = PLAIN_EVERY_SECONDS,
    ):
        self.desc, self.total, self.n, self.unit, self.file = desc, total, initial, unit, file or sys.stderr
        self.every_seconds, self.postfix = every_seconds, ""
        self._start_n, self._start = initial, time.monotonic()
        self._step = max(1.0, total * every_fraction) if total else None
        self._next_n = (initial // self._step + 1) * self._step if self._step else None
        self._last_time, self._printed_n = self._start, initial
        # the rate behind the ETA counts from the end of the first update: that one holds the warm-up
        # (torch.compile, first allocations), which the rest do not repeat
        self._rate_from: tuple[float, float] | None = None

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self._rate_from is None:
            self._rate_from = (self.n, now)
        if (self._next_n is not None and self.n >= self._next_n) or now - self._last_time >= self.every_seconds:
            self._print(now)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def write(self, text: str, file: TextIO | None = None) -> None:
        print(text, file=file or self.file, flush=True)

    def line(self, now: float | None = None) -> str:
        """The progress line as it would print now."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        label = "step" if self.unit == "step" else self.unit
        where = (
            f"{label} {_amount(self.n)}/{_amount(self.total)} ({self.n / self.total:.0%})"
            if self.total
            else f"{_amount(self.n)} {label}"
        )
        parts = [f"{self.desc}: {where}"] + ([self.postfix] if self.postfix else [])
        if self.unit != "step" and rate:
            parts.append(f"{_amount(rate)} {label}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and self._rate_from is not None:
            since_n, since = self._rate_from
            if self.n > since_n and now > since:
                parts.append(f"ETA {_clock(max(0.0, self.total - self.n) * (now - since) / (self.n - since_n))}")
        return " | ".join(parts)

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.file, flush=True)
        self._last_time, self._printed_n = now, self.n
        if self._step:
            while self._next_n <= self.n:
                self._next_n += self._step

    def close(self) -> None:
        if self.n != self._printed_n:  # the final position, unless it was just printed
            self._print(time.monotonic())

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
