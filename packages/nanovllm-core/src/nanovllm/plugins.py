"""Find and load plugins: installed packages with entry points in the group ``nanovllm``."""
import importlib.metadata
import logging
import os
from dataclasses import dataclass

import pluggy

from nanovllm import hookspecs

logger = logging.getLogger(__name__)

pm = pluggy.PluginManager("nanovllm")
pm.add_hookspecs(hookspecs)

# Entry points that failed to load, name -> reason, for `nanovllm info`.
load_failures: dict[str, str] = {}
_loaded = False


def load_plugins():
    """Load every installed plugin once; NANOVLLM_PLUGINS (comma list) limits which ones."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from nanovllm import experts  # core's own expert managers, registered like any plugin's
    pm.register(experts, name="nanovllm.experts")
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
    load_plugins()
    items = []
    getattr(pm.hook, hook_name)(register=lambda *args: items.append(args))
    return items


def attention_backends() -> dict[str, type]:
    return {cls.name: cls for (cls,) in _collect("register_attention_backends")}


def expert_managers() -> dict[str, type]:
    return {cls.name: cls for (cls,) in _collect("register_expert_managers")}


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
