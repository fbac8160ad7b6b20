"""Tensor parallelism: every rank runs in its own process, and the engine's process only sends each step and
reads rank 0's sampled tokens (one step later: scheduling overlaps the GPU, as with one rank). It never waits
inside a collective, so a rank that dies, stops or raises ends the call with EngineDeadError in bounded time: a
watchdog reads each rank's pipe, its process, a heartbeat and a deadline for the step."""
import collections
import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import threading
import time
import traceback
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler

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


def _beat(heartbeats, rank: int):
    """Stamp this rank's heartbeat; leave when the engine's process is gone (a rank blocked in a collective
    would not notice it otherwise): then the fork server that started this rank leaves too, and its parent changes."""
    parent = os.getppid()
    while True:
        heartbeats[rank] = time.monotonic()
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(HEARTBEAT_SECONDS)


def rank_context():
    """Where ranks come from: a fork server that imports torch and the engine once per process, so each rank is
    forked from it in a fraction of a second instead of importing them again (seconds), and never inherits CUDA."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def run_worker(config: Config, rank: int, model_cls: type, backend_cls: type, port: int, conn, heartbeats,
               environ: dict[str, str]):
    """One rank: build the model, answer "ready", then run what the engine sends until it says exit. Steps are
    launched without waiting for the GPU: rank 0's sampled tokens go back from a second thread once ready. An
    error is sent back (the engine then shuts every rank down) and ends the process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's process to handle
    os.environ.clear()  # the engine's environment now, not the fork server's when it started
    os.environ.update(environ)
    threading.Thread(target=_beat, args=(heartbeats, rank), daemon=True).start()
    replies = queue.Queue()
    unread_steps = threading.Semaphore(2)  # the sampled tokens' pinned buffers alternate by step
    sender = threading.Thread(target=_send_replies, args=(conn, replies, unread_steps), daemon=True)
    sender.start()
    try:
        runner = ModelRunner(config, rank, model_cls, backend_cls, port)
        replies.put(("ready", runner.num_kvcache_blocks))
        while True:
            method, args = conn.recv()
            if method == "execute":
                unread_steps.acquire()
                sampled = runner.execute(*args)
                if sampled is None:  # ranks other than 0 answer a step only with an error
                    unread_steps.release()
                else:
                    replies.put(("sampled", sampled))
                continue
            replies.put(("done", getattr(runner, method)(*args)))
            if method == "exit":
                break
    except EOFError:  # the engine's process is gone
        return
    except BaseException as exc:
        replies.put(("error", _describe(exc)))
    replies.put(None)
    sender.join()


def _send_replies(conn, replies: queue.Queue, unread_steps: threading.Semaphore):
    """Send the replies in order; a step's sampled tokens once the GPU has them."""
    while (reply := replies.get()) is not None:
        kind, payload = reply
        if kind == "sampled":
            try:
                payload = payload.tolist(), payload.logprobs(), payload.prompt_logprobs()
            except BaseException as exc:
                kind, payload = "error", _describe(exc)
            unread_steps.release()
        conn.send((kind, payload))


