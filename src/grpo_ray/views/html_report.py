"""``grpo-ray report RUN``: one self-contained HTML page about a sweep, PNG plots inlined.

Everything comes from the run's storage (a local directory or a URI), without Ray:
Tune's newest experiment snapshot (every trial's state and last result, as ``status``),
each trial's ``result.json`` (one line per report window: the curves), ``spec.resolved.yaml``
(objectives, search space, early stopping), ``trials.json`` (errors, once the sweep ended)
and ``best/best.json`` (the winner, once the export finished). A running sweep gets a report
of what is there so far.

Hyperparameter importances are Optuna's ``get_param_importances`` with the PED-ANOVA
evaluator, on a study rebuilt from the trial records: the default evaluator (fANOVA) needs
scikit-learn, which grpo-ray does not install, and PED-ANOVA rates each parameter's share in
reaching the Pareto front of all objectives at once.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from grpo_ray import storage
from grpo_ray.config.load import parse_spec
from grpo_ray.config.search import Choice, IntRange, LogUniform, SearchSpec, Uniform
from grpo_ray.config.spec import SweepSpec
from grpo_ray.run_dir import REPORT_HTML, RESULT_FILE, best_json_path, spec_resolved_path, trials_path
from grpo_ray.select import TrialRecord, pareto_front
from grpo_ray.views.status import TrialStatus, advice, last_line, read_status


@dataclass
class TrialView:
    """One trial as the report shows it."""

    trial_id: str
    state: str  # finished, stopped early, failed, running, pending, paused
    config: dict[str, Any]
    last: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    cause: str | None = None  # why it failed, or why it stopped

    def record(self) -> TrialRecord:
        return TrialRecord(trial_id=self.trial_id, config=self.config, metrics=self.last,
                           error=self.cause if self.state == "failed" else None,
                           stopped_early=self.state == "stopped early")


@dataclass
class RunData:
    run_dir: str
    search: SearchSpec
    spec: SweepSpec | None
    trials: list[TrialView]
    best: dict[str, Any] | None
    advice: list[str] = field(default_factory=list)  # views/status.py advice: what the diagnostics say to change


def _try_read(location: str) -> str | None:
    try:
        return storage.read_text(location)
    except (OSError, FileNotFoundError):
        return None


def trial_history(run_dir: str, status: TrialStatus) -> list[dict[str, Any]]:
    """The trial's reports, in order, from its result.json (a line per report; the last may be mid-write)."""
    if not status.logdir:
        return []
    text = _try_read(storage.join(run_dir, status.logdir, RESULT_FILE)) or ""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def load_run(run_dir: str) -> RunData:
    """Everything the report shows, read from ``run_dir``; FileNotFoundError when it holds no sweep."""
    statuses = read_status(run_dir)
    spec_text = _try_read(spec_resolved_path(run_dir))
    spec = parse_spec(spec_text, file=spec_resolved_path(run_dir)) if spec_text else None
    records = {t["trial_id"]: t for t in json.loads(_try_read(trials_path(run_dir)) or "[]")}
    best_text = _try_read(best_json_path(run_dir))
    es = spec.search.early_stopping if spec else None
    trials = []
    for s in statuses:
        cause = None
        if s.status == "ERROR":
            state = "failed"
            error = (records.get(s.trial_id) or {}).get("error")  # trials.json: written once the sweep ends
            cause = s.cause or (last_line(error) if error else "failed (no error text recorded)")
        elif s.status == "TERMINATED" and s.stopped_early:
            state = "stopped early"
            what = f"{es.metric} = {_fmt(s.last.get(es.metric))}" if es else "its metric"
            cause = f"ASHA stopped it at step {s.last.get('step')}: {what} was below the rung's cutoff"
        elif s.status == "TERMINATED":
            state = "finished"
        else:
            state = s.status.lower()
        trials.append(TrialView(s.trial_id, state, s.config, s.last, trial_history(run_dir, s), cause))
    return RunData(run_dir=run_dir, search=spec.search if spec else SearchSpec(), spec=spec, trials=trials,
                   best=json.loads(best_text) if best_text else None,
                   advice=advice(statuses, spec.model.gpu_memory_utilization if spec else None,
                                 search=spec.search if spec else None))


