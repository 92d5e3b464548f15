"""Progress for long work: a bar on a terminal or in Jupyter, plain lines elsewhere.

A scheduled job's log (a CronJob, Slurm's output file, ``nohup``) gets one line every
``every_s`` seconds with the count, the rate and the ETA, instead of carriage-return frames
packed into one line.
"""

from __future__ import annotations

import sys
import time


def interactive() -> bool:
    """A terminal or a Jupyter kernel: where a live bar renders."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class Progress:
    """``update(n)`` as work is done, ``postfix(text)`` for a status (loss, KL), ``close()`` at the end.

    ``unit`` names what is counted ("cells", "step"); ``enabled=False`` shows nothing."""

    def __init__(
        self,
        total: int,
        description: str,
        unit: str = "cells",
        enabled: bool = True,
        initial: int = 0,
        every_s: float = 30.0,
    ) -> None:
        self.total, self.description, self.unit, self.every_s = total, description, unit, every_s
        self.done = self.initial = initial
        self.bar, self.lines, self.status = None, False, ""
        self.started = self.last = time.perf_counter()
        if enabled and interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=description,
                unit=unit,
                unit_scale=unit == "cells",
                dynamic_ncols=True,
            )
        else:
            self.lines = enabled

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def rate(self) -> float:
        """Units per second since the start."""
        return (self.done - self.initial) / max(time.perf_counter() - self.started, 1e-9)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.perf_counter() - self.last >= self.every_s:
            self._line()

    def postfix(self, text: str) -> None:
        self.status = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines:
            self._line()
            self.lines = False

    def _line(self) -> None:
        self.last = time.perf_counter()
        rate = self.rate
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        eta = f", ETA {left / 60:.1f} min" if self.done < self.total and left == left else ""
        print(
            f"{self.description}: {self.done:,}/{self.total:,} {self.unit}{share}, {rate:,.0f} {self.unit}/s{eta}"
            + (f"  {self.status}" if self.status else ""),
            file=sys.stderr,
            flush=True,
        )
