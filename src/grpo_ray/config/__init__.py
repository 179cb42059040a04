"""The sweep spec: the YAML a user writes, validated with pydantic. The single source of truth.

* ``sections.py``, ``training.py``, ``search.py``: the sections, each field with its default (the
  defaults follow Unsloth's GRPO tutorial) and a description; unknown keys are errors;
* ``spec.py``: :class:`~grpo_ray.config.spec.SweepSpec`, the whole spec, and the dotted paths
  (``lora.rank``, ``grpo.temperature``, ``rewards.check_answer.weight``) that name its fields;
* ``overrides.py``: a trial's configuration, the spec with the sampled values applied at their
  dotted paths and validated again, so a trial can never run a configuration the spec would
  have refused;
* ``load.py``: YAML in and out; ``errors.py``: :class:`~grpo_ray.config.errors.SpecError`, which
  names the file, the line and the field.

This package must not import torch, ray or trl, nor any other grpo_ray package (but
``grpo_ray.errors``): ``grpo-ray validate`` answers in well under a second.
"""
