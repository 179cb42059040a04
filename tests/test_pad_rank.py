"""lora.pad_rank: every trial's LoRA built at the search's largest rank, its own rank training in
the first rows of A and columns of B (trial/common.py adapter_rank, init_lora, resize_lora,
save_lora_adapter, load_lora_weights).

Real TRL SFT + GRPO trials of the smoke spec on the tiny Qwen3 (hf backend), run in this
process as Ray Tune runs them in an actor (tests/test_warm.py does the same for warm actors).
"""

import doctest
import json
import math

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from grpo_ray.config import spec as spec_module
from grpo_ray.config.load import load_spec, parse_spec
from grpo_ray.config.overrides import apply_overrides
from grpo_ray.config.search import Choice
from grpo_ray.config.training import RewardSpec
from grpo_ray.trial import warm
from grpo_ray.trial.common import ADAPTER, adapter_rank, peft_lora_alpha
from grpo_ray.trial.run import run_trial
from conftest import REPO

WIDTH = 16  # the largest rank of _spec()'s search: every padded trial's adapter is this wide
# What the rank-4 trials share; weight decay stays on (the smoke spec's 0.01): decay must keep zeros zero.
TRIAL = {"lora.rank": 4, "grpo.num_generations": 2, "rewards.check_answer.weight": 2.0, "lora.alpha": 12}
PADDED = {"lora.pad_rank": True}
UNPADDED = {"lora.pad_rank": False}  # the default (auto) pads _spec()'s trials: a warm actor, a searched rank
# Reported values that are per run (clocks) or say, by design, how the adapter was built.
TIMING = {"trial_started_at", "first_step_at", "reported_at", "startup_s", "load_s", "elapsed_s", "sft_seconds",
          "model_reused", "sft_setup_s", "eval_seconds", "grpo_setup_s", "grpo_step_s", "compile_s",
          "sft_compile_s", "compiled_graphs"}
HOW_BUILT = {"effective/lora.pad_rank", "lora_tensor_rank"}


def _spec():
    # test_trial's digit reward varies within a group, so GRPO has a gradient to follow.
    spec = load_spec(REPO / "sweeps" / "smoke.yaml")
    search = spec.search.model_copy(update={"space": spec.search.space | {"lora.rank": Choice(choice=[4, 8, WIDTH])}})
    return spec.model_copy(update={"search": search,
                                   "rewards": [*spec.rewards, RewardSpec(name="test_trial:digit_reward", weight=0.5)]})