class Workers:
    """The ranks of a tensor-parallel engine, seen from the engine's process: ``execute`` a step on all of
    them (rank 0's sampled tokens are read later, so the next step is scheduled meanwhile), ``call`` a method on
    all of them, ``exit``. Any fault shuts them all down and raises EngineDeadError naming the rank."""

    def __init__(self, config: Config, model_cls: type, backend_cls: type):
        self.heartbeat_timeout = _seconds("NANOVLLM_HEARTBEAT_TIMEOUT", 30.0)
        self.step_timeout = _seconds("NANOVLLM_STEP_TIMEOUT", 300.0)
        self.world_size = config.tensor_parallel_size
        context = rank_context()
        self.heartbeats = context.Array("d", self.world_size, lock=False)  # 0 until a rank's first beat
        self.conns, self.processes = [], []
        self.unanswered = [0] * self.world_size  # replies each rank still owes
        self.replies = [collections.deque() for _ in range(self.world_size)]  # received, not yet taken
        self.steps: collections.deque[RemoteSampledTokens] = collections.deque()  # launched, tokens not read
        self.dead: str | None = None
        port = _free_port()
        try:
            for rank in range(self.world_size):
                parent, child = context.Pipe()
                process = context.Process(target=run_worker, daemon=True, name=f"nanovllm-rank-{rank}", args=(
                    config, rank, model_cls, backend_cls, port, child, self.heartbeats, dict(os.environ)))
                process.start()
                child.close()
                self.conns.append(parent)
                self.processes.append(process)
                self.unanswered[rank] = 1  # its "ready"
            # loading may take long: only a fault, not a deadline, ends it
            self._wait(lambda: not any(self.unanswered), "building the model", None)
            self.num_kvcache_blocks = min(replies.pop() for replies in self.replies)
        except BaseException:
            self.dead = "its construction failed"
            self._stop_processes(grace=0)
            raise

    def execute(self, inputs: StepInputs) -> "RemoteSampledTokens":
        """Launch a step on every rank; its sampled tokens are read when asked for."""
        step = RemoteSampledTokens(self)
        self._send("execute", (inputs,), replying=[0], step=step)
        return step

    def call(self, method: str, *args):
        """Run ``method(*args)`` on every rank's ModelRunner; rank 0's result."""
        while self.steps:  # earlier steps' replies come first on rank 0's pipe
            self._read_step()
        self._send(method, args, replying=range(self.world_size))
        self._wait(lambda: not any(self.unanswered), method, self.step_timeout)
        results = [self.replies[rank].pop() for rank in range(self.world_size)]
        return results[0]

    def _send(self, method: str, args: tuple, replying, step: "RemoteSampledTokens | None" = None):
        self._check_alive()
        message = ForkingPickler.dumps((method, args))  # once for all ranks
        with _interrupts_deferred():  # every rank gets it and the books say so, or none
            try:
                for conn in self.conns:
                    conn.send_bytes(message)
            except OSError:  # a rank's pipe is closed: it died since its last reply
                self._fail_on_deaths(method)
                self._fail(f"a rank's pipe closed before {method}")
            for rank in replying:
                self.unanswered[rank] += 1
            if step is not None:
                self.steps.append(step)

    def _read_step(self):
        """Rank 0's tokens for the oldest unread step (a step Ctrl-C abandoned gets them too, unread)."""
        self._wait(lambda: self.replies[0], "the step", self.step_timeout)
        with _interrupts_deferred():  # the step and its reply leave together
            step = self.steps.popleft()
            step.token_ids, step.token_logprobs, step.token_prompt_logprobs = self.replies[0].popleft()

    def _wait(self, done, what: str, timeout: float | None):
        """Receive replies until ``done()``, watching every rank for an error, its death, its silence, and the
        deadline."""
        self._check_alive()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            ready = wait(self.conns + [p.sentinel for p in self.processes], HEARTBEAT_SECONDS)
            for rank, conn in enumerate(self.conns):
                if conn in ready:
                    self._receive(rank, what)
            self._fail_on_deaths(what)
            now = time.monotonic()
            silent = [r for r, beat in enumerate(self.heartbeats) if beat and now - beat > self.heartbeat_timeout]
            if silent:
                self._fail(f"rank {silent[0]} stopped responding (no heartbeat for {self.heartbeat_timeout:g} s: "
                           f"stopped or frozen) while {what}")
            if deadline is not None and now > deadline and not done():
                late = [r for r in range(self.world_size) if self.unanswered[r]]
                self._fail(f"ranks {late} did not finish {what} within {timeout:g} s (NANOVLLM_STEP_TIMEOUT): a "
                           f"collective may wait for a rank that will not come")

    def _receive(self, rank: int, what: str):
        """Take one message of ``rank``: a reply is kept, an error fails the engine."""
        try:
            with _interrupts_deferred():  # a message read in part would garble the pipe; a reply half kept too
                kind, payload = self.conns[rank].recv()
                if kind != "error":
                    self.replies[rank].append(payload)
                    self.unanswered[rank] -= 1
        except (EOFError, OSError):
            return  # the process is gone: its sentinel says how
        if kind == "error":
            summary, trace = payload
            logger.error("rank %d failed while %s:\n%s", rank, what, trace)
            self._fail_on_deaths(what, error_from=rank)  # a rank's death shows on the others as a collective's error
            self._fail(f"rank {rank} failed while {what}: {summary}")

    def _check_alive(self):
        if self.dead:
            raise EngineDeadError(f"the engine is dead: {self.dead}; build a new LLM")

    def _fail_on_deaths(self, what: str, error_from: int | None = None):
        """Fail naming the first rank whose process ended when it should not have (what it sent before it
        ended is read first: an exit's reply, or its error)."""
        for rank, process in enumerate(self.processes):
            if rank != error_from and process.exitcode is not None:
                while self.unanswered[rank] and self.conns[rank].poll():
                    self._receive(rank, what)
            if process.exitcode or (process.exitcode == 0 and self.unanswered[rank]):
                self._fail(f"rank {rank} exited with {_exit_reason(process.exitcode)} while {what}")

    def _fail(self, reason: str):
        self.dead = reason
        self._stop_processes(grace=0)
        raise EngineDeadError(f"tensor-parallel engine failed: {reason}. Every rank was shut down; build a new LLM")

    def exit(self):
        """Have the ranks release their memory and leave; stop any that do not within seconds."""
        try:
            if not self.dead:
                self.call("exit")
        except EngineDeadError as exc:  # its ranks are already stopped
            logger.warning("%s", exc)
        finally:
            self.dead = self.dead or "it was shut down (exit)"
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


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C's SIGINT waits until the block is done."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"signal {signal.Signals(-exitcode).name}"
    return f"code {exitcode}"


class RemoteSampledTokens:
    """Rank 0's sampled token ids of one step, read from its pipe when first asked for."""

    def __init__(self, workers: Workers):
        self.workers = workers
        self.token_ids: list[int] | None = None
        self.token_logprobs = None
        self.token_prompt_logprobs = None

    def tolist(self) -> list[int]:
        while self.token_ids is None:
            self.workers._read_step()
        return self.token_ids

    def logprobs(self):
        self.tolist()
        return self.token_logprobs

    def prompt_logprobs(self):
        self.tolist()
        return self.token_prompt_logprobs
