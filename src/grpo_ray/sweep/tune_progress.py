"""A Ray Tune callback that forwards trial events to the CLI's progress display.

Tune pickles its run config (callbacks included) into the experiment directory for
``--resume``; the listener (a rich display holding locks) stays out of the pickled state,
and the class lives at module level so it pickles by reference. A callback restored by
``Tuner.restore`` has no listener of its own: it reports to the one this process set with
:func:`set_listener` (search.py does, before a resumed sweep runs).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ray.tune import Callback

log = logging.getLogger(__name__)

# Receives ("start" | "result" | "complete" | "error", event data) from Tune's callback below,
# and ("note", {"message": str}) for a line about the search itself (search.py).
ProgressFn = Callable[[str, dict[str, Any]], None]


_listener: ProgressFn | None = None  # for callbacks restored from a pickled run config


def set_listener(on_event: ProgressFn | None) -> None:
    global _listener
    _listener = on_event


class ProgressCallback(Callback):
    def __init__(self, on_event: ProgressFn | None) -> None:
        self.on_event = on_event

    def __getstate__(self) -> dict[str, Any]:
        return {"on_event": None}

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
        self._emit("start", {"trial_id": trial.trial_id, "config": dict(trial.config)})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._emit("result", {"trial_id": trial.trial_id, "result": dict(result)})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._emit("complete", {"trial_id": trial.trial_id})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._emit("error", {"trial_id": trial.trial_id, "error": str(getattr(trial, "error_file", "") or "")})
