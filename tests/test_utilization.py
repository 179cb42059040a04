"""Sweep-level GPU use (utilization.py) from the timings trials report."""

import pytest

from grpo_ray.views.utilization import summary_line, utilization


def _t(start, first, end, pid, reused, gpus="0", node="n1"):
    return ({"trial_started_at": start, "first_step_at": first, "reported_at": end, "worker_pid": pid,
             "model_reused": float(reused), "gpus": gpus, "node": node}, True)


def test_one_gpu_with_a_warm_actor():
    # A cold trial (100 s of start-up), then two trials on the same actor, 2 s and 4 s to their first step.
    u = utilization([_t(0, 100, 200, 7, False), _t(201, 203, 300, 7, True), _t(301, 305, 400, 7, True)])
    assert u["devices"] == 1 and u["wall_s"] == 400 and u["finished"] == 3
    assert u["busy_fraction"] == pytest.approx((100 + 97 + 95) / 400, abs=1e-4)
    assert u["busy_fraction_after_first"] == pytest.approx((97 + 95) / 200, abs=1e-4)
    assert u["startup_s"]["cold"]["median"] == 100 and u["startup_s"]["warm"]["median"] == 3
    assert u["handoff_s"] == {"n": 2, "mean": 4.0, "median": 4.0, "max": 5.0}
    assert u["trials_per_device_hour"] == pytest.approx(3 / (400 / 3600), rel=1e-3)
    assert u["trials_per_device_hour_after_first"] == pytest.approx(2 / (200 / 3600), rel=1e-3)
    assert "busy 73%" in summary_line(u)


def test_packed_trials_overlap_on_one_gpu_and_gpus_are_apart():
    # Two trials share GPU 0 at the same time; a third runs alone on GPU 1.
    u = utilization([_t(0, 10, 110, 1, False), _t(0, 20, 120, 2, False), _t(0, 60, 120, 3, False, gpus="1")])
    assert u["devices"] == 2
    assert u["busy_fraction"] == pytest.approx((110 + 60) / (120 * 2), abs=1e-4)  # GPU 0 is busy 10..120, not 200 s
    assert u["handoff_s"] is None  # nobody took over from anybody


def test_packed_steady_rate_counts_the_share_of_a_trial_after_the_first():
    # Two actors on GPU 0; actor 2's first trial ends 50 s after actor 1's (at 100): half of it
    # (50 of its 100 s) falls after the first trial, then one more trial per actor.
    u = utilization([_t(0, 10, 100, 1, False), _t(50, 60, 150, 2, False),
                     _t(100, 102, 200, 1, True), _t(150, 152, 250, 2, True)])
    assert u["trials_per_device_hour_after_first"] == pytest.approx((0.5 + 1 + 1) / (150 / 3600), rel=1e-3)


def test_a_fresh_process_hands_over_from_the_trial_before_it_on_its_gpu():
    u = utilization([_t(0, 90, 190, 1, False), _t(195, 280, 380, 2, False)])
    assert u["handoff_s"]["max"] == 90 and u["startup_s"]["warm"] is None


def test_cpu_trials_share_their_node():
    # No GPU ids: two fresh processes one after the other on one node are one device, 5 s apart.
    u = utilization([_t(0, 1, 10, 1, False, gpus=""), _t(12, 15, 20, 2, False, gpus="")])
    assert u["devices"] == 1 and u["handoff_s"]["max"] == 5 and u["busy_fraction"] == pytest.approx(0.7, abs=1e-4)


def test_no_report_yet():
    assert utilization([({"step": 1}, False)]) is None
    assert "no trial has reported" in summary_line(None)


def test_compile_time_cold_and_warm_apart():
    # The cold trial compiled for 80 s; one warm trial reused every graph, the next recompiled for 12 s.
    cold, warm1, warm2 = _t(0, 100, 200, 7, False), _t(201, 203, 300, 7, True), _t(301, 305, 400, 7, True)
    for (m, _), c in zip((cold, warm1, warm2), (80.0, 0.0, 12.0)):
        m["compile_s"] = c
    u = utilization([cold, warm1, warm2, _t(0, 50, 90, 8, False, gpus="1")])  # one from before the metric
    assert u["compile_s"]["cold"] == {"n": 1, "mean": 80.0, "median": 80.0, "max": 80.0}
    assert u["compile_s"]["warm"] == {"n": 2, "mean": 6.0, "median": 6.0, "max": 12.0}


