"""The demo's console: thread choice, progress lines for training and evaluation, and progress bars.

On a terminal progress is drawn as bars; in a log (``make demo > log``) as lines, at least every ``every_s``
seconds, since a log never shows a redrawn bar.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from longitudinal.commands._common import output_width

# Bound to the real stdout: the training loop's own lines are captured (``capture``) and shown through this.
console = Console(file=sys.stdout, width=output_width())

def duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    return f"{int(s // 60)} min" + (f" {int(s % 60):02d} s" if int(s % 60) else "")


# --- threads ----------------------------------------------------------------------------------------------
def choose_threads(cores: int, load: float, env: Mapping[str, str]) -> tuple[int, str]:
    """(torch threads, why). LONGITUDINAL_DEMO_THREADS or OMP_NUM_THREADS win; otherwise all cores on an idle
    machine and one thread when the 1-minute load average says other work is running."""
    for var in ("LONGITUDINAL_DEMO_THREADS", "OMP_NUM_THREADS"):
        if env.get(var, "").strip().isdigit() and int(env[var]) > 0:
            return int(env[var]), f"{var}={env[var]}"
    if load < 0.5:
        return cores, f"load average {load:.1f} on {cores} cores: idle"
    n = max(1, min(cores, round(cores - load)))
    return n, (f"load average {load:.1f} on {cores} cores: other work is running, and threads that wait on "
               "each other would be far slower (LONGITUDINAL_DEMO_THREADS overrides)")


def set_threads() -> None:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    n, why = choose_threads(os.cpu_count() or 1, load, os.environ)
    torch.set_num_threads(n)
    console.print(f"PyTorch threads: {n} ({why})")


# --- progress ---------------------------------------------------------------------------------------------
_STEP = re.compile(r"^step (\d+)/(\d+|-) ")
_EVAL = re.compile(r"evaluated (\d+)/(\d+) (targets|patients)")
_TRAINED = re.compile(r"^trained (\d+) steps in")
_BUDGET = re.compile(r"^budget of (\d+) s reached at step (\d+)")


class Reporter:
    """Turns the lines training prints and the evaluation's progress messages into progress bars (on a
    terminal) or into a line at least every ``every_s`` seconds (in a log), so no phase passes in silence."""

    def __init__(self, out: Console, steps: int, every_s: float = 20.0) -> None:
        self.out, self.steps, self.every_s = out, steps, every_s
        self.live = out.is_terminal
        self.progress: Progress | None = None
        self.train_task = None
        self.eval_task = None
        self.phase = "preparing the training run"
        self.trained = False
        self.n_evals_after_training = 0
        self.last_eval: tuple[int, int] | None = None
        self.last_print = 0.0
        self.safety_stop: tuple[int, int] | None = None  # (budget s, step)

    @contextlib.contextmanager
    def active(self) -> Iterator[Reporter]:
        if not self.live:
            self.out.print(f"training {self.steps} steps; a line at least every {self.every_s:.0f} s")
            yield self
            return
        with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=self.out, transient=False) as prog:
            self.progress = prog
            self.train_task = prog.add_task("training steps", total=self.steps)
            yield self
            if self.eval_task is not None:
                prog.update(self.eval_task, description="evaluation done")
            self.progress = None

    # every line the training loop prints, and every progress message of an evaluation
    def line(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        if m := _EVAL.search(text):
            self._evaluated(int(m.group(1)), int(m.group(2)), m.group(3))
        elif m := _STEP.match(text):
            self._stepped(int(m.group(1)), text)
        else:
            if m := _BUDGET.match(text):
                self.safety_stop = (int(m.group(1)), int(m.group(2)))
                self.out.print(f"[bold red]SAFETY STOP: training hit the {m.group(1)} s wall-clock limit at step "
                               f"{m.group(2)} of {self.steps}[/bold red]")
            if m := _TRAINED.match(text):
                self.trained = True
                self._set_train(int(m.group(1)))
            if text.startswith("calibrating"):
                self.phase = text
            self.out.print(escape(text))

    def _set_train(self, step: int) -> None:
        if self.progress is not None and self.train_task is not None:
            self.progress.update(self.train_task, completed=step)

    def _stepped(self, step: int, text: str) -> None:
        self.phase = "training"
        if self.live:
            self._set_train(step)
        elif time.perf_counter() - self.last_print >= self.every_s or step >= self.steps:
            self.last_print = time.perf_counter()
            self.out.print(escape(text))

    def _evaluated(self, done: int, total: int, unit: str) -> None:
        new = self.last_eval is None or done <= self.last_eval[0] or total != self.last_eval[1] \
            or self.last_eval[0] >= self.last_eval[1]
        if new:
            if self.trained:
                self.n_evals_after_training += 1
                self.phase = ("scoring on the validation patients: the model and the last-scan baseline (the gate)"
                              if self.n_evals_after_training == 1 else
                              "scoring on the held-out test patients: the model and both baselines")
            elif not self.phase.startswith("calibrating"):
                self.phase = "validating"
        self.last_eval = (done, total)
        if self.n_evals_after_training == 2 and done >= total:
            self.out.print("logging the tables, figures and model to MLflow, registering the model, applying the gate")
        if self.progress is not None:
            if self.eval_task is None:
                self.eval_task = self.progress.add_task(self.phase, total=total)
            if new:
                self.progress.reset(self.eval_task, total=total, description=self.phase)
            self.progress.update(self.eval_task, completed=done, total=total)
        elif new or done >= total or time.perf_counter() - self.last_print >= self.every_s:
            self.last_print = time.perf_counter()
            self.out.print(f"{self.phase}: {done}/{total} {unit}")


class _Lines(io.TextIOBase):
    """A text stream that hands every complete line to ``sink``."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self.sink, self.buf = sink, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.sink(line)
        return len(s)

    def flush(self) -> None:
        if self.buf:
            self.sink(self.buf)
            self.buf = ""


@contextlib.contextmanager
def capture(reporter: Reporter) -> Iterator[None]:
    """Training's printed lines and every evaluation's progress go to ``reporter``."""
    from longitudinal.evaluation.harness import evaluation_progress

    lines = _Lines(reporter.line)
    with evaluation_progress(reporter.line), contextlib.redirect_stdout(lines):
        try:
            yield
        finally:
            lines.flush()


# --- bars --------------------------------------------------------------------------------------------
class Bar:
    """A progress bar on a terminal; in a log, a line at the start, at least every ``every_s`` seconds and at the
    end (a log never shows a redrawn bar)."""

    def __init__(self, description: str, total: int | None, every_s: float = 20.0) -> None:
        self.description, self.total, self.every_s = description, total, every_s
        self.prog: Progress | None = None
        self.last = 0.0
        self.t0 = time.perf_counter()

    def __enter__(self) -> Bar:
        if console.is_terminal:
            self.prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console)
            self.prog.__enter__()
            self.task = self.prog.add_task(self.description, total=self.total)
        else:
            console.print(f"{self.description} ...")
            self.last = time.perf_counter()
        return self

    def update(self, done: int, total: int | None = None) -> None:
        self.total = total if total is not None else self.total
        if self.prog is not None:
            self.prog.update(self.task, completed=done, total=self.total)
        elif time.perf_counter() - self.last >= self.every_s or (self.total and done >= self.total):
            self.last = time.perf_counter()
            console.print(f"{self.description}: {done}/{self.total or '?'} "
                          f"({duration(time.perf_counter() - self.t0)})")

    def __exit__(self, *exc: object) -> None:
        if self.prog is not None:
            self.prog.__exit__(*exc)
