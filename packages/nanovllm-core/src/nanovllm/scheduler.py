"""Continuous batching under a token budget, with chunked prefill and preemption by recompute."""
import logging
from collections import deque

from nanovllm.block_manager import BlockManager
from nanovllm.config import Config
from nanovllm.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

# One step's work: each scheduled sequence with the number of its tokens to compute now.
Batch = list[tuple[Sequence, int]]


class Scheduler:
    def __init__(self, config: Config, num_kvcache_blocks: int):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.eos_token_ids = config.eos_token_ids
        self.block_manager = BlockManager(num_kvcache_blocks, config.kvcache_block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first: the newest is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> Batch:
        """Running decodes first, then prefills in progress, then waiting requests, in the budget."""
        budget = self.max_num_batched_tokens
        batch: Batch = []
        scheduled: set[int] = set()
        decodes = [seq for seq in self.running if seq.num_uncomputed_tokens == 1]
        prefills = [seq for seq in self.running if seq.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING or seq.finish_reason:
                continue  # preempted earlier in this loop, or its last token is in flight
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if self._make_room(seq, seq.num_computed_tokens + num_tokens, scheduled):
                self.block_manager.allocate(seq, seq.num_computed_tokens + num_tokens)
                batch.append((seq, num_tokens))
                scheduled.add(seq.seq_id)
                budget -= num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.token_ids[-1] < 0:
                break  # preempted with a token still in flight: recompute once it is known
            cached_ids, cached_hashes = self.block_manager.find_cached_blocks(seq)
            num_computed = len(cached_ids) * self.block_manager.block_size
            num_tokens = min(len(seq) - num_computed, budget)
            if num_tokens < len(seq) - num_computed and not self.enable_chunked_prefill:
                break
            if not self.block_manager.can_allocate(seq, num_computed + num_tokens, cached_ids):
                break
            self.block_manager.allocate(seq, num_computed + num_tokens, cached_ids, cached_hashes)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append((seq, num_tokens))
            budget -= num_tokens
        return batch

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[int]) -> bool:
        """Preempt the newest unscheduled sequences until ``seq`` fits; False if ``seq`` itself went."""
        while not self.block_manager.can_allocate(seq, num_tokens):
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

    def postprocess(self, batch: Batch, sampled_token_ids: list[int]) -> list[Sequence]:
        """Advance the batch and fill in its sampled tokens at once; return the finished sequences.

        ``sampled_token_ids`` holds one token for each sequence whose every token is now computed.
        """
        return self.resolve(self.advance(batch), sampled_token_ids)

    def advance(self, batch: Batch) -> list[tuple[Sequence, int]]:
        """Count a launched step's tokens as computed, before its sampled tokens are known.

        Each sequence that samples gets a placeholder token ``-(i + 1)``: "the i-th token sampled by
        the step in flight", which the next step can read on the device. A sequence whose token is
        its last by length is marked so and scheduled no more. Returns (sequence, placeholder index).
        """
        pending = []
        for seq, num_tokens in batch:
            seq.num_computed_tokens += num_tokens
            if seq.num_uncomputed_tokens:
                continue  # a prefill chunk: nothing to sample yet
            seq.token_ids.append(-(len(pending) + 1))
            pending.append((seq, len(seq) - 1))
            params = seq.sampling_params
            if seq.num_completion_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
                seq.finish_reason = "length"
        return pending

    def resolve(self, pending: list[tuple[Sequence, int]], sampled_token_ids: list[int]) -> list[Sequence]:
        """Put sampled tokens in place of their placeholders; finish sequences that stop or reached length."""
        finished = []
        for (seq, index), token_id in zip(pending, sampled_token_ids):
            if seq.status == SequenceStatus.FINISHED:
                continue
            seq.token_ids[index] = token_id
            params = seq.sampling_params
            if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
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
