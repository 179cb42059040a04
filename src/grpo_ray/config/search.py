"""The spec's search section: the search-space domains (``choice``, ``uniform``, ``loguniform``,
``int``), the objectives, early stopping (ASHA) and the sampler's settings.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import ConfigDict, Field, field_validator

from grpo_ray.config.sections import Strict


# --------------------------------------------------------------------------- search
class Choice(Strict):
    """``{choice: [8, 16, 32]}``: one of the listed values (any YAML values)."""

    choice: list[Any] = Field(min_length=1, description="The values a trial can get; every one is validated at "
                              "the path when the spec loads.")


class Uniform(Strict):
    """``{uniform: [0.7, 1.2]}``: a float drawn evenly between low and high."""

    uniform: tuple[float, float] = Field(description="[low, high], low < high; both ends are validated at the path.")


class LogUniform(Strict):
    """``{loguniform: [1.0e-6, 2.0e-5]}``: a float drawn evenly on a log scale (learning rates)."""

    loguniform: tuple[float, float] = Field(description="[low, high], 0 < low < high; both ends are validated at "
                                            "the path.")


class IntRange(Strict):
    """``{int: [50, 200]}``: an integer between low and high, both included."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # The YAML key is `int`; the attribute can't be, or it would shadow the type in this class.
    int_: tuple[int, int] = Field(alias="int", description="Inclusive integer range [low, high].")


Domain = Union[Choice, Uniform, LogUniform, IntRange]


class Objective(Strict):
    """One objective of the search: a metric each trial reports and its direction."""

    metric: Literal["reward", "eval_accuracy", "format_rate", "reward_weighted", "eval_format_rate"] = Field(
        description="reward: the sum of each reward's mean weighted by the spec's own weights (comparable across "
        "trials); eval_accuracy: held-out exact-answer share; format_rate: share of GRPO completions in the exact "
        "format; reward_weighted: the total with the trial's sampled weights; eval_format_rate: the format share on "
        "the held-out set.")
    mode: Literal["max", "min"] = Field("max", description="max: higher is better; min: lower is better.")


# Metrics every trial reports at each window (trial/run.py) that early stopping can judge by.
ReportedMetric = Literal["reward", "eval_accuracy", "format_rate", "reward_weighted", "eval_format_rate",
                         "completion_length", "zero_std_groups", "truncated_rate", "clip_ratio", "kl", "entropy"]


class EarlyStopping(Strict):
    """ASHA (Ray Tune's ASHAScheduler): at each rung, a trial below the top 1/reduction_factor stops.

    Time is the GRPO step a trial reports (``step``): rungs sit at grace_period x
    reduction_factor^k steps and are judged at the first report at or after them.
    """

    type: Literal["asha"] = Field("asha", description="The scheduler; only asha (asynchronous successive halving).")
    metric: ReportedMetric = Field("reward", description="The reported metric the rungs compare.")
    mode: Literal["max", "min"] = Field("max", description="max: a higher metric survives; min: a lower one.")
    grace_period: int | None = Field(
        None, gt=0, description="GRPO steps every trial runs before it can be stopped; default: grpo.report_every."
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="Keep the top 1/reduction_factor at each rung. Higher: more trials stopped sooner, "
        "more risk of stopping a slow starter.")
    max_t: int | None = Field(
        None, gt=0, description="Steps that bound the rungs; default (and minimum): the largest grpo.max_steps a "
        "trial can run."
    )


# The samplers that model finished trials after drawing their first search.startup_trials at
# random (nsga2 learns by generations instead), and Optuna's default for that count.
LEARNING_SAMPLERS = ("tpe", "gp")
OPTUNA_STARTUP_TRIALS = 10


def informed_trials(num_samples: int, at_once: int, startup: int) -> int:
    """How many of a sweep's trials a learning sampler can draw from finished results: trial k
    starts when k - at_once trials have finished, and the sampler models them from ``startup``
    finished trials on.

    >>> informed_trials(40, 8, 10)    # sweeps/rewards.yaml on 8 GPUs, one trial per GPU
    23
    >>> informed_trials(40, 64, 10)   # eight per GPU on 8 GPUs: every trial starts before one finishes
    0
    """
    return max(0, num_samples - (at_once + startup) + 1)


def concurrency_costs_learning(num_samples: int, informed: int, startup: int) -> bool:
    """Whether fewer than half of ``num_samples`` trials were (or will be) drawn from finished
    results where one trial at a time would have drawn at least half: the trials at once, not
    the sweep's length, keep the sampler from learning (a sweep of startup_trials or fewer is a
    random search at any concurrency: startup_trials' help).

    >>> concurrency_costs_learning(40, 0, 10), concurrency_costs_learning(40, 23, 10)
    (True, False)
    >>> concurrency_costs_learning(3, 0, 10)  # the smoke sweep: too short to learn one at a time
    False
    """
    return 2 * informed < num_samples <= 2 * informed_trials(num_samples, 1, startup)


