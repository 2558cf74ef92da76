"""Picks the runtime ``INFEROXY_RUNTIME`` names.

Each runtime lives in its own module, ``task_manager/runtimes/<kind>.py``, which exposes
``create_runtime(settings: Settings) -> Runtime``. Modules are imported only when chosen, so
a proxy that runs local processes never imports the Docker client.
"""

from __future__ import annotations

import importlib

from inferoxy.settings import Settings
from task_manager.runtimes.base import Runtime, RuntimeStartError

RUNTIME_MODULES: dict[str, str] = {
    "process": "task_manager.runtimes.process",
    "docker": "task_manager.runtimes.docker",
    "kubernetes": "task_manager.runtimes.kubernetes",
}


def make_runtime(settings: Settings) -> Runtime:
    module_name = RUNTIME_MODULES.get(settings.runtime)
    if module_name is None:
        raise RuntimeStartError(f"unknown runtime {settings.runtime!r}; choose one of {', '.join(RUNTIME_MODULES)}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the runtime exists but a library it needs is missing: say which
        raise RuntimeStartError(f"the {settings.runtime!r} runtime is not available in this build") from None
    runtime: Runtime = module.create_runtime(settings)
    return runtime
