"""Run by test_faults.py in a subprocess (with a timeout): one fault or lifecycle scenario on a tiny checkpoint
over tensor parallelism (gloo), printing a JSON line of what happened.

    python fault_driver.py PATH fault KIND RANKS CALL   a rank raises, is killed, aborts, stops or hangs mid-generate
    python fault_driver.py PATH killed-idle             a rank killed between two generate calls
    python fault_driver.py PATH interrupt main|group    Ctrl-C reaches the engine's process, or its whole group
    python fault_driver.py PATH uncaught                Ctrl-C that nobody catches: the process must end
    python fault_driver.py PATH build-fail              a checkpoint that fails to load on every rank
    python fault_driver.py PATH lifecycle               engines side by side, freed by del and by with
"""
import gc
import json
import multiprocessing
import os
import signal
import sys
import time
import weakref

import fault_plugin
import torch

from nanovllm import LLM, EngineDeadError, SamplingParams, plugins
from nanovllm.testing import process_alive

# on a GPU too (flash-attn needs blocks of 256), where the faulty backend is the torch one, asked for by name
OPTIONS = dict(kvcache_block_size=256 if torch.cuda.is_available() else 8, max_model_len=128, max_num_seqs=8,
               max_num_batched_tokens=128)
PROMPTS = [[5, 6, 7, 8], list(range(20, 50)), [9] * 12]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def tokens(llm) -> list[list[int]]:
    return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def after_failure(result: dict, path: str, reference, pids):
    """What a fault must leave: no rank process, and a process that builds working engines again."""
    result["children"] = [p.pid for p in multiprocessing.active_children()]
    result["ranks_alive"] = [pid for pid in pids if process_alive(pid)]
    os.environ.pop("NANOVLLM_TEST_FAULT", None)
    with LLM(path, **OPTIONS) as llm:
        result["tp1_matches"] = tokens(llm) == reference
    with LLM(path, tensor_parallel_size=2, **OPTIONS) as llm:
        result["tp2_matches"] = tokens(llm) == reference


def main():
    path, mode, *args = sys.argv[1:]
    # Ctrl-C as at a terminal, also where pytest runs in the background (whose children start ignoring SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    plugins.load_plugins()
    plugins.pm.register(fault_plugin, name="faulty")
    os.environ["NANOVLLM_TEST_ENGINE_PID"] = str(os.getpid())  # where sigint-main sends Ctrl-C
    with LLM(path, **OPTIONS) as llm:
        reference = tokens(llm)
    result = {}
    if mode == "fault":
        kind, ranks, call = args
        os.environ["NANOVLLM_TEST_FAULT"] = f"{ranks}:{call}:{kind}"
        llm = LLM(path, tensor_parallel_size=2, attention_backend="faulty", **OPTIONS)
        pids = [p.pid for p in llm.model_runner.processes]
        start = time.monotonic()
        try:
            tokens(llm)
            result["error"] = None
        except EngineDeadError as exc:
            result["error"] = str(exc)
        result["seconds"] = time.monotonic() - start
        try:
            tokens(llm)
        except EngineDeadError as exc:
            result["next_call"] = str(exc)
        after_failure(result, path, reference, pids)
    elif mode == "killed-idle":  # a rank killed between two generate calls
        llm = LLM(path, tensor_parallel_size=2, **OPTIONS)
        tokens(llm)
        pids = [p.pid for p in llm.model_runner.processes]
        os.kill(pids[1], signal.SIGKILL)
        time.sleep(0.5)
        try:
            tokens(llm)
            result["error"] = None
        except EngineDeadError as exc:
            result["error"] = str(exc)
        llm.exit()
        after_failure(result, path, reference, pids)
    elif mode == "interrupt":  # rank 0 sends the signal at its 6th attention call (the 3rd step), then goes on
        os.environ["NANOVLLM_TEST_FAULT"] = f"0:6:sigint-{args[0]}"
        llm = LLM(path, tensor_parallel_size=2, attention_backend="faulty", **OPTIONS)
        try:
            tokens(llm)
            result["interrupted"] = False
        except KeyboardInterrupt:
            result["interrupted"] = True
        result["same_engine_matches"] = tokens(llm) == reference  # the fault fires once
        result["blocks_leaked"] = sum(b.ref_count for b in llm.scheduler.block_manager.blocks)
        pids = [p.pid for p in llm.model_runner.processes]
        llm.exit()
        result["ranks_alive"] = [pid for pid in pids if process_alive(pid)]
    elif mode == "uncaught":
        os.environ["NANOVLLM_TEST_FAULT"] = "0:6:sigint-main"
        llm = LLM(path, tensor_parallel_size=2, attention_backend="faulty", **OPTIONS)
        print(json.dumps({"pids": [p.pid for p in llm.model_runner.processes]}), flush=True)
        tokens(llm)
    elif mode == "build-fail":
        bad = args[0]
        start = time.monotonic()
        try:
            LLM(bad, tensor_parallel_size=2, **OPTIONS)
            result["error"] = None
        except EngineDeadError as exc:
            result["error"] = str(exc)
        result["seconds"] = time.monotonic() - start
        after_failure(result, path, reference, [])
    elif mode == "lifecycle":
        first, second = (LLM(path, tensor_parallel_size=2, **OPTIONS) for _ in range(2))
        result["side_by_side"] = [tokens(first) == reference, tokens(second) == reference]
        with LLM(path, **OPTIONS) as llm:  # one rank beside live tensor-parallel engines: not a shard of theirs
            result["tp1_beside"] = tokens(llm) == reference
        del first, second
        gc.collect()
        result["children_after_del"] = len(multiprocessing.active_children())
        fds = []
        for _ in range(3):  # the first builds may open what stays open (the resource tracker's pipe)
            with LLM(path, tensor_parallel_size=2, **OPTIONS) as llm:
                matches = tokens(llm) == reference
            fds.append(open_fds())
        result["fds_per_engine"] = fds
        result["children_after_with"] = len(multiprocessing.active_children())
        try:
            tokens(llm)
        except RuntimeError as exc:
            result["after_with"] = str(exc)
        result["with_matches"] = matches
        llm = LLM(path, **OPTIONS)
        engine = weakref.ref(llm)
        del llm
        gc.collect()
        result["tp1_freed"] = engine() is None
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
