"""bench/warm_summary.py's split of packed GRPO steps by what else ran on the card (alone, beside
neighbours that step too, beside a neighbour still starting), on made-up trials with known
answers, and on the windows bench/dump_run.py reads from a real sweep's result.json files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from dump_run import snapshot  # noqa: E402
from warm_summary import steps_by_company, timeline, windows  # noqa: E402


def _trial(tid, gpus, started, rows):
    return {"trial_id": tid, "gpus": gpus, "trial_started_at": started,
            "windows": [dict(zip(("step", "reported_at", "eval_seconds", "grpo_step_s"), r)) for r in rows]}


def test_windows_time_the_steps_between_reports_less_the_evaluations():
    a = _trial("a", "0", 0.0, [(5, 100.0, 2.0, 4.0), (10, 125.0, 7.0, 4.0), (15, 160.0, 7.0, 5.0)])
    # the first window: the trial's mean step back from its first report; then report to report,
    # less the held-out evaluation run in between (5 s in the second window), over 5 steps
    assert windows(a) == [(80.0, 100.0, 4.0), (100.0, 125.0, 4.0), (125.0, 160.0, 7.0)]
    assert windows({"trial_id": "x"}) == []


def test_each_window_is_sorted_by_its_cards_company():
    trials = [
        _trial("a", "0", 0.0, [(5, 100.0, 2.0, 4.0), (10, 125.0, 7.0, 4.0), (15, 160.0, 7.0, 5.0)]),
        _trial("b", "0", 110.0, [(5, 190.0, 0.0, 3.0), (10, 205.0, 0.0, 3.0)]),  # GRPO from 175
        _trial("d", "0", 0.0, [(5, 200.0, 0.0, 4.0)]),                           # GRPO from 180
        _trial("c", "1", 0.0, [(5, 50.0, 0.0, 2.0)]),                            # another card
    ]
    got = steps_by_company(trials)
    # a's three windows all overlap d's start-up (0 to 180), two also b's; b's first overlaps d's;
    # b's second (190-205) and d's only window (180-200) see the other one stepping; c is alone.
    assert {k: v["windows"] for k, v in got.items()} == {"alone": 1, "beside_stepping": 2, "beside_a_start": 4}
    assert got["alone"]["step_s_mean"] == 2.0
    assert got["beside_stepping"]["step_s_mean"] == pytest.approx(3.5)
    assert got["beside_a_start"]["step_s_mean"] == pytest.approx((4 + 4 + 7 + 3) / 4)


def test_a_real_sweeps_windows_are_read_and_timed(asha_run):
    run_dir, _ = asha_run
    trials = snapshot(str(run_dir))["trials"]
    done = [t for t in trials if t["status"] == "TERMINATED"]
    assert done
    for t in done:
        steps = [w["step"] for w in t["windows"]]
        assert steps and steps == sorted(steps), t["windows"]
        timed = windows(t)
        assert len(timed) == len(steps) and all(b > a and per > 0 for a, b, per in timed), timed
    assert max(len(t["windows"]) for t in done) >= 2  # a trial ASHA let run reported several windows
    got = steps_by_company(trials)
    assert sum(v["windows"] for v in got.values()) == sum(len(windows(t)) for t in trials)


def test_timeline_orders_trials_by_first_step_from_the_first_start():
    cold = {"trial_id": "cold", "trial_started_at": 100.0, "first_step_at": 210.0, "sft_seconds": 40.0,
            "reported_at": 400.0, "model_reused": 0.0}
    early = {"trial_id": "early", "trial_started_at": 101.0, "first_step_at": 195.0, "sft_seconds": 55.5,
             "reported_at": 380.0, "model_reused": 0.0}
    warm = {"trial_id": "warm", "trial_started_at": 380.0, "first_step_at": 384.0, "sft_seconds": None,
            "reported_at": 450.0, "model_reused": 1.0}
    rows = timeline([cold, warm, early])
    assert [r["trial_id"] for r in rows] == ["early", "cold", "warm"]
    assert rows[0] == {"trial_id": "early", "reused": False, "first_step": 95.0, "sft_end": 150.5, "end": 280.0}
    assert rows[1]["sft_end"] == 150.0  # started SFT 15 s later, ended it with the other
    assert rows[2]["reused"] and rows[2]["sft_end"] is None  # no SFT reported: none
    assert timeline([]) == []


def test_the_warm_wave_rate_counts_only_warm_trials_and_their_hand_overs():
    from warm_summary import warm_wave

    cold = {"trial_id": "c", "model_reused": 0.0, "elapsed_s": 500.0, "startup_s": 200.0}
    warm = [{"trial_id": "a", "model_reused": 1.0, "elapsed_s": 146.0, "startup_s": 4.0},
            {"trial_id": "b", "model_reused": 1.0, "elapsed_s": 196.0, "startup_s": 4.0}]
    # eight at once, each 175 s with its hand-over: 8 x 3600 / 175
    assert warm_wave([cold, *warm], 8) == {"n": 2, "slots": 8, "trial_s_mean": 175.0, "trial_s_sd": 35.4,
                                           "trials_per_device_hour": 164.6}
    assert warm_wave([cold], 8) is None  # one cold wave: nothing to estimate from
    assert warm_wave(warm, None) is None  # an older result without trials_per_device_max, no --slots