def _lora_weights(model):
    """{name: Parameter} of the live model's LoRA A and B weights."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def _run(spec, config, fresh=True):
    """Run one trial; each report keeps (metrics, saved weights, saved config, the live adapter)."""
    reports = []

    def report(metrics, ckpt_dir):
        live = {n: p.detach().clone() for n, p in _lora_weights(warm._warm.backend.model).items()}
        reports.append((dict(metrics), load_file(f"{ckpt_dir}/adapter_model.safetensors"),
                        json.loads(open(f"{ckpt_dir}/adapter_config.json").read()), live))

    if fresh:
        warm.release()
    run_trial(config, spec, report=report)
    return reports


def _same_reports(got, want, exact_weights=True):
    assert [m["step"] for m, *_ in got] == [m["step"] for m, *_ in want]
    for (m_g, w_g, *_), (m_w, w_w, *_) in zip(got, want):
        for key in set(m_w) - TIMING - HOW_BUILT:
            a, b = m_g[key], m_w[key]
            assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (m_w["step"], key, a, b)
        assert set(w_g) == set(w_w)
        for k in w_w:
            assert w_g[k].shape == w_w[k].shape, k
            if exact_weights:
                assert (w_g[k] == w_w[k]).all(), f"step {m_w['step']}: {k} differs"


@pytest.fixture(scope="module")
def padded_and_unpadded(tiny_model_dir):
    spec = _spec()
    unpadded = _run(spec, TRIAL | UNPADDED)
    padded = _run(spec, TRIAL | PADDED)
    by_default = _run(spec, TRIAL)  # lora.pad_rank: auto, resolved on the trial's own spec
    warm.release()
    return unpadded, padded, by_default


def test_a_padded_adapter_is_the_searchs_largest_rank_wide_while_it_trains(padded_and_unpadded):
    unpadded, padded, _ = padded_and_unpadded
    for (m, _, _, live), width in [(padded[0], WIDTH), (unpadded[0], 4)]:
        assert live and all((p.shape[0] if ".lora_A." in n else p.shape[1]) == width for n, p in live.items())
        assert m["lora_tensor_rank"] == width
        assert m["effective/lora.rank"] == 4 and m["effective/lora.alpha"] == 12  # the trial's own, both ways
    assert padded[0][0]["effective/lora.pad_rank"] is True and unpadded[0][0]["effective/lora.pad_rank"] is False


def test_by_default_a_warm_trial_of_a_searched_rank_is_padded(padded_and_unpadded):
    """lora.pad_rank: auto resolves on the spec run_trial builds (the sweep's, sampled values
    applied), which keeps search.space: were it lost there, auto would resolve to no padding."""
    _, padded, by_default = padded_and_unpadded
    assert by_default[0][0]["effective/lora.pad_rank"] is True and by_default[0][0]["lora_tensor_rank"] == WIDTH
    _same_reports(by_default, padded)


def test_pad_rank_auto_pads_a_warm_actors_searched_rank():
    spec = _spec()
    assert spec.lora.pad_rank == "auto" and spec.trial.reuse_model and "lora.rank" in spec.search.space

    def pads(over, base=spec):
        return apply_overrides(base, over).pads_lora_rank()

    assert pads({}) and pads({"lora.rank": 4})  # a trial's spec: the sweep's with its sampled values
    assert not pads({"trial.reuse_model": False})  # a fresh process per trial: no shapes to keep
    unsearched = spec.model_copy(update={"search": spec.search.model_copy(update={"space": {}})})
    assert unsearched.max_lora_rank() == unsearched.lora.rank and not pads({}, unsearched)
    # Set, it wins either way
    assert pads(PADDED | {"trial.reuse_model": False}) and pads(PADDED, unsearched)
    assert not pads(UNPADDED) and not pads(UNPADDED | {"lora.rank": 4})
    assert doctest.testmod(spec_module).failed == 0


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("auto", "auto"), (None, "auto")])
def test_pad_rank_parses_from_yaml(text, value):
    spec = parse_spec("name: x\n" + (f"lora:\n  pad_rank: {text}\n" if text else ""))
    assert spec.lora.pad_rank == value and type(spec.lora.pad_rank) is type(value)  # true, not "true"


def test_the_padding_stays_exactly_zero_through_sft_and_grpo(padded_and_unpadded):
    """Zero B columns and zero A rows give the padding zero gradients, and AdamW (weight decay
    0.01 here) leaves a zero weight with a zero gradient at zero: checked, not assumed."""
    _, padded, _ = padded_and_unpadded
    for m, _, _, live in padded:  # after SFT and every GRPO report window
        for n, p in live.items():
            rest = p[4:] if ".lora_A." in n else p[:, 4:]
            assert rest.numel() and not rest.count_nonzero(), (m["step"], n)
    # The own part did train: the adapter moved between the first report and the last.
    first, last = padded[0][3], padded[-1][3]
    assert any(not torch.equal(first[n], last[n]) for n in first)


def test_a_padded_trial_is_the_unpadded_trial(padded_and_unpadded):
    """Same init (the first 4 rows of A drawn as for a rank-4 adapter), same scaling (alpha / 4,
    not alpha / 16): every report, metrics and saved weights, is the unpadded trial's. Exact on
    this CPU (the padding adds exact zeros); a GPU's kernels for other shapes may round apart."""
    unpadded, padded, _ = padded_and_unpadded
    _same_reports(padded, unpadded)
    # The comparison has teeth: training moved the adapter between reports.
    first, last = unpadded[0][1], unpadded[-1][1]
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_what_a_padded_trial_saves_is_its_own_rank_and_alpha(padded_and_unpadded):
    unpadded, padded, _ = padded_and_unpadded
    for (_, weights, config, live), (_, _, config_u, _) in zip(padded, unpadded):
        assert config["r"] == 4 and config["lora_alpha"] == 12 and config == config_u
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        assert shapes and all(s[0] == 4 for k, s in shapes.items() if ".lora_A." in k)
        assert all(s[1] == 4 for k, s in shapes.items() if ".lora_B." in k)
        # The saved adapter is the live one's own part (PEFT's keys drop the adapter's name).
        for n, p in live.items():
            key = n.replace(f".{ADAPTER}.", ".")
            assert torch.equal(weights[key], p[:4] if ".lora_A." in n else p[:, :4]), key


def test_a_warm_padded_actor_keeps_its_parameters_across_ranks(tiny_model_dir):
    """Trial A (rank 8), then trial B (rank 4), both padded, in one actor: the LoRA weights are
    the same Parameter objects (their shapes, all torch.compile guards on, do not change), and
    B's reports equal B's on a fresh padded actor."""
    spec = _spec()
    a = {"lora.rank": 8, "grpo.learning_rate": 5e-4, "grpo.num_generations": 4} | PADDED
    b = TRIAL | {"grpo.learning_rate": 2e-3, "grpo.temperature": 0.8} | PADDED
    _run(spec, a)
    model = warm._warm.backend.model
    before = {n: id(p) for n, p in _lora_weights(model).items()}
    reused = _run(spec, b, fresh=False)
    seen = {n: id(p) for n, p in _lora_weights(model).items()}
    assert reused[0][0]["model_reused"] == 1.0 and warm._warm.backend.model is model
    assert before and seen == before  # the same Parameter objects, not new ones of the same shape
    assert all(p.shape[0] == WIDTH for n, p in _lora_weights(model).items() if ".lora_A." in n)
    fresh = _run(spec, b)
    assert fresh[0][0]["model_reused"] == 0.0
    _same_reports(reused, fresh)
    warm.release()


