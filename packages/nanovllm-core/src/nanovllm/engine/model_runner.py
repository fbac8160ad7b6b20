"""One per tensor-parallel rank: builds the model, owns its KV cache, runs steps. Rank 0 samples."""
import glob
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import xxhash

from nanovllm.attention_backend import AttentionBackend
from nanovllm.config import Config
from nanovllm.engine.context import Context, set_context
from nanovllm.engine.cuda_graphs import CudaGraphs
from nanovllm.engine.kv_compaction import KVCompaction
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.expert_manager import select_expert_manager
from nanovllm.kernels.prompt_work import prompt_work
from nanovllm.kv_retention import select_kv_retention_policy
from nanovllm.layers.attention import Attention
from nanovllm.layers.sampler import LogitsAdjustments, Sampler
from nanovllm.loader import load_model
from nanovllm.platform import detect_platform

logger = logging.getLogger(__name__)

_DEFAULT_KV_GIB = {"mps": 1.0, "cpu": 2.0}  # devices that cannot report free memory


def _checkpoint_gib(path: str) -> float:
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.safetensors"))) / 2**30


@dataclass
class StepInputs:
    """What every rank needs to run one step, as host arrays (pickled to the other ranks)."""

    input_ids: np.ndarray
    positions: np.ndarray
    cu_seqlens_q: np.ndarray
    cu_seqlens_k: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray
    logits_indices: np.ndarray  # last token of each sequence that samples this step
    # retention work, per compacted sequence: (first query row, end row, prompt blocks, prompt length, kept, kept blocks)
    compactions: tuple[tuple[int, int, list[int], int, int, list[int]], ...] = ()
    sampling: "SamplingInputs | None" = None  # None: no sequence samples this step
    prompt_logprobs: "PromptLogprobInputs | None" = None  # None: no sequence asks for its prompt's this step

    @property
    def is_decode(self) -> bool:
        return len(self.input_ids) == len(self.cu_seqlens_q) - 1


def stream_seed(seed: int, sample_index: int, num_generated: int) -> int:
    """The seed of a seeded request's draw for its next token: the same whatever else is in the batch, and after
    a preemption; each of its n samples draws its own."""
    return xxhash.xxh64_intdigest(f"{seed}:{sample_index}:{num_generated}".encode())


