"""Where each running trial is now, between its reports: for the sweep's live display.

A trial reports to Tune every ``grpo.report_every`` GRPO steps. Before its first report it loads
the model (and may queue for packed neighbours' engine starts), evaluates, runs SFT and compiles
its first GRPO steps: minutes on a GPU (a cold gemma-3-270m trial packed eight per H200 took its
first GRPO step up to 290 s after it started, bench/README.md "H200 lease at ffe34b9"), tens of
minutes for the tutorial's SFT. Tune sees nothing in that time, and neither did the user.

So the driver starts a small Ray actor per sweep, the :class:`Board` (no CPU of its own, named
after the sweep), and each trial process posts its phase there through a :class:`PhasePoster`:
"loading the model", "held-out evaluation", "SFT step 12/75", "GRPO step 3/50": the watchdog's
beats (trial/guard.py), which mark the same progress. The sweep's
display (sweep/tune_progress.py) polls the board and shows one line per running trial. This is a
side channel for people: schedulers and the searcher still see only ``tune.report``.

Posting never fails a trial: outside a sweep (a test calling ``run_trial``, a benchmark) or when
the board is gone, the poster does nothing. Step updates are sent at most every
:data:`MIN_INTERVAL_S` seconds; a new phase (SFT after the load, GRPO after SFT) is sent at once.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 2.0  # between two posts of the same phase (its step count): a display, not a log


def board_name(sweep: str) -> str:
    """The board's actor name for the sweep named ``sweep`` (one driver per sweep: run_lock.py)."""
    return f"grpo-ray-phases:{sweep}"


class Board:
    """The latest phase of each trial: ``{trial_id: (text, unix time the phase began)}``.

    >>> b = Board()
    >>> b.post("t1", "SFT step 1/10", 100.0, new_phase=True)
    >>> b.post("t1", "SFT step 5/10", 104.0, new_phase=False)   # same phase: its start stays
    >>> b.snapshot()
    {'t1': ('SFT step 5/10', 100.0)}
    >>> b.drop("t1"); b.snapshot()
    {}
    """

    def __init__(self) -> None:
        self._phases: dict[str, tuple[str, float]] = {}

    def post(self, trial_id: str, text: str, at: float, new_phase: bool) -> None:
        began = at if new_phase or trial_id not in self._phases else self._phases[trial_id][1]
        self._phases[trial_id] = (text, began)

    def drop(self, trial_id: str) -> None:
        self._phases.pop(trial_id, None)

    def snapshot(self) -> dict[str, tuple[str, float]]:
        return dict(self._phases)


def start_board(sweep: str) -> Any:
    """The driver's board for ``sweep`` (Ray must be up): an actor that takes no CPU from trials."""
    import ray

    return ray.remote(num_cpus=0)(Board).options(name=board_name(sweep), get_if_exists=True).remote()


def phase_of(text: str) -> str:
    """The phase a post's text belongs to: its words before a step count or a colon.

    >>> phase_of("GRPO step 3/50"), phase_of("GRPO: starting"), phase_of("loading the model")
    ('GRPO', 'GRPO', 'loading the model')
    """
    return re.split(r":| step ", text, maxsplit=1)[0]


class PhasePoster:
    """Posts this trial's phase to its sweep's board; does nothing outside a Tune trial."""

    def __init__(self, board: Any = None, trial_id: str | None = None, clock: Any = time.time) -> None:
        self.board, self.trial_id, self.clock = board, trial_id, clock
        self._last_phase: str | None = None
        self._last_at = 0.0

    @classmethod
    def for_this_trial(cls, sweep: str) -> PhasePoster:
        """The poster of the Tune trial running in this process, or one that does nothing."""
        try:
            import ray
            from ray import tune

            if not ray.is_initialized():
                return cls()
            trial_id = tune.get_context().get_trial_id()
            if not trial_id:
                return cls()
            return cls(ray.get_actor(board_name(sweep)), str(trial_id))
        except Exception:  # noqa: BLE001 - no board (an old driver, a test without one): no display
            return cls()

    def __call__(self, text: str, force: bool = False) -> None:
        """Post ``text``; within one phase, at most every MIN_INTERVAL_S seconds unless ``force``."""
        if self.board is None:
            return
        now, phase = self.clock(), phase_of(text)
        new_phase = phase != self._last_phase
        if not new_phase and not force and now - self._last_at < MIN_INTERVAL_S:
            return
        self._last_phase, self._last_at = phase, now
        try:
            self.board.post.remote(self.trial_id, text, now, new_phase)  # fire and forget
        except Exception:  # noqa: BLE001 - the board went away (its driver ended): stop posting
            log.debug("phase board gone; no more phase posts", exc_info=True)
            self.board = None


_current: list[PhasePoster] = []  # the poster of the trial this process runs now (run_trial)


@contextmanager
def posting(poster: PhasePoster) -> Iterator[PhasePoster]:
    """For the block (one trial), :func:`post` goes to ``poster``: code below the recipe that has
    no poster of its own (the engine-start lock) can say what the trial waits for."""
    _current.append(poster)
    try:
        yield poster
    finally:
        _current.remove(poster)


def post(text: str) -> None:
    """Post ``text`` as the current trial's phase, at once (nothing outside a trial)."""
    for poster in _current[-1:]:
        poster(text, force=True)
