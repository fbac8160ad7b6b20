"""BlockManager: paged KV block allocation, reference counts and the hash-chained prefix cache."""
import pytest

from nanovllm.engine.block_manager import BlockManager, chain_hash
from nanovllm.sampling_params import SamplingParams
from nanovllm.engine.sequence import Sequence

BS = 4  # block size used throughout


def make_seq(token_ids, block_size=BS):
    return Sequence(list(token_ids), SamplingParams(), block_size)


def compute(bm: BlockManager, seq: Sequence, num_tokens: int | None = None):
    """Pretend the model computed ``seq``'s first ``num_tokens`` tokens (all by default) and cache full blocks."""
    num_tokens = len(seq) if num_tokens is None else num_tokens
    bm.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    bm.cache_full_blocks(seq)


def admit(bm: BlockManager, seq: Sequence, num_tokens: int | None = None):
    """What the scheduler does for a waiting request: look up the cache, then allocate."""
    ids, hashes = bm.find_cached_blocks(seq)
    bm.allocate(seq, len(seq) if num_tokens is None else num_tokens, ids, hashes)
    return ids


def check_consistency(bm: BlockManager, live: list[Sequence]):
    """ref counts equal the number of live block tables holding each block; free list is exactly the ref-0 blocks."""
    counts = {}
    for seq in live:
        for b in seq.block_table:
            counts[b] = counts.get(b, 0) + 1
    for block in bm.blocks:
        assert block.ref_count == counts.get(block.block_id, 0), f"block {block.block_id}"
    assert set(bm.free_block_ids) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    for h, b in bm.hash_to_block_id.items():
        assert bm.blocks[b].hash == h


# ---------------------------------------------------------------- allocation, ref counts, free

def test_allocate_extends_block_table_without_touching_existing_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    seq = make_seq(range(10, 20))  # 10 tokens -> 3 blocks when complete
    bm.allocate(seq, 5)
    assert len(seq.block_table) == 2
    first = list(seq.block_table)
    assert bm.num_free_blocks == 6
    bm.allocate(seq, 8)  # still fits in 2 blocks: nothing new
    assert seq.block_table == first
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and seq.block_table[:2] == first
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    check_consistency(bm, [seq])


def test_two_sequences_get_disjoint_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=False)
    a, b = make_seq(range(10, 17)), make_seq(range(20, 29))
    bm.allocate(a, len(a))
    bm.allocate(b, len(b))
    assert len(a.block_table) == 2 and len(b.block_table) == 3
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 1
    check_consistency(bm, [a, b])
    a.num_computed_tokens = 7
    bm.free(a)
    assert a.block_table == [] and a.block_hashes == [] and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 3
    check_consistency(bm, [b])
    bm.free(b)
    assert bm.num_free_blocks == 6
    assert all(block.ref_count == 0 for block in bm.blocks)


def test_can_allocate_and_num_blocks_needed_without_cache():
    bm = BlockManager(num_blocks=3, block_size=BS, enable_prefix_caching=False)
    seq = make_seq(range(10, 30))  # 20 tokens
    assert bm.num_blocks_needed(seq, 12) == 3
    assert bm.can_allocate(seq, 12)
    assert not bm.can_allocate(seq, 13)  # 4 blocks
    bm.allocate(seq, 9)
    assert bm.num_blocks_needed(seq, 12) == 0  # already has 3 blocks
    assert bm.num_blocks_needed(seq, 13) == 1
    assert not bm.can_allocate(seq, 13)


def test_prefix_caching_disabled_finds_nothing_and_counts_nothing():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq(range(10, 22))
    compute(bm, a)
    assert bm.hash_to_block_id == {} and a.block_hashes == []
    b = make_seq(range(10, 22))
    assert bm.find_cached_blocks(b) == ([], [])
    bm.allocate(b, len(b))
    assert bm.num_queried_blocks == 0 and bm.num_hit_blocks == 0


# ---------------------------------------------------------------- prefix cache hits

