"""A third-party plugin, built and installed outside the workspace, is found through its entry point.

The example package lives in tmp_path and is installed with ``--target`` into tmp_path/site; only
subprocesses with that folder on PYTHONPATH see it, so the workspace venv is left as it was.
"""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest

DIST, VERSION, ENTRY_POINT, MODULE = "nanovllm-example-plugin", "0.3.1", "example", "nanovllm_example_plugin"

PYPROJECT = f"""\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{DIST}"
version = "{VERSION}"
description = "An example nanovllm plugin: an attention backend and an LLM() option."
requires-python = ">=3.10"
dependencies = ["nanovllm-core>=0.1,<0.2", "nanovllm-attn-mps>=0.1,<0.2"]

[project.entry-points.nanovllm]
{ENTRY_POINT} = "{MODULE}"

[tool.setuptools.packages.find]
where = ["src"]
"""

PLUGIN = '''\
"""The pure-PyTorch backend under another name, counting its calls; and one LLM() option."""
import nanovllm
from nanovllm_attn_mps import TorchPagedAttention

calls = {"forward": 0, "decode": 0, "option_seen": None}


class ExampleAttention(TorchPagedAttention):
    name = "example"
    priority = 5  # below "mps" (10): on CPU and MPS it is used only when asked for by name

    def __init__(self, *args):
        super().__init__(*args)
        calls["option_seen"] = self.config.plugin_options["example_option"]  # options reach the backend

    def forward(self, q, k, v, kv_cache, context):
        calls["forward"] += 1
        calls["decode"] += context.is_decode  # decode steps read earlier tokens from the paged cache
        return super().forward(q, k, v, kv_cache, context)


@nanovllm.hookimpl
def register_attention_backends(register):
    register(ExampleAttention)


@nanovllm.hookimpl
def register_options(register):
    register("example_option", "unset", "a value the example plugin keeps in config.plugin_options")
'''

# Runs in a subprocess with the plugin on PYTHONPATH; prints one JSON line.
DRIVER = '''\
import contextlib, io, json, sys
from nanovllm import LLM, SamplingParams, plugins
from nanovllm.cli import main

path, mode = sys.argv[1:]
options = dict(max_model_len=64, max_num_seqs=2, max_num_batched_tokens=64, kvcache_block_size=16)
params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
prompts = [list(range(3, 23)), [7, 8, 9]]  # 20 tokens span two 16-token blocks
result = {"plugins": plugins.installed_plugins()}


def run(**extra):
    llm = LLM(path, **options, **extra)
    backend = llm.model_runner.attention_layers[0].backend
    tokens = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    row = {"backend": [type(backend).__module__, type(backend).name], "tokens": tokens,
           "plugin_options": llm.config.plugin_options}
    llm.exit()
    return row


if mode == "use":
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result["info_rc"] = main(["info"])
    result["info"] = out.getvalue()
    import nanovllm_example_plugin as example
    result["reference"] = run(attention_backend="mps")  # named, so it runs on CUDA too
    result["calls_after_reference"] = dict(example.calls)
    result["example"] = run(attention_backend="example", example_option="from the test")
    result["calls_after_example"] = dict(example.calls)
else:  # the plugin is installed but NANOVLLM_PLUGINS leaves it out
    for key, extra in [("by_name", dict(attention_backend="example")), ("option", dict(example_option=1))]:
        try:
            LLM(path, **options, **extra)
            result[key] = "no error"
        except (ValueError, TypeError) as exc:
            result[key] = f"{type(exc).__name__}: {exc}"
print(json.dumps(result))
'''


def install_command(plugin_dir, site) -> list[str]:
    """pip where the venv has it (e.g. the GPU machine), else uv's pip (a uv venv has no pip); offline."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        return [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                "--target", str(site), str(plugin_dir)]
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("neither pip nor uv is available to install the example plugin")
    return [uv, "pip", "install", "--python", sys.executable, "--no-deps", "--no-build-isolation", "--no-index",
            "--offline", "--no-cache", "--target", str(site), str(plugin_dir)]


def start_driver(tmp_path, path, mode, **env) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items()
           if key not in ("NANOVLLM_PLUGINS", "NANOVLLM_ATTENTION_BACKEND")} | env
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site")] + ([os.environ["PYTHONPATH"]]
                                                                     if os.environ.get("PYTHONPATH") else []))
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), path, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def result_of(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_third_party_plugin_is_discovered_and_used(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    plugin_dir = tmp_path / "nanovllm-example-plugin"
    (plugin_dir / "src" / MODULE).mkdir(parents=True)
    (plugin_dir / "pyproject.toml").write_text(PYPROJECT)
    (plugin_dir / "src" / MODULE / "__init__.py").write_text(PLUGIN)
    (tmp_path / "driver.py").write_text(DRIVER)
    site = tmp_path / "site"
    install = subprocess.run(install_command(plugin_dir, site), capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    assert (site / MODULE / "__init__.py").is_file()

    # Two fresh processes, run side by side (importing torch dominates): one with every plugin, one without
    # the example. NANOVLLM_PLUGINS is read once per process, so each case needs its own.
    processes = [start_driver(tmp_path, path, "use"),
                 start_driver(tmp_path, path, "exclude", NANOVLLM_PLUGINS="models,attn_mps")]
    try:
        used, excluded = [result_of(process) for process in processes]
    finally:
        for process in processes:
            process.kill()
    # `nanovllm info` and installed_plugins() show it with its distribution and version
    assert [ENTRY_POINT, DIST, VERSION] in used["plugins"]
    assert {"models", "attn_mps"} <= {row[0] for row in used["plugins"]}
    assert used["info_rc"] == 0
    assert f"  {ENTRY_POINT}: {DIST} {VERSION}" in used["info"].splitlines()
    assert any(line.startswith("  example (priority 5): ") for line in used["info"].splitlines())
    assert "Chosen: example" not in used["info"]  # priority 5: unasked, a higher-priority backend wins
    # the counter moves only when the example backend runs, and the option has its default
    assert used["reference"]["backend"] == ["nanovllm_attn_mps", "mps"]
    assert used["calls_after_reference"] == {"forward": 0, "decode": 0, "option_seen": None}
    assert used["reference"]["plugin_options"]["example_option"] == "unset"
    # asked for by name, the engine builds the plugin's class and runs it, decode steps included
    assert used["example"]["backend"] == [MODULE, "example"]
    calls = used["calls_after_example"]
    assert calls["forward"] > 0 and calls["decode"] > 0, calls
    assert calls["option_seen"] == "from the test"  # the backend got the engine's Config
    assert used["example"]["plugin_options"]["example_option"] == "from the test"
    # it is the same arithmetic as the backend it subclasses, so greedy tokens agree
    assert all(len(tokens) == 6 for tokens in used["example"]["tokens"])
    assert used["example"]["tokens"] == used["reference"]["tokens"]

    assert ENTRY_POINT not in {row[0] for row in excluded["plugins"]}
    assert excluded["by_name"].startswith("ValueError: attention_backend='example' is not installed"), excluded
    assert "'mps'" in excluded["by_name"]
    assert excluded["option"].startswith("TypeError: unknown option(s) 'example_option'"), excluded

    # nothing was installed into the environment running the tests
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution(DIST)
    assert ENTRY_POINT not in {ep.name for ep in importlib.metadata.entry_points(group="nanovllm")}