# --------------------------------------------------------------------------- plots
def _png(fig: Any) -> str:
    """The figure as a PNG data URI (and closed: pyplot keeps figures alive otherwise)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
        return None
    return float(v)


# GRPO group diagnostics drawn under the objectives' curves: a share of groups with no
# gradient near 1, or completions cut at the length limit, says why a trial did not learn.
DIAGNOSTIC_CURVES = ["zero_std_groups", "truncated_rate", "clip_ratio", "kl"]


def curves_png(run: RunData) -> str | None:
    """Reward and held-out accuracy (and the early-stopping metric, if another) per trial, by GRPO step."""
    metrics = ["reward", "eval_accuracy"]
    es = run.search.early_stopping
    if es is not None and es.metric not in metrics:
        metrics.append(es.metric)
    series = [t for t in run.trials if any(_number(r.get("reward")) is not None for r in t.history)]
    if not series:
        return None
    # A second row: what the groups said (trial/run.py GROUP_DIAGNOSTICS), where any trial reported it.
    diagnostics = [m for m in DIAGNOSTIC_CURVES if m not in metrics
                   and any(_number(r.get(m)) is not None for t in series for r in t.history)]
    cols = max(len(metrics), len(diagnostics))
    plt = _pyplot()
    rows = 2 if diagnostics else 1
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in list(axes[0][len(metrics):]) + (list(axes[1][len(diagnostics):]) if diagnostics else []):
        ax.set_visible(False)
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours before any repeats
    panels = list(zip(axes[0], metrics)) + (list(zip(axes[1], diagnostics)) if diagnostics else [])
    for ax, metric in panels:
        ax.set_prop_cycle(color=colors)
        for t in series:
            pts = [(r.get("step"), _number(r.get(metric))) for r in t.history]
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            if not pts:
                continue
            style = {"stopped early": "--", "failed": ":"}.get(t.state, "-")
            line, = ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", ms=3, label=t.trial_id)
            if t.state == "stopped early":
                ax.plot(*pts[-1], "x", color=line.get_color(), ms=9, mew=2)
        ax.set_title(metric)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0][len(metrics) - 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="trial (- - stopped early)",
                       ncol=1 + len(series) // 25)
    return _png(fig)


def pareto_png(run: RunData) -> tuple[str | None, str | None]:
    """The first two objectives of every finished trial, the Pareto front joined, the winner starred."""
    objectives = [(o.metric, o.mode) for o in run.search.objectives]
    if len(objectives) < 2:
        return None, "The sweep has one objective: there is no front to draw."
    (mx, _), (my, _) = objectives[:2]
    records = [t.record() for t in run.trials]
    front = pareto_front(records, objectives)
    competing = [r for r in records if r.error is None and not r.stopped_early
                 and all(_number(r.metrics.get(m)) is not None for m, _ in objectives)]
    if not competing:
        return None, "No trial finished with every objective reported yet."
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.scatter([r.metrics[mx] for r in competing], [r.metrics[my] for r in competing], c="tab:blue",
               label="finished")
    stopped = [r for r in records if r.stopped_early and _number(r.metrics.get(mx)) is not None
               and _number(r.metrics.get(my)) is not None]
    if stopped:
        ax.scatter([r.metrics[mx] for r in stopped], [r.metrics[my] for r in stopped], marker="x", c="grey",
                   label="stopped early (last report; not competing)")
    pts = sorted((r.metrics[mx], r.metrics[my]) for r in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", c="tab:red", label="Pareto front")
    for r in competing + stopped:
        ax.annotate(r.trial_id, (r.metrics[mx], r.metrics[my]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    best = (run.best or {}).get("trial_id")
    won = [r for r in competing if r.trial_id == best]
    if won:
        ax.scatter([won[0].metrics[mx]], [won[0].metrics[my]], marker="*", s=250, c="gold", edgecolors="k",
                   zorder=5, label=f"best ({best})")
    ax.set_xlabel(f"{mx} ({objectives[0][1]})")
    ax.set_ylabel(f"{my} ({objectives[1][1]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    note = None
    if len(objectives) > 2:
        note = f"Drawn on the first two of {len(objectives)} objectives; the front is computed on all of them."
    return _png(fig), note


def importances(run: RunData) -> tuple[dict[str, float] | None, str]:
    """Optuna's hyperparameter importances (PED-ANOVA) on a study rebuilt from the trials, and a note."""
    import optuna

    space = run.search.space
    if not space:
        return None, "The sweep has no search space."
    objectives = [(o.metric, o.mode) for o in run.search.objectives]
    dists = {path: _distribution(dom) for path, dom in space.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize" if m == "max" else "minimize" for _, m in objectives])
    finished, distinct = 0, set()
    for t in run.trials:
        params = {p: t.config[p] for p in dists if p in t.config}
        if len(params) != len(dists):
            continue
        values = [_number(t.last.get(m)) for m, _ in objectives]
        state = optuna.trial.TrialState.FAIL
        if t.state == "stopped early":
            state = optuna.trial.TrialState.PRUNED
        elif t.state == "finished" and None not in values:
            state = optuna.trial.TrialState.COMPLETE
            finished += 1
            distinct.add(tuple(values))
        elif t.state not in ("failed", "finished"):
            continue  # still running: nothing to say yet
        study.add_trial(optuna.trial.create_trial(
            state=state, params=params, distributions=dists,
            values=values if state == optuna.trial.TrialState.COMPLETE else None))
    if finished < 2:
        return None, (f"Importances need at least 2 finished trials with every objective reported; "
                      f"this sweep has {finished}.")
    if len(distinct) < 2:
        return None, (f"The {finished} finished trials reached the same objective values: nothing tells "
                      "the hyperparameters apart.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            imp = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except (ValueError, RuntimeError) as e:
            return None, f"Optuna could not compute importances: {e}"
    note = (f"Optuna's PED-ANOVA importance of each hyperparameter for reaching the Pareto front of "
            f"{', '.join(m for m, _ in objectives)}, from {finished} finished trials "
            f"(stopped trials count as pruned, failed ones as failed).")
    if finished < 20:
        note += (f" With {finished} finished trials these numbers are a hint, not a measurement: PED-ANOVA "
                 "compares the top 10% of trials with the rest.")
    said = sorted({str(w.message) for w in caught if "importance" in str(w.message).lower()
                   or "trials" in str(w.message).lower()})
    if said:
        note += " Optuna warns: " + " ".join(said)
    return dict(imp), note


def _distribution(dom: Any) -> Any:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if isinstance(dom, Choice):
        return CategoricalDistribution(dom.choice)
    if isinstance(dom, Uniform):
        return FloatDistribution(*dom.uniform)
    if isinstance(dom, LogUniform):
        return FloatDistribution(*dom.loguniform, log=True)
    assert isinstance(dom, IntRange)
    return IntDistribution(*dom.int_)


def importances_png(imp: dict[str, float]) -> str:
    plt = _pyplot()
    names = list(imp)[::-1]  # largest on top
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    ax.barh(names, [imp[n] for n in names], color="tab:green")
    ax.set_xlabel("importance (PED-ANOVA)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


# --------------------------------------------------------------------------- HTML
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}.note{color:#555}img{max-width:100%}
.failed{color:#b00}.stopped{color:#a60}"""


def render(run: RunData) -> str:
    """The whole report page."""
    s = run.search
    counts: dict[str, int] = {}
    for t in run.trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    title = f"grpo-ray sweep report: {run.spec.name if run.spec else run.run_dir}"
    es = s.early_stopping
    stopping = (f"early stopping: ASHA on {es.metric} ({es.mode}), grace period {es.grace_period} steps, "
                f"reduction factor {es.reduction_factor:g}, max_t {es.max_t}") if es else "no early stopping"
    states = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    objectives = ", ".join(f"{o.metric} ({o.mode})" for o in s.objectives)
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p>Run directory: <code>{html.escape(run.run_dir)}</code>.",
        f"{len(run.trials)} trials: {html.escape(states)}.</p>",
        f"<p>Objectives: {html.escape(objectives)}; sampler {html.escape(s.sampler)}; {html.escape(stopping)}.</p>",
    ]
    if run.advice:
        parts.append("<p class='note'>" + "<br>".join(html.escape(a) for a in run.advice) + "</p>")
    if run.spec is None:
        parts.append("<p class='note'>No spec.resolved.yaml in the run directory: objectives are the defaults "
                     "and importances are not computed.</p>")

    parts.append("<h2>Best configuration</h2>")
    if run.best:
        b = run.best
        parts.append(f"<p>Trial <b>{html.escape(str(b.get('trial_id')))}</b>. {html.escape(str(b.get('rule', '')))}"
                     f". Pareto front: {html.escape(', '.join(b.get('pareto_front', [])))}.</p>")
        parts.append(_table(["hyperparameter", "value"], [[k, v] for k, v in (b.get("hyperparameters") or {}).items()]))
        keys = [m for m in ["reward", "eval_accuracy", "format_rate", "reward_weighted", "eval_format_rate",
                            "sft_eval_accuracy", "completion_length", "step"] if m in (b.get("metrics") or {})]
        parts.append(_table(["metric (last report)", "value"], [[k, b["metrics"][k]] for k in keys]))
        parts.append(_effective_html(b.get("metrics") or {}))
    else:
        parts.append("<p class='note'>No best/best.json yet: the sweep is running, did not finish, or its export "
                     "did not finish.</p>")

    parts.append("<h2>Curves per trial</h2>")
    curves = curves_png(run)
    parts.append(_img(curves, "reward and eval accuracy per trial") if curves
                 else "<p class='note'>No trial has reported yet.</p>")

    parts.append("<h2>Pareto front</h2>")
    pareto, note = pareto_png(run)
    if pareto:
        parts.append(_img(pareto, "Pareto front"))
    if note:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")

    parts.append("<h2>Hyperparameter importances</h2>")
    imp, note = importances(run) if run.spec else (None, "Not computed without the run's spec.")
    if imp is not None:
        parts.append(_img(importances_png(imp), "hyperparameter importances"))
        parts.append(_table(["hyperparameter", "importance"], [[k, v] for k, v in imp.items()]))
    parts.append(f"<p class='note'>{html.escape(note)}</p>")

    parts.append("<h2>GPU use</h2>")
    parts.append(_utilization_html(run))

    parts.append("<h2>Failed and stopped trials</h2>")
    ended = [t for t in run.trials if t.state in ("failed", "stopped early")]
    if ended:
        parts.append(_table(["trial", "state", "cause", "hyperparameters"],
                            [[t.trial_id, t.state, t.cause, _hp(t.config)] for t in ended]))
    else:
        parts.append("<p class='note'>None.</p>")

    parts.append("<h2>All trials</h2>")
    metric_cols = list(dict.fromkeys(["reward", "eval_accuracy", "format_rate"] + [o.metric for o in s.objectives]
                                     + ["zero_std_groups", "truncated_rate"]))
    parts.append(_table(["trial", "state", "step", *metric_cols, "hyperparameters"],
                        [[t.trial_id, t.state, t.last.get("step"), *[t.last.get(m) for m in metric_cols],
                          _hp(t.config)] for t in run.trials]))
    parts.append("</body></html>")
    return "\n".join(parts)


def _effective_html(metrics: dict[str, Any]) -> str:
    """What the winner's trainers really ran with (trial/run.py EffectiveRecord), and what the backend changed."""
    ran = {k.removeprefix("effective/"): v for k, v in metrics.items() if k.startswith("effective/")}
    if not ran:
        return ""
    out = ["<h3>The configuration that really ran</h3>",
           "<p class='note'>Read from the trainers' own arguments, after the backend (Unsloth) and TRL set "
           "them; every checkpoint holds all of them in effective_config.json.</p>",
           _table(["field", "value"], [[k, v] for k, v in sorted(ran.items())])]
    if metrics.get("changed_by_backend"):
        out.append(f"<p class='note'>Changed by the backend from the spec's values: "
                   f"{html.escape(str(metrics['changed_by_backend']))}.</p>")
    return "\n".join(out)


def _utilization_html(run: RunData) -> str:
    """Busy fraction, start-up and hand-over times, trials per device-hour, measured GPU load (views/utilization.py)."""
    from grpo_ray.views.utilization import summary_line, utilization

    use = utilization((t.last, t.state in ("finished", "stopped early")) for t in run.trials)
    if not use:
        return "<p class='note'>No trial has reported yet.</p>"
    rows = [["devices", use["devices"]], ["wall time (s)", use["wall_s"]],
            ["busy fraction", use["busy_fraction"]],
            ["busy fraction after each device's first trial", use["busy_fraction_after_first"]],
            ["trials per device-hour", use["trials_per_device_hour"]]]
    for name, key in [("start-up, cold (s)", ("startup_s", "cold")), ("start-up, reused model (s)", ("startup_s", "warm")),
                      ("hand-over between trials (s)", ("handoff_s",)),
                      ("torch.compile per trial, cold (s)", ("compile_s", "cold")),
                      ("torch.compile per trial, reused model (s)", ("compile_s", "warm"))]:
        st = use[key[0]] if len(key) == 1 else use[key[0]][key[1]]
        if st:
            rows.append([name, f"median {st['median']:.1f}, max {st['max']:.1f} over {st['n']} trials"])
    if use.get("gpu_util_mean") is not None:  # NVML, sampled in the trials (trial/gpu_sampler.py)
        rows += [["GPU utilization during steps (%)", use["gpu_util_steps_mean"]],
                 ["GPU utilization overall (%)", use["gpu_util_mean"]],
                 ["GPU memory used, most on a card (GiB)", use["gpu_mem_used_max_gib"]]]
        if len(use["gpu_util_per_device"]) > 1:
            rows += [[f"GPU utilization on {dev} (%)", f"{_fmt(d['gpu_util_steps_mean'])} during steps, "
                      f"{_fmt(d['gpu_util_mean'])} overall"] for dev, d in use["gpu_util_per_device"].items()]
    note = ("Busy: from a trial's first training step or evaluation to its last report. Start-up: trial start to "
            "first step. Hand-over: the previous trial's end on the same actor (or device) to this trial's first step. "
            "torch.compile: the trial's time compiling graphs (its model load included); a reused model's trials "
            "compile only what they recompile."
            + (" GPU utilization: NVML's utilization.gpu (the share of time a kernel ran), sampled about once a "
               "second in each trial, from its first step on (during steps) and from its start (overall); trials "
               "packed on one GPU each see the whole card, so a card's numbers average its trials' samples."
               if use.get("gpu_util_mean") is not None else ""))
    return (f"<p>{html.escape(summary_line(use))}.</p>" + _table(["", "value"], rows)
            + f"<p class='note'>{html.escape(note)}</p>")


def _hp(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in config.items())


def write_report(run_dir: str, output: str | None = None) -> str:
    """Write the report of the sweep at ``run_dir`` to ``output`` (default ``<run_dir>/report.html``); its path."""
    run = load_run(run_dir)
    dest = output or storage.join(run_dir, REPORT_HTML)
    storage.write_text(dest, render(run))
    return dest