class SearchSpec(Strict):
    """The search (Ray Tune + Optuna).

    Parameters of the sampler: ``sampler``, ``seed``, ``startup_trials``, ``study_storage``,
    ``warm_start``. What is searched and judged: ``space``, ``objectives``, ``baseline_first``.
    How many trials and how they run: ``num_samples``, ``max_concurrent_trials``, ``max_failures``,
    ``early_stopping``.
    """

    sampler: Literal["tpe", "nsga2", "random", "gp", "grid"] = Field(
        "tpe", description="Optuna's sampler. tpe: models the results (multivariate TPE); nsga2: evolutionary, for "
        "several objectives; random; gp: Gaussian process; grid: every combination of the space's choices once "
        "(every domain a choice or an int range; num_samples at most the number of combinations), e.g. one "
        "configuration on several seeds: space: {grpo.seed: {choice: [1, 2, 3]}}.")
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="reward"), Objective(metric="eval_accuracy")], min_length=1,
        description="What the search optimises: one objective, or several (then the best trials form a Pareto "
        "front). Default: the mean reward and the held-out accuracy, both maximised."
    )
    num_samples: int = Field(
        40, gt=0, description="Trials in the sweep (baseline included). Higher: a better search, proportionally "
        "more GPU time.")
    max_concurrent_trials: Union[int, Literal["auto"]] = Field(
        "auto", description="Trials running at once. auto: as many as the cluster holds at resources.gpu per trial "
        "(GPUs now, or what the autoscaler may start), or at resources.cpu on a machine without GPUs; at most "
        "num_samples (sweep/packing.py). Higher: more trials per hour; lower: a tpe or gp sampler draws more "
        "trials from finished results (trial k starts when k - this many have finished, and the first "
        "startup_trials are random); the sweep says when fewer than half of them are."
    )
    seed: int = Field(3407, description="The sampler's seed: the same spec proposes the same trials.")
    startup_trials: int | None = Field(
        None, ge=1, description="Trials the tpe and gp samplers draw at random before they model the results; "
        "null: Optuna's default, 10, which makes a sweep of 10 trials or fewer a random search "
        "(bench/results/search_compare_cpu.json)."
    )
    space: dict[str, Domain] = Field(
        default_factory=dict, description="Dotted spec path (lora.rank, grpo.temperature, "
        "rewards.<name>.weight) -> domain (choice, uniform, loguniform, int); empty: every trial runs the spec.")
    study_storage: str | None = Field(
        None, description="Where the Optuna study lives: an RDB URL (sqlite:///..., postgresql://...) shared "
        "between sweeps, or null: a journal file in the run directory when storage is local, else in memory "
        "(Tune still saves the searcher with the run, so --resume works either way)."
    )
    max_failures: int = Field(1, ge=0, description="Retries of a trial that raised, before it counts as failed.")
    baseline_first: bool = Field(
        True, description="Run the spec's own values (the baseline) as the first trial, when inside the space."
    )
    early_stopping: EarlyStopping | None = Field(None, description="Stop poor trials early (ASHA); off by default.")
    warm_start: list[str] = Field(
        default_factory=list, description="Previous runs (<storage>/<name>: a directory or URI) whose trials.json "
        "the Optuna study starts with: each finished trial inside this space that reported every objective is "
        "added as COMPLETE, so the sampler exploits it instead of exploring again. Checked before any trial starts."
    )

    @field_validator("max_concurrent_trials", mode="before")
    @classmethod
    def _concurrency(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError("expected a whole number > 0 or 'auto' (as many as the cluster holds)")

    @field_validator("warm_start")
    @classmethod
    def _distinct_runs(cls, v: list[str]) -> list[str]:
        # A run listed twice would add its trials twice and weigh them double in the sampler.
        if any(not r.strip() for r in v):
            raise ValueError("expected run directories or URIs (<storage>/<name>), got an empty entry")
        dupes = sorted({r for r in v if v.count(r) > 1})
        if dupes:
            raise ValueError(f"run listed twice: {', '.join(dupes)}")
        return v

    @field_validator("space", mode="before")
    @classmethod
    def _one_domain_key(cls, v: Any) -> Any:
        kinds = ("choice", "uniform", "loguniform", "int")
        for path, dom in (v or {}).items():
            if not (isinstance(dom, dict) and len(dom) == 1 and next(iter(dom)) in kinds):
                raise ValueError(
                    f"{path}: expected one of {{choice: [..]}}, {{uniform: [low, high]}}, "
                    f"{{loguniform: [low, high]}}, {{int: [low, high]}}; got {dom!r}"
                )
        return v

    def learning_startup(self) -> int | None:
        """How many trials the sampler draws at random before it models finished ones; None for a
        sampler that does not learn that way (LEARNING_SAMPLERS) or an empty space (nothing to learn).

        >>> SearchSpec(space={"grpo.learning_rate": {"loguniform": [1e-6, 1e-5]}}).learning_startup()
        10
        >>> SearchSpec(sampler="random", space={"grpo.learning_rate": {"loguniform": [1e-6, 1e-5]}}).learning_startup()
        """
        if self.sampler not in LEARNING_SAMPLERS or not self.space:
            return None
        return self.startup_trials or OPTUNA_STARTUP_TRIALS


def domain_values(d: Domain) -> list[Any]:
    """The values of a domain that bound what a trial can get: all choices, or both ends."""
    if isinstance(d, Choice):
        return list(d.choice)
    lo, hi = next(iter(d.model_dump().values()))
    return [lo, hi]


def check_domain(d: Domain) -> None:
    if isinstance(d, (Uniform, LogUniform, IntRange)):
        lo, hi = next(iter(d.model_dump().values()))
        if not lo < hi:
            raise ValueError(f"expected low < high, got [{lo}, {hi}]")
        if isinstance(d, LogUniform) and lo <= 0:
            raise ValueError(f"loguniform needs low > 0, got {lo}")


def in_domain(value: Any, d: Domain) -> bool:
    if isinstance(d, Choice):
        return value in d.choice
    lo, hi = next(iter(d.model_dump().values()))
    return isinstance(value, (int, float)) and lo <= value <= hi


