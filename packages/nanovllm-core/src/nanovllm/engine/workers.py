"""Tensor parallelism: every rank runs in its own process, and the engine's process only sends each step and
reads rank 0's sampled tokens. It never waits inside a collective, so a rank that dies, stops or raises ends the
call with EngineDeadError in bounded time: a watchdog reads each rank's pipe, its process, a heartbeat and a
deadline for the step."""
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from multiprocessing.connection import wait

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner, StepInputs

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 0.5


class EngineDeadError(RuntimeError):
    """The engine's ranks failed and were shut down; its requests are ended. Build a new LLM to go on."""


def _seconds(variable: str, default: float) -> float:
    value = os.environ.get(variable, "")
    try:
        seconds = float(value) if value else default
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{variable}={value!r} is not a positive number of seconds")
    return seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(exc: BaseException) -> tuple[str, str]:
    return f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc))


def _beat(heartbeats, rank: int, parent: int):
    """Stamp this rank's heartbeat; leave when the engine's process is gone (a rank blocked in a collective
    would not notice it otherwise)."""
    while True:
        heartbeats[rank] = time.monotonic()
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(HEARTBEAT_SECONDS)


def run_worker(config: Config, rank: int, model_cls: type, backend_cls: type, port: int, conn, heartbeats,
               parent: int):
    """One rank: build the model, answer "ready", then run what the engine sends until it says exit. An error
    is sent back (the engine shuts every rank down) and ends the process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's process to handle
    threading.Thread(target=_beat, args=(heartbeats, rank, parent), daemon=True).start()
    try:
        runner = ModelRunner(config, rank, model_cls, backend_cls, port)
        conn.send(("ready", runner.num_kvcache_blocks))
        while True:
            method, args = conn.recv()
            result = getattr(runner, method)(*args)
            if method == "execute":
                result = result.tolist() if result is not None else None
            conn.send(("done", result))
            if method == "exit":
                return
    except EOFError:  # the engine's process is gone
        return
    except BaseException as exc:
        conn.send(("error", _describe(exc)))


class Workers:
    """The ranks of a tensor-parallel engine, seen from the engine's process: ``execute`` a step on all of
    them, ``exit`` them. Any fault shuts them all down and raises EngineDeadError naming the rank."""

    def __init__(self, config: Config, model_cls: type, backend_cls: type):
        self.heartbeat_timeout = _seconds("NANOVLLM_HEARTBEAT_TIMEOUT", 30.0)
        self.step_timeout = _seconds("NANOVLLM_STEP_TIMEOUT", 300.0)
        self.world_size = config.tensor_parallel_size
        spawn = mp.get_context("spawn")
        self.heartbeats = spawn.Array("d", self.world_size, lock=False)  # 0 until a rank's first beat
        self.conns, self.processes = [], []
        self.unanswered = [0] * self.world_size  # calls sent to each rank whose replies were not read yet
        self.dead: str | None = None
        port = _free_port()
        try:
            for rank in range(self.world_size):
                parent, child = spawn.Pipe()
                process = spawn.Process(target=run_worker, daemon=True, name=f"nanovllm-rank-{rank}", args=(
                    config, rank, model_cls, backend_cls, port, child, self.heartbeats, os.getpid()))
                process.start()
                child.close()
                self.conns.append(parent)
                self.processes.append(process)
                self.unanswered[rank] = 1  # its "ready"
            # loading may take long: only a fault, not a deadline, ends it
            self.num_kvcache_blocks = self._replies("building the model", None)[0]
        except BaseException:
            self.dead = "its construction failed"
            self._stop_processes(grace=0)
            raise

    def execute(self, inputs: StepInputs) -> "RemoteSampledTokens":
        return RemoteSampledTokens(self.call("execute", inputs))

    def call(self, method: str, *args):
        """Run ``method(*args)`` on every rank's ModelRunner; rank 0's result. The replies of a call that
        Ctrl-C interrupted are read first (each rank runs its calls in order)."""
        if self.dead:
            raise EngineDeadError(f"the engine is dead: {self.dead}; build a new LLM")
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # every rank gets the call, or none
        try:
            for rank, conn in enumerate(self.conns):
                conn.send((method, args))
                self.unanswered[rank] += 1
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return self._replies("the step" if method == "execute" else method, self.step_timeout)[0]

    def _replies(self, what: str, timeout: float | None) -> list:
        """Each rank's reply to its latest call, watching for errors, deaths, silence and the deadline."""
        results = [None] * self.world_size
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(self.unanswered):
            waiting = [r for r in range(self.world_size) if self.unanswered[r]]
            ready = wait([self.conns[r] for r in waiting] + [p.sentinel for p in self.processes], HEARTBEAT_SECONDS)
            for rank in waiting:
                if self.conns[rank] in ready:
                    try:
                        kind, payload = self.conns[rank].recv()
                    except EOFError:
                        continue  # the process is gone: its sentinel says how
                    if kind == "error":
                        summary, trace = payload
                        logger.error("rank %d failed while %s:\n%s", rank, what, trace)
                        self._fail(f"rank {rank} failed while {what}: {summary}")
                    results[rank] = payload
                    self.unanswered[rank] -= 1
            for rank, process in enumerate(self.processes):
                if process.sentinel in ready and (self.unanswered[rank] or process.exitcode):
                    self._fail(f"rank {rank} exited with {_exit_reason(process.exitcode)} while {what}")
            now = time.monotonic()
            silent = [r for r, beat in enumerate(self.heartbeats) if beat and now - beat > self.heartbeat_timeout]
            if silent:
                self._fail(f"rank {silent[0]} stopped responding (no heartbeat for {self.heartbeat_timeout:g} s: "
                           f"stopped or frozen) while {what}")
            if deadline is not None and now > deadline and any(self.unanswered):
                late = [r for r in range(self.world_size) if self.unanswered[r]]
                self._fail(f"ranks {late} did not finish {what} within {timeout:g} s (NANOVLLM_STEP_TIMEOUT): a "
                           f"collective may wait for a rank that will not come")
        return results

    def _fail(self, reason: str):
        self.dead = reason
        self._stop_processes(grace=0)
        raise EngineDeadError(f"tensor-parallel engine failed: {reason}. Every rank was shut down; build a new LLM")

    def exit(self):
        """Have the ranks release their memory and leave; stop any that do not within seconds."""
        if not self.dead:
            try:
                self.call("exit")
            except EngineDeadError as exc:  # its ranks are already stopped
                logger.warning("%s", exc)
            self.dead = "it was shut down (exit)"
        self._stop_processes(grace=5)

    def _stop_processes(self, grace: float):
        for process in self.processes:
            process.join(timeout=grace)
            if process.is_alive():
                process.kill()  # a stopped process too
                process.join()
            process.close()
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"signal {signal.Signals(-exitcode).name}"
    return f"code {exitcode}"


class RemoteSampledTokens:
    """Rank 0's sampled token ids, already read back."""

    def __init__(self, token_ids: list[int] | None):
        self.token_ids = token_ids or []

    def tolist(self) -> list[int]:
        return self.token_ids
