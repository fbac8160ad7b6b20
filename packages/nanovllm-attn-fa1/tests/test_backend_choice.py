"""Discovery by GPU: fa1 on Turing (sm75), fa2 on sm80+, fp16 on GPUs without bf16; runs on CPU with
hand-made platforms (flash-attn is not installed there, so its version check is patched)."""
import logging

import pytest
import torch

import nanovllm_attn_fa1
import nanovllm_attn_fa2
from nanovllm.attention_backend import select_backend
from nanovllm.config import Config
from nanovllm.cli.info import backend_report, platform_report
from nanovllm.platform import Platform
from nanovllm_attn_mps import TorchPagedAttention

TURING = Platform("cuda", "NVIDIA GeForce RTX 2080 Ti", (7, 5), 11 * 2**30)
AMPERE = Platform("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), 80 * 2**30)
HOPPER = Platform("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)


@pytest.fixture
def fa1_installed(monkeypatch):
    monkeypatch.setattr(nanovllm_attn_fa1, "flash_attn_version", lambda: "1.0.9")
    return {"fa1": nanovllm_attn_fa1.FlashAttention1, "mps": TorchPagedAttention}


@pytest.fixture
def fa2_installed(monkeypatch):
    monkeypatch.setattr(nanovllm_attn_fa2, "flash_attn_version", lambda: "2.8.3")
    return {"fa2": nanovllm_attn_fa2.FlashAttention2, "mps": TorchPagedAttention}


def choose(backends, platform, dtype=torch.float16, requested=None, head_dim=128):
    return select_backend(backends, platform, dtype, head_dim, 256, requested)[0].name


def test_turing_picks_fa1(fa1_installed, monkeypatch):
    monkeypatch.delenv("NANOVLLM_ATTENTION_BACKEND", raising=False)
    assert choose(fa1_installed, TURING) == "fa1"


def test_fa1_on_newer_gpus_only_by_name(fa1_installed, monkeypatch):
    monkeypatch.delenv("NANOVLLM_ATTENTION_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="Install nanovllm-attn-fa2"):
        choose(fa1_installed, HOPPER)
    assert choose(fa1_installed, HOPPER, requested="fa1") == "fa1"
    assert choose(fa1_installed, HOPPER, torch.bfloat16, requested="fa1") == "fa1"


def test_fa1_refuses_bf16_on_turing(fa1_installed):
    with pytest.raises(ValueError, match="bf16 only on sm80"):
        choose(fa1_installed, TURING, torch.bfloat16, requested="fa1")


def test_fa1_head_sizes(fa1_installed):
    with pytest.raises(ValueError, match="head sizes"):
        choose(fa1_installed, TURING, requested="fa1", head_dim=256)


def test_fa1_without_flash_attn_1_says_what_to_install(monkeypatch):
    monkeypatch.setattr(nanovllm_attn_fa1, "flash_attn_version", lambda: "2.8.3")
    reason = nanovllm_attn_fa1.FlashAttention1.unsupported_reason(TURING, torch.float16, 128, 256)
    assert "flash-attn 1.x" in reason


@pytest.mark.parametrize("platform", [AMPERE, HOPPER])
def test_sm80_and_newer_pick_fa2(fa2_installed, platform, monkeypatch):
    monkeypatch.delenv("NANOVLLM_ATTENTION_BACKEND", raising=False)
    assert choose(fa2_installed, platform, torch.bfloat16) == "fa2"


def test_turing_without_fa1_names_its_package(fa2_installed, monkeypatch):
    monkeypatch.delenv("NANOVLLM_ATTENTION_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match=r"sm75, Turing.*Install nanovllm-attn-fa1"):
        choose(fa2_installed, TURING)


def test_bf16_checkpoint_runs_in_fp16_on_turing(tiny_checkpoint, monkeypatch, caplog):
    path = tiny_checkpoint("qwen3", dtype=torch.bfloat16)
    monkeypatch.setattr("nanovllm.config.detect_platform", lambda: TURING)
    with caplog.at_level(logging.WARNING, logger="nanovllm"):
        assert Config(path).torch_dtype == torch.float16
    assert "no bf16" in caplog.text and "float16" in caplog.text
    assert Config(path, dtype="float32").torch_dtype == torch.float32  # dtype= overrides
    monkeypatch.setattr("nanovllm.config.detect_platform", lambda: HOPPER)
    assert Config(path).torch_dtype == torch.bfloat16


def test_info_names_the_gpu_family_and_choice(fa1_installed, monkeypatch):
    monkeypatch.delenv("NANOVLLM_ATTENTION_BACKEND", raising=False)
    monkeypatch.setattr("nanovllm.cli.info.plugins.attention_backends", lambda: fa1_installed)
    platform_lines = "\n".join(platform_report(TURING))
    assert "RTX 2080 Ti" in platform_lines and "compute capability 7.5 (Turing)" in platform_lines
    assert "flash-attn: " in platform_lines
    backend_lines = "\n".join(backend_report(TURING))
    assert "dtype float16" in backend_lines and "Chosen: fa1" in backend_lines