def test_hits_are_full_registered_blocks_and_never_the_last_tokens_block():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = make_seq(range(10, 22))  # 12 tokens = 3 full blocks
    compute(bm, a)
    assert len(a.block_hashes) == 3 and len(bm.hash_to_block_id) == 3

    same = make_seq(range(10, 22))  # identical: the third block holds its last token -> not taken
    ids, hashes = bm.find_cached_blocks(same)
    assert ids == a.block_table[:2] and hashes == a.block_hashes[:2]

    longer = make_seq(list(range(10, 22)) + [99])  # last token in a 4th block -> all 3 hit
    ids, _ = bm.find_cached_blocks(longer)
    assert ids == a.block_table

    diverging = make_seq(list(range(10, 16)) + [77, 78, 79, 80, 81])  # differs inside block 1
    ids, _ = bm.find_cached_blocks(diverging)
    assert ids == a.block_table[:1]

    short = make_seq(range(10, 14))  # one full block only, holding the last token
    assert bm.find_cached_blocks(short) == ([], [])


def test_only_computed_blocks_are_registered():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = make_seq(range(10, 22))
    bm.allocate(a, 12)
    b = make_seq(list(range(10, 22)) + [5])
    # allocated but not computed or registered: no hit
    assert bm.find_cached_blocks(b) == ([], [])
    a.num_computed_tokens = 7  # block 0 full and computed, block 1 only partly
    bm.cache_full_blocks(a)
    ids, _ = bm.find_cached_blocks(b)
    assert ids == a.block_table[:1]
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a)  # incremental: registers blocks 1 and 2
    ids, _ = bm.find_cached_blocks(b)
    assert ids == a.block_table
    assert len(a.block_hashes) == 3


def test_allocating_with_cached_blocks_shares_them_and_sets_computed_tokens():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a = make_seq(range(10, 22))
    compute(bm, a)
    b = make_seq(list(range(10, 18)) + [50, 51, 52])  # shares 2 blocks, 11 tokens -> 3 blocks
    ids = admit(bm, b)
    assert ids == a.block_table[:2]
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert b.block_hashes == a.block_hashes[:2]
    assert [bm.blocks[x].ref_count for x in b.block_table] == [2, 2, 1]
    check_consistency(bm, [a, b])
    a_tail = a.block_table[2]
    bm.free(a)
    assert [bm.blocks[x].ref_count for x in b.block_table] == [1, 1, 1]
    assert bm.blocks[a_tail].ref_count == 0 and a_tail in bm.free_block_ids
    check_consistency(bm, [b])
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_hash_chain_same_block_after_different_prefix_is_not_a_hit():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    p0, p1, q, r = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]
    x = make_seq(p0 + q)  # q after p0
    z = make_seq(p1 + r)  # p1 cached as a first block
    compute(bm, x)
    compute(bm, z)
    y = make_seq(p1 + q + [99])  # p1 hits, but q after p1 was never computed
    ids, hashes = bm.find_cached_blocks(y)
    assert ids == z.block_table[:1]
    assert hashes == [chain_hash(p1, -1)]
    # the hash of a block depends on its prefix
    assert chain_hash(q, chain_hash(p0, -1)) != chain_hash(q, chain_hash(p1, -1))
    assert chain_hash(q, chain_hash(p0, -1)) != chain_hash(q, -1)
    # and q after p0 is a hit
    ids, _ = bm.find_cached_blocks(make_seq(p0 + q + [99]))
    assert ids == x.block_table


