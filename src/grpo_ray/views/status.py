"""What a sweep looks like right now, read from its storage (local or URI) without Ray.

Tune snapshots the experiment every few seconds (``experiment_state-*.json``); each trial's
status, config and last reported metrics come from the newest snapshot, so ``grpo-ray status``
works while the sweep runs, after it finished, and after its driver died. A trial the newest
snapshot left unfinished (running, pending, paused) while no live driver holds the run
(run_lock.py) shows as INTERRUPTED: nothing runs it until ``grpo-ray sweep SPEC --resume``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from grpo_ray import storage
from grpo_ray.config.search import SearchSpec, concurrency_costs_learning
from grpo_ray.config.sections import MAX_TRIALS_PER_GPU, share_of
from grpo_ray.run_dir import ERROR_FILE, FAULT_FILE, is_snapshot

UNFINISHED = ("RUNNING", "PENDING", "PAUSED")  # states a trial leaves only while a driver runs the sweep
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


@dataclass(frozen=True)
class TrialStatus:
    trial_id: str
    status: str  # PENDING, RUNNING, TERMINATED, ERROR, PAUSED; INTERRUPTED: unfinished and no driver runs it
    config: dict[str, Any]
    last: dict[str, Any]
    failures: int
    logdir: str | None = None  # the trial's directory, relative to the run directory
    cause: str | None = None  # why it failed, one line (see trial_cause)

    @property
    def stopped_early(self) -> bool:
        return bool(self.last.get("stopped_early"))


def read_status(run_dir: str) -> list[TrialStatus]:
    """Every trial of the sweep at ``run_dir`` (``<storage>/<name>``), from Tune's newest snapshot."""
    snapshots = [n for n in storage.list_dir(run_dir) if is_snapshot(n)]
    if not snapshots:
        raise FileNotFoundError(f"{run_dir}: no sweep here yet (no experiment_state-*.json)")
    # Names carry the start time; after --resume a newer file holds every trial.
    state = read_snapshot(storage.join(run_dir, sorted(snapshots)[-1]))
    from grpo_ray.run_lock import driver_alive

    orphaned = not driver_alive(run_dir)  # Tune's snapshot still says RUNNING after its driver died
    out = []
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        runtime = json.loads(entry[1]) if len(entry) > 1 else {}
        last = runtime.get("last_result") or {}
        status = trial["status"]
        out.append(TrialStatus(
            trial_id=trial["trial_id"],
            status="INTERRUPTED" if orphaned and status in UNFINISHED else status,
            config=trial.get("config") or {},
            last={k: v for k, v in last.items() if not isinstance(v, dict)},
            failures=int(runtime.get("num_failures") or 0),
            logdir=trial.get("relative_logdir"),
            cause=trial_cause(run_dir, trial.get("relative_logdir")) if trial["status"] == "ERROR" else None,
        ))
    return out


# Tune writes its snapshot whole in the driver's staging directory, then copies it over the one
# in storage (pyarrow's copy_files, not a rename), so a reader can catch it half-written (a
# benchmark's progress listener did on an H200 at 8d5b03e, eight trials reporting at once).
SNAPSHOT_READS = 5
SNAPSHOT_RETRY_S = 0.2  # the copy of a ~250 KB snapshot takes milliseconds


def read_snapshot(path: str) -> dict[str, Any]:
    """Tune's experiment snapshot at ``path``, read again while it is being rewritten.

    Raises ValueError naming the file when it stays incomplete JSON (damaged, not in flux)."""
    for attempt in range(1, SNAPSHOT_READS):
        try:
            return json.loads(storage.read_text(path))
        except json.JSONDecodeError:
            time.sleep(SNAPSHOT_RETRY_S * attempt)  # 2 s in all
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a whole JSON snapshot in {SNAPSHOT_READS} reads ({e}): Tune rewrites it "
                         "every few seconds while the sweep runs; if none runs, the file is damaged") from None


