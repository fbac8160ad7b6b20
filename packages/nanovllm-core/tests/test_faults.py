"""Faults of a tensor-parallel engine end in a clear error in bounded time, leave no process behind, and leave a
process that builds working engines; Ctrl-C leaves the engine usable; engines are freed by del and by with; the fork
server that ranks come from never asks for CUDA, so they can use it.

Each scenario runs fault_driver.py in a subprocess with a timeout, so a regression fails instead of hanging CI.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm.engine.workers import rank_context
from nanovllm.testing import process_alive

HERE = os.path.dirname(os.path.abspath(__file__))
# a healthy rank beats every 0.5 s and a tiny step takes milliseconds: these keep the tests short
FAST_WATCHDOG = dict(NANOVLLM_HEARTBEAT_TIMEOUT="4", NANOVLLM_STEP_TIMEOUT="10")


def start_driver(*args, new_session=False) -> subprocess.Popen:
    env = {**os.environ, **FAST_WATCHDOG, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, os.path.join(HERE, "fault_driver.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=new_session)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL) if process.pid == os.getpgid(process.pid) else process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"the driver hung for {timeout} s:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return process.returncode, stdout, stderr


def run_driver(*args, new_session=False) -> dict:
    rc, stdout, stderr = finish(start_driver(*args, new_session=new_session))
    assert rc == 0, f"driver failed ({rc}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


def assert_recovered(result: dict):
    assert result["children"] == [] and result["ranks_alive"] == []
    assert result["tp1_matches"] and result["tp2_matches"]


@pytest.mark.parametrize("kind, ranks, says, bound", [
    ("kill", "1", "rank 1 exited with signal SIGKILL", 10),
    ("abort", "1", "rank 1 exited with signal SIGABRT", 10),
    ("raise", "1", "rank 1 failed while the step: RuntimeError: injected fault on rank 1", 10),
    ("raise", "all", "failed while the step: RuntimeError: injected fault on rank", 10),
    ("stop", "1", "rank 1 stopped responding (no heartbeat for 4 s", 12),
    ("hang", "0", "did not finish the step within 10 s (NANOVLLM_STEP_TIMEOUT)", 18),
])
def test_rank_fault_ends_generate_with_a_clear_error(tiny_checkpoint, kind, ranks, says, bound):
    result = run_driver(tiny_checkpoint("qwen3"), "fault", kind, ranks, 6)
    assert result["error"] and says in result["error"], result
    assert result["seconds"] < bound, result
    assert "the engine is dead" in result["next_call"]
    assert_recovered(result)


def test_rank_killed_between_calls_ends_the_next_with_a_clear_error(tiny_checkpoint):
    result = run_driver(tiny_checkpoint("qwen3"), "killed-idle")
    assert result["error"] and "rank 1 exited with signal SIGKILL" in result["error"], result
    assert_recovered(result)


@pytest.mark.parametrize("target", ["main", "group"])
def test_ctrl_c_leaves_the_engine_usable(tiny_checkpoint, target):
    result = run_driver(tiny_checkpoint("qwen3"), "interrupt", target, new_session=target == "group")
    assert result == dict(interrupted=True, same_engine_matches=True, blocks_leaked=0, ranks_alive=[])


def test_uncaught_ctrl_c_ends_the_process_and_its_ranks(tiny_checkpoint):
    start = time.monotonic()
    rc, stdout, stderr = finish(start_driver(tiny_checkpoint("qwen3"), "uncaught"), timeout=120)
    assert rc != 0 and "KeyboardInterrupt" in stderr
    assert time.monotonic() - start < 120
    pids = json.loads(stdout.splitlines()[0])["pids"]
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(process_alive(pid) for pid in pids)


def test_failure_while_building_names_the_rank_and_the_cause(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen3")
    bad = tmp_path / "missing-tensor"
    bad.mkdir()
    for name in os.listdir(path):
        if not name.endswith(".safetensors"):
            os.symlink(os.path.join(path, name), bad / name)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    missing = "model.layers.1.mlp.down_proj.weight"
    del tensors[missing]
    save_file(tensors, bad / "model.safetensors")
    result = run_driver(path, "build-fail", bad)
    assert result["error"] and "failed while building the model" in result["error"] and missing in result["error"]
    assert result["seconds"] < 60
    assert_recovered(result)


def test_engines_side_by_side_and_freed_by_del_and_with(tiny_checkpoint):
    result = run_driver(tiny_checkpoint("qwen3"), "lifecycle")
    assert result["side_by_side"] == [True, True] and result["tp1_beside"]
    assert result["children_after_del"] == 0 and result["children_after_with"] == 0
    assert result["fds_per_engine"][1] == result["fds_per_engine"][2], "an engine built and freed leaks pipes"
    assert "has exited" in result["after_with"] and result["with_matches"]
    assert result["tp1_freed"]


def test_the_fork_server_imports_nothing_that_asks_for_cuda():
    """Its ranks could not use CUDA otherwise: run in a fresh interpreter, every torch.cuda call that initializes
    CUDA or asks the driver is recorded while the server's preload and the installed plugins are imported."""
    script = """
import torch
calls = []
for name in ("_lazy_init", "init", "is_available", "device_count", "current_device", "get_device_properties",
             "get_device_capability", "get_device_name", "set_device"):
    setattr(torch.cuda, name, lambda *args, _name=name, **kwargs: calls.append(_name))
import nanovllm.engine.workers
from nanovllm import plugins
plugins.load_plugins()
print(calls)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.gpu
def test_a_rank_forked_after_the_engine_initialized_cuda_can_use_it():
    torch.ones(1, device="cuda")  # as the engine's process may have done before building a tensor-parallel engine
    process = rank_context().Process(target=torch.cuda.init)  # raises in a child forked from a CUDA process
    process.start()
    process.join(120)
    assert process.exitcode == 0
