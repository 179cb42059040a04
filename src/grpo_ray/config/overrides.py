"""A trial's configuration: the spec with the sampled search-space values applied at their dotted
paths, validated again, so a trial can never run a configuration the spec would have refused;
and the check, when the spec loads, that every value a domain can produce validates.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from grpo_ray.config.errors import SpecError, from_validation
from grpo_ray.config.search import check_domain, domain_values
from grpo_ray.config.spec import FIXED_PER_SWEEP, SweepSpec, slot_of


def check_space(spec: SweepSpec) -> None:
    """Every search path names a real spec field and every value its domain can produce validates
    there: each choice, and both ends of a range (the field's constraints are intervals, so the
    ends bound every value in between)."""
    for path, domain in spec.search.space.items():
        field = f"search.space.{path}"
        if path in FIXED_PER_SWEEP:
            raise SpecError(f"cannot be searched: {FIXED_PER_SWEEP[path]}; set {path} once for the sweep", field=field)
        try:
            check_domain(domain)
        except ValueError as e:
            raise SpecError(e.args[0], field=field) from None
        kind = next(iter(domain.model_dump(by_alias=True)))
        for value in domain_values(domain):
            try:
                apply_overrides(spec, {path: value})
            except SpecError as e:
                if e.field is None or e.field == path:  # a constraint of the field itself
                    msg = e.message
                else:  # another field's check that this value trips (e.g. lengths over max_seq_length)
                    msg = f"{e.field}: {e.message}"
                raise SpecError(f"{kind} value {value!r}: {msg}", field=field) from None


def apply_overrides(spec: SweepSpec, overrides: dict[str, Any]) -> SweepSpec:
    """Return a copy of ``spec`` with ``{dotted.path: value}`` applied (a trial's config)."""
    data = spec.model_dump(mode="python", by_alias=True)  # `int` domains dump as `int`, not `int_`
    for path, value in overrides.items():
        node, key = slot_of(data, path)
        node[key] = value
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise from_validation(e, None, None) from None