def trial_cause(run_dir: str, logdir: str | None) -> str | None:
    """One line on why a trial failed: the cause the trial recorded itself (``fault.txt``: a
    hang that ended its process), else the last line of Tune's ``error.txt`` (the exception)."""
    if not logdir:
        return None
    base = storage.join(run_dir, logdir)
    for name in (FAULT_FILE, ERROR_FILE):
        try:
            text = storage.read_text(storage.join(base, name))
        except OSError:  # FileNotFoundError, or the object store's "not found"
            continue
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return last_line(text) if name == ERROR_FILE else clean_line(lines[0])
    return None


def trial_log(run_dir: str, logdir: str | None) -> str | None:
    """Where a failed trial's whole story is: Tune's error.txt (every attempt's traceback), else the
    fault.txt of a trial that had to end its own process."""
    if not logdir:
        return None
    for name in (ERROR_FILE, FAULT_FILE):
        path = storage.join(run_dir, logdir, name)
        if storage.exists(path):
            return path
    return None


def clean_line(text: str) -> str:
    """One line for people: no ANSI colour codes, and a location prefix said once.

    A SpecError crossing Ray's pickling is rebuilt from its message, which already starts with
    its ``<file>: `` prefix, so the prefix comes back doubled ("SpecError: <spec>: <spec>: ...").
    """
    text = _ANSI.sub("", text).strip()
    return re.sub(r"(?P<p>(?:<spec>|[^\s:]+\.ya?ml(?::\d+)?): )(?P=p)+", r"\g<p>", text)


def last_line(error: str) -> str:
    """The exception a trial raised: Ray's error text (error.txt, a result's error) ends with it."""
    error = _ANSI.sub("", error)
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return clean_line(lines[-1]) if lines else error


# When the group diagnostics say a sweep's GRPO is wasting its steps, and what to change. The
# thresholds are where most of the signal is gone: in the quality benchmark (bench/README.md)
# 20-55% of groups gave no gradient at 4 completions per prompt, and GRPO's own gain stayed
# within the seeds' spread.
NO_GRAD_WARN = 0.5
CUT_WARN = 0.3
FORMAT_WARN = 0.5
# Under this GPU utilization during steps (%) a card running one trial has room for a second: one
# gemma-3-270m trial kept an H200 4-9% busy and two per GPU ran 2.7x the trials per GPU-hour of
# one (bench/README.md, "Warm trial actors"); one Qwen3-1.7B-shape trial kept it 57-66% busy and
# two did 1.26-1.36x the work of one, at 91% (packed_qwen3_h200_85f0640.json). Two fit where the
# card holds the engine's share once (two half-shares) and the training memory twice.
PACK_UTIL_WARN_ALONE = 70.0
# ... and a card already shared: four gemma-3-270m trials at about 20% busy finished short trials
# no faster than two (docs/performance.md, "Four and eight per GPU"), so only a card far idler.
PACK_UTIL_WARN = 30.0
PACK_MEMORY_SHARE = 0.9  # of the card: room for fragmentation and the CUDA contexts


