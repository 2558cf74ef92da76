"""Reading models.yaml, the file that seeds the registry.

Two shapes are accepted. Inferoxy's own: a ``models`` mapping (or list) of specs, each
with the fields of ``ModelSpec``. And the older Inferoxy style, a top-level mapping of
model name to ``address`` / ``batch_size`` / ``stateless`` / ``run_on_gpu``, which is
translated field by field so existing files keep working.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from inferoxy.settings import Settings
from model_manager.spec import ModelSpec

log = logging.getLogger(__name__)

_LEGACY_FIELDS = {"address": "image", "batch_size": "max_batch_size", "run_on_gpu": "run_on_gpu"}


class ModelsFileError(ValueError):
    pass


def models_file_to_seed(settings: Settings) -> Path | None:
    """The models file to seed the registry from, or None for none.

    A file the operator named (``INFEROXY_MODELS_FILE``, ``--models``, the config file; the proxy image names
    /etc/inferoxy/models.yaml) must exist: a forgotten mount or a typo would otherwise start a proxy that
    serves nothing. Only the default, ``models.yaml`` in the working directory, may be absent.
    """
    if not settings.models_file:
        return None
    path = Path(settings.models_file)
    if path.is_file():
        return path
    if "models_file" in settings.model_fields_set:
        raise ModelsFileError(
            f"the models file {path.absolute()} (INFEROXY_MODELS_FILE) does not exist; create or mount it, or set "
            "INFEROXY_MODELS_FILE= (empty) to start with only what Redis holds"
        )
    log.info("no %s in %s; the registry starts with what Redis holds", path, Path.cwd())
    return None


def load_models_file(path: str | Path) -> list[ModelSpec]:
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelsFileError(f"cannot read {path}: {exc}") from None
    return parse_models(document, source=str(path))


def parse_models(document: Any, source: str = "models file") -> list[ModelSpec]:
    if document is None:
        return []
    if not isinstance(document, dict):
        raise ModelsFileError(f"{source}: expected a mapping at the top level")
    entries = document.get("models", document)
    if isinstance(entries, dict):
        items = [{**_fields(body, name, source), "name": body.get("name", name) if isinstance(body, dict)
                  else name} for name, body in entries.items()]
    elif isinstance(entries, list):
        items = [_fields(body, f"#{i}", source) for i, body in enumerate(entries)]
    else:
        raise ModelsFileError(f"{source}: 'models' must be a mapping of name to spec, or a list of specs")
    specs = []
    for item in items:
        try:
            specs.append(ModelSpec.model_validate(item))
        except ValidationError as exc:
            raise ModelsFileError(f"{source}: model {item.get('name')!r}: {exc}") from None
    return specs


def _fields(body: Any, name: str, source: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ModelsFileError(f"{source}: model {name!r} must be a mapping of fields")
    if not any(key in body for key in ("address", "stateless", "batch_size")):
        return dict(body)
    fields = {new: body[old] for old, new in _LEGACY_FIELDS.items() if old in body}
    if "stateless" in body:
        fields["stateful"] = not body["stateless"]
    return fields | {k: v for k, v in body.items() if k not in {*_LEGACY_FIELDS, "stateless"}}