def test_an_actor_switches_between_padded_and_unpadded_by_resizing(tiny_model_dir):
    """pad_rank is not in the warm cache key: a padded and an unpadded trial differ in the
    adapter's shape only, and the same PEFT wrapping is resized in place."""
    spec = _spec()
    model_dir = str(tiny_model_dir)
    assert warm.load_key(model_dir, spec) == warm.load_key(model_dir, apply_overrides(spec, PADDED))
    warm.release()
    backend, _ = warm.acquire(model_dir, apply_overrides(spec, {"lora.rank": 8} | UNPADDED))
    peft_model = backend.model
    again, reused = warm.acquire(model_dir, apply_overrides(spec, {"lora.rank": 4} | PADDED))
    assert reused and again.model is peft_model
    cfg = peft_model.peft_config[ADAPTER]
    assert (cfg.r, cfg.lora_alpha) == (WIDTH, 8 * WIDTH // 4)  # PEFT's (and vLLM's) lora_alpha / r = 8 / 4
    layer = next(m for m in peft_model.modules() if isinstance(m, LoraLayer))
    assert layer.scaling[ADAPTER] == 2.0 and layer.r[ADAPTER] == WIDTH
    ids = {n: id(p) for n, p in _lora_weights(peft_model).items()}
    again, reused = warm.acquire(model_dir, apply_overrides(spec, {"lora.rank": 8} | PADDED))
    assert reused and {n: id(p) for n, p in _lora_weights(peft_model).items()} == ids
    back, reused = warm.acquire(model_dir, apply_overrides(spec, {"lora.rank": 4} | UNPADDED))
    assert reused and back.model is peft_model and peft_model.peft_config[ADAPTER].r == 4
    warm.release()


def test_the_lora_alpha_peft_gets_keeps_the_trials_scaling():
    spec = _spec()

    def at(**over):
        return apply_overrides(spec, {f"lora.{k}": v for k, v in over.items()})

    assert adapter_rank(at(rank=4, pad_rank=False)) == 4 and peft_lora_alpha(at(rank=4, pad_rank=False)) == 8
    assert adapter_rank(at(rank=4, pad_rank=True)) == WIDTH
    assert peft_lora_alpha(at(rank=4, pad_rank=True)) == 32  # default alpha 2 x 4, at r 16: 2 x 16
    assert peft_lora_alpha(at(rank=4, alpha=12, pad_rank=True)) == 48
    odd = peft_lora_alpha(at(rank=3, alpha=10, pad_rank=True))  # 160 / 3: no int gives the scaling
    assert isinstance(odd, float) and math.isclose(odd / WIDTH, 10 / 3)
    # The search cannot sample past its largest rank; a spec rank above it is never cut down.
    assert adapter_rank(at(rank=32, pad_rank=True)) == 32


def test_padding_an_embeddings_lora_is_refused_by_name(tiny_model_dir):
    """PEFT initialises an embedding's LoRA the other way round (A zero, B drawn): its padded rows
    of A would train. The trial fails before any step, naming the setting, and says why auto
    padded; unpadded, the same targets build."""
    spec = apply_overrides(_spec(), {"lora.target_modules": ["embed_tokens", "q_proj"], "lora.rank": 4})
    warm.release()
    with pytest.raises(ValueError, match=r"lora\.pad_rank: the LoRA of a Embedding layer .* set lora\.pad_rank: "
                       r"false"):
        warm.acquire(str(tiny_model_dir), apply_overrides(spec, PADDED))
    warm.release()
    with pytest.raises(ValueError, match=r"auto pads: trial\.reuse_model is on .* set lora\.pad_rank: false"):
        warm.acquire(str(tiny_model_dir), spec)
    warm.release()
    backend, _ = warm.acquire(str(tiny_model_dir), apply_overrides(spec, UNPADDED))
    assert {m.r[ADAPTER] for m in backend.model.modules() if isinstance(m, LoraLayer)} == {4}
    warm.release()


def test_a_padding_that_moved_is_not_cut_away_silently(tiny_model_dir, tmp_path):
    spec = apply_overrides(_spec(), {"lora.rank": 4} | PADDED)
    warm.release()
    backend, _ = warm.acquire(str(tiny_model_dir), spec)
    backend.save_adapter(tmp_path / "ok")
    a = next(p for n, p in _lora_weights(backend.model).items() if ".lora_A." in n)
    with torch.no_grad():
        a[WIDTH - 1, 0] = 1.0
    with pytest.raises(RuntimeError, match="padding past rank 4 .* is not zero"):
        backend.save_adapter(tmp_path / "moved")
    warm.release()
