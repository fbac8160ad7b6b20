"""Paged KV blocks with reference counts and a prefix cache keyed by hash chains of full blocks."""
from collections import OrderedDict

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


def chain_hash(token_ids: list[int], prefix_hash: int) -> int:
    """Hash of a full block, chained to the hash of the blocks before it (-1 for the first)."""
    h = xxhash.xxh64()
    if prefix_hash != -1:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: list[int] = []  # kept to rule out hash collisions


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with no reference, oldest first; a cached one stays findable until reused.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.num_queried_blocks = 0
        self.num_hit_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def find_cached_blocks(self, seq: Sequence, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """Block ids and hashes of the longest cached prefix of ``seq``'s first ``max_tokens`` tokens.

        By default all but the last token, so that at least one token is computed.
        """
        if not self.enable_prefix_caching:
            return [], []
        block_ids, hashes, prefix_hash = [], [], -1
        for i in range((len(seq) - 1 if max_tokens is None else max_tokens) // self.block_size):
            tokens = seq.block_tokens(i)
            prefix_hash = chain_hash(tokens, prefix_hash)
            block_id = self.hash_to_block_id.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block_ids.append(block_id)
            hashes.append(prefix_hash)
        return block_ids, hashes

    def num_blocks_needed(self, seq: Sequence, num_slots: int, cached_block_ids: list[int] = ()) -> int:
        """Free blocks that ``allocate(seq, num_slots, cached_block_ids)`` would take."""
        have = len(seq.block_table) + len(cached_block_ids)
        new = max(0, -(-num_slots // self.block_size) - have)
        revived = sum(1 for b in cached_block_ids if self.blocks[b].ref_count == 0)
        return new + revived

    def can_allocate(self, seq: Sequence, num_slots: int, cached_block_ids: list[int] = (), extra_blocks: int = 0) -> bool:
        return self.num_blocks_needed(seq, num_slots, cached_block_ids) + extra_blocks <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_slots: int, cached_block_ids: list[int] = (), cached_hashes: list[int] = ()):
        """Give ``seq`` blocks for its first ``num_slots`` KV slots, starting with cached ones."""
        assert self.can_allocate(seq, num_slots, cached_block_ids)
        if not seq.block_table:
            seq.num_cached_tokens = len(cached_block_ids) * self.block_size
            if self.enable_prefix_caching:
                self.num_queried_blocks += (len(seq) - 1) // self.block_size
                self.num_hit_blocks += len(cached_block_ids)
        for block_id in cached_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
        if cached_block_ids:
            seq.block_table = list(cached_block_ids)
            seq.block_hashes = list(cached_hashes)
            seq.num_computed_tokens = seq.num_cached_tokens
        while len(seq.block_table) * self.block_size < num_slots:
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, [], 1
        return block_id

    def allocate_blocks(self, num_blocks: int) -> list[int]:
        """``num_blocks`` fresh blocks, for KV that a retention policy keeps (see ``compact``)."""
        assert num_blocks <= self.num_free_blocks
        return [self._take_free_block() for _ in range(num_blocks)]

    def compact(self, seq: Sequence, block_table: list[int], num_kept: int):
        """Swap ``seq``'s blocks for ``block_table``, which holds the ``num_kept`` KV entries a retention policy
        keeps of its computed tokens. The old blocks are released, their full prompt blocks still findable in the
        prefix cache; the compacted ones never enter it (they are not the KV of a token prefix)."""
        self.cache_full_blocks(seq)
        self._release(seq.block_table)
        seq.block_table = block_table
        seq.block_hashes = []
        seq.num_dropped_tokens = seq.num_computed_tokens - num_kept

    def cache_full_blocks(self, seq: Sequence):
        """Make the full blocks whose K and V are now computed findable by later requests."""
        if not self.enable_prefix_caching or seq.num_dropped_tokens:
            return
        prefix_hash = seq.block_hashes[-1] if seq.block_hashes else -1
        # a stop string may have cut tokens a step computed past it
        for i in range(len(seq.block_hashes), min(seq.num_computed_tokens, len(seq)) // self.block_size):
            tokens = seq.block_tokens(i)
            prefix_hash = chain_hash(tokens, prefix_hash)
            seq.block_hashes.append(prefix_hash)
            if prefix_hash not in self.hash_to_block_id:
                block = self.blocks[seq.block_table[i]]
                block.hash, block.token_ids = prefix_hash, tokens
                self.hash_to_block_id[prefix_hash] = block.block_id

    def free(self, seq: Sequence):
        self._release(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = seq.num_dropped_tokens = 0

    def _release(self, block_ids: list[int]):
        # The tail first, so shared leading blocks are the last to be evicted.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
