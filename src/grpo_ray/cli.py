"""grpo-ray: sweep SFT + GRPO recipes with Ray Tune and Optuna; export the best trial.

Commands: validate, sweep, status, report, export, pull. User errors (bad spec, bad data, missing model,
unsupported export, a wrong path, a run another sweep holds) print one line naming the file, line and
field, and exit with code 2. An interrupted sweep (Ctrl-C, SIGTERM) exits 130 (143 for SIGTERM) and
prints the command that resumes it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from grpo_ray.config.errors import SpecError
from grpo_ray.config.load import dump_spec, load_spec_lines
from grpo_ray.trial.phases import phase_of

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)
out = Console()


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the user must change something', each with a self-contained message."""
    from grpo_ray.task.data import DataError
    from grpo_ray.models import ModelError
    from grpo_ray.task.rewards import RewardError
    from grpo_ray.run_lock import RunLockedError
    from grpo_ray.errors import SweepError
    from grpo_ray.trial.base import BackendError

    errors: list[type[BaseException]] = [SpecError, DataError, ModelError, RewardError, BackendError, SweepError,
                                         RunLockedError]
    try:
        from grpo_ray.export.base import ExportError

        errors.append(ExportError)
    except ImportError:  # pragma: no cover - export extras missing
        pass
    return tuple(errors)


def _fail(e: BaseException | str) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code=2)


def _run_path(run: str) -> str:
    """``run`` normalized; a local path that is missing or not a directory fails in one line."""
    from grpo_ray import storage as st

    path = st.normalize(run)
    if not st.is_uri(path):
        p = Path(path)
        if not p.exists():
            _fail(f"{run}: no sweep here (no such directory; expected a sweep's directory: <storage>/<name>)")
        if not p.is_dir():
            _fail(f"{run}: no sweep here (not a directory; expected a sweep's directory: <storage>/<name>)")
    return path


@app.command()
def validate(spec: Path = typer.Argument(..., help="The sweep spec (YAML).")) -> None:
    """Print the resolved spec (defaults filled in), or what is wrong with it.

    Besides the spec's own fields it checks what a sweep would otherwise fail on later, without a
    GPU or the network: every value of each search domain, the rewards, local data files (rows left
    after the filters) and the model path. Hub names are checked for their shape only.
    """
    from grpo_ray.sweep.driver import preflight

    try:
        resolved, lines = load_spec_lines(spec)
        preflight(resolved, lines)
    except _user_errors() as e:
        _fail(e)
    out.print(dump_spec(resolved), highlight=False, markup=False, end="")