def packing_advice(use: dict[str, Any] | None, gpu_memory_utilization: float | None) -> str | None:
    """Pack twice as many trials per GPU? When the card idles during steps and twice would fit.

    ``use``: views/utilization.py's numbers (``trials_per_device_max``: how many trials shared a
    card); ``gpu_memory_utilization``: the spec's ``model.gpu_memory_utilization`` (vLLM's share
    of a trial's slice of the card, so the engines of a card hold that share of it together at
    any density, and what doubles is the training memory beside them).

    >>> use = {"gpu_util_steps_mean": 8.0, "trials_per_device_max": 1, "gpu_mem_used_max_gib": 40.0,
    ...        "gpu_mem_total_gib": 140.0}
    >>> packing_advice(use, 0.25)[:47]
    'GPU busy 8% during steps with one trial per GPU'
    >>> packing_advice(use | {"gpu_mem_used_max_gib": 120.0}, 0.7) is None  # 98 + 2 x 22 GiB: no room
    True
    >>> packing_advice(use | {"gpu_util_steps_mean": 60.0}, 0.25)[:48]  # a 1.7B trial alone: two do 1.3x
    'GPU busy 60% during steps with one trial per GPU'
    >>> packing_advice(use | {"gpu_util_steps_mean": 60.0, "trials_per_device_max": 2}, 0.25) is None
    True
    >>> packing_advice(use | {"trials_per_device_max": 4}, 0.25)[:65]
    'GPU busy 8% during steps with 4 trials per GPU, and 8 would fit ('
    >>> "resources.gpu: 0.1666;" in packing_advice(use | {"trials_per_device_max": 3}, 0.25)  # six fit one card
    True
    >>> packing_advice(use | {"trials_per_device_max": 8}, 0.25) is None  # the most the spec allows
    True
    """
    if not use or gpu_memory_utilization is None:
        return None
    k = int(use.get("trials_per_device_max", 1) or 1)
    util, used, total = use.get("gpu_util_steps_mean"), use.get("gpu_mem_used_max_gib"), use.get("gpu_mem_total_gib")
    if util is None or used is None or not total or 2 * k > MAX_TRIALS_PER_GPU:
        return None
    if util >= (PACK_UTIL_WARN_ALONE if k == 1 else PACK_UTIL_WARN):
        return None
    engines = gpu_memory_utilization * total  # the card's engines together, at any density
    packed = engines + 2 * max(used - engines, 0.0)
    if packed > PACK_MEMORY_SHARE * total:
        return None
    now = "one trial" if k == 1 else f"{k} trials"
    how = ("resources.gpu: 0.5, with 2 x resources.cpu cores per GPU); two gemma-3-270m trials per H200 ran 2.7x "
           "the trials per GPU-hour of one, two of the Qwen3-1.7B shape 1.3x the work at 91% busy" if k == 1 else
           f"resources.max_trials_per_gpu: {2 * k} with resources.gpu: auto, or resources.gpu: {share_of(2 * k):g}; "
           f"{2 * k} x resources.cpu cores per GPU); eight gemma-3-270m trials per H200 finished 136 trials per "
           "GPU-hour after the first, two 49.7 (docs/performance.md), but more trials at once give the search "
           "fewer finished trials to learn from")
    return (f"GPU busy {util:.0f}% during steps with {now} per GPU, and {2 * k} would fit ({packed:.0f} of "
            f"{total:.0f} GiB): pack {2 * k} per GPU ({how}")


# Over this part of warm trials' time in torch.compile, say what recompiles: a warm trial should
# compile nothing; each warm 1.7B-shape trial at 55e4f1e compiled 42-67 s of its 81-116 s (the
# sampled temperature, since fixed in trial/unsloth_patches.py), and rank changes 17-78 s of 79-153 s.
RECOMPILE_WARN = 0.2
RECOMPILE_MIN_S = 10.0  # ... and at least this many seconds per warm trial, so short trials' few seconds stay quiet


def recompile_advice(use: dict[str, Any] | None, rank_searched: bool = False, rank_padded: bool = False,
                     groups_searched: bool = False) -> str | None:
    """Warm trials that compile much of their time: what to set, or how to find the guard that fails.

    ``rank_searched``: the trials differ in lora.rank, ``rank_padded``: their adapters were padded
    to one width (effective lora.pad_rank), ``groups_searched``: they differ in grpo.num_generations.

    >>> use = {"compile_s": {"warm": {"n": 2, "mean": 50.0, "median": 50.0, "max": 57.0}}, "warm_compile_share": 0.55}
    >>> recompile_advice(use)[:60]
    'warm trials compiled 50 s each on average (55% of their time'
    >>> "lora.pad_rank: true" in recompile_advice(use, rank_searched=True)
    True
    >>> "lora.pad_rank" in recompile_advice(use, rank_searched=True, rank_padded=True)
    False
    >>> recompile_advice(use | {"warm_compile_share": 0.05}) is None
    True
    """
    if not use or not (warm := (use.get("compile_s") or {}).get("warm")):
        return None
    share = use.get("warm_compile_share")
    if share is None or share < RECOMPILE_WARN or warm["mean"] < RECOMPILE_MIN_S:
        return None
    causes = []
    if rank_searched and not rank_padded:
        causes.append("the search samples lora.rank, and a new rank is a new shape: set lora.pad_rank: true")
    if groups_searched:  # at 8d5b03e a warm gemma trial with a new group size compiled 41-57 s of 171-184 s
        causes.append("the search samples grpo.num_generations, and a new group size can be a new shape for "
                      "Unsloth's GRPO graphs (grpo-ray gives its log-prob function one chunk count for all, "
                      "trial/unsloth_patches.py; sequences of 20k tokens or more defeat that): search "
                      "fewer sizes")
    return (f"warm trials compiled {warm['mean']:.0f} s each on average ({share:.0%} of their time), though a "
            f"warm trial reuses its actor's compiled graphs: something a graph was specialized on changes between "
            f"trials. {''.join(c + '; ' for c in causes)}to see which guard fails, run with TORCH_LOGS=recompiles "
            "GRPO_RAY_TRIAL_LOGS=1 (docs/monitoring.md)")


