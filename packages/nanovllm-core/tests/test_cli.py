"""The nanovllm command: generate, info and bench, and its errors."""
import os
import subprocess
import sys

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
                 "--max-model-len", "64", "--max-num-seqs", "8", "--max-num-batched-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "Device: CPU" in out and "Throughput:" in out


def test_console_script_bench_makes_its_own_checkpoint():
    """`nanovllm bench` with no model writes random weights locally: nothing is downloaded."""
    script = os.path.join(os.path.dirname(sys.executable), "nanovllm")
    result = subprocess.run([script, "bench", "--num-seqs", "2", "--input-len", "8", "16", "--output-len", "4", "8"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "Total: " in result.stdout and "tok/s" in result.stdout
