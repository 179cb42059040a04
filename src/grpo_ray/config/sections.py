"""The spec's sections besides training and search: the model, the reasoning format, the data, a
trial's resources and watchdog, the export and the tracking. Every field is declared with its
default (the defaults follow Unsloth's GRPO tutorial) and a description; unknown keys are errors.
"""

from __future__ import annotations

import math

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from grpo_ray.config.errors import FieldError

# The tutorial's reasoning format: the tags a completion uses and the system prompt naming them
# (the defaults of `format:`; grpo_ray.task.template builds prompts and templates from them).
REASONING_START = "<think>"
REASONING_END = "</think>"
SOLUTION_START = "<SOLUTION>"
SOLUTION_END = "</SOLUTION>"

DEFAULT_SYSTEM_PROMPT = (
    "You are given a problem.\n"
    "Think about the problem and provide your working out.\n"
    f"Place it between {REASONING_START} and {REASONING_END}.\n"
    f"Then, provide your solution between {SOLUTION_START}{SOLUTION_END}"
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- model & format
class ModelSpec(Strict):
    """The base model every trial fine-tunes.

    Parameters that choose the model: ``source``. Parameters that size it in memory:
    ``max_seq_length``, ``gpu_memory_utilization``, ``kv_cache_gib``, ``load_in_4bit``. Parameters of its
    prompts: ``add_bos``. Start-up against step speed: ``compile``.
    """

    source: str = Field(
        "unsloth/Qwen3-1.7B-Base",
        description="The base model: a Hub name, a local HF directory, a .gguf file, or 'builtin:tiny-qwen3' (a "
        "tiny random Qwen3 for tests on CPU). The default is the tutorial recipe's base (sweeps/rewards.yaml).",
    )
    max_seq_length: int = Field(
        2048, gt=0, description="Longest prompt + completion, in tokens; grpo.max_prompt_length + "
        "grpo.max_completion_length must fit in it. Higher: longer reasoning, more GPU memory (vLLM's KV cache "
        "and the activations). The tutorial's: 2048.")
    gpu_memory_utilization: float = Field(
        0.7, gt=0, le=1, description="vLLM's share of the trial's GPU memory (unsloth backend); with trials packed "
        "on a GPU (resources.gpu below 1) the share of the trial's slice: 0.7 at gpu 0.5 reserves up to 35% of the "
        "card. Unsloth scales it by the card's free share as the engine starts, so later packed engines reserve "
        "less (eight per H200 at 0.7: 6.1-11.7 GiB each, bench/README.md). "
        "Higher: a larger KV cache (faster generation), less memory left for training. The tutorial's: 0.7.")
    kv_cache_gib: Optional[float] = Field(
        None, gt=0, description="vLLM's KV cache per trial, in GiB (unsloth backend). Unset: vLLM sizes it as its "
        "engine starts, gpu_memory_utilization of the trial's share less what the card lost while it profiled, so "
        "packed trials start their engines one at a time (each would count a neighbour's memory as its own), a "
        "neighbour that frees memory meanwhile can stop a start (\"Error in memory profiling\", retried by "
        "Unsloth), and later starts get less. Set: every engine gets exactly this, sized without reading the "
        "card, and the next packed trial starts as soon as it is set. It needs completions in flight x "
        "max_seq_length x the model's KV bytes per token (Qwen3-1.7B in 16 bits: 112 KiB; 16 x 2048 tokens: "
        "3.5 GiB); vLLM refuses to start when one sequence of max_seq_length does not fit, and with more memory "
        "than the card has free. Not yet measured on a GPU: bench/README.md, \"Next lease\".")
    load_in_4bit: bool = Field(
        False, description="Load the base weights in 4 bits (QLoRA; unsloth backend): about a quarter of the "
        "weights' memory, slightly less accurate and slower steps. The tutorial's: false (16-bit LoRA).")
    add_bos: Literal["auto", "always", "never"] = Field(
        "auto", description="Put BOS in front of every prompt; auto = when the tokenizer has one (Gemma needs it)."
    )
    compile: bool = Field(
        True, description="Compile the model (unsloth backend): torch.compile of the training graphs and vLLM's "
        "compiled, CUDA-graphed engine. false: eager training and an eager engine (vLLM enforce_eager), for a "
        "model whose compilation fails or a debugging run. Measured on gemma-3-270m on an H200: model and engine "
        "load in 63 s instead of 125-145 s, but generation is about 10x slower, so GRPO steps are slower too. Fixed "
        "per sweep (Unsloth reads it when a trial process imports it): it cannot be searched. The tutorial's: "
        "true. bench/README.md, \"Compiled or eager\".")


class FormatSpec(Strict):
    """The reasoning format the model learns and the rewards check (defaults: the tutorial's).

    Parameters of the prompt: ``system_prompt``. The tags of a completion:
    ``reasoning_start`` ... ``reasoning_end``, then ``solution_start`` answer ``solution_end``.
    """

    system_prompt: str = Field(
        DEFAULT_SYSTEM_PROMPT, description="System prompt put before every problem (SFT, GRPO and "
        "evaluation); it should name the four tags. The tutorial's, with its tags filled in.")
    reasoning_start: str = Field(
        REASONING_START, description="Tag that opens the reasoning; every generation prompt ends with it, "
        "so completions start inside the reasoning. The tutorial's: <think>.")
    reasoning_end: str = Field(
        REASONING_END, description="Tag that closes the reasoning. The tutorial's: </think>.")
    solution_start: str = Field(
        SOLUTION_START, description="Tag that opens the answer the rewards and evaluation parse. The "
        "tutorial's: <SOLUTION>.")
    solution_end: str = Field(
        SOLUTION_END, description="Tag that closes the answer. The tutorial's: </SOLUTION>.")


# --------------------------------------------------------------------------- data
class Columns(Strict):
    """Which columns of a data set hold what: the problem, its answer, worked reasoning, its kind."""

    question: str = Field("question", description="Column holding the problem text.")
    answer: str = Field("answer", description="Column holding the reference answer.")
    reasoning: str | None = Field(None, description="Column with worked reasoning (SFT only; SFT rows without it "
                                  "are dropped).")
    kind: str | None = Field(None, description="Column naming each problem's kind (eval set only): held-out "
                             "accuracy is then also reported per kind, as eval_accuracy/<kind>.")


class DatasetSpec(Strict):
    """One data set. Where it comes from: ``source``, ``subset``, ``split``. How its rows are read:
    ``columns``. Which rows are kept: ``numeric_only``, ``limit``."""

    source: str = Field(description="Hub dataset name, a local .jsonl/.json/.parquet/.csv file, or "
                        "'builtin:math_mini' (a small offline math set).")
    subset: str | None = Field(None, description="Hub config name (e.g. 'en'); null: the data set's default.")
    split: str = Field("train", description="Hub split to load (e.g. 'train', 'cot'); local files are read whole.")
    columns: Columns = Field(Columns(), description="Column names of the problem, its answer and its reasoning.")
    numeric_only: bool = Field(
        True, description="Keep rows whose answer parses as a number (the check_answer and check_numbers rewards "
        "and the held-out accuracy compare numbers). The tutorial's: true.")
    limit: int | None = Field(
        None, gt=0, description="Use at most this many rows (after filtering and the held-out split); null: all. "
        "Lower: faster data loading and start-up, fewer distinct problems.")


class EvalSpec(Strict):
    """The held-out evaluation (greedy, exact numeric match; not in the tutorial).

    Parameters that choose the problems: ``source``, ``size``. Parameters of the generation:
    ``max_new_tokens``. When it runs: after SFT, every grpo.report_every steps, and ``before_sft``.
    """

    source: DatasetSpec | None = Field(None, description="A separate eval set; default: held out from the GRPO set.")
    size: int = Field(
        100, gt=0, description="Held-out problems scored after each report window (the same ones for every trial). "
        "Higher: a less noisy eval_accuracy, longer evaluations.")
    max_new_tokens: int = Field(
        256, gt=0, description="Tokens each greedy evaluation answer may run to. Higher: long reasoning is not cut "
        "(a cut answer scores 0), slower evaluations; near grpo.max_completion_length measures what GRPO trains.")
    before_sft: bool = Field(False, description="Also score the base model before the SFT warm-up.")


class DataSpec(Strict):
    """The data (defaults: the tutorial's sets). The training sets: ``sft`` (the format warm-up)
    and ``grpo``. The held-out evaluation: ``eval``. Their shuffling and split: ``seed``."""

    sft: DatasetSpec | None = Field(
        DatasetSpec(
            source="unsloth/OpenMathReasoning-mini",
            split="cot",
            columns=Columns(question="problem", answer="expected_answer", reasoning="generated_solution"),
            limit=None,
        ),
        description="The SFT format warm-up's set: problems with worked reasoning (columns.reasoning); null: no SFT. "
        "The tutorial's: unsloth/OpenMathReasoning-mini, split cot.",
    )
    grpo: DatasetSpec = Field(
        DatasetSpec(
            source="open-r1/DAPO-Math-17k-Processed", subset="en", columns=Columns(question="prompt", answer="solution")
        ),
        description="The GRPO set: problems with reference answers; the eval set is held out from it unless "
        "eval.source is given. The tutorial's: open-r1/DAPO-Math-17k-Processed, subset en.",
    )
    eval: EvalSpec = Field(EvalSpec(), description="The held-out evaluation.")
    seed: int = Field(3407, description="Shuffle and held-out split seed (same for every trial).")


# The most trials resources.max_trials_per_gpu allows on one GPU: the most the card was measured
# to take (K processes on one H200: bench/results/share_gpu_h200_a9f965a.json).
MAX_TRIALS_PER_GPU = 8


def share_of(k: int) -> float:
    """The GPU share that packs ``k`` trials on a card: 1/k, rounded down to Ray's 4 decimals so
    that k of them fit (rounded to nearest, 1/6 would be 0.1667, and six of it exceed one GPU).

    >>> share_of(2), share_of(3), share_of(6), share_of(8)
    (0.5, 0.3333, 0.1666, 0.125)
    """
    return math.floor(10_000 / k) / 10_000


class ResourcesSpec(Strict):
    """What one trial reserves from Ray: ``gpu`` and ``cpu``; with ``gpu: auto``, how densely trials
    may share a GPU: ``max_trials_per_gpu``."""

    gpu: Union[float, Literal["auto"]] = Field(
        "auto", description="GPUs per trial; a fraction packs trials onto one GPU (0.5: two per GPU, 0.25: four). "
        "auto: 0 on a machine without GPUs; 1 when the model's 16-bit weights take over 3% of the smallest GPU's "
        "memory or cannot be known on the driver; else as many trials per GPU as max_trials_per_gpu, the GPU's "
        "memory and the GPU nodes' CPU cores (resources.cpu each) all allow. The sweep prints its choice and why "
        "(sweep/packing.py).")

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError("expected a number >= 0 (0.5 packs two trials per GPU) or 'auto'")
    cpu: float = Field(
        2.0, gt=0, description="CPU cores Ray reserves per trial (data loading, rewards, tokenizing; on a machine "
        "without GPUs, the trial's torch threads). Higher: fewer trials at once on a machine without GPUs, and "
        "fewer packed per GPU under gpu: auto (a GPU node with 16 cores per GPU holds eight trials of 2, four of 4). "
        "A packed trial's step keeps about one core busy: eight gemma-3-270m trials on an H200 node kept 8-9 of its "
        "16 cores busy (bench/results/warm_sweep_density_h200_920d3f9.top.txt.gz).")
    max_trials_per_gpu: Optional[int] = Field(
        None, ge=1, le=MAX_TRIALS_PER_GPU, description="With gpu: auto, the most trials that may share one GPU. "
        "Unset: 8 when the model's 16-bit weights take at most 1% of the GPU's memory, else 2 (sweep/packing.py). "
        "Measured on an H200: gemma-3-270m (0.36% of it) eight per GPU finished 136.0 trials per GPU-hour after "
        "the first, the card 80-93% busy while its warm trials stepped, where two per GPU finished 49.7 and "
        "cannot pass about 68; the tutorial's Qwen3-1.7B (2.3%) did 1.3x one trial's work with two. Lower: the "
        "search learns from more finished trials before it samples the next (eight per GPU on 8 GPUs runs 64 "
        "at once), and fewer packed cold starts queue for the card (about 35 s per start ahead); higher: more "
        "trials per GPU-hour for a small model on a large card, if resources.cpu leaves the cores for them. "
        "Only with gpu: auto; a number in gpu already sets the density.")

    @model_validator(mode="after")
    def _density_needs_auto(self) -> "ResourcesSpec":
        if self.max_trials_per_gpu is not None and self.gpu != "auto":
            per = f"{1 / self.gpu:g} per GPU" if isinstance(self.gpu, (int, float)) and self.gpu > 0 else "no GPU"
            raise FieldError("resources.max_trials_per_gpu", (
                f"applies only to resources.gpu: auto, and resources.gpu is {self.gpu:g} ({per}): set gpu: "
                f"auto, or drop max_trials_per_gpu and set gpu: {share_of(self.max_trials_per_gpu):g} for "
                f"{self.max_trials_per_gpu} per GPU"))
        return self


class ExportSpec(Strict):
    """Export of the best trial after the sweep (to <storage>/<name>/best/).

    What is written: ``enabled``, ``merged16``, ``gguf``. How it is checked: ``check``,
    ``agreement_prompts``, ``min_agreement``.
    """

    enabled: bool = Field(
        True, description="Export the best trial at the end of the sweep: its LoRA adapter, the merged 16-bit "
        "model, GGUF files and an Ollama Modelfile. false: only the trials' checkpoints remain.")
    merged16: bool = Field(
        True, description="Keep the merged 16-bit HF model (best/merged16/, bf16 or fp16 as the base: as large as "
        "the base model). false: it is still built, as the GGUF files are converted from it and the checks compare "
        "with it, then removed: best/ holds the adapter, the GGUF files and the Modelfile.")
    gguf: list[Literal["f16", "bf16", "f32", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]] = Field(
        ["q8_0"], description="GGUF types to write for llama.cpp / Ollama (q4_k_m, q5_k_m, q6_k need llama.cpp's "
        "bindings). Smaller types: smaller, faster files, more quantization error (see min_agreement).")
    check: bool = Field(True, description="Load the GGUF back with llama.cpp and compare with the HF model.")
    agreement_prompts: int = Field(
        16, ge=0, description="Held-out prompts on which each quantized GGUF's greedy answers are compared "
        "with the 16-bit GGUF's (needs llama.cpp's bindings; 0 skips)."
    )
    min_agreement: float | None = Field(
        0.5, ge=0, le=1, description="Fail the export when a quantized GGUF's greedy answers match the 16-bit "
        "GGUF's on fewer held-out prompts than this share (null: record only). A fine-tune of an already "
        "quantized base can lose its whole LoRA delta to re-quantization (bench/results/export_gemma_cpu.json)."
    )


class TrialSpec(Strict):
    """How a trial runs: its hang watchdog (``step_timeout_s``) and model reuse (``reuse_model``)."""

    step_timeout_s: float | None = Field(
        1800, gt=0, description="End a trial that finishes no SFT/GRPO step or evaluation for this long, in "
        "seconds (a hung generation or reward function); null disables. The first GRPO step on a cold GPU "
        "compiles for minutes."
    )
    reuse_model: bool = Field(
        True, description="Keep a trial's loaded base model (and vLLM engine) in its Ray actor for the next "
        "trial, which only gets a fresh LoRA, optimizer and settings: no model load, no engine start-up, no "
        "recompilation between trials (trial/warm.py). false: every trial starts a fresh process."
    )


class TrackingSpec(Strict):
    """Where a sweep is watched besides Tune's own files: MLflow and/or Weights & Biases (tracking/).

    Parameters of MLflow: ``mlflow_uri``, ``mlflow_experiment``. Parameters of W&B:
    ``wandb_project``, ``wandb_entity``, ``wandb_mode``, ``wandb_dir``.

    Credentials never live here (this section is written to spec.resolved.yaml): MLflow reads
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN and W&B reads
    WANDB_API_KEY from the environment.
    """

    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI: a local directory (a file store, created if missing), file://..., "
        "http(s)://host:port of a tracking server, or sqlite:///mlflow.db. One run per trial (its sampled config as "
        "params, every reported metric by GRPO step, its final status as the tag grpo_ray.status) under a parent run "
        "for the sweep. null (default): no MLflow. `grpo-ray sweep --mlflow URI` sets it.")
    mlflow_experiment: str | None = Field(
        None, description="MLflow experiment the runs go to; null (default): the sweep's name.")
    wandb_project: str | None = Field(
        None, description="Weights & Biases project: one run per trial, grouped by the sweep's name. null "
        "(default): no W&B. `grpo-ray sweep --wandb PROJECT` sets it.")
    wandb_entity: str | None = Field(None, description="W&B entity (user or team); null (default): the key's own.")
    wandb_mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="online: send to W&B (needs WANDB_API_KEY or `wandb login`); offline: write run "
        "directories to sync later with `wandb sync`; auto (default): online when WANDB_API_KEY is set, else offline.")
    wandb_dir: str | None = Field(
        None, description="Local directory W&B writes its run files under (<dir>/wandb/); null (default): the run "
        "directory when storage is local, else ./wandb-runs.")

    @model_validator(mode="after")
    def _no_password_in_uri(self) -> "TrackingSpec":
        import re

        # spec.resolved.yaml and the MLflow store itself would keep it in plain text. A model
        # validator, so that the error message does not quote the URI (and its password) back.
        v = self.mlflow_uri
        if v is not None and re.match(r"^[a-z][a-z0-9+.-]*://[^/@]*:[^/@]*@", v, re.IGNORECASE):
            raise FieldError("tracking.mlflow_uri", "a password in the URI would be written to spec.resolved.yaml: "
                              "drop it and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment")
        if v is not None and not v.strip():
            raise FieldError("tracking.mlflow_uri", "expected a directory or a tracking URI, or null for no MLflow")
        return self

    @field_validator("wandb_project", "wandb_entity", "mlflow_experiment", "wandb_dir")
    @classmethod
    def _name(cls, v: str | None, info: Any) -> str | None:
        import re

        # An empty name would silently mean "the default" to MLflow and W&B.
        if v is not None and not v.strip():
            raise ValueError("expected a non-empty value, or null for the default")
        # W&B refuses these in a project name, and only says so once the first trial started.
        if v is not None and info.field_name == "wandb_project" and re.search(r"[/\\#?%:]", v):
            raise ValueError("a W&B project name cannot contain / \\ # ? % :")
        return v


