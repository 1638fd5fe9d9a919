"""The one way long work reports progress: a callback `progress(done, total, what)`.

Counted work (generate, import, predict, evaluate, tune, the tiles of a large image) calls it with its counts,
`progress(12, 40, "images")`; work in stages (export, bench) with the fraction of the whole job done,
`progress(0.4, 1.0, "quantizing to INT8")`. The CLI shows it as a tqdm bar (engine/__main__.py), the pages as
an st.progress bar (app_pages/ui.py, progress_bar); `describe` is how both turn a call into a fraction and a line of text.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, float, str], None]


def silent(done: float, total: float, what: str = "") -> None:
    """The default callback: report nothing."""


def part(progress: Progress, start: float, span: float, prefix: str = "") -> Progress:
    """A callback for one part of a bigger job: the part's own (done, total) fill [start, start + span] of it, its
    text (with its counts) after `prefix`."""
    def report(done: float, total: float, what: str = "") -> None:
        fraction, text = describe(done, total, what)
        progress(start + span * fraction, 1.0, prefix + text)

    return report


def time_left(fraction: float, elapsed_s: float) -> float | None:
    """Seconds left of a job `fraction` done after elapsed_s seconds, at its pace so far (None before 2 % done,
    where the pace says nothing yet, and once done)."""
    return elapsed_s * (1.0 - fraction) / fraction if 0.02 <= fraction < 1.0 else None


def describe(done: float, total: float, what: str = "") -> tuple[float, str]:
    """(fraction done, text) of a progress call: counts are shown for counted work, the stage alone otherwise."""
    fraction = min(1.0, max(0.0, done / total)) if total else 0.0
    counted = total > 1 and float(total).is_integer()
    return fraction, (f"{what} {int(done)}/{int(total)}" if counted else what).strip()