@dataclass
class SamplingInputs:
    """Rank 0's sampling parameters, a row per sequence that samples this step; the arrays that only some
    options need are None when no row uses them."""

    temperatures: np.ndarray
    top_k: np.ndarray  # 0: the whole vocabulary
    top_p: np.ndarray
    seeds: tuple[tuple[int, int, int, int], ...]  # (row, seed, sample index, tokens generated) of each seeded row
    filter_top: bool
    min_p: np.ndarray | None = None
    banned: np.ndarray | None = None  # [rows, k]: eos and stop ids of rows short of min_tokens, PAD after
    history: np.ndarray | None = None  # [rows, L]: prompt and output ids before this step's, PAD after
    num_prompt: np.ndarray | None = None
    penalties: np.ndarray | None = None  # [rows, 3]: repetition, presence, frequency
    num_logprobs: int | None = None  # top log-probabilities to return, the most any row asks for

    PAD = -2**62  # placeholders of tokens in flight are -1, -2, ...

    @classmethod
    def of(cls, seqs: list, eos_token_ids: frozenset[int] = frozenset()) -> "SamplingInputs | None":
        if not seqs:
            return None
        params = [seq.sampling_params for seq in seqs]
        seeds = tuple((row, p.seed, seq.sample_index, seq.num_completion_tokens)
                      for row, (seq, p) in enumerate(zip(seqs, params)) if p.seed is not None and p.temperature > 0)
        inputs = cls(np.array([p.temperature for p in params], dtype=np.float32),
                     np.array([p.top_k for p in params], dtype=np.int64),
                     np.array([p.top_p for p in params], dtype=np.float32), seeds,
                     any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in params))
        asked = [p.logprobs for p in params if p.logprobs is not None]
        if asked:
            inputs.num_logprobs = max(asked)
        if any(p.min_p > 0 for p in params):
            inputs.min_p = np.array([p.min_p for p in params], dtype=np.float32)
        # the token sampled now is the num_completion_tokens-th: min_tokens bans the ends until it is past
        banned = [sorted(eos_token_ids | set(p.stop_token_ids)) if seq.num_completion_tokens <= p.min_tokens else []
                  for seq, p in zip(seqs, params)]
        if any(banned):
            inputs.banned = _padded(banned)
        if any(p.penalized for p in params):
            inputs.history = _padded([seq.token_ids[:-1] for seq in seqs])  # the last is this step's placeholder
            inputs.num_prompt = np.array([seq.num_prompt_tokens for seq in seqs], dtype=np.int64)
            inputs.penalties = np.array([[p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
                                         for p in params], dtype=np.float32)
        return inputs


@dataclass
class PromptLogprobInputs:
    """The prompt positions whose log-probabilities of the next prompt token are asked for this step."""

    rows: np.ndarray  # the positions' rows among the step's tokens
    targets: np.ndarray  # the next prompt token of each
    num_top: int  # top log-probabilities to return, the most any sequence asks for

    ROWS_AT_ONCE = 1024  # logits of a long prompt at once would take vocabulary x prompt floats


def _logprobs(logits: torch.Tensor, sampled: torch.Tensor, k: int) -> torch.Tensor:
    """The model's log-probabilities (before penalties and temperature, as vLLM's default) of each row's sampled
    token and of its top ``k``, packed as [sampled id, its log-prob, k ids, k log-probs] in float64 (ids exact)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(k, dim=-1)
    return torch.cat([sampled[:, None].double(), logprobs.gather(1, sampled[:, None]).double(), top.indices.double(),
                      top.values.double()], dim=1)


def _padded(rows: list[list[int]], fill: int = SamplingInputs.PAD, dtype=np.int64) -> np.ndarray:
    """``rows`` as one array, each row filled up with ``fill`` to the longest."""
    table = np.full((len(rows), max(1, max(map(len, rows)))), fill, dtype=dtype)
    for i, row in enumerate(rows):
        table[i, :len(row)] = row
    return table


class SampledTokens:
    """A step's sampled token ids: on the device for the next step's inputs, and on their way to the host.

    Reading them waits for this step only, not for a next step queued behind it on the GPU.
    """

    def __init__(self, device_ids: torch.Tensor, logprobs: torch.Tensor | None = None,
                 prompt_logprobs: torch.Tensor | None = None, host_buffer=None):
        # logprobs: [rows, 2 + 2k] sampled id, its log-prob, top k ids, their log-probs; prompt_logprobs: the same
        # with the next prompt token in place of the sampled one
        self.tensors = {"ids": device_ids, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs}
        self.ready = None
        if host_buffer is not None:  # on CUDA: copied back into pinned buffers without waiting
            self.tensors = {name: None if t is None else host_buffer(name, t).copy_(t, non_blocking=True)
                            for name, t in self.tensors.items()}
            self.ready = torch.cuda.Event()
            self.ready.record()

    def _read(self, name: str) -> torch.Tensor | None:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tensors[name]

    def tolist(self) -> list[int]:
        return self._read("ids").tolist()

    def logprobs(self) -> list[tuple[int, float, list[tuple[int, float]]]] | None:
        """Per row: the sampled token, its log-probability, and the top tokens with theirs (None: not asked)."""
        return _logprob_rows(self._read("logprobs"))

    def prompt_logprobs(self) -> list[tuple[int, float, list[tuple[int, float]]]] | None:
        """Per prompt position asked for: the next prompt token, its log-probability, and the top tokens."""
        return _logprob_rows(self._read("prompt_logprobs"))


def _logprob_rows(packed: torch.Tensor | None) -> list[tuple[int, float, list[tuple[int, float]]]] | None:
    if packed is None:
        return None
    k = (packed.size(1) - 2) // 2
    return [(int(row[0]), row[1], [(int(i), lp) for i, lp in zip(row[2:2 + k], row[2 + k:])])
            for row in packed.tolist()]


PROFILER_DIR = "NANOVLLM_TORCH_PROFILER_DIR"  # as vLLM's VLLM_TORCH_PROFILER_DIR


def _start_profiler() -> torch.profiler.profile | None:
    """With NANOVLLM_TORCH_PROFILER_DIR set, profile every step of this rank until the engine exits."""
    if not os.environ.get(PROFILER_DIR):
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


def _write_profile(profiler: torch.profiler.profile, rank: int):
    """The rank's operators and kernels by their own GPU time, then by their own CPU time, as rank<N>.txt in the
    profiler folder."""
    profiler.stop()
    folder = os.environ[PROFILER_DIR]
    os.makedirs(folder, exist_ok=True)
    averages = profiler.key_averages()
    path = os.path.join(folder, f"rank{rank}.txt")
    with open(path, "w") as f:
        for device in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
            f.write(f"By self {device.upper()} time\n")
            f.write(averages.table(sort_by=f"self_{device}_time_total", row_limit=40, max_name_column_width=80))
            f.write("\n")
    logger.info("profile of rank %d written to %s", rank, path)


class ModelRunner:
    def __init__(self, config: Config, rank: int, model_cls: type, backend_cls: type[AttentionBackend],
                 dist_port: int | None = None):
        self.config = config
        self.rank = rank
        self.world_size = config.tensor_parallel_size
        self.block_size = config.kvcache_block_size
        platform = detect_platform()
        self.device = torch.device(platform.device_type, rank if platform.device_type == "cuda" else None)
        if platform.device_type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1:
            dist.init_process_group("nccl" if platform.device_type == "cuda" else "gloo",
                                    f"tcp://127.0.0.1:{dist_port}", world_size=self.world_size, rank=rank,
                                    timeout=timedelta(minutes=10))
        dtype = config.torch_dtype
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(self.device):
                self.model = model_cls(config)
                expert_managers = select_expert_manager(config)[0].install(self.model, config)
            load_model(self.model, config.model)
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError(f"the model's weights do not fit on {platform.describe()} (about "
                               f"{_checkpoint_gib(config.model) / self.world_size:.1f} GiB per rank): use a larger "
                               f"tensor_parallel_size or a smaller model") from None
        finally:
            torch.set_default_dtype(default_dtype)
        self.model.eval()
        self.sampler = Sampler()
        self.retention = select_kv_retention_policy(config)[0](config)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for index, layer in enumerate(self.attention_layers):
            layer.backend = backend_cls(layer.num_heads, layer.head_dim, layer.num_kv_heads, layer.scale, config)
            layer.layer_index = index
        self.pinned: dict[tuple[str, int], torch.Tensor] = {}  # host staging buffers, by field and step parity
        self.copies_queued: dict[int, torch.cuda.Event] = {}  # by step parity: recorded after a step's launches
        self.num_steps = 0
        self.prev_sampled: torch.Tensor | None = None  # the last step's sampled token ids, on the device
        self.graphs: CudaGraphs | None = None
        self.num_kvcache_blocks = self._allocate_kv_cache(dtype, platform.device_type)
        graphs_safe = backend_cls.cuda_graphs and all(m.cuda_graphs for m in expert_managers)
        if platform.device_type == "cuda" and not config.enforce_eager and graphs_safe:
            with torch.inference_mode():
                layer = self.attention_layers[0]
                self.graphs = CudaGraphs(self.model, config.max_num_seqs, config.max_num_batched_tokens,
                                         config.max_model_len, self.block_size, config.hf_config.hidden_size,
                                         layer.num_heads, layer.num_kv_heads, dtype, self.device)
        if platform.device_type == "cuda":
            self._warmup_sampler()
        if config.seed is not None:  # after the warm-ups: the first request sees the seeded state
            torch.manual_seed(config.seed)
        self.profiler = _start_profiler()

    def _allocate_kv_cache(self, dtype: torch.dtype, device_type: str) -> int:
        config = self.config
        layer = self.attention_layers[0]
        block_bytes = (2 * len(self.attention_layers) * self.block_size * layer.num_kv_heads * layer.head_dim
                       * dtype.itemsize)
        if config.num_kvcache_blocks is not None:
            num_blocks = config.num_kvcache_blocks
        else:
            budget = config.kv_cache_memory_gib
            if budget is None:
                budget = _DEFAULT_KV_GIB.get(device_type)
            if budget is not None:
                num_blocks = int(budget * 2**30) // block_bytes
                if config.kv_cache_memory_gib is None:  # a default budget never exceeds what can be used
                    num_blocks = min(num_blocks, config.max_num_seqs * -(-config.max_model_len // self.block_size))
            else:
                num_blocks = self._num_blocks_from_free_memory(block_bytes)
        if self.world_size > 1:
            count = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            num_blocks = int(count.item())
        config.fit_kv_capacity(num_blocks)
        try:
            kv_cache = torch.zeros(len(self.attention_layers), 2, num_blocks, self.block_size, layer.num_kv_heads,
                                   layer.head_dim, dtype=dtype, device=self.device)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:  # the CPU allocator raises RuntimeError
            if "memory" not in str(exc):
                raise
            raise RuntimeError(f"the KV cache of {num_blocks} blocks ({num_blocks * block_bytes / 2**30:.2f} GiB) "
                               f"cannot be allocated on {self.device}, which has {self._free_gib():.2f} GiB free: "
                               f"give it less (num_kvcache_blocks, kv_cache_memory_gib or gpu_memory_utilization)"
                               ) from None
        for i, attention in enumerate(self.attention_layers):
            attention.kv_cache = kv_cache[i]
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                    num_blocks * block_bytes / 2**30)
        return num_blocks

    def _free_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] / 2**30
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        except (ValueError, OSError):  # not on every system
            return float("nan")

    def _num_blocks_from_free_memory(self, block_bytes: int) -> int:
        """CUDA: what gpu_memory_utilization leaves after the weights and a measured warm-up peak."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            self._warmup()
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError(f"a step of max_num_batched_tokens={self.config.max_num_batched_tokens} tokens runs "
                               f"out of GPU memory next to the weights: lower max_num_batched_tokens") from None
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        peak_extra = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
        budget = total * self.config.gpu_memory_utilization - (total - free) - peak_extra
        return int(budget) // block_bytes

    @torch.inference_mode()
    def _warmup(self):
        """One full-size prefill batch without a KV cache, to measure peak activation memory."""
        config = self.config
        max_len = min(config.max_model_len, config.max_num_batched_tokens)
        num_seqs = max(1, min(config.max_num_batched_tokens // max_len, config.max_num_seqs))
        lens = np.full(num_seqs, max_len)
        cu = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        positions = np.tile(np.arange(max_len), num_seqs)
        inputs = StepInputs(np.zeros(len(positions), dtype=np.int64), positions, cu, cu,
                            np.full(len(positions), -1, dtype=np.int64), np.zeros((num_seqs, 0), dtype=np.int32),
                            cu[1:].astype(np.int64) - 1)
        self.run_model(inputs)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def _warmup_sampler(self):
        """Compile the sampler's Triton kernels now, as steps call them; otherwise the first run pays for it."""
        vocab = self.config.hf_config.vocab_size
        temperatures = torch.tensor([0.0, 1.0], device=self.device)  # a greedy row and a sampled one
        for dtype in (self.config.torch_dtype, torch.float32):  # the LM head's logits, and after penalties
            logits = torch.zeros(2, vocab, dtype=dtype, device=self.device)
            self.sampler(logits, temperatures, None, None, [None] * 2, False)

    # ---- steps -------------------------------------------------------------------------------

    @torch.inference_mode()
    def run_model(self, inputs: StepInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Forward one step on this rank; rank 0 gets the logits of the sampling sequences and the prompt
        log-probabilities asked for."""
        self.num_steps += 1
        if (before_last := self.copies_queued.pop(self.num_steps % 2, None)) is not None:
            before_last.synchronize()  # its copies from this parity's pinned buffers have run: they may be refilled

        def to_device(name):
            return self._to_device(name, getattr(inputs, name))
        input_ids, hidden = self._input_ids(inputs), None
        if self.graphs is not None and not inputs.compactions:
            hidden = self.graphs.run(input_ids, inputs.positions, inputs.cu_seqlens_q,
                                     inputs.cu_seqlens_k, inputs.slot_mapping, inputs.block_tables, self._staged)
        if hidden is None:
            seqlens_k = np.diff(inputs.cu_seqlens_k)
            cu_seqlens_k = to_device("cu_seqlens_k")
            fresh_prefill = bool((inputs.cu_seqlens_q == inputs.cu_seqlens_k).all())
            work = None
            if self.device.type == "cuda" and not (inputs.is_decode or fresh_prefill):
                layer = self.attention_layers[0]
                work = prompt_work(np.diff(inputs.cu_seqlens_q), seqlens_k, layer.num_heads, layer.num_kv_heads,
                                   self.device, to_device=self._to_device)
            set_context(Context(
                cu_seqlens_q=to_device("cu_seqlens_q"), cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=int(np.diff(inputs.cu_seqlens_q).max()), max_seqlen_k=int(seqlens_k.max()),
                slot_mapping=to_device("slot_mapping"), context_lens=cu_seqlens_k.diff(),
                block_tables=to_device("block_tables"), is_decode=inputs.is_decode,
                is_fresh_prefill=fresh_prefill, compaction=self._compaction(inputs), prompt_work=work))
            try:
                hidden = self.model(input_ids, to_device("positions"))
            finally:
                set_context(None)
        return (self.model.compute_logits(hidden[to_device("logits_indices")]),
                self._prompt_logprobs(hidden, inputs.prompt_logprobs))

    def _prompt_logprobs(self, hidden: torch.Tensor, asked: PromptLogprobInputs | None) -> torch.Tensor | None:
        """Rank 0's packed log-probabilities of the asked positions' next prompt tokens, a slice of rows at a time."""
        if asked is None:
            return None
        rows, targets = self._to_device("prompt_rows", asked.rows), self._to_device("prompt_targets", asked.targets)
        parts = []
        for first in range(0, len(asked.rows), asked.ROWS_AT_ONCE):
            part = slice(first, first + asked.ROWS_AT_ONCE)
            logits = self.model.compute_logits(hidden[rows[part]])  # every rank: the vocabulary is gathered
            if logits is not None:
                parts.append(_logprobs(logits, targets[part], asked.num_top))
        return torch.cat(parts) if parts else None

    def _compaction(self, inputs: StepInputs) -> KVCompaction | None:
        if not inputs.compactions:
            return None
        first, end, prompt_blocks, num_prompt, num_kept, kept_blocks = zip(*inputs.compactions)
        return KVCompaction(self.retention, list(zip(first, end)), self._block_tensors(prompt_blocks),
                            list(num_prompt), list(num_kept), self._block_tensors(kept_blocks))

    def _block_tensors(self, tables) -> list[torch.Tensor]:
        return [torch.tensor(table, dtype=torch.int64, device=self.device) for table in tables]

    def _staged(self, name: str, array: np.ndarray) -> torch.Tensor:
        """``array`` as a tensor; on CUDA in a reused pinned buffer, so its copy to the GPU is asynchronous.

        Buffers alternate by step: a step fills those of the step before last once the GPU has run its copies
        (run_model waits for them: a step that samples nothing is not waited for by reading its tokens).
        """
        if self.device.type != "cuda":
            return torch.from_numpy(array)
        staged = self._pinned(name, array.size, torch.from_numpy(array[:0]).dtype).view(array.shape)
        staged.numpy()[...] = array
        return staged

    def _pinned(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """``numel`` elements of this step's pinned host buffer ``name`` (two per name, by step parity)."""
        key = (name, self.num_steps % 2)
        buffer = self.pinned.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.pinned[key] = torch.empty(2 * numel, dtype=dtype, pin_memory=True)
        return buffer[:numel]

    def _to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        return self._staged(name, array).to(self.device, non_blocking=True)

    def _input_ids(self, inputs: "StepInputs") -> torch.Tensor:
        """Token ids on the device; a placeholder -(i + 1) is the i-th token sampled by the previous step."""
        return self._token_ids("input_ids", inputs.input_ids)

    def _token_ids(self, name: str, array: np.ndarray, pad: int | None = None) -> torch.Tensor:
        """``array`` on the device with its placeholders resolved and SamplingInputs.PAD made ``pad``."""
        ids = self._to_device(name, array)
        if pad is not None:
            ids = ids.masked_fill(ids == SamplingInputs.PAD, pad)
        if ((array < 0) & (array != SamplingInputs.PAD)).any():
            ids = torch.where(ids < 0, self.prev_sampled[(-ids - 1).clamp(min=0)], ids)
        return ids

    def _adjustments(self, sampling: SamplingInputs, vocab: int) -> LogitsAdjustments | None:
        if sampling.min_p is None and sampling.banned is None and sampling.penalties is None:
            return None
        adjust = LogitsAdjustments()
        if sampling.min_p is not None:
            adjust.min_p = self._to_device("min_p", sampling.min_p)
        if sampling.banned is not None:
            adjust.banned = self._token_ids("banned", sampling.banned, vocab)
        if sampling.penalties is not None:
            adjust.history = self._token_ids("history", sampling.history, vocab)
            adjust.num_prompt = self._to_device("num_prompt", sampling.num_prompt)
            adjust.penalties = self._to_device("penalties", sampling.penalties)
        return adjust

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> SampledTokens | None:
        """Run one step; rank 0 samples a token for each sequence that samples and returns without waiting for
        the GPU. Other ranks return None; they get the tokens too, for the next step's placeholders."""
        try:
            return self._execute(inputs)
        finally:
            if self.device.type == "cuda":
                self.copies_queued[self.num_steps % 2] = torch.cuda.Event()
                self.copies_queued[self.num_steps % 2].record()

    def _execute(self, inputs: StepInputs) -> SampledTokens | None:
        logits, prompt_logprobs = self.run_model(inputs)
        host_buffer = self._host_buffer if self.device.type == "cuda" else None
        sampling = inputs.sampling
        if sampling is None:
            if self.rank:
                return None
            return SampledTokens(torch.empty(0, dtype=torch.int64), None, prompt_logprobs,
                                 host_buffer if prompt_logprobs is not None else None)
        if self.rank == 0:
            vocab = logits.size(-1)
            temperatures = self._to_device("temperatures", sampling.temperatures)
            top_k = self._to_device("top_k", np.where(sampling.top_k > 0, sampling.top_k, vocab))
            top_p = self._to_device("top_p", sampling.top_p)
            generators = [None] * len(sampling.temperatures)
            for row, seed, sample_index, num_generated in sampling.seeds:
                generators[row] = torch.Generator(self.device).manual_seed(stream_seed(seed, sample_index,
                                                                                       num_generated))
            self.prev_sampled = self.sampler(logits, temperatures, top_k, top_p, generators, sampling.filter_top,
                                             self._adjustments(sampling, vocab))
        else:
            self.prev_sampled = torch.empty(len(sampling.temperatures), dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            dist.broadcast(self.prev_sampled, src=0)
        if self.rank:
            return None
        logprobs = None if sampling.num_logprobs is None else _logprobs(logits, self.prev_sampled,
                                                                         sampling.num_logprobs)
        return SampledTokens(self.prev_sampled, logprobs, prompt_logprobs, host_buffer)

    def _host_buffer(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A pinned host buffer of ``tensor``'s shape for its asynchronous copy back."""
        return self._pinned(f"{name} back", tensor.numel(), tensor.dtype).view(tensor.shape)

    def exit(self):
        """Release the model, the KV cache and the graphs, so another engine can use the device."""
        if self.profiler is not None:
            _write_profile(self.profiler, self.rank)
            self.profiler = None
        self.graphs = None
        self.attention_layers = []
        self.model = None
        if self.world_size > 1:
            dist.destroy_process_group()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def prepare_step(batch: ScheduledBatch, block_size: int, retention_window: int,
                 eos_token_ids: frozenset[int] = frozenset()) -> StepInputs:
    """Flatten the scheduled token runs of a batch into the arrays of one forward pass, and its sampling."""
    num_seqs = len(batch)
    starts = np.array(batch.starts, dtype=np.int64)
    counts = np.array(batch.num_tokens, dtype=np.int64)
    dropped = np.array(batch.num_dropped, dtype=np.int64)
    cu_q = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(counts, out=cu_q[1:])
    cu_k = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(starts + counts - dropped, out=cu_k[1:])  # KV slots after the step
    if cu_q[-1] == num_seqs:  # all decodes: one token each
        input_ids = np.fromiter((seq.token_ids[start] for seq, start in zip(batch.seqs, batch.starts)), np.int64,
                                num_seqs)
    else:
        input_ids = np.fromiter((t for seq, start, n in zip(batch.seqs, batch.starts, batch.num_tokens)
                                 for t in seq.token_ids[start:start + n]), np.int64, int(cu_q[-1]))
    seq_of_token = np.repeat(np.arange(num_seqs), counts)
    positions = np.arange(cu_q[-1], dtype=np.int64) - np.repeat(cu_q[:-1] - starts, counts)
    slots = positions - dropped[seq_of_token]
    block_tables = _padded(batch.block_tables, 0, np.int32)
    slot_mapping = (block_tables[seq_of_token, slots // block_size].astype(np.int64) * block_size
                    + slots % block_size)
    logits_indices = cu_q[1:][np.array(batch.sampling)].astype(np.int64) - 1
    compactions = []
    for c in batch.compactions:  # the step ends each compacted sequence's prompt
        num_prompt = int(starts[c.index] + counts[c.index])
        window = min(retention_window, num_prompt)
        end = int(cu_q[c.index + 1])
        prompt_blocks = batch.block_tables[c.index][:-(-num_prompt // block_size)]
        compactions.append((end - window, end, prompt_blocks, num_prompt, c.num_kept, c.block_table))
    sampling = SamplingInputs.of([seq for seq, samples in zip(batch.seqs, batch.sampling) if samples], eos_token_ids)
    return StepInputs(input_ids, positions, cu_q, cu_k, slot_mapping, block_tables, logits_indices,
                      tuple(compactions), sampling, _prompt_logprob_inputs(batch, cu_q))


def _prompt_logprob_inputs(batch: ScheduledBatch, cu_q: np.ndarray) -> PromptLogprobInputs | None:
    positions = batch.prompt_logprob_positions()
    if not positions:
        return None
    rows = np.array([cu_q[i] + position - batch.starts[i] for i, position in positions], dtype=np.int64)
    targets = np.array([batch.seqs[i].token_ids[position + 1] for i, position in positions], dtype=np.int64)
    num_top = max(batch.seqs[i].sampling_params.prompt_logprobs for i, _ in positions)
    return PromptLogprobInputs(rows, targets, num_top)