def search_advice(trials: list[TrialStatus], search: SearchSpec | None) -> str | None:
    """A line when the sweep's tpe or gp sampler drew fewer than half of its started trials from
    finished results because so many ran at once (the sweep said so at its start: driver.search_note);
    None otherwise, or without the run's search section.

    A trial counts as drawn from finished results when it started after the sampler's first
    ``startup_trials`` had finished (Optuna models COMPLETE and PRUNED trials, i.e. Tune's
    TERMINATED, finished or stopped early); its start and a trial's end are the first and last
    report's ``trial_started_at`` and ``reported_at``.
    """
    startup = search.learning_startup() if search else None
    if startup is None:
        return None
    ends = sorted(float(t.last["reported_at"]) for t in trials
                  if t.status == "TERMINATED" and isinstance(t.last.get("reported_at"), (int, float)))
    learned_from = ends[startup - 1] if len(ends) >= startup else float("inf")
    starts = [float(t.last["trial_started_at"]) for t in trials
              if isinstance(t.last.get("trial_started_at"), (int, float))]
    informed = sum(1 for t0 in starts if t0 >= learned_from)
    if not concurrency_costs_learning(len(starts), informed, startup):
        return None
    return (f"search: {search.sampler} drew {informed} of {len(starts)} started trials from finished results; the "
            f"others started before {startup} trials had finished, so they are random draws (search.startup_trials) "
            "or the baseline; with fewer trials at once (search.max_concurrent_trials, "
            "resources.max_trials_per_gpu) more of them learn from the rest")


def advice(trials: list[TrialStatus], gpu_memory_utilization: float | None = None,
           use: dict[str, Any] | None = None, search: SearchSpec | None = None) -> list[str]:
    """One line per problem the reporting trials share (their last windows, averaged), and the fix.

    ``gpu_memory_utilization`` (the spec's, when known) lets it also say when to pack trials;
    ``use``: the trials' utilization when the caller already has it; ``search`` (the run's, when
    known): whether so many trials ran at once that the sampler could not learn (search_advice).

    >>> advice([TrialStatus("a", "RUNNING", {}, {"step": 10, "zero_std_groups": 0.7}, 0)])[0][:22]
    'no-grad 70% on average'
    """
    from grpo_ray.views.utilization import utilization

    last = [t.last for t in trials if t.last.get("step")]

    def mean(key: str) -> float | None:
        vals = [float(m[key]) for m in last if isinstance(m.get(key), (int, float)) and m[key] == m[key]]
        return sum(vals) / len(vals) if vals else None

    out = []
    if (v := mean("zero_std_groups")) is not None and v >= NO_GRAD_WARN:
        out.append(f"no-grad {v:.0%} on average: in most GRPO groups every completion scored the same, which "
                   "gives no gradient; raise grpo.num_generations (more completions per prompt) or make the "
                   "rewards finer")
    if (v := mean("truncated_rate")) is not None and v >= CUT_WARN:
        out.append(f"cut {v:.0%} on average: completions end at grpo.max_completion_length; raise it, or set "
                   "grpo.mask_truncated_completions: true so cut completions do not count")
    if (v := mean("format_rate")) is not None and v < FORMAT_WARN:
        out.append(f"format {v:.0%} on average: the model rarely writes the answer format, so the answer rewards "
                   "see little; lengthen the SFT warm-up (sft.max_steps) or raise sft.learning_rate")
    if use is None:
        use = utilization((t.last, t.status == "TERMINATED") for t in trials)
    pack = packing_advice(use, gpu_memory_utilization)
    def differ(key: str) -> bool:  # the trials ran more than one value of key
        return len({t.config.get(key, t.last.get(f"effective/{key}")) for t in trials} - {None}) > 1

    padded = any(t.last.get("effective/lora.pad_rank") is True for t in trials)
    recompile = recompile_advice(use, rank_searched=differ("lora.rank"), rank_padded=padded,
                                 groups_searched=differ("grpo.num_generations"))
    return out + [line for line in (pack, recompile, search_advice(trials, search)) if line]


