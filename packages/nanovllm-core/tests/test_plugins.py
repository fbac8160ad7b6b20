"""Attention-backend selection, plugin loading and plugin options (nanovllm.plugins / attention / config)."""
import importlib.metadata
import logging
import sys
import uuid

import pluggy
import pytest
import torch

import nanovllm
from nanovllm import hookspecs, plugins
from nanovllm.attention_backend import AttentionBackend, recommended_package, select_backend
from nanovllm.config import Config
from nanovllm.platform import Platform

GiB = 2**30
SM75 = Platform("cuda", "Tesla T4", (7, 5), 15 * GiB)
SM80 = Platform("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB)
SM86 = Platform("cuda", "NVIDIA RTX A6000", (8, 6), 48 * GiB)
SM90 = Platform("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB)
MPS = Platform("mps", "Apple MPS")
CPU = Platform("cpu", "x86_64")


def backend(name, priority=0, device_types=("cuda",), **attrs) -> type[AttentionBackend]:
    return type(f"Fake_{name}", (AttentionBackend,), dict(name=name, priority=priority, device_types=device_types,
                                                          **attrs))


FA2 = backend("fa2", priority=30, min_capability=(8, 0))
FA1 = backend("fa1", priority=20, min_capability=(7, 5), max_capability=(7, 5))
# runs on CUDA too, but is only picked there when asked for by name
TORCH = backend("torch", priority=10, device_types=("cuda", "mps", "cpu"), default_device_types=("mps", "cpu"))
ALL = {"torch": TORCH, "fa1": FA1, "fa2": FA2}


def select(backends, platform, requested=None, dtype=torch.float16, head_dim=128, block_size=256):
    return select_backend(backends, platform, dtype, head_dim, block_size, requested)


@pytest.fixture(autouse=True)
def no_backend_env(monkeypatch):
    monkeypatch.delenv("NANOVLLM_ATTENTION_BACKEND", raising=False)


# ---------------------------------------------------------------- select_backend

@pytest.mark.parametrize("platform, expected", [(SM90, FA2), (SM86, FA2), (SM80, FA2), (SM75, FA1), (MPS, TORCH),
                                                (CPU, TORCH)])
def test_highest_priority_supported_backend_wins(platform, expected):
    cls, why = select(ALL, platform)
    assert cls is expected
    assert expected.name in why
    # the order of the dict does not matter
    cls, _ = select(dict(reversed(list(ALL.items()))), platform)
    assert cls is expected


def test_priority_decides_between_two_supported_backends():
    low = backend("low", priority=1)
    high = backend("high", priority=5)
    assert select({"low": low, "high": high}, SM90)[0] is high
    assert select({"high": high, "low": low}, SM90)[0] is high


def test_requested_by_argument():
    cls, why = select(ALL, SM90, requested="torch")
    assert cls is TORCH
    assert "asked for by name" in why


def test_requested_by_environment_variable(monkeypatch):
    monkeypatch.setenv("NANOVLLM_ATTENTION_BACKEND", "torch")
    assert select(ALL, SM90)[0] is TORCH
    # the argument beats the environment
    assert select(ALL, SM90, requested="fa2")[0] is FA2
    monkeypatch.setenv("NANOVLLM_ATTENTION_BACKEND", "")
    assert select(ALL, SM90)[0] is FA2


def test_default_device_types_backend_is_used_on_other_devices_only_by_name():
    only_torch = {"torch": TORCH}
    with pytest.raises(RuntimeError, match="only when asked for by name"):
        select(only_torch, SM90)
    assert select(only_torch, SM90, requested="torch")[0] is TORCH
    assert select(only_torch, CPU)[0] is TORCH


def test_max_capability_limits_unasked_use_only():
    only_fa1 = {"fa1": FA1}
    assert select(only_fa1, SM75)[0] is FA1
    with pytest.raises(RuntimeError, match="picked up to compute capability 7.5"):
        select(only_fa1, SM90)
    assert select(only_fa1, SM90, requested="fa1")[0] is FA1


def test_min_capability_applies_even_by_name():
    with pytest.raises(ValueError, match=r"'fa2' cannot run here: it needs compute capability 8.0 or newer"):
        select(ALL, SM75, requested="fa2")


def test_by_name_still_needs_the_device_type():
    with pytest.raises(ValueError, match=r"runs on cuda, not mps"):
        select(ALL, MPS, requested="fa2")


def test_unsupported_dtype_head_size_and_block_size_skip_a_backend():
    picky = backend("picky", priority=100, dtypes=(torch.bfloat16,), head_sizes=(64, 128), block_size_multiple=256)
    backends = {"picky": picky, "fa2": FA2}
    assert select(backends, SM90, dtype=torch.bfloat16, head_dim=128, block_size=512)[0] is picky
    assert select(backends, SM90, dtype=torch.float16, head_dim=128, block_size=512)[0] is FA2
    assert select(backends, SM90, dtype=torch.bfloat16, head_dim=96, block_size=512)[0] is FA2
    assert select(backends, SM90, dtype=torch.bfloat16, head_dim=128, block_size=16)[0] is FA2
    with pytest.raises(ValueError, match="supports dtypes bfloat16, not float16"):
        select(backends, SM90, requested="picky", dtype=torch.float16)


def test_unknown_requested_name_lists_installed_backends(monkeypatch):
    with pytest.raises(ValueError) as info:
        select(ALL, SM90, requested="flashinfer")
    message = str(info.value)
    assert "'flashinfer' is not installed" in message
    assert "['fa1', 'fa2', 'torch']" in message
    monkeypatch.setenv("NANOVLLM_ATTENTION_BACKEND", "nope")
    with pytest.raises(ValueError, match="'nope' is not installed"):
        select(ALL, SM90)
    with pytest.raises(ValueError, match="installed backends: none"):
        select({}, SM90, requested="fa2")


@pytest.mark.parametrize("platform, package", [(SM90, "nanovllm-attn-fa2"), (SM86, "nanovllm-attn-fa2"),
                                               (SM80, "nanovllm-attn-fa2"), (SM75, "nanovllm-attn-fa1"),
                                               (MPS, "nanovllm-attn-mps"), (CPU, "nanovllm-attn-mps")])
def test_nothing_fits_names_the_platform_and_the_package(platform, package):
    assert recommended_package(platform) == package
    cuda_only_old = backend("old", priority=1, min_capability=(9, 5))
    with pytest.raises(RuntimeError) as info:
        select({"old": cuda_only_old}, platform)
    message = str(info.value)
    assert platform.describe() in message
    assert f"Install {package}." in message
    assert "old " in message  # the rejected backend and its reason are listed
    with pytest.raises(RuntimeError, match="no backend is installed") as info:
        select({}, platform)
    assert package in str(info.value)


def test_platform_describe_names_the_gpu():
    assert SM90.describe() == "CUDA NVIDIA H100 80GB HBM3 (sm90, Hopper, 80 GiB)"
    assert SM75.describe() == "CUDA Tesla T4 (sm75, Turing, 15 GiB)"
    assert MPS.describe() == "MPS (Apple MPS)"
    assert CPU.describe() == "CPU (x86_64)"


# ---------------------------------------------------------------- plugin loading

@pytest.fixture
def isolated_plugins(monkeypatch, tmp_path):
    """A fresh plugin manager and fake entry points, so the real plugin state is untouched."""
    fresh = pluggy.PluginManager("nanovllm")
    fresh.add_hookspecs(hookspecs)
    monkeypatch.setattr(plugins, "pm", fresh)
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "load_failures", {})
    monkeypatch.delenv("NANOVLLM_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    suffix = uuid.uuid4().hex[:8]
    modules = {
        "broken": ("raise RuntimeError('boom from a broken plugin')\n"),
        "good": ("import nanovllm\n\n"
                 "@nanovllm.hookimpl\n"
                 "def register_options(register):\n"
                 "    register('good_option', 5, 'an option from the good plugin')\n"),
        "excluded": ("raise RuntimeError('the excluded plugin must not even be imported')\n"),
    }
    entry_points = []
    for name, source in modules.items():
        module_name = f"nanovllm_test_plugin_{name}_{suffix}"
        (tmp_path / f"{module_name}.py").write_text(source)
        entry_points.append(importlib.metadata.EntryPoint(name=name, value=module_name, group="nanovllm"))
    real_entry_points = importlib.metadata.entry_points

    def fake_entry_points(**params):
        if params.get("group") == "nanovllm":
            return entry_points
        return real_entry_points(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    yield SimpleState(fresh, suffix)
    for name in modules:
        sys.modules.pop(f"nanovllm_test_plugin_{name}_{suffix}", None)


class SimpleState:
    def __init__(self, pm, suffix):
        self.pm = pm
        self.suffix = suffix

    def module(self, name):
        return f"nanovllm_test_plugin_{name}_{self.suffix}"


def test_broken_plugin_is_logged_recorded_and_skipped(isolated_plugins, caplog):
    with caplog.at_level(logging.WARNING, logger="nanovllm.plugins"):
        plugins.load_plugins()
    assert set(plugins.load_failures) == {"broken", "excluded"}
    assert plugins.load_failures["broken"] == "RuntimeError: boom from a broken plugin"
    assert any("'broken'" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # the plugin after the broken one still loads
    good = isolated_plugins.pm.get_plugin("good")
    assert good is not None and good.__name__ == isolated_plugins.module("good")
    assert isolated_plugins.pm.get_plugin("broken") is None
    assert plugins.plugin_options()["good_option"].default == 5
    assert [row[0] for row in plugins.installed_plugins()] == ["good"]


def test_nanovllm_plugins_limits_which_plugins_load(isolated_plugins, monkeypatch):
    monkeypatch.setenv("NANOVLLM_PLUGINS", " good , broken")
    plugins.load_plugins()
    assert isolated_plugins.pm.get_plugin("good") is not None
    assert set(plugins.load_failures) == {"broken"}  # "excluded" was never imported
    assert isolated_plugins.module("excluded") not in sys.modules

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "pm", pluggy.PluginManager("nanovllm"))
    plugins.pm.add_hookspecs(hookspecs)
    monkeypatch.setattr(plugins, "load_failures", {})
    monkeypatch.setenv("NANOVLLM_PLUGINS", "excluded")
    plugins.load_plugins()
    assert plugins.pm.get_plugin("good") is None
    assert set(plugins.load_failures) == {"excluded"}
    core_options = {"offload_experts_per_layer", "offload_cache_gib", "kv_keep_first", "kv_keep_last"}
    assert set(plugins.plugin_options()) == core_options  # core's own only


def test_plugin_whose_registration_raises_is_logged_recorded_and_skipped(isolated_plugins, caplog):
    class RaisingPlugin:
        @nanovllm.hookimpl
        def register_options(self, register):
            register("half_registered", 1, "registered before the plugin raises: must not count")
            raise KeyError("no such setting")

    plugins.load_plugins()
    isolated_plugins.pm.register(RaisingPlugin(), name="raising")
    with caplog.at_level(logging.WARNING, logger="nanovllm.plugins"):
        options = plugins.plugin_options()
        plugins.plugin_options()  # logged once
    assert "good_option" in options and "half_registered" not in options
    assert plugins.load_failures["raising"] == "register_options raised KeyError: 'no such setting'"
    assert [r.getMessage() for r in caplog.records if "'raising'" in r.getMessage()] == [
        "plugin 'raising' is skipped: its register_options raised KeyError: 'no such setting'"]


def test_plugins_load_once(isolated_plugins):
    plugins.load_plugins()
    isolated_plugins.pm.unregister(name="good")
    plugins.load_plugins()  # already loaded: nothing happens again
    assert isolated_plugins.pm.get_plugin("good") is None


# ---------------------------------------------------------------- register_options and Config

class OptionPlugin:
    @nanovllm.hookimpl
    def register_options(self, register):
        register("my_option", 7, "an option registered by the test")


@pytest.fixture
def option_plugin():
    plugins.load_plugins()  # load the real plugins first, as the engine would
    name = "test-option-plugin"
    plugins.pm.register(OptionPlugin(), name=name)
    try:
        yield
    finally:
        plugins.pm.unregister(name=name)
    assert "my_option" not in plugins.plugin_options()


def test_plugin_option_reaches_config(option_plugin, tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    option = plugins.plugin_options()["my_option"]
    assert (option.default, option.help) == (7, "an option registered by the test")
    config = Config.from_options(path, my_option=3, max_num_seqs=4)
    assert config.plugin_options["my_option"] == 3
    assert config.max_num_seqs == 4
    assert Config.from_options(path).plugin_options["my_option"] == 7


def test_unknown_option_lists_known_ones_including_plugin_options(option_plugin, tiny_checkpoint):
    with pytest.raises(TypeError) as info:
        Config.from_options(tiny_checkpoint("qwen3"), my_optoin=3)
    message = str(info.value)
    assert "'my_optoin'" in message
    known = message.split("known options:")[1]
    assert "my_option" in known and "max_num_seqs" in known and "enable_prefix_caching" in known
    assert "hf_config" not in known and "plugin_options" not in known


class ShadowingPlugin:
    @nanovllm.hookimpl
    def register_options(self, register):
        register("max_num_seqs", 4, "a plugin option named like a core one")


class SecondOptionPlugin:
    @nanovllm.hookimpl
    def register_options(self, register):
        register("my_option", 8, "the same name from another plugin")


@pytest.mark.parametrize("plugin, message", [(ShadowingPlugin(), r"\['max_num_seqs'\] would shadow core options"),
                                             (SecondOptionPlugin(), "registered by two plugins")])
def test_clashing_plugin_options_are_refused(option_plugin, tiny_checkpoint, plugin, message):
    plugins.pm.register(plugin, name="clashing")
    try:
        with pytest.raises(ValueError, match=message):
            Config.from_options(tiny_checkpoint("qwen3"), max_num_seqs=4)
    finally:
        plugins.pm.unregister(name="clashing")


def test_empty_default_device_types_means_only_by_name():
    class NamedOnly(TORCH):
        name = "named-only"
        default_device_types = ()
    with pytest.raises(RuntimeError, match="only when asked for by name"):
        select({"named-only": NamedOnly}, CPU)
    assert select({"named-only": NamedOnly}, CPU, requested="named-only")[0] is NamedOnly
