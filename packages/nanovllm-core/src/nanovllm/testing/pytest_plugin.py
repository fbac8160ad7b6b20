"""pytest fixtures and markers for nanovllm and its plugins, loaded by pytest through nanovllm-core's
``pytest11`` entry point wherever nanovllm-core is installed.

- ``tiny_checkpoint(name="qwen3", dtype=torch.float32, **overrides)``: the path of a tiny random checkpoint of
  one of ``nanovllm.testing.TINY_MODELS``, made once per session.
- ``assert_matches_hf(path, prompts, outputs, **kwargs)``: fails listing every greedy token of ``outputs``
  that is not Hugging Face's argmax (``nanovllm.testing.hf_greedy_mismatches``).
- ``gpu`` / ``multi_gpu`` markers: such tests skip, with the reason, where CUDA (or a second GPU) is missing.
- nanovllm's log records propagate to the root logger, where ``caplog`` reads them.
"""
import logging

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere, with the reason)")
    config.addinivalue_line("markers", "multi_gpu: needs two or more CUDA GPUs")
    logging.getLogger("nanovllm").propagate = True


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is None and item.get_closest_marker("multi_gpu") is None:
        return
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: run on the GPU machine (tools/device_run.sh)")
    if item.get_closest_marker("multi_gpu") is not None and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(name, **overrides) -> path of a cached tiny random fp32 checkpoint."""
    import torch

    from nanovllm.testing import TINY, TINY_MODELS, make_random_checkpoint
    made = {}

    def make(name: str = "qwen3", dtype=torch.float32, **overrides):
        key = (name, str(dtype), tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in made:
            architecture, arch_overrides = TINY_MODELS[name]
            path = str(tmp_path_factory.mktemp(name))
            made[key] = make_random_checkpoint(path, architecture, dtype=dtype, **{**TINY, **arch_overrides, **overrides})
        return made[key]
    return make


@pytest.fixture
def assert_matches_hf():
    from nanovllm.testing import hf_greedy_mismatches

    def check(path, prompts, outputs, **kwargs):
        problems = hf_greedy_mismatches(path, prompts, [o["token_ids"] for o in outputs], **kwargs)
        assert not problems, "greedy tokens differ from Hugging Face:\n" + "\n".join(problems)
    return check