def resolved_settings(run_dir: str) -> tuple[float | None, SearchSpec | None]:
    """The run's ``model.gpu_memory_utilization`` and ``search`` section from its spec.resolved.yaml,
    each None when unreadable (an older run, a partial file: the advice goes without their lines)."""
    import yaml

    from grpo_ray.run_dir import spec_resolved_path

    try:
        spec = yaml.safe_load(storage.read_text(spec_resolved_path(run_dir)))
    except Exception:
        return None, None
    share = search = None
    try:
        share = float(spec["model"]["gpu_memory_utilization"])
    except Exception:
        pass
    try:
        search = SearchSpec.model_validate(spec["search"])
    except Exception:
        pass
    return share, search


def read_phases(run_dir: str) -> dict[str, tuple[str, float]]:
    """What each running trial was doing when the driver last wrote ``phases.json`` (trial/phases.py):
    ``{trial_id: (phase, unix time it began)}``; empty when there is none or it cannot be read (a
    sweep of an older grpo-ray, a write in flight on a bucket): the table then goes without it."""
    from grpo_ray.run_dir import phases_path

    try:
        doc = json.loads(storage.read_text(phases_path(run_dir)))
        return {t: (str(p["phase"]), float(p["since"])) for t, p in doc["trials"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def duration_text(seconds: float) -> str:
    """``seconds`` as a person reads it on a progress line or in the status table.

    >>> duration_text(42.4), duration_text(125), duration_text(3725)
    ('42 s', '2 min 5 s', '1 h 2 min')
    """
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def status_table(trials: list[TrialStatus], gpu_memory_utilization: float | None = None,
                 search: SearchSpec | None = None, phases: dict[str, tuple[str, float]] | None = None,
                 now: float | None = None) -> Any:  # a rich Table
    """A rich table: one row per trial with its state, progress, objectives and hyperparameters;
    with ``phases`` (:func:`read_phases`), a "now" column: what each running trial is doing and for how long."""
    from rich.table import Table

    from grpo_ray.views.utilization import summary_line, utilization

    use = utilization((t.last, t.status == "TERMINATED") for t in trials)
    table = Table(title=f"{len(trials)} trials",
                  caption="\n".join([summary_line(use), *advice(trials, gpu_memory_utilization, use, search)]))
    causes = any(t.cause for t in trials)
    now = time.time() if now is None else now
    # Only a running trial's phase: an interrupted sweep's phases.json is what it was doing when it died.
    doing = {t.trial_id: f"{phases[t.trial_id][0]} ({duration_text(now - phases[t.trial_id][1])})"
             for t in trials if t.status == "RUNNING" and t.trial_id in (phases or {})}
    # "no-grad": the share of GRPO groups whose rewards were all equal; "cut": completions cut at
    # max_completion_length (trial/run.py GROUP_DIAGNOSTICS), over the last report window.
    for col in ["trial", "state", *(["now"] if doing else []), "step", "reward", "eval acc", "format", "no-grad",
                "cut", "hyperparameters"] + (["cause"] if causes else []):
        table.add_column(col, overflow="fold")

    def f(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))

    for t in trials:
        hp = ", ".join(f"{k}={f(v)}" for k, v in t.config.items())
        state = t.status + (f" ({t.failures} failures)" if t.failures else "")
        state += " (stopped early)" if t.stopped_early else ""
        table.add_row(t.trial_id, state, *([doing.get(t.trial_id, "")] if doing else []),
                      f(t.last.get("step")), f(t.last.get("reward")),
                      f(t.last.get("eval_accuracy")), f(t.last.get("format_rate")),
                      f(t.last.get("zero_std_groups")), f(t.last.get("truncated_rate")), hp,
                      *([t.cause or ""] if causes else []))
    return table
