"""The nanovllm command: generate, info and bench, and its errors."""
import argparse
import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanovllm.cli import main


def test_generate_prints_each_prompt(tiny_checkpoint, capsys):
    path = tiny_checkpoint("qwen3")
    assert main(["generate", path, "Hello", "The quick", "--max-tokens", "3", "--max-model-len", "64",
                 "--max-num-seqs", "4", "--max-num-batched-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "Prompt: 'Hello'" in out and "Prompt: 'The quick'" in out and out.count("Output: ") == 2


def test_generate_with_chat_template(tiny_checkpoint, capsys):
    path = tiny_checkpoint("qwen3")
    assert main(["generate", path, "Hi", "--chat", "--max-tokens", "2", "--temperature", "0.8", "--seed", "3",
                 "--max-model-len", "64", "--max-num-seqs", "4", "--max-num-batched-tokens", "64"]) == 0
    assert "Output: " in capsys.readouterr().out


def test_bad_argument_is_an_error_message(tiny_checkpoint, capsys):
    assert main(["generate", tiny_checkpoint("qwen3"), "Hi", "--temperature", "-1"]) == 1
    assert "temperature=-1.0 is negative" in capsys.readouterr().err


def test_info_names_platform_plugins_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "Platform: CPU" in out
    assert "nanovllm-models" in out and "nanovllm-attn-mps" in out
    assert "Chosen: mps" in out


def test_bench_on_a_given_checkpoint(tiny_checkpoint, capsys):
    path = tiny_checkpoint("qwen3")
    assert main(["bench", "--model", path, "--num-seqs", "4", "--input-len", "8", "16", "--output-len", "4", "8",
                 "--max-model-len", "64", "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--repeats", "2",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert "Workload: 4 sequences, prompts of 8..16 and outputs of 4..8 tokens" in out
    assert "Device: CPU" in out and "(median of 2: " in out and "bench runs" in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["num_seqs"] == 4 and result["input_len"] == [8, 16] and result["repeats"] == 2
    assert result["engine_options"] == dict(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64)
    assert len(result["seconds"]) == 2 and result["median_seconds"] == sum(result["seconds"]) / 2
    from nanovllm.cli.bench import make_workload
    assert result["output_tokens"] == sum(p.max_tokens for p in make_workload(4, (8, 16), (4, 8), 0, 511)[1])


def test_console_script_bench_makes_its_own_checkpoint():
    """`nanovllm bench` with no model writes random weights locally: nothing is downloaded."""
    script = os.path.join(os.path.dirname(sys.executable), "nanovllm")
    result = subprocess.run([script, "bench", "--num-seqs", "2", "--input-len", "8", "16", "--output-len", "4", "8"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "Total: " in result.stdout and "tok/s" in result.stdout


@pytest.mark.parametrize("argv, says", [
    (["--num-seqs", "0"], "--num-seqs: 0 is below 1"),
    (["--num-seqs", "-3"], "--num-seqs: -3 is below 1"),
    (["--input-len", "0", "8"], "--input-len: 0 is below 1"),
])
def test_bench_refuses_an_empty_workload(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_bench_refuses_an_inverted_range(capsys):
    assert main(["bench", "--output-len", "9", "4"]) == 1
    assert capsys.readouterr().err == "error: --output-len 9 4: MIN is above MAX\n"


def test_library_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    """Every error the library raises on bad input is one line on stderr, never a traceback."""
    good = tiny_checkpoint("qwen3")
    no_config = tmp_path / "no-config"
    shutil.copytree(good, no_config)
    (no_config / "config.json").unlink()
    cases = [(["generate", str(tmp_path / "absent"), "Hi"], "does not exist"),
             (["generate", str(no_config), "Hi"], "has no config.json"),
             (["generate", good, "Hi", "--tensor-parallel-size", "3"], "does not divide"),
             (["generate", good, "Hi", "--dtype", "int3"], "dtype='int3'")]
    for argv, says in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err


LOGGING_APP = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, format="APP %(name)s: %(message)s")
from nanovllm import LLM, SamplingParams
llm = LLM(sys.argv[1], kvcache_block_size=8, max_num_batched_tokens=16, max_num_seqs=4)
llm.generate([[1] * 40], SamplingParams(max_tokens=2), use_tqdm=False)
"""


@pytest.mark.parametrize("env, shows, hides", [
    ({}, ["INFO nanovllm.engine.model_runner: KV cache:"], ["APP nanovllm", "admitting"]),
    ({"NANOVLLM_LOG_LEVEL": "DEBUG"}, ["DEBUG nanovllm.engine.scheduler: admitting sequence",
                                       "prefill chunk of 16 tokens from 16 of 40"], ["APP nanovllm"]),
    ({"NANOVLLM_CONFIGURE_LOGGING": "0"}, ["APP nanovllm.engine.model_runner: KV cache:", "APP nanovllm.engine."
                                           "scheduler: admitting"], ["INFO nanovllm"]),
])
def test_logging_once_under_an_application_that_configures_it(tiny_checkpoint, tmp_path, env, shows, hides):
    (tmp_path / "app.py").write_text(LOGGING_APP)
    result = subprocess.run([sys.executable, str(tmp_path / "app.py"), tiny_checkpoint("qwen3")], capture_output=True,
                            text=True, timeout=120, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    for text in shows:
        assert text in result.stderr, result.stderr
    for text in hides:
        assert text not in result.stderr, result.stderr
    kv_lines = [line for line in result.stderr.splitlines() if "KV cache:" in line]
    assert len(kv_lines) == 1, kv_lines


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"nanovllm {importlib.metadata.version('nanovllm-core')}\n"


def test_every_engine_and_plugin_option_is_a_flag_with_help():
    from nanovllm import plugins
    from nanovllm.cli import _add_engine_options, _engine_options
    from nanovllm.config import engine_options
    parser = argparse.ArgumentParser()
    _add_engine_options(parser)
    names = [o.name for o in engine_options()] + list(plugins.plugin_options())
    flags = {action.dest: action for action in parser._actions if action.dest != "help"}
    assert set(names) == set(flags) and all(flags[name].help for name in names)
    args = parser.parse_args(["--max-model-len", "64", "--no-enable-prefix-caching", "--kv-keep-first", "2",
                              "--enable-snapkv", "--snapkv-limit", "32", "--gpu-memory-utilization", "0.5"])
    assert _engine_options(args) == dict(max_model_len=64, enable_prefix_caching=False, kv_keep_first=2,
                                         enable_snapkv=True, snapkv_limit=32, gpu_memory_utilization=0.5)


def test_generate_passes_plugin_options(tiny_checkpoint, capsys):
    path = tiny_checkpoint("qwen3")
    assert main(["generate", path, "Hello there", "--max-tokens", "2", "--max-model-len", "64",
                 "--kv-retention", "recent", "--kv-keep-first", "1", "--kv-keep-last", "2"]) == 0
    assert "Output: " in capsys.readouterr().out
    assert main(["generate", path, "Hi", "--kv-keep-first", "-1", "--kv-retention", "recent"]) == 1
    assert "kv_keep_first" in capsys.readouterr().err


def test_random_checkpoint_tokenizer_covers_the_vocabulary(tmp_path, capsys):
    from nanovllm.testing import TINY, make_random_checkpoint, make_tokenizer
    tokenizer = make_tokenizer(5000)
    assert len(tokenizer) == 5000
    assert all(tokenizer.decode([i]).strip() for i in range(400, 5000))
    path = make_random_checkpoint(str(tmp_path / "ckpt"), dtype=torch.float32, **{**TINY, "vocab_size": 2000})
    assert main(["generate", path, "Hello", "--max-tokens", "8", "--ignore-eos", "--max-model-len", "64"]) == 0
    text = capsys.readouterr().out.split("Output: ")[1]
    assert len(ast.literal_eval(text.strip())) >= 8  # eight tokens, each some text
