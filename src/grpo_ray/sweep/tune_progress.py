"""A Ray Tune callback that forwards trial events to the CLI's progress display.

Besides Tune's own events it polls the sweep's phase board (trial/phases.py) about once a second
from Tune's loop and forwards each running trial's new phase as a ``phase`` event: what a trial is
doing between its reports (loading, SFT step 12/75, GRPO step 3/50).

Tune pickles its run config (callbacks included) into the experiment directory for
``--resume``; the listener (a rich display holding locks) stays out of the pickled state,
and the class lives at module level so it pickles by reference. A callback restored by
``Tuner.restore`` has no listener of its own: it reports to the one this process set with
:func:`set_listener` (search.py does, before a resumed sweep runs).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from ray.tune import Callback

log = logging.getLogger(__name__)

# Receives ("start" | "result" | "complete" | "error", event data) from Tune's callback below,
# ("phase", {"trial_id", "phase": text, "since": unix time the phase began}) from the phase board,
# and ("note", {"message": str}) for a line about the search itself (search.py).
ProgressFn = Callable[[str, dict[str, Any]], None]


_listener: ProgressFn | None = None  # for callbacks restored from a pickled run config


def set_listener(on_event: ProgressFn | None) -> None:
    global _listener
    _listener = on_event


POLL_S = 1.0  # how often the phase board is read, from Tune's loop
WRITE_S = 10.0  # how often, at most, the phases go to the run's phases.json (a bucket write each time)


class ProgressCallback(Callback):
    def __init__(self, on_event: ProgressFn | None, board: str | None = None, phases_file: str | None = None) -> None:
        self.on_event = on_event
        self.board = board  # the phase board's actor name (trial/phases.py), None: no phases
        self.phases_file = phases_file  # where `grpo-ray status` reads them (run_dir.phases_path), or None
        self._handle: Any = None
        self._ended: set[str] = set()  # a post still in flight when its trial ended must not revive it
        self._polled = 0.0
        # the running trials' phases as last read (and forwarded): {trial id: (text, since)}
        self._phases: dict[str, tuple[str, float]] = {}
        self._written: tuple[float, dict | None] = (0.0, None)  # when, and what, phases.json got last

    def __getstate__(self) -> dict[str, Any]:
        return {"on_event": None, "board": self.board, "phases_file": self.phases_file}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a run pickled before the board has neither: no phases
        self.__init__(state.get("on_event"), state.get("board"), state.get("phases_file"))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if self.board is None or now - self._polled < POLL_S:
            return
        self._polled = now
        try:
            import ray

            if self._handle is None:
                self._handle = ray.get_actor(self.board)
            phases = ray.get(self._handle.snapshot.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - no board, or it died: the sweep goes on without phases
            log.debug("phase board %s unreadable; no phases shown", self.board, exc_info=True)
            self.board = None
            return
        for trial_id, (text, since) in phases.items():
            if trial_id in self._ended:
                self._forget(trial_id)  # a late post of an ended trial: off the board again
            elif self._phases.get(trial_id, ("",))[0] != text:
                self._emit("phase", {"trial_id": trial_id, "phase": text, "since": since})
        self._phases = {t: p for t, p in phases.items() if t not in self._ended}
        self._write_phases()

    def _write_phases(self, force: bool = False) -> None:
        """The running trials' phases into phases.json, at most every WRITE_S seconds (or now)."""
        at, last = self._written
        if self.phases_file is None or self._phases == last or (not force and time.monotonic() - at < WRITE_S):
            return
        from grpo_ray import storage

        doc = {"written_at": time.time(),
               "trials": {t: {"phase": text, "since": since} for t, (text, since) in sorted(self._phases.items())}}
        try:
            storage.write_text(self.phases_file, json.dumps(doc, indent=1))
            self._written = (time.monotonic(), dict(self._phases))
        except OSError:  # a display's file: the sweep goes on without it
            log.warning("could not write %s; `grpo-ray status` shows no phases", self.phases_file, exc_info=True)
            self.phases_file = None

    def _forget(self, trial_id: str) -> None:
        """A trial that ended: off the board, so a stale phase is never shown again."""
        self._ended.add(trial_id)
        if self._phases.pop(trial_id, None) is not None:
            self._write_phases(force=True)  # status must not show an ended trial's phase for WRITE_S
        if self._handle is not None:
            try:
                self._handle.drop.remote(trial_id)
            except Exception:  # noqa: BLE001 - the board is a display's; never the trial's fault
                log.debug("phase board: could not drop %s", trial_id, exc_info=True)

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        listener = self.on_event or _listener
        if listener is None:
            return
        try:
            listener(kind, data)
        except Exception:  # noqa: BLE001 - a display's fault must not become the trial's
            # Tune runs callbacks inside its own trial handling: an exception here marks the
            # trial ERROR and stops its actor (a warm actor lost, its next trial cold). A
            # benchmark's listener did that at 8d5b03e (bench/README.md); log it and go on.
            log.warning("progress listener failed on a %r event; the sweep goes on", kind, exc_info=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended.discard(trial.trial_id)  # started again (a resumed sweep): its phases count
        self._emit("start", {"trial_id": trial.trial_id, "config": dict(trial.config)})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._emit("result", {"trial_id": trial.trial_id, "result": dict(result)})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._forget(trial.trial_id)
        self._emit("complete", {"trial_id": trial.trial_id})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._forget(trial.trial_id)
        self._emit("error", {"trial_id": trial.trial_id, "error": str(getattr(trial, "error_file", "") or "")})
