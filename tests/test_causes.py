"""A failed trial's cause in trials.json, status and the report: one line, no ANSI colour codes, the
location prefix said once (a SpecError rebuilt by Ray's unpickling repeats it). Issue #26."""

from grpo_ray.views.status import last_line

RAY_ERROR = """Failure # 1 (occurred at 2026-12-02_06-00-00)
\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=123, ip=10.0.0.1, actor_id=abc)
  File "/x/trial/run.py", line 120, in run_trial
    trial_spec = apply_overrides(spec, config)
grpo_ray.config.errors.SpecError: <spec>: <spec>: lora.rank: Input should be greater than 0 (got -8)
"""


def test_a_ray_traceback_becomes_one_clean_line():
    assert last_line(RAY_ERROR) == "grpo_ray.config.errors.SpecError: <spec>: lora.rank: Input should be greater than 0 (got -8)"
    assert last_line("x\n\x1b[31mRuntimeError: bad.yaml:3: bad.yaml:3: boom\x1b[0m\n") == "RuntimeError: bad.yaml:3: boom"
