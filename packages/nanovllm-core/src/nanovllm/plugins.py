"""Find and load plugins, core's defaults first, then installed packages with entry points in the group
``nanovllm``; collect what they register; and choose among candidates, the same way for every kind."""
import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import pluggy

from nanovllm import hookspecs

logger = logging.getLogger(__name__)

# Core's own implementations, registered through the hooks like any plugin's.
DEFAULT_PLUGINS = ("nanovllm.default_plugins.expert_managers", "nanovllm.default_plugins.kv_retention")

pm = pluggy.PluginManager("nanovllm")
pm.add_hookspecs(hookspecs)

# Plugins that failed to load or to register, name -> reason, for `nanovllm info`.
load_failures: dict[str, str] = {}
_loaded = False


def load_plugins():
    """Load the default plugins and every installed plugin, once; NANOVLLM_PLUGINS (comma list) limits
    which installed ones load."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    allowed = os.environ.get("NANOVLLM_PLUGINS")
    allowed = None if allowed is None else {name.strip() for name in allowed.split(",") if name.strip()}
    for entry_point in importlib.metadata.entry_points(group="nanovllm"):
        if allowed is not None and entry_point.name not in allowed:
            continue
        try:
            module = entry_point.load()
        except Exception as exc:  # a broken plugin must not take the others down
            load_failures[entry_point.name] = f"{type(exc).__name__}: {exc}"
            logger.warning("plugin %r failed to load and is skipped: %s", entry_point.name, exc)
            continue
        if pm.get_plugin(entry_point.name) is None:
            pm.register(module, name=entry_point.name)


def _collect(hook_name: str) -> list[tuple]:
    """What the plugins register, in the order they were loaded (core's defaults first): equal priorities
    go to the earlier one."""
    load_plugins()
    items = []
    for hookimpl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order (pluggy calls LIFO)
        registered = []
        try:
            hookimpl.function(register=lambda *args: registered.append(args))
        except Exception as exc:  # as for a plugin that fails to import: skip it, keep the others
            failure = f"{hook_name} raised {type(exc).__name__}: {exc}"
            if load_failures.get(hookimpl.plugin_name) != failure:
                load_failures[hookimpl.plugin_name] = failure
                logger.warning("plugin %r is skipped: its %s", hookimpl.plugin_name, failure)
            continue
        items += registered
    return items


def attention_backends() -> dict[str, type]:
    return {cls.name: cls for (cls,) in _collect("register_attention_backends")}


def expert_managers() -> dict[str, type]:
    return {cls.name: cls for (cls,) in _collect("register_expert_managers")}


def kv_retention_policies() -> dict[str, type]:
    return {cls.name: cls for (cls,) in _collect("register_kv_retention_policies")}


def model_classes() -> dict[str, type]:
    return dict(_collect("register_models"))


@dataclass(frozen=True)
class PluginOption:
    name: str
    default: object
    help: str


def plugin_options() -> dict[str, PluginOption]:
    options = {}
    for name, default, help in _collect("register_options"):
        if name in options:
            raise ValueError(f"option {name!r} is registered by two plugins; one of them must rename it")
        options[name] = PluginOption(name, default, help)
    return options


def installed_plugins() -> list[tuple[str, str, str]]:
    """(entry point name, distribution, version) of each loaded plugin."""
    load_plugins()
    rows = []
    for entry_point in importlib.metadata.entry_points(group="nanovllm"):
        if pm.get_plugin(entry_point.name) is not None:
            dist = entry_point.dist
            rows.append((entry_point.name, dist.name if dist else "?", dist.version if dist else "?"))
    return rows


def choose(candidates: dict[str, type], unsupported_reason: Callable[[type, bool], str | None],
           requested: str | None, option: str, kind: str, setting: str) -> tuple[type, str]:
    """The candidate named ``requested``, else the supported one with the highest ``priority``; and why.

    ``unsupported_reason(cls, by_name)`` is None when ``cls`` can serve ``setting``, else why not.
    ``option`` is the ``LLM()`` keyword that names one; ``kind`` says what they are ("backend").
    """
    kinds = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
    if requested:
        if requested not in candidates:
            raise ValueError(f"{option}={requested!r} is not installed; installed {kinds}: "
                             f"{sorted(candidates) or 'none'}. Install the plugin that provides it.")
        reason = unsupported_reason(candidates[requested], True)
        if reason:
            raise ValueError(f"{option}={requested!r} cannot run here: it {reason} ({setting})")
        return candidates[requested], f"{requested} was asked for by name"
    rejected = {}
    for name, cls in sorted(candidates.items(), key=lambda item: -item[1].priority):
        reason = unsupported_reason(cls, False)
        if reason is None:
            return cls, f"{name} is the highest-priority installed {kind} that supports {setting}"
        rejected[name] = reason
    details = "; ".join(f"{name} {reason}" for name, reason in rejected.items()) or f"no {kind} is installed"
    raise RuntimeError(f"no {kind} supports {setting} ({details})")