def test_engine_start_queue_of_packed_cold_trials():
    # Three trials packed on GPU 0 start together; the engine starts queue: 0, 130 and 260 s of
    # waiting. A warm trial waits for nothing, a trial from before the metric is left out.
    ts = [_t(0, 150, 400, 1, False), _t(0, 280, 500, 2, False), _t(0, 410, 600, 3, False),
          _t(401, 405, 700, 1, True), _t(0, 100, 300, 4, False, gpus="1")]
    for (m, _), w in zip(ts, (0.0, 130.0, 260.0, 0.0)):
        m["engine_wait_s"] = w
    u = utilization(ts)
    assert u["engine_wait_s"] == {"n": 3, "mean": 130.0, "median": 130.0, "max": 260.0}
    assert "queued for an engine start up to 260 s" in summary_line(u)
    for m, _ in ts:  # one at a time per GPU: nothing queued, nothing said
        m["engine_wait_s"] = 0.0
    assert "queued" not in summary_line(utilization(ts))


def test_warm_trials_compile_share():
    # Two warm trials of 100 s each: one compiled for 60 s (a guard failed), one for nothing.
    ts = [_t(0, 100, 200, 7, False), _t(200, 201, 300, 7, True), _t(300, 301, 400, 7, True)]
    for (m, _), c in zip(ts, (80.0, 60.0, 0.0)):
        m["compile_s"] = c
    assert utilization(ts)["warm_compile_share"] == 0.3
    assert "warm 1.0 s (x2, compiling 30% of their time)" in summary_line(utilization(ts))
    ts[1][0]["compile_s"] = 2.0
    assert "compiling" not in summary_line(utilization(ts))  # 1%: graphs reused, nothing to say
    assert utilization(ts[:1])["warm_compile_share"] is None  # no warm trial: nothing to say


def test_status_says_when_warm_trials_recompile_and_what_to_set():
    from grpo_ray.views.status import TrialStatus, advice, status_table

    def statuses(compiles, ranks):
        ts = [_t(0, 100, 200, 7, False), _t(200, 201, 300, 7, True), _t(300, 301, 400, 7, True)]
        for (m, _), c in zip(ts, compiles):
            m["compile_s"] = c
        return [TrialStatus(f"t{i}", "TERMINATED", {"lora.rank": r}, m, 0) for i, ((m, _), r) in enumerate(zip(ts, ranks))]

    # 55e4f1e's warm 1.7B trials: 57 and 42 s of compiling in about 100 s each, rank fixed
    [line] = advice(statuses((74.0, 57.0, 42.0), (32, 32, 32)))
    assert line.startswith("warm trials compiled 50 s each on average (50% of their time)"), line
    assert "TORCH_LOGS=recompiles" in line and "lora.pad_rank" not in line
    assert line in str(status_table(statuses((74.0, 57.0, 42.0), (32, 32, 32))).caption)
    # the search samples the rank: padding is the first thing to set
    assert "set lora.pad_rank: true" in advice(statuses((74.0, 57.0, 42.0), (16, 8, 16)))[0]
    assert advice(statuses((74.0, 0.0, 3.0), (32, 32, 32))) == []  # warm trials that reuse their graphs


def test_recompile_advice_names_a_searched_group_size_and_leaves_padded_ranks_alone():
    from grpo_ray.views.status import TrialStatus, advice

    # 8d5b03e's warm gemma trials at eight per GPU, padded: the rank changed without a recompile,
    # a new grpo.num_generations cost 41-57 s (here 50 s of two 100 s warm trials)
    ts = [_t(0, 100, 200, 7, False), _t(200, 201, 300, 7, True), _t(300, 301, 400, 7, True)]
    for (m, _), c, groups in zip(ts, (80.0, 50.0, 50.0), (4, 6, 8)):
        m |= {"compile_s": c, "effective/lora.pad_rank": True, "effective/grpo.num_generations": groups}
    trials = [TrialStatus(f"t{i}", "TERMINATED", {"lora.rank": r}, m, 0) for i, ((m, _), r) in enumerate(zip(ts, (8, 16, 32)))]
    [line] = advice(trials)
    assert "grpo.num_generations" in line and "lora.pad_rank" not in line, line
    # the same trials unpadded: padding is named too; one group size: only the padding
    for m, _ in ts:
        m["effective/lora.pad_rank"] = False
    assert "set lora.pad_rank: true" in advice(trials)[0] and "grpo.num_generations" in advice(trials)[0]
    for m, _ in ts:
        m["effective/grpo.num_generations"] = 8
    assert "grpo.num_generations" not in advice(trials)[0]


def test_status_doctests():
    import doctest

    from grpo_ray.views import status

    assert doctest.testmod(status).failed == 0
