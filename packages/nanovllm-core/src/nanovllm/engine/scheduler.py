"""Continuous batching under a token budget, with chunked prefill, preemption by recompute and KV retention."""
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.kv_retention import KVRetentionPolicy

logger = logging.getLogger(__name__)


@dataclass
class Compaction:
    """Retention work in a step: sequence ``index`` of the batch completes its prompt, and its ``num_kept``
    KV entries per layer and head go to the fresh blocks ``block_table``."""

    index: int
    num_kept: int
    block_table: list[int]


@dataclass
class ScheduledBatch:
    """One step as the scheduler decided it: the model runner and the engine read it, nothing recomputes it.

    Sequence i computes the tokens at positions [starts[i], starts[i] + num_tokens[i]); a token at position p
    has its K and V in slot p - num_dropped[i] of ``block_tables[i]`` (the step's own tables: a compaction
    gives the sequence new ones for later steps).
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    num_dropped: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    sampling: list[bool] = field(default_factory=list)  # its last token is computed: it samples the next
    compactions: list[Compaction] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0

    def add(self, seq: Sequence, num_tokens: int, num_kept: int, block_table: list[int]):
        if num_kept:
            self.compactions.append(Compaction(len(self.seqs), num_kept, block_table))
        start = seq.num_computed_tokens
        self.seqs.append(seq)
        self.num_tokens.append(num_tokens)
        self.starts.append(start)
        self.num_dropped.append(seq.num_dropped_tokens)
        self.block_tables.append(seq.block_table)
        self.sampling.append(start + num_tokens == len(seq))
        if num_tokens == 1 and start >= seq.num_prompt_tokens:
            self.num_decode_tokens += 1
        else:
            self.num_prefill_tokens += num_tokens

    def __len__(self):
        return len(self.seqs)

    def prompt_logprob_positions(self) -> list[tuple[int, int]]:
        """(sequence index, position) of each computed prompt token whose logits give the next prompt token's
        log-probability, for the sequences that ask for prompt logprobs."""
        return [(i, position) for i, (seq, start, n) in enumerate(zip(self.seqs, self.starts, self.num_tokens))
                if seq.prompt_logprobs is not None
                for position in range(start, min(start + n, seq.num_prompt_tokens - 1))]


class Scheduler:
    def __init__(self, config: Config, num_kvcache_blocks: int, retention: KVRetentionPolicy | None = None):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.long_prefill_token_threshold = config.long_prefill_token_threshold
        self.max_prompt_chunk = config.long_prefill_token_threshold or config.max_num_batched_tokens
        self.eos_token_ids = config.eos_token_ids
        self.block_manager = BlockManager(num_kvcache_blocks, config.kvcache_block_size, config.enable_prefix_caching)
        self.retention = retention
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first: the newest is preempted first
        self.num_preemptions = 0

    @staticmethod
    def check_retention(config: Config, retention: KVRetentionPolicy):
        """A policy's window must fit the tokens a step has for one prompt when every other sequence decodes."""
        threshold = config.long_prefill_token_threshold
        if threshold and retention.window > threshold:
            raise ValueError(f"the KV-retention policy {retention.name!r} reads the last {retention.window} queries of "
                             f"a prompt in one step, more than long_prefill_token_threshold={threshold} lets a prompt "
                             f"compute: raise the threshold to {retention.window} or more")
        room = config.max_num_batched_tokens - config.max_num_seqs + 1
        if retention.window > room:
            raise ValueError(f"the KV-retention policy {retention.name!r} reads the last {retention.window} queries of "
                             f"a prompt in one step, but a step with max_num_seqs={config.max_num_seqs} running "
                             f"sequences may have as few as max_num_batched_tokens - max_num_seqs + 1 = {room} tokens "
                             f"for it: raise max_num_batched_tokens or lower max_num_seqs")

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> ScheduledBatch:
        """Running decodes first, then prefills in progress, then waiting requests, in the budget; the
        scheduled tokens count as computed from here on (their sampled tokens come with ``update``)."""
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch()
        scheduled: set[int] = set()
        decodes = [seq for seq in self.running if seq.num_uncomputed_tokens == 1]
        prefills = [seq for seq in self.running if seq.num_uncomputed_tokens > 1]
        room = self._room_for_short_prompts(budget - len(decodes))
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING or seq.finish_reason:
                continue  # preempted earlier in this loop, or its last token is in flight
            long_prefill = seq.num_uncomputed_tokens > 1 and seq.num_prompt_tokens > self.long_prefill_token_threshold
            num_tokens, num_kept = self._chunk(seq, seq.num_computed_tokens,
                                               max(0, budget - room) if long_prefill else budget)
            if num_tokens == 0:
                continue
            fresh = self._blocks_for(num_kept)
            if num_tokens > 1 and seq.num_computed_tokens + num_tokens < len(seq):
                logger.debug("sequence %d: prefill chunk of %d tokens from %d of %d", seq.seq_id, num_tokens,
                             seq.num_computed_tokens, len(seq))
            if self._make_room(seq, seq.num_kv_slots + num_tokens, fresh, scheduled):
                self.block_manager.allocate(seq, seq.num_kv_slots + num_tokens)
                batch.add(seq, num_tokens, num_kept, self.block_manager.allocate_blocks(fresh))
                scheduled.add(seq.seq_id)
                budget -= num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.token_ids[-1] < 0:
                break  # preempted with a token still in flight: recompute once it is known
            if self._waits_for_first_sample(seq):
                break  # the prompt's other samples start from its first one's blocks, once they are cached
            cached_ids, cached_hashes = self.block_manager.find_cached_blocks(seq, self._cacheable_tokens(seq))
            num_computed = len(cached_ids) * self.block_manager.block_size
            num_tokens, num_kept = self._chunk(seq, num_computed, budget)
            whole = (seq.num_prompt_tokens if self._compacts(seq) else len(seq)) - num_computed
            if num_tokens == 0 or (num_tokens < whole and not self.enable_chunked_prefill):
                break
            fresh = self._blocks_for(num_kept)
            if not self.block_manager.can_allocate(seq, num_computed + num_tokens, cached_ids, fresh):
                break
            self.block_manager.allocate(seq, num_computed + num_tokens, cached_ids, cached_hashes)
            logger.debug("admitting sequence %d: %d tokens, %d from the prefix cache, %d computed now%s", seq.seq_id,
                         len(seq), num_computed, num_tokens, " (a chunk)" if num_tokens < whole else "")
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_tokens, num_kept, self.block_manager.allocate_blocks(fresh))
            budget -= num_tokens
        self._advance(batch)
        return batch

    def _room_for_short_prompts(self, budget: int) -> int:
        """Tokens that prompts longer than long_prefill_token_threshold leave in the step for the waiting prompts at
        the queue's head that are not, and that have a sequence slot and free blocks: those start at once, whole,
        instead of after a long prompt's chunk or split by it (as vLLM's partial-prefill limits let them)."""
        if not self.long_prefill_token_threshold:
            return 0
        room, blocks = 0, 0
        for seq in itertools.islice(self.waiting, max(0, self.max_num_seqs - len(self.running))):
            if (len(seq) > self.long_prefill_token_threshold or room + len(seq) > budget or seq.token_ids[-1] < 0
                    or self._waits_for_first_sample(seq)):
                break
            blocks += self.block_manager.num_blocks_needed(seq, len(seq))
            if blocks > self.block_manager.num_free_blocks:
                break
            room += len(seq)
        return room

    def _waits_for_first_sample(self, seq: Sequence) -> bool:
        """A prompt's later sample, never run, waits while its first sample runs and has not yet cached the
        prompt's full blocks (not when that cannot happen: no prefix caching, a compacted or waiting first)."""
        first = seq.first_sample
        if (first is None or seq.num_completion_tokens or first.status != SequenceStatus.RUNNING
                or not self.block_manager.enable_prefix_caching or self._compacts(first) or first.num_dropped_tokens):
            return False
        return len(first.block_hashes) < (seq.num_prompt_tokens - 1) // self.block_manager.block_size

    def _compacts(self, seq: Sequence) -> bool:
        """Whether the retention policy will drop KV of ``seq`` when its prompt completes (not done yet)."""
        return (self.retention is not None and seq.num_computed_tokens <= seq.num_prompt_tokens
                and not seq.num_dropped_tokens and self.retention.num_kept(seq.num_prompt_tokens) < seq.num_prompt_tokens)

    def _window(self, seq: Sequence) -> int:
        """Prompt tokens that the step completing the prompt must compute: the policy's window, at least one."""
        return min(max(self.retention.window, 1), seq.num_prompt_tokens)

    def _cacheable_tokens(self, seq: Sequence) -> int:
        """How many leading tokens may come from the prefix cache: all but the last, and never the prompt's
        window when it will be compacted (its queries must be computed); none when every prompt token's logits
        are asked for."""
        if seq.prompt_logprobs is not None:
            return 0
        if self._compacts(seq):
            return seq.num_prompt_tokens - self._window(seq)
        return len(seq) - 1

    def _chunk(self, seq: Sequence, start: int, budget: int) -> tuple[int, int]:
        """Tokens to compute from position ``start`` in ``budget``, and the KV entries to keep after them (0: no
        compaction). A chunk that reaches the prompt's end stops there when the prompt is compacted, and no chunk
        ends inside the policy's window, whose queries must all be computed in the compacting step. A prompt
        computes at most long_prefill_token_threshold tokens (when set) per step."""
        num_tokens = min(len(seq) - start, budget, self.max_prompt_chunk)
        if not self._compacts(seq):
            return num_tokens, 0
        prompt, end = seq.num_prompt_tokens, start + num_tokens
        if end >= prompt:
            return prompt - start, self.retention.num_kept(prompt)
        return max(0, min(end, prompt - self._window(seq)) - start), 0

    def _blocks_for(self, num_kept: int) -> int:
        return -(-num_kept // self.block_manager.block_size)

    def _make_room(self, seq: Sequence, num_slots: int, extra_blocks: int, scheduled: set[int]) -> bool:
        """Preempt the newest unscheduled sequences until ``seq`` fits; False if ``seq`` itself went."""
        while not self.block_manager.can_allocate(seq, num_slots, extra_blocks=extra_blocks):
            victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence):
        logger.debug("preempting sequence %d: out of KV blocks", seq.seq_id)
        self.num_preemptions += 1
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _advance(self, batch: ScheduledBatch):
        """Count the batch's tokens as computed before the step runs, and apply its compactions.

        Each sequence that samples gets a placeholder token ``-(i + 1)``: "the i-th token sampled by the step in
        flight", which the next step can read on the device. A sequence whose token is its last by length is
        marked so and scheduled no more.
        """
        num_sampling = 0
        for seq, num_tokens, sampling in zip(batch.seqs, batch.num_tokens, batch.sampling):
            seq.num_computed_tokens += num_tokens
            if not sampling:
                continue
            num_sampling += 1
            seq.token_ids.append(-num_sampling)
            if seq.num_completion_tokens >= seq.sampling_params.max_tokens or len(seq) >= self.max_model_len:
                seq.finish_reason = "length"
        for compaction in batch.compactions:
            self.block_manager.compact(batch.seqs[compaction.index], compaction.block_table, compaction.num_kept)

    def update(self, batch: ScheduledBatch, sampled_token_ids: list[int],
               stop_string_hit: Callable[[Sequence, int], bool] = lambda seq, end: False,
               logprobs: list | None = None, prompt_logprobs: list | None = None) -> list[Sequence]:
        """Put a step's sampled tokens (one per sampling sequence) in place of their placeholders; finish the
        sequences that stop or reached their length; returns them. ``stop_string_hit(seq, end)`` says whether the
        output's first ``end - num_prompt_tokens`` tokens complete one of its stop strings. ``logprobs`` and
        ``prompt_logprobs``: the step's rows of them, where asked (see SampledTokens)."""
        if prompt_logprobs:  # the positions are only looked for in steps that computed some
            for (i, position), (target, logprob, top) in zip(batch.prompt_logprob_positions(), prompt_logprobs):
                seq = batch.seqs[i]  # a position computed twice (after a preemption) gets the same entry again
                seq.prompt_logprobs[position + 1] = dict(top[:seq.sampling_params.prompt_logprobs]) | {target: logprob}
        finished = []
        sampling = (i for i, samples in enumerate(batch.sampling) if samples)
        for row, (i, token_id) in enumerate(zip(sampling, sampled_token_ids)):
            seq, index = batch.seqs[i], batch.starts[i] + batch.num_tokens[i]
            if seq.status == SequenceStatus.FINISHED:
                continue
            seq.token_ids[index] = token_id
            params = seq.sampling_params
            if params.logprobs is not None:  # the sampled token's and the top ones', as vLLM gives them
                sampled, logprob, top = logprobs[row]
                seq.logprobs.append(dict(top[:params.logprobs]) | {sampled: logprob})
            if (token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)
                    or (params.stop and stop_string_hit(seq, index + 1))):
                seq.finish_reason = "stop"
                del seq.token_ids[index + 1:]  # a token the next step computed past the stop
            if seq.finish_reason and index == len(seq) - 1:
                self._finish(seq)
                finished.append(seq)
            else:
                self.block_manager.cache_full_blocks(seq)
        return finished

    def _finish(self, seq: Sequence):
        if seq.status == SequenceStatus.RUNNING:
            self.block_manager.cache_full_blocks(seq)  # the last step's blocks too: a later prompt may share them
            self.block_manager.free(seq)
            self.running.remove(seq)
        else:  # preempted while its last token was in flight; its blocks are already free
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def abort_all(self):
        """Drop every unfinished request and free its blocks (after an error mid-generate)."""
        for seq in self.running:
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
        self.running.clear()
        self.waiting.clear()
