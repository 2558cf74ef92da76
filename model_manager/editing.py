"""Changing a spec safely: JSON merge patches and ``field=value`` assignments, validated before anything is stored.

A patch that does not validate raises ``SpecError`` listing each offending field and the
reason, so the admin API and the CLI can say exactly what is wrong and store nothing.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from model_manager.spec import ModelSpec


class SpecError(ValueError):
    """A spec or patch that does not validate; ``fields`` holds ``{"field", "reason"}`` per problem."""

    def __init__(self, message: str, fields: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.fields = fields


def validate_spec(document: Any) -> ModelSpec:
    """A ``ModelSpec`` from untrusted JSON-like data, or SpecError naming the fields at fault."""
    if not isinstance(document, dict):
        raise SpecError("a model spec must be a JSON object", [{"field": "", "reason": "not an object"}])
    try:
        return ModelSpec.model_validate(document)
    except ValidationError as exc:
        fields = [_problem(error) for error in exc.errors()]
        summary = "; ".join(f"{f['field'] or 'spec'}: {f['reason']}" for f in fields)
        raise SpecError(f"invalid model spec: {summary}", fields) from None


def check_runnable(spec: ModelSpec, runtime: str) -> ModelSpec:
    """``spec``, or SpecError when the proxy's runtime could never start it.

    The docker and kubernetes runtimes start replicas from images only, so a spec without one would be stored
    and then fail at every start; the process runtime runs ``command`` or ``model_class`` and needs no image.
    """
    if runtime in ("docker", "kubernetes") and not spec.image:
        raise SpecError(f"model {spec.key} has no image, and this proxy runs replicas as containers "
                        f"(INFEROXY_RUNTIME={runtime}), which start from an image",
                        [{"field": "image", "reason": f"required by the {runtime} runtime"}])
    return spec


def apply_patch(spec: ModelSpec, patch: Any) -> ModelSpec:
    """``spec`` with a JSON merge patch (RFC 7386) applied: objects merge, ``null`` resets a field.

    ``name`` and ``version`` name the spec being changed, so a patch may not change them.
    """
    if not isinstance(patch, dict):
        raise SpecError("a patch must be a JSON object", [{"field": "", "reason": "not an object"}])
    for field in ("name", "version"):
        if field in patch and patch[field] != getattr(spec, field):
            raise SpecError(f"a patch cannot change {field}; create a new model or version instead",
                            [{"field": field, "reason": "cannot be changed by a patch"}])
    merged = _merge(spec.model_dump(exclude_unset=False, mode="json"), patch)
    return validate_spec(merged)


def assignments_to_patch(assignments: list[str]) -> dict[str, Any]:
    """``["max_batch_size=16", "env.MODE=fast", "command=[python, -m, x]"]`` as a merge patch.

    Values are read as YAML, so numbers, booleans, lists and ``null`` come out typed; a dotted
    field sets a key inside a mapping field (``env``, ``resources``).
    """
    patch: dict[str, Any] = {}
    for assignment in assignments:
        field, sep, raw = assignment.partition("=")
        if not sep or not field.strip():
            raise SpecError(f"{assignment!r} is not field=value", [{"field": assignment, "reason": "not field=value"}])
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problem = [{"field": field, "reason": "unreadable value"}]
            raise SpecError(f"{field}: cannot read {raw!r}: {exc}", problem) from None
        target = patch
        *parents, leaf = field.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise SpecError(f"{field}: {parent} is set as a value and a mapping",
                                [{"field": field, "reason": "conflicting assignments"}])
        # env values are strings; YAML would turn "1" into 1, which the spec then refuses.
        target[leaf] = str(value) if parents[:1] == ["env"] and value is not None else value
    return patch


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _problem(error: Any) -> dict[str, str]:
    location = ".".join(str(part) for part in error.get("loc", ()))
    return {"field": location, "reason": str(error.get("msg", "invalid"))}
