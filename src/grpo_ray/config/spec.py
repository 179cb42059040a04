"""The whole sweep spec (:class:`SweepSpec`): its sections, the checks across them, the values a trial
derives from them, and the dotted paths (``lora.rank``, ``rewards.<name>.weight``) that name a field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from grpo_ray.config.errors import FieldError, SpecError
from grpo_ray.config.search import Choice, IntRange, SearchSpec, in_domain
from grpo_ray.config.sections import (
    DataSpec,
    ExportSpec,
    FormatSpec,
    ModelSpec,
    ResourcesSpec,
    Strict,
    TrackingSpec,
    TrialSpec,
)
from grpo_ray.config.training import GrpoSpec, LoraSpec, RewardSpec, SftSpec


# Spec fields a trial process fixes once, so trials of one sweep cannot differ in them
# (config/overrides.py check_space refuses them in search.space).
FIXED_PER_SWEEP = {
    "model.compile": "Unsloth reads it when a trial process imports it, and a warm process serves many trials",
    "resources.gpu": "Ray reserves a trial's resources before its configuration is sampled",
    "resources.cpu": "Ray reserves a trial's resources before its configuration is sampled",
    "resources.max_trials_per_gpu": "it decides how many trials share a GPU before any trial starts",
}


def _default_rewards() -> list[RewardSpec]:
    names = ["match_format_exactly", "match_format_approximately", "check_answer", "check_numbers"]
    return [RewardSpec(name=n) for n in names]


class SweepSpec(Strict):
    """A whole sweep: only ``name`` is required; every section defaults to the tutorial's recipe.

    The run: ``name``, ``backend``, ``storage``. The recipe: ``model``, ``format``, ``data``,
    ``rewards``, ``lora``, ``sft``, ``grpo``. The search: ``search``, ``resources``, ``trial``.
    After and around it: ``export``, ``tracking``.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name; results go to <storage>/<name>.")
    model: ModelSpec = Field(ModelSpec(), description="The base model and how it is loaded.")
    format: FormatSpec = Field(FormatSpec(), description="The system prompt and the reasoning and solution tags.")
    data: DataSpec = Field(DataSpec(), description="The SFT, GRPO and held-out evaluation sets.")
    rewards: list[RewardSpec] = Field(
        default_factory=_default_rewards, min_length=1, description="The GRPO reward functions and their weights, "
        "each name once. Default: the tutorial's four rewards, weight 1.0 each.")
    lora: LoraSpec = Field(LoraSpec(), description="The LoRA adapter both stages train.")
    sft: SftSpec = Field(SftSpec(), description="The SFT format warm-up.")
    grpo: GrpoSpec = Field(GrpoSpec(), description="GRPO training: optimizer, batch, generation and algorithm.")
    search: SearchSpec = Field(SearchSpec(), description="The search space, the sampler and the objectives.")
    resources: ResourcesSpec = Field(ResourcesSpec(), description="GPUs and CPUs reserved per trial.")
    trial: TrialSpec = Field(TrialSpec(), description="A trial's watchdog and model reuse.")
    backend: Literal["auto", "unsloth", "hf"] = Field(
        "auto", description="Training stack: unsloth (Unsloth + vLLM generation, CUDA only, the tutorial's), hf "
        "(transformers + PEFT, generation by the trained model; runs on CPU), auto: unsloth on CUDA, else hf. "
        "unsloth needs the gpu extra (pip install 'grpo-ray[gpu]') on every GPU node.")
    storage: str = Field("./runs", description="Local directory or URI (s3://, gs://) for results; credentials "
                         "come from the environment.")
    export: ExportSpec = Field(ExportSpec(), description="The best trial's export: adapter, merged model, GGUF.")
    tracking: TrackingSpec = Field(TrackingSpec(), description="MLflow and Weights & Biases tracking.")

    @field_validator("rewards")
    @classmethod
    def _unique_rewards(cls, v: list[RewardSpec]) -> list[RewardSpec]:
        names = [r.name for r in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward listed twice: {', '.join(dupes)}")
        return v

    @model_validator(mode="after")
    def _check_lengths(self) -> "SweepSpec":
        if self.grpo.max_prompt_length + self.grpo.max_completion_length > self.model.max_seq_length:
            raise ValueError(
                "grpo.max_prompt_length + grpo.max_completion_length "
                f"({self.grpo.max_prompt_length} + {self.grpo.max_completion_length}) exceeds "
                f"model.max_seq_length ({self.model.max_seq_length}): lower one or raise max_seq_length"
            )
        return self

    @model_validator(mode="after")
    def _check_grid(self) -> "SweepSpec":
        if self.search.sampler != "grid":
            return self
        size = 1
        for path, dom in self.search.space.items():
            if not isinstance(dom, (Choice, IntRange)):
                raise FieldError(f"search.space.{path}", "sampler grid needs every domain to be {choice: [..]} or "
                                  "{int: [low, high]}; use another sampler for continuous ranges")
            size *= len(dom.choice) if isinstance(dom, Choice) else dom.int_[1] - dom.int_[0] + 1
        if not self.search.space:
            raise FieldError("search.sampler", "grid needs a search.space to enumerate")
        if self.search.num_samples > size:
            raise FieldError("search.num_samples", f"{self.search.num_samples} exceeds the grid's {size} "
                              f"combinations: set num_samples: {size}")
        return self

    @model_validator(mode="after")
    def _resolve_early_stopping(self) -> SweepSpec:
        es = self.search.early_stopping
        if es is None:
            return self
        longest = self.max_grpo_steps()
        # Filled in here so spec.resolved.yaml shows the rungs the sweep really used.
        if es.grace_period is None:
            es.grace_period = min(self.grpo.report_every, longest)
        if es.max_t is None:
            es.max_t = longest
        if es.max_t < longest:
            raise FieldError("search.early_stopping.max_t", (
                f"{es.max_t} is below the largest grpo.max_steps a trial can run ({longest}): every trial "
                f"would be cut at {es.max_t} steps; lower grpo.max_steps instead"))
        if es.grace_period > es.max_t:
            raise FieldError("search.early_stopping.grace_period", (
                f"{es.grace_period} exceeds max_t ({es.max_t}, by default the largest grpo.max_steps): "
                "no trial could ever be stopped"))
        return self

    # --- derived values the trial needs
    def _largest(self, path: str, fixed: int) -> int:
        """The largest integer any trial can sample at ``path``; ``fixed`` when the search leaves it alone."""
        dom = self.search.space.get(path)
        if isinstance(dom, Choice):
            return max(int(x) for x in dom.choice)
        if isinstance(dom, IntRange):
            return dom.int_[1]
        return fixed

    def max_lora_rank(self) -> int:
        """The largest rank any trial can sample (vLLM reserves LoRA slots for it)."""
        return self._largest("lora.rank", self.lora.rank)

    def pads_lora_rank(self) -> bool:
        """Whether a trial's adapter is built :meth:`max_lora_rank` wide (``lora.pad_rank`` resolved).

        ``auto`` pads only where it can save a recompile: a warm actor (``trial.reuse_model``) and a
        searched ``lora.rank``, so that the actor's next trial may have another rank. A trial's spec
        keeps the sweep's search.space (config/overrides.py apply_overrides), so a trial resolves as
        its sweep does.

        >>> spec = SweepSpec(name="x", search={"space": {"lora.rank": {"choice": [8, 16]}}})
        >>> spec.pads_lora_rank(), spec.model_copy(update={"trial": TrialSpec(reuse_model=False)}).pads_lora_rank()
        (True, False)
        >>> SweepSpec(name="x").pads_lora_rank()  # the rank is not searched: nothing to pad to
        False
        """
        if self.lora.pad_rank == "auto":
            return self.trial.reuse_model and "lora.rank" in self.search.space
        return self.lora.pad_rank

    def vllm_memory_share(self) -> float:
        """vLLM's ``gpu_memory_utilization``: the spec's share of this trial's slice of the GPU, so
        trials packed on one card (``resources.gpu`` below 1) split its memory instead of each
        reserving the same share of the whole card."""
        gpu = self.resources.gpu
        return self.model.gpu_memory_utilization * (min(1.0, gpu) if isinstance(gpu, float) and gpu > 0 else 1.0)

    def max_grpo_rows(self) -> int:
        """The most completions one GRPO step scores: the largest grpo.batch_size (prompts) any
        trial can sample times the largest grpo.num_generations.

        >>> SweepSpec(name="x", search={"space": {"grpo.num_generations": {"choice": [4, 8]}}}).max_grpo_rows()
        8
        """
        return (self._largest("grpo.batch_size", self.grpo.batch_size)
                * self._largest("grpo.num_generations", self.grpo.num_generations))

    def max_grpo_steps(self) -> int:
        """The most GRPO steps any trial can run (early stopping's horizon)."""
        return self._largest("grpo.max_steps", self.grpo.max_steps)

    def baseline_point(self) -> dict[str, Any] | None:
        """The spec's own value at every search path, if each lies inside its domain."""
        data = self.model_dump(mode="python")
        point: dict[str, Any] = {}
        for path, dom in self.search.space.items():
            node, key = slot_of(data, path)
            value = node[key]
            if not in_domain(value, dom):
                return None
            point[path] = value
        return point

    def value_at(self, path: str) -> Any:
        """The value at a dotted spec path (``lora.rank``, ``rewards.<name>.weight``); SpecError if none."""
        node, key = slot_of(self.model_dump(mode="python"), path)
        return node[key]

    def reward_weights(self) -> dict[str, float]:
        return {r.name: r.weight for r in self.rewards}


def split_reward_path(path: str) -> tuple[str, str] | None:
    """``rewards.<name>.weight`` -> (name, 'weight'); reward names may contain dots and colons."""
    if path.startswith("rewards.") and path.count(".") >= 2:
        name, _, attr = path[len("rewards."):].rpartition(".")
        return name, attr
    return None


def slot_of(data: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The mapping and key that a dotted spec path names inside ``data`` (a dumped spec)."""
    reward = split_reward_path(path)
    if reward is not None:
        name, attr = reward
        matches = [r for r in data["rewards"] if r["name"] == name]
        if not matches or attr not in matches[0]:
            known = ", ".join(f"rewards.{r['name']}.weight" for r in data["rewards"])
            raise SpecError(f"no such reward field (known: {known})", field=path)
        return matches[0], attr
    node, keys = data, path.split(".")
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise SpecError(f"no such field '{'.'.join(keys[: i + 1])}'", field=path)
        if i < len(keys) - 1:
            node = node[key]
    return node, keys[-1]