def test_freed_cached_blocks_stay_findable_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = make_seq(range(10, 18))  # 2 blocks
    compute(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    probe = make_seq(list(range(10, 18)) + [1])
    ids, _ = bm.find_cached_blocks(probe)
    assert ids == a_blocks  # ref 0 but still cached

    # The pool is exhausted by other content: the 2 never-used blocks go first, then a's tail block.
    other = make_seq(range(100, 112))  # 3 blocks
    bm.allocate(other, len(other))
    assert set(other.block_table) == (set(range(4)) - set(a_blocks)) | {a_blocks[1]}
    ids, _ = bm.find_cached_blocks(probe)
    assert ids == a_blocks[:1]  # the head block survives, the evicted tail is gone from the cache
    assert bm.blocks[a_blocks[1]].hash == -1
    assert len(bm.hash_to_block_id) == 1

    other2 = make_seq(range(200, 204))
    bm.allocate(other2, 4)  # takes the last free block: a's head block
    assert other2.block_table == a_blocks[:1]
    assert bm.find_cached_blocks(probe) == ([], [])
    assert bm.hash_to_block_id == {}
    check_consistency(bm, [other, other2])


def test_evicted_block_reused_with_new_content_is_findable_by_new_content_only():
    bm = BlockManager(num_blocks=2, block_size=BS, enable_prefix_caching=True)
    a = make_seq(range(10, 18))
    compute(bm, a)
    bm.free(a)
    b = make_seq(range(30, 38))
    compute(bm, b)  # reuses both blocks
    assert sorted(b.block_table) == [0, 1]
    assert bm.find_cached_blocks(make_seq(list(range(10, 18)) + [1])) == ([], [])
    ids, _ = bm.find_cached_blocks(make_seq(list(range(30, 38)) + [1]))
    assert ids == b.block_table


def test_hit_and_query_counters():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    a = make_seq(range(10, 23))  # 13 tokens: 3 queryable blocks
    assert admit(bm, a) == []
    assert (bm.num_queried_blocks, bm.num_hit_blocks) == (3, 0)
    a.num_computed_tokens = 13
    bm.cache_full_blocks(a)

    b = make_seq(list(range(10, 18)) + [70, 71, 72, 73, 74, 75])  # 14 tokens: 3 queryable, 2 hits
    assert len(admit(bm, b)) == 2
    assert (bm.num_queried_blocks, bm.num_hit_blocks) == (6, 2)

    c = make_seq(range(10, 23))  # same as a: (13-1)//4 = 3 queryable, 3 hits
    assert len(admit(bm, c)) == 3
    assert (bm.num_queried_blocks, bm.num_hit_blocks) == (9, 5)

    # Extending an existing block table is not a new query.
    c.token_ids += [1, 2, 3, 4]
    bm.allocate(c, len(c))
    assert (bm.num_queried_blocks, bm.num_hit_blocks) == (9, 5)


def test_can_allocate_counts_revived_ref0_cached_blocks():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = make_seq(range(10, 18))
    compute(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4

    b = make_seq(list(range(10, 18)) + [1, 2, 3, 4, 5])  # 13 tokens -> 4 blocks, 2 of them cached
    ids, hashes = bm.find_cached_blocks(b)
    assert len(ids) == 2
    # 2 new + 2 revived from the free list
    assert bm.num_blocks_needed(b, 13, ids) == 4
    assert bm.can_allocate(b, 13, ids)
    too_long = make_seq(list(range(10, 18)) + list(range(1, 10)))  # 17 tokens -> 5 blocks
    ids2, _ = bm.find_cached_blocks(too_long)
    assert bm.num_blocks_needed(too_long, 17, ids2) == 5
    assert not bm.can_allocate(too_long, 17, ids2)

    bm.allocate(b, 13, ids, hashes)
    assert bm.num_free_blocks == 0
    assert b.block_table[:2] == ids
    check_consistency(bm, [b])


def test_cached_blocks_still_referenced_are_not_counted_as_free_blocks_needed():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = make_seq(range(10, 18))
    compute(bm, a)  # a keeps its 2 blocks
    b = make_seq(list(range(10, 18)) + [1, 2, 3, 4, 5])  # 4 blocks, 2 shared with live a
    ids, hashes = bm.find_cached_blocks(b)
    assert bm.num_blocks_needed(b, 13, ids) == 2
    assert bm.can_allocate(b, 13, ids)
    bm.allocate(b, 13, ids, hashes)
    assert bm.num_free_blocks == 0
    check_consistency(bm, [a, b])
    bm.free(a)
    assert bm.num_free_blocks == 0  # shared blocks still held by b
    check_consistency(bm, [b])


def test_allocate_asserts_when_the_pool_is_too_small():
    bm = BlockManager(num_blocks=2, block_size=BS, enable_prefix_caching=False)
    with pytest.raises(AssertionError):
        bm.allocate(make_seq(range(10, 19)), 9)
    assert bm.num_free_blocks == 2
