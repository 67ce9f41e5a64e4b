"""Discovery and construction of experts through Python entry points.

An expert package declares, in its pyproject.toml,
    [project.entry-points."lamina.experts"]
    my_expert = "my_package.module:create"
where `create(config: dict) -> Expert`. The built-ins (`ocr`, `detection`, `caption`) are registered the same
way by this project's pyproject. The entry-point name is the expert's name in settings and requests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from experts.base import Expert, UnknownExpertError
from experts.run import ExpertRunner, Observer, QueueObserver

GROUP = "lamina.experts"
BUILTINS = ("ocr", "detection", "caption")
RUNNER_KEYS = ("timeout",)  # per-expert keys the runner consumes; the rest goes to the expert's factory

log = logging.getLogger(__name__)

ExpertFactory = Callable[[dict[str, Any]], Expert]


def available_experts() -> dict[str, EntryPoint]:
    """Installed experts by name (first registration wins; a duplicate name is logged)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            log.warning("expert %r is registered twice (%s and %s); using the first", ep.name,
                        found[ep.name].value, ep.value)
            continue
        found.setdefault(ep.name, ep)
    return found


def load_factory(name: str) -> ExpertFactory:
    installed = available_experts()
    if name not in installed:
        hint = " (the built-ins register when this project is installed: `pip install -e .`)" \
            if name in BUILTINS else ""
        raise UnknownExpertError(
            f"no expert named {name!r} is installed{hint}; installed: {sorted(installed) or 'none'}. "
            f"Experts register under the {GROUP!r} entry-point group."
        )
    factory = installed[name].load()
    if not callable(factory):
        raise TypeError(f"entry point {installed[name].value!r} for expert {name!r} is not callable")
    return factory


def create_expert(name: str, config: Mapping[str, Any] | None = None) -> Expert:
    """Build one installed expert from its config dict."""
    expert = load_factory(name)(dict(config or {}))
    if not isinstance(expert, Expert):
        raise TypeError(f"factory for expert {name!r} returned {type(expert).__name__}, which lacks name/run")
    if expert.name != name:
        raise ValueError(f"expert registered as {name!r} calls itself {expert.name!r}; the names must match")
    return expert


def create_experts(names: Sequence[str], config: Mapping[str, Mapping[str, Any]] | None = None) -> list[Expert]:
    """Build the named experts; `config` maps expert name -> its config dict (runner keys removed)."""
    config = config or {}
    if unknown := set(config) - set(names):
        log.info("config given for experts that are not enabled: %s", sorted(unknown))
    built = []
    for name in dict.fromkeys(names):
        cfg = {k: v for k, v in (config.get(name) or {}).items() if k not in RUNNER_KEYS}
        built.append(create_expert(name, cfg))
    return built


def create_runner(
    enabled: Sequence[str],
    config: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    default: Sequence[str] | None = None,
    timeout: float = 10.0,
    total_budget: float = 20.0,
    cache_size: int = 256,
    observer: Observer | None = None,
    workers: int = 1,
    queue_observer: QueueObserver | None = None,
) -> ExpertRunner:
    """What the server calls at startup: build the enabled experts and the runner that schedules them.

    `config[name]["timeout"]` overrides `timeout` for one expert; `default` is the set a request gets when
    it does not name experts (all enabled ones if None).
    """
    config = config or {}
    experts = create_experts(enabled, config)
    timeouts = {name: float(cfg["timeout"]) for name, cfg in config.items() if cfg and "timeout" in cfg}
    return ExpertRunner(experts, timeout=timeout, timeouts=timeouts, total_budget=total_budget,
                        cache_size=cache_size, default=default, observer=observer, workers_per_expert=workers,
                        queue_observer=queue_observer)
