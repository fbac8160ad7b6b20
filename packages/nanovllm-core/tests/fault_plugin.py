"""A fault-injecting attention backend for test_faults.py: the CPU backend, except that on the ranks and at the
attention call NANOVLLM_TEST_FAULT names ("RANKS:CALL:KIND", e.g. "1:6:kill" or "all:6:raise") it raises, is
killed (SIGKILL), aborts (SIGABRT), stops (SIGSTOP) or hangs while staying alive; or it sends Ctrl-C's SIGINT to
the engine's process (sigint-main, its pid in NANOVLLM_TEST_ENGINE_PID) or to the whole process group (sigint-group)
and goes on."""
import os
import signal
import time

import torch.distributed as dist
from nanovllm_attn_mps import TorchPagedAttention

import nanovllm

calls = 0


class FaultyAttention(TorchPagedAttention):
    name = "faulty"
    priority = -1  # only by name

    def forward(self, q, k, v, kv_cache, context):
        global calls
        calls += 1
        ranks, call, kind = os.environ.get("NANOVLLM_TEST_FAULT", "none:0:none").split(":")
        rank = dist.get_rank() if dist.is_initialized() else 0
        if calls == int(call) and ranks in ("all", str(rank)):
            if kind == "raise":
                raise RuntimeError(f"injected fault on rank {rank}")
            if kind == "hang":
                time.sleep(3600)
            if kind.startswith("sigint"):
                if kind == "sigint-main":
                    os.kill(int(os.environ["NANOVLLM_TEST_ENGINE_PID"]), signal.SIGINT)
                else:
                    os.killpg(0, signal.SIGINT)
                return super().forward(q, k, v, kv_cache, context)
            os.kill(os.getpid(), {"kill": signal.SIGKILL, "abort": signal.SIGABRT, "stop": signal.SIGSTOP}[kind])
        return super().forward(q, k, v, kv_cache, context)


@nanovllm.hookimpl
def register_attention_backends(register):
    register(FaultyAttention)
