"""Each running trial's phase between its reports (trial/phases.py): what a real trial posts, the
poster's throttle, the CLI's live lines, and a real sweep on a local Ray cluster whose display gets
the phases of its trial from the board and whose board is gone when the sweep ends."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from rich.console import Console

from conftest import REPO
from grpo_ray.config.load import load_spec
from grpo_ray.config.overrides import apply_overrides
from grpo_ray.trial import phases, warm
from grpo_ray.trial.phases import Board, PhasePoster, phase_of


class _LocalBoard:
    """A Board in this process, called the way a Ray actor handle is (``board.post.remote``)."""

    def __init__(self) -> None:
        self.board, self.posts = Board(), []
        outer = self

        class _Post:
            @staticmethod
            def remote(trial_id, text, at, new_phase):
                outer.posts.append(text)
                outer.board.post(trial_id, text, at, new_phase)

        self.post = _Post


def _small(spec_name: str = "phases"):
    return apply_overrides(load_spec(REPO / "sweeps" / "smoke.yaml"), {
        "name": spec_name, "sft.max_steps": 3, "grpo.max_steps": 2, "grpo.report_every": 2,
        "data.eval.size": 4, "data.eval.max_new_tokens": 8, "export.enabled": False})


def test_a_real_trial_posts_its_phases_in_order(tiny_model_dir, monkeypatch):
    board = _LocalBoard()
    monkeypatch.setattr(phases, "MIN_INTERVAL_S", 0.0)  # every post, to see the whole sequence
    monkeypatch.setattr(PhasePoster, "for_this_trial", classmethod(lambda cls, sweep: cls(board, "t1")))
    from grpo_ray.trial.run import run_trial

    warm.release()
    run_trial({}, _small(), report=lambda m, d: None)
    warm.release()
    kinds = list(dict.fromkeys(phase_of(p) for p in board.posts))  # each phase once, in first-seen order
    # the smoke spec evaluates after SFT (data.eval.before_sft: false) and at each GRPO report
    assert kinds == ["loading the model", "preparing the data", "SFT", "held-out evaluation",
                     "held-out evaluation done", "GRPO"]
    assert "SFT step 3/3" in board.posts and "GRPO step 2/2" in board.posts  # steps with the trainer's total
    assert board.posts.index("SFT: starting (a cold process compiles its first step)") < board.posts.index(
        "SFT step 1/3")


def test_the_poster_sends_a_new_phase_at_once_and_steps_at_most_every_interval():
    board, now = _LocalBoard(), [100.0]
    post = PhasePoster(board, "t1", clock=lambda: now[0])
    post("SFT step 1/10")
    now[0] += 0.5
    post("SFT step 2/10")      # same phase, too soon: not sent
    post("GRPO: starting")     # a new phase: sent at once
    now[0] += phases.MIN_INTERVAL_S
    post("GRPO step 1/5")      # same phase (GRPO), the interval passed: sent
    assert board.posts == ["SFT step 1/10", "GRPO: starting", "GRPO step 1/5"]
    assert board.board.snapshot() == {"t1": ("GRPO step 1/5", 100.5)}  # the phase began with "GRPO: starting"
    PhasePoster()("anything")  # outside a sweep: nothing to post to, nothing raised


def test_the_display_shows_a_live_line_per_running_trial_until_it_ends():
    from grpo_ray.cli import _Display

    display = _Display(total=2)
    display.on_event("start", {"trial_id": "a1", "config": {"lora.rank": 8}})
    display.on_event("phase", {"trial_id": "a1", "phase": "SFT step 3/75", "since": 0.0})
    display.on_event("start", {"trial_id": "b2", "config": {"lora.rank": 4}})
    console = Console(record=True, width=120)
    console.print(*display.progress.get_renderables())
    text = console.export_text()
    assert "a1  SFT step 3/75" in text and "b2  starting" in text
    display.on_event("complete", {"trial_id": "a1"})
    console = Console(record=True, width=120)
    console.print(*display.progress.get_renderables())
    assert "a1" not in console.export_text().split("trials")[-1]  # ended: its line is gone


def test_piped_the_display_prints_a_line_when_a_trial_enters_a_new_phase():
    import io

    from grpo_ray.cli import _Display

    sink = io.StringIO()
    display = _Display(total=1, console=Console(file=sink, force_terminal=False, width=120))
    display.on_event("start", {"trial_id": "a1", "config": {}})
    for text in ("SFT: starting", "SFT step 1/75", "SFT step 2/75", "GRPO step 1/50", "GRPO step 2/50"):
        display.on_event("phase", {"trial_id": "a1", "phase": text, "since": 0.0})
    lines = [ln for ln in sink.getvalue().splitlines() if ln.startswith("a1 ")]
    assert lines == ["a1 started: ", "a1 SFT: starting", "a1 GRPO step 1/50"]  # not every step


def test_a_real_sweep_forwards_its_trials_phases_and_ends_its_board(tmp_path, tiny_model_dir):
    # The driver in its own process, as `grpo-ray sweep` runs it: a local Ray cluster, one trial.
    out = tmp_path / "events.json"
    script = textwrap.dedent(f"""
        import json, ray
        from grpo_ray.config.load import load_spec
        from grpo_ray.config.overrides import apply_overrides
        from grpo_ray.sweep.driver import run_sweep
        from grpo_ray.trial.phases import board_name

        spec = apply_overrides(load_spec({str(REPO / "sweeps" / "smoke.yaml")!r}), {{
            "name": "phases", "sft.max_steps": 3, "grpo.max_steps": 2, "grpo.report_every": 2,
            "data.eval.size": 4, "data.eval.max_new_tokens": 8, "export.enabled": False,
            "search.num_samples": 1}})
        events = []
        run_sweep(spec, {str(tmp_path / "runs")!r}, on_event=lambda kind, data: events.append([kind, data]))
        try:
            ray.get_actor(board_name("phases"))
            board_left = True
        except ValueError:
            board_left = False
        json.dump({{"events": events, "board_left": board_left}}, open({str(out)!r}, "w"), default=str)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())
    started = [d["trial_id"] for k, d in got["events"] if k == "start"]
    seen = [d for k, d in got["events"] if k == "phase"]
    assert len(started) == 1 and seen, got["events"]
    known = {"loading the model", "preparing the data", "held-out evaluation", "held-out evaluation done", "SFT",
             "GRPO"}
    assert all(d["trial_id"] == started[0] and phase_of(d["phase"]) in known for d in seen), seen
    kinds = [k for k, _ in got["events"]]
    assert kinds.index("phase") > kinds.index("start") and max(
        i for i, k in enumerate(kinds) if k == "phase") < kinds.index("complete")  # none after its end
    assert got["board_left"] is False
    # `grpo-ray status` reads the phases from the run: written while the trial ran, empty once it ended
    doc = json.loads((tmp_path / "runs" / "phases" / "phases.json").read_text())
    assert doc["trials"] == {} and doc["written_at"] > 0