class _Display:
    """Rich progress for a sweep: a bar of finished trials, one line per report, and below the bar
    one live line per running trial with its phase and how long it has been in it (trial/phases.py)."""

    def __init__(self, total: int, console: Console | None = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.text import Text

        from grpo_ray.views.status import duration_text

        running: dict[str, tuple[str, float]] = {}  # trial id -> (phase, unix time it began)
        self.running = running

        class _WithPhases(Progress):
            def get_renderables(self):  # rich's documented hook: the bar, then the running trials
                yield self.make_tasks_table(self.tasks)
                now = time.time()
                for tid, (phase, since) in sorted(running.items()):
                    yield Text(f"  {tid}  {phase}  ({duration_text(now - since)})", style="dim")

        self.progress = _WithPhases(
            TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console or err
        )
        self.task = self.progress.add_task("trials", total=total)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "note":  # about the search, not a trial (e.g. search.warm_start)
            self.progress.console.print(data["message"], highlight=False, markup=False)
            return
        if kind == "resumed":  # trials an interrupted run finished count as done
            self.progress.advance(self.task, data["finished"])
            self.progress.console.print(f"resuming: {data['finished']} trial(s) already finished")
            return
        tid = data["trial_id"]
        if kind == "phase":  # a live line, not a printed one: a trial posts one every few seconds
            before = self.running.get(tid, ("", 0.0))[0]
            self.running[tid] = (data["phase"], data["since"])
            # Piped (`ray job logs`, a file) nothing is live: a line when a trial enters a new phase
            if not self.progress.console.is_terminal and phase_of(data["phase"]) != phase_of(before):
                self.progress.console.print(f"{tid} {data['phase']}", highlight=False, markup=False)
            return
        if kind in ("complete", "error"):
            self.running.pop(tid, None)
        if kind == "start":
            cfg = ", ".join(f"{k}={_fmt(v)}" for k, v in data["config"].items())
            self.progress.console.print(f"[cyan]{tid}[/] started: {cfg}")
            self.running[tid] = ("starting", time.time())
        elif kind == "result":
            r = data["result"]
            self.progress.console.print(
                f"[cyan]{tid}[/] step {r.get('step')}: reward {_fmt(r.get('reward'))}, "
                f"format {_fmt(r.get('format_rate'))}, eval acc {_fmt(r.get('eval_accuracy'))}, "
                f"len {_fmt(r.get('completion_length'))}"
            )
        elif kind in ("complete", "error"):
            self.progress.advance(self.task)
            if kind == "error":
                self.progress.console.print(f"[red]{tid} failed[/] (log: {data.get('error')})")


class _Interrupt(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise _Interrupt(signum)


def _quietly(cleanup: Any) -> None:
    """Run ``cleanup``; a further Ctrl-C cuts it short instead of printing a traceback."""
    try:
        cleanup()
    except KeyboardInterrupt:
        pass


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="The sweep spec (YAML)."),
    # The envvar lets a cluster name its bucket once (cluster/gpu.yaml sets it on the head node).
    storage: Optional[str] = typer.Option(
        None, envvar="GRPO_RAY_STORAGE",
        help="Results root: a directory or URI (overrides spec.storage)."),
    resume: bool = typer.Option(False, help="Resume an interrupted sweep of the same name from its storage."),
    mlflow: Optional[str] = typer.Option(
        None, "--mlflow", metavar="URI",
        help="Also track the sweep in MLflow: a directory or tracking URI (overrides tracking.mlflow_uri)."),
    wandb: Optional[str] = typer.Option(
        None, "--wandb", metavar="PROJECT",
        help="Also track the sweep in this Weights & Biases project (overrides tracking.wandb_project); "
        "offline unless WANDB_API_KEY is set."),
) -> None:
    """Run the sweep (Ray Tune + Optuna), pick the best trial and export it.

    Ctrl-C or SIGTERM stops the trials, keeps every finished trial and checkpoint, exports nothing
    and prints the command that resumes; a second Ctrl-C stops at once.
    """
    try:
        resolved, lines = load_spec_lines(spec)
        resolved = _with_tracking(resolved, mlflow, wandb)
    except SpecError as e:
        _fail(e)
    import signal

    from grpo_ray.sweep.search import SweepInterrupted
    from grpo_ray.sweep.driver import run_sweep
    from grpo_ray.trial.workdirs import shutdown_and_clean

    import shlex

    resume_cmd = (f"grpo-ray sweep {shlex.quote(str(spec))}" + (f" --storage {shlex.quote(storage)}" if storage else "")
                  + " --resume")
    display = _Display(resolved.search.num_samples)
    # Outside the search (start-up, export) SIGTERM ends the command as Ctrl-C does: through the
    # `finally`s, so the run's lock is released and the export's staging directory removed.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        try:
            with display.progress:
                outcome = run_sweep(
                    resolved, storage, resume=resume, on_event=display.on_event,
                    progress=lambda msg: display.progress.console.print(f"[magenta]export:[/] {msg}"), lines=lines,
                )
        finally:
            _quietly(shutdown_and_clean)  # the trials' temporary directories go; checkpoints are in the run
    except _user_errors() as e:
        _fail(e)
    except SweepInterrupted as e:
        err.print(f"[bold yellow]interrupted[/] ({e.signal_name}): {e.finished} finished trial(s) and every "
                  f"checkpoint kept in {e.run_dir}; nothing exported, no best.json. Resume with: {resume_cmd}",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(code=e.exit_code) from None
    except KeyboardInterrupt as e:  # before the search started, or during the export
        signum = getattr(e, "signum", signal.SIGINT)
        err.print(f"[bold yellow]interrupted[/] ({signal.Signals(signum).name}): nothing exported, no best.json. "
                  f"Resume with: {resume_cmd}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=128 + signum) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    from grpo_ray.views.utilization import summary_line

    out.print(summary_line(outcome.utilization), highlight=False)
    best = outcome.best_json or {}
    metrics = best.get("metrics", {})
    # The objectives the winner was chosen on, then eval_accuracy (the rule's tie-break): named, not bare numbers.
    names = list(dict.fromkeys([o.metric for o in resolved.search.objectives] + ["eval_accuracy"]))
    shown = ", ".join(f"{m} {_fmt(metrics.get(m))}" for m in names)
    out.print(f"[bold green]best trial[/] {best.get('trial_id')}: {shown}", highlight=False)
    merged = "merged16/, " if resolved.export.merged16 else ""
    out.print(f"results: {outcome.run_dir}/best/ (best.json, lora/, {merged}*.gguf)", highlight=False)


def _with_tracking(spec: Any, mlflow: str | None, wandb: str | None) -> Any:
    """The spec with ``--mlflow`` / ``--wandb`` applied, validated as if written in its tracking section."""
    from grpo_ray.config.overrides import apply_overrides

    changes = {k: v for k, v in {"tracking.mlflow_uri": mlflow, "tracking.wandb_project": wandb}.items() if v}
    if not changes:
        return spec
    try:
        return apply_overrides(spec, changes)
    except SpecError as e:  # name the option, not a spec line the user never wrote
        option = "--mlflow" if e.field == "tracking.mlflow_uri" else "--wandb"
        error = SpecError(e.message, field=option)
        error.args = (f"{option}: {e.message}",)  # no "<spec>:" in front: it came from the command line
        raise error from None


@app.command()
def status(
    run: str = typer.Argument(..., help="A sweep's directory or URI: <storage>/<name>."),
    watch: float = typer.Option(0, help="Refresh every this many seconds (0: print once)."),
) -> None:
    """Trials of a sweep (running or finished): state, step, reward, accuracy, hyperparameters."""
    import time

    from rich.live import Live

    from grpo_ray.views.status import read_phases, read_status, resolved_settings, status_table

    run = _run_path(run)
    share, search = resolved_settings(run)  # for the packing and search advice
    try:
        table = status_table(read_status(run), share, search, read_phases(run))
    except (OSError, ValueError) as e:  # no snapshot yet, or an unreadable one
        _fail(e)
    if watch <= 0:
        out.print(table)
        return
    with Live(table, console=out, refresh_per_second=1) as live:
        while True:
            time.sleep(watch)
            try:
                table = status_table(read_status(run), share, search, read_phases(run))
            except (OSError, ValueError) as e:  # a snapshot in flux past read_status's retries: keep the last table
                err.print(f"[yellow]status:[/] {e}", highlight=False)
            live.update(table)


@app.command()
def report(
    run: Annotated[str, typer.Argument(help="A sweep's directory or URI: <storage>/<name>.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write (default <run>/report.html).")]
    = None,
) -> None:
    """An HTML page of a sweep: curves per trial, Pareto front, importances, best configuration, failures."""
    from grpo_ray.views.html_report import write_report

    try:
        dest = write_report(_run_path(run), str(output.resolve()) if output else None)
    except FileNotFoundError as e:
        _fail(e)
    except SpecError as e:  # a damaged spec.resolved.yaml
        _fail(e)
    except OSError as e:  # --output a directory, or somewhere not writable
        _fail(f"{output or run}: cannot write the report ({e.strerror or e})")
    out.print(f"report: {dest}", highlight=False)


@app.command()
def export(
    run: str = typer.Argument(..., help="A finished sweep's directory or URI: <storage>/<name>."),
    trial: Optional[str] = typer.Option(None, help="Export this trial id instead of the best one."),
    gguf: Optional[str] = typer.Option(None, help="GGUF types to write instead of the spec's export.gguf, "
                                       "comma-separated (e.g. f16,q8_0)."),
) -> None:
    """(Re-)export a finished sweep's best trial, or another trial, into <run>/best."""
    from grpo_ray import storage as st
    from grpo_ray.sweep.driver import export_run

    try:
        info = export_run(_run_path(run), trial, progress=lambda msg: err.print(f"[magenta]export:[/] {msg}"),
                          gguf=[t.strip() for t in gguf.split(",") if t.strip()] if gguf else None)
    except _user_errors() as e:
        _fail(e)
    out.print(f"exported trial {info['trial_id']} to {st.join(st.normalize(run), 'best')}", highlight=False)


@app.command()
def pull(
    run: str = typer.Argument(..., help="A sweep's directory or URI: <storage>/<name>."),
    dest: Path = typer.Argument(..., help="Local directory to copy the exported best trial into."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty destination whole."),
) -> None:
    """Copy <run>/best (best.json, GGUF, merged model, adapter) to a local directory."""
    import shutil
    import tempfile

    from grpo_ray import storage as st
    from grpo_ray.run_dir import BEST_JSON, best_path

    src = best_path(_run_path(run))
    if not st.exists(st.join(src, BEST_JSON)):
        _fail(f"{src}: no best.json (the sweep or its export has not finished)")
    target = dest.expanduser().resolve()
    if target.exists() and not target.is_dir():
        _fail(f"{dest}: exists and is not a directory; give a directory to pull into")
    if target.is_dir() and any(target.iterdir()) and not force:
        # Merging would leave the files of an older export (other GGUF types) beside this best.json.
        _fail(f"{dest}: not empty; pass --force to replace it whole, or pull into a new directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copied beside the target first, then swapped in: an interrupted pull leaves the old one whole.
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.pull-", dir=target.parent))
    except OSError as e:
        _fail(f"{dest}: cannot create the destination ({e.strerror or e})")
    try:
        st.copy_dir(src, str(staging))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out.print(f"pulled {src} -> {dest}", highlight=False)


@app.command()
def push(
    run: str = typer.Argument(..., metavar="RUN", help="A finished sweep's directory or URI: <storage>/<name>."),
    repo_id: str = typer.Argument(..., metavar="REPO_ID", help="The Hub model repo: <user or org>/<name>."),
    private: bool = typer.Option(False, "--private",
                                 help="Create the repo private (an existing repo keeps its visibility)."),
    gguf_only: bool = typer.Option(False, "--gguf-only", help="Only the GGUF files, Modelfile, card and best.json; "
                                   "no LoRA adapter, no merged weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a repo that holds other content."),
) -> None:
    """Upload <run>/best to the Hugging Face Hub: the model card as README, GGUF files, Modelfile,
    LoRA and merged weights. The token comes from HF_TOKEN or `hf auth login`."""
    from grpo_ray import storage as st
    from grpo_ray.tracking.hub import PushError, push_run

    try:
        result = push_run(st.normalize(run), repo_id, private=private, gguf_only=gguf_only, overwrite=overwrite,
                          progress=lambda msg: err.print(f"[magenta]push:[/] {msg}", highlight=False))
    except PushError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(code=2) from None
    for note in result.notes:
        out.print(note, highlight=False)
    verb = "pushed" if result.uploaded else "up to date:"
    out.print(f"{verb} {len(result.files)} files to {result.url}", highlight=False)


if __name__ == "__main__":  # pragma: no cover  (python -m grpo_ray.cli, used by the tests)
    app()
