import math

from grpo_ray.select import TrialRecord, pareto_front, pick_best

OBJ = [("reward", "max"), ("eval_accuracy", "max")]


def t(i, reward, acc, error=None):
    return TrialRecord(trial_id=f"t{i}", config={}, metrics={"reward": reward, "eval_accuracy": acc}, error=error)


def test_front_and_rule():
    trials = [t(1, 5.0, 0.2), t(2, 3.0, 0.4), t(3, 2.0, 0.1), t(4, 9.0, 0.4, error="boom"), t(5, 1.0, math.nan)]
    front = pareto_front(trials, OBJ)
    assert {x.trial_id for x in front} == {"t1", "t2"}  # t3 dominated, t4 errored, t5 incomplete
    assert pick_best(trials, OBJ).trial_id == "t2"  # highest accuracy on the front


def test_ties_break_by_reward_then_id():
    trials = [t(2, 1.0, 0.5), t(1, 1.0, 0.5), t(3, 0.5, 0.5)]
    assert pick_best(trials, OBJ).trial_id == "t1"


def test_min_mode_and_nothing_finished():
    obj = [("reward", "min")]
    assert pick_best([t(1, 5.0, 0), t(2, 3.0, 0)], obj).trial_id == "t2"
    assert pick_best([t(1, 1.0, 0.1, error="x")], OBJ) is None


def test_stopped_early_and_missing_accuracy_never_win():
    stopped = TrialRecord(trial_id="t0", config={}, metrics={"reward": 9.0, "eval_accuracy": 0.9}, stopped_early=True)
    no_acc = TrialRecord(trial_id="t9", config={}, metrics={"reward": 99.0})
    trials = [stopped, no_acc, t(1, 1.0, 0.1), t(2, 2.0, 0.0)]
    assert {x.trial_id for x in pareto_front(trials, OBJ)} == {"t1", "t2"}
    # eval_accuracy is required (and ranks first on the front) even when it is not an objective.
    assert pick_best(trials, [("reward", "max")]).trial_id == "t2"
    assert pick_best([no_acc, t(1, 1.0, 0.1)], [("reward", "max")]).trial_id == "t1"