def test_status_shows_what_running_trials_do_and_ignores_a_broken_phases_file(tmp_path):
    from grpo_ray.views.status import TrialStatus, read_phases, status_table

    (tmp_path / "phases.json").write_text(json.dumps(
        {"written_at": 1000.0, "trials": {"a1": {"phase": "GRPO step 12/50", "since": 900.0},
                                          "b2": {"phase": "loading the model", "since": 990.0}}}))
    phases = read_phases(str(tmp_path))
    trials = [TrialStatus("a1", "RUNNING", {}, {"step": 10}, 0), TrialStatus("b2", "INTERRUPTED", {}, {}, 0),
              TrialStatus("c3", "TERMINATED", {}, {"step": 50}, 0)]
    console = Console(record=True, width=200)
    console.print(status_table(trials, phases=phases, now=1025.0))
    text = console.export_text()
    assert "now" in text and "GRPO step 12/50 (2 min 5 s)" in text
    assert "loading the model" not in text  # not running (its driver died): what it did then is not news
    console = Console(record=True, width=200)
    console.print(status_table(trials[1:], phases=phases, now=1025.0))
    assert " now " not in console.export_text()  # no running trial: no column
    (tmp_path / "phases.json").write_text('{"written_at": 1000.0, "trials": {"a1": {"pha')  # a write in flight
    assert read_phases(str(tmp_path)) == {} and read_phases(str(tmp_path / "missing")) == {}


def test_a_retried_trial_counts_its_steps_from_where_the_first_attempt_stopped():
    # a retry trains the remaining steps in a new trainer (trial/run.py): the phase counts the trial's
    from types import SimpleNamespace

    from grpo_ray.trial.guard import TrialGuard, Watchdog

    beats: list[str] = []
    guard = TrialGuard(Watchdog(None, on_beat=beats.append), _small(), "GRPO", steps_before=10)
    guard.on_step_end(None, SimpleNamespace(global_step=3, max_steps=40), None)
    assert beats == ["GRPO step 13/50"]
