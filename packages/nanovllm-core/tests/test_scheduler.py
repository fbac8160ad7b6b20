"""Scheduler driven without a model: continuous batching, chunked prefill, preemption, finishing.

A tiny fake "model" (FakeKV) writes each computed token id into a shadow copy of the paged KV
cache, so the tests can check that every sequence always reads back its own tokens, also across
prefix-cache sharing and preemption by recompute.
"""
import random
from types import SimpleNamespace

import pytest

from nanovllm.sampling_params import SamplingParams
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.kv_retention import KVRetentionPolicy

EOS = 2


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=1024,
                   chunked=True, prefix=False, eos=(EOS,), long_prefill_token_threshold=0):
    config = SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=max_model_len, enable_chunked_prefill=chunked,
                             long_prefill_token_threshold=long_prefill_token_threshold,
                             eos_token_ids=frozenset(eos), kvcache_block_size=block_size,
                             enable_prefix_caching=prefix)
    sched = Scheduler(config, num_blocks)
    sched.test_kv = FakeKV(block_size)  # the shadow KV cache of this scheduler's blocks
    return sched


def make_seq(sched, n_or_tokens, start=100, **params):
    tokens = list(range(start, start + n_or_tokens)) if isinstance(n_or_tokens, int) else list(n_or_tokens)
    params.setdefault("max_tokens", 1000)
    params.setdefault("ignore_eos", False)
    seq = Sequence(tokens, SamplingParams(**params), sched.block_manager.block_size)
    sched.add(seq)
    return seq


def num_to_sample(batch):
    """Sequences whose every token is computed once the step is done: they get a sampled token."""
    return sum(batch.sampling)


def pairs(batch):
    """(sequence, tokens computed) for each sequence of a scheduled batch."""
    return list(zip(batch.seqs, batch.num_tokens))


def step(sched, token=7):
    batch = sched.schedule()
    assert batch, "scheduler returned an empty batch while requests were pending"
    return batch, post(sched, batch, [token] * num_to_sample(batch))


def post(sched, batch, sampled):
    """Check the batch, 'run the model' on the shadow KV cache, then update the scheduler."""
    check_batch(sched, batch)
    sched.test_kv.run(batch)
    return sched.update(batch, sampled)


def check_batch(sched, batch):
    seqs = batch.seqs
    assert len({s.seq_id for s in seqs}) == len(seqs), "a sequence was scheduled twice"
    assert sum(batch.num_tokens) <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    for seq, n, start, dropped, table in zip(seqs, batch.num_tokens, batch.starts, batch.num_dropped,
                                             batch.block_tables):
        assert n >= 1
        assert seq.status == SequenceStatus.RUNNING and seq in sched.running
        assert start + n == seq.num_computed_tokens and start + n <= len(seq)
        assert len(table) * sched.block_manager.block_size >= start + n - dropped
    check_blocks(sched)


def check_blocks(sched):
    bm = sched.block_manager
    counts = {}
    for seq in sched.running:
        for b in seq.block_table:
            counts[b] = counts.get(b, 0) + 1
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    for block in bm.blocks:
        assert block.ref_count == counts.get(block.block_id, 0), f"block {block.block_id} ref count"
    assert set(bm.free_block_ids) == {b.block_id for b in bm.blocks if b.ref_count == 0}


class FakeKV:
    """Shadow paged KV cache: slot -> token id written there. Checks each read sees the right token.

    A compaction keeps the prompt's last ``num_kept`` entries (as the test policy below would), so slot s of a
    sequence always holds position s + num_dropped.
    """

    def __init__(self, block_size):
        self.block_size = block_size
        self.slots = {}

    def slot(self, table, index):
        return table[index // self.block_size], index % self.block_size

    def run(self, batch):
        runs = list(zip(batch.seqs, batch.num_tokens, batch.starts, batch.num_dropped, batch.block_tables))
        for seq, n, start, dropped, table in runs:
            # attention reads the kept entries before this step's tokens: they must hold this sequence's tokens
            for pos in range(dropped, start):
                assert self.slots.get(self.slot(table, pos - dropped)) == seq.token_ids[pos], \
                    f"seq {seq.seq_id} reads a wrong KV entry at position {pos}"
        for seq, n, start, dropped, table in runs:
            for pos in range(start, start + n):
                self.slots[self.slot(table, pos - dropped)] = seq.token_ids[pos]
        for compaction in batch.compactions:
            _, n, start, _, table = runs[compaction.index]
            for j in range(compaction.num_kept):
                kept = self.slots[self.slot(table, start + n - compaction.num_kept + j)]
                self.slots[self.slot(compaction.block_table, j)] = kept


def drive(sched, sample=lambda seq: 7, max_steps=10_000):
    """Run until every request is done; returns (steps, finished in order)."""
    finished = []
    steps = 0
    while not sched.is_finished():
        steps += 1
        assert steps <= max_steps, "no progress: the driver loop does not terminate"
        batch = sched.schedule()
        assert batch, "scheduler returned an empty batch while requests were pending"
        sampled = [sample(seq) for seq, samples in zip(batch.seqs, batch.sampling) if samples]
        finished += post(sched, batch, sampled)
    return steps, finished


def assert_all_blocks_free(sched):
    bm = sched.block_manager
    assert all(block.ref_count == 0 for block in bm.blocks)
    assert bm.num_free_blocks == len(bm.blocks)


# ---------------------------------------------------------------- continuous batching

def test_max_num_seqs_limits_running_and_finished_slots_are_refilled():
    sched = make_scheduler(max_num_seqs=2)
    a = make_seq(sched, 4, max_tokens=1)
    b = make_seq(sched, 4, max_tokens=3)
    c = make_seq(sched, 4, max_tokens=2)
    d = make_seq(sched, 4, max_tokens=2)
    batch, finished = step(sched)
    assert pairs(batch) == [(a, 4), (b, 4)]
    assert finished == [a] and a.finish_reason == "length"
    assert list(sched.waiting) == [c, d]
    # a's slot is refilled in the very next step, alongside b's decode
    batch, finished = step(sched)
    assert pairs(batch) == [(b, 1), (c, 4)]
    assert list(sched.waiting) == [d]
    batch, finished = step(sched)
    assert pairs(batch) == [(b, 1), (c, 1)]
    assert set(finished) == {b, c}
    batch, finished = step(sched)
    assert pairs(batch) == [(d, 4)]
    batch, finished = step(sched)
    assert pairs(batch) == [(d, 1)] and finished == [d]
    assert sched.is_finished()
    assert_all_blocks_free(sched)


def test_max_num_batched_tokens_caps_a_step_and_chunks_the_last_prompt():
    sched = make_scheduler(max_num_batched_tokens=10, chunked=True)
    a, b, c = (make_seq(sched, 4, start=100 + 10 * i) for i in range(3))
    batch, _ = step(sched)
    assert pairs(batch) == [(a, 4), (b, 4), (c, 2)]
    assert c.num_computed_tokens == 2 and len(c) == 4  # no token sampled for a partial prefill
    assert len(a) == 5 and len(b) == 5
    batch, _ = step(sched)
    assert pairs(batch) == [(a, 1), (b, 1), (c, 2)]
    assert len(c) == 5


def test_chunked_prefill_splits_a_long_prompt_over_steps():
    sched = make_scheduler(max_num_batched_tokens=10, chunked=True)
    seq = make_seq(sched, 25, max_tokens=2)
    progress = []
    for _ in range(3):
        batch, finished = step(sched, token=42)
        progress.append((batch.num_tokens[0], seq.num_computed_tokens, len(seq)))
        assert not finished
    assert progress == [(10, 10, 25), (10, 20, 25), (5, 25, 26)]
    assert seq.completion_token_ids == [42]
    assert len(seq.block_table) == 7  # ceil(25 / 4)
    batch, finished = step(sched, token=43)
    assert pairs(batch) == [(seq, 1)] and finished == [seq]
    assert seq.completion_token_ids == [42, 43] and seq.finish_reason == "length"


def test_step_order_is_decodes_then_running_prefills_then_waiting():
    sched = make_scheduler(max_num_batched_tokens=10, chunked=True)
    dec = make_seq(sched, 2, start=100)
    pre = make_seq(sched, 20, start=200)
    batch, _ = step(sched)
    assert pairs(batch) == [(dec, 2), (pre, 8)]
    batch, _ = step(sched)
    assert pairs(batch) == [(dec, 1), (pre, 9)]
    new = make_seq(sched, 3, start=300)
    batch, _ = step(sched)
    assert pairs(batch) == [(dec, 1), (pre, 3), (new, 3)]


def test_decodes_go_before_an_older_prefill_in_progress():
    sched = make_scheduler(max_num_batched_tokens=10, chunked=True)
    dec = make_seq(sched, 2, start=100)
    pre = make_seq(sched, 30, start=200)
    step(sched)
    # White-box setup: make the prefill the older of the two running sequences.
    sched.running.reverse()
    assert sched.running == [pre, dec]
    new = make_seq(sched, 3, start=300)
    batch = sched.schedule()
    assert pairs(batch) == [(dec, 1), (pre, 9)]  # the decode first; the newcomer gets no budget
    assert list(sched.waiting) == [new]


def test_running_decodes_are_not_starved_by_a_long_prompt():
    sched = make_scheduler(max_num_batched_tokens=16, chunked=True)
    decoders = [make_seq(sched, 3, start=100 + 10 * i) for i in range(3)]
    step(sched)
    lengths = [len(s) for s in decoders]
    long = make_seq(sched, 100, start=500)
    for i in range(1, 8):
        batch, _ = step(sched)
        assert pairs(batch)[:3] == [(s, 1) for s in decoders]
        assert pairs(batch)[3] == (long, 13)
        assert [len(s) for s in decoders] == [n + i for n in lengths]
    assert long.num_computed_tokens == 7 * 13


def test_long_prefill_token_threshold_caps_each_prompt_so_a_new_short_one_starts_at_once():
    sched = make_scheduler(max_num_batched_tokens=16, long_prefill_token_threshold=5)
    dec = make_seq(sched, 2, start=100, max_tokens=8)
    step(sched)
    long = make_seq(sched, 40, start=200, max_tokens=4)
    batch, _ = step(sched)
    assert pairs(batch) == [(dec, 1), (long, 5)]
    short = make_seq(sched, 3, start=300, max_tokens=4)
    batch, _ = step(sched)
    assert pairs(batch) == [(dec, 1), (long, 5), (short, 3)]  # without the cap the long prompt took the budget
    other_long = make_seq(sched, 9, start=400, max_tokens=4)
    batch, _ = step(sched)
    assert pairs(batch) == [(dec, 1), (short, 1), (long, 5), (other_long, 5)]
    drive(sched)
    assert [s.num_completion_tokens for s in (dec, long, short, other_long)] == [8, 4, 4, 4]
    assert_all_blocks_free(sched)


def test_a_long_prompt_leaves_room_in_the_step_for_a_waiting_short_one():
    sched = make_scheduler(max_num_batched_tokens=12, long_prefill_token_threshold=8)
    dec = make_seq(sched, 2, start=100, max_tokens=8)
    step(sched)
    long = make_seq(sched, 40, start=200, max_tokens=4)
    batch, _ = step(sched)
    assert pairs(batch) == [(dec, 1), (long, 8)]
    short = make_seq(sched, 6, start=300, max_tokens=4)
    batch, _ = step(sched)
    assert pairs(batch) == [(dec, 1), (long, 5), (short, 6)]  # not (long, 8), (short, 3): whole, in one step
    batch, _ = step(sched)
    assert pairs(batch) == [(dec, 1), (short, 1), (long, 8)]
    drive(sched)
    assert [s.num_completion_tokens for s in (dec, long, short)] == [8, 4, 4]
    assert_all_blocks_free(sched)


def test_no_room_is_left_for_a_short_prompt_that_cannot_start():
    sched = make_scheduler(max_num_batched_tokens=12, long_prefill_token_threshold=8, max_num_seqs=2)
    dec = make_seq(sched, 2, start=100, max_tokens=3)
    long = make_seq(sched, 40, start=200, max_tokens=4)
    step(sched)
    short = make_seq(sched, 6, start=300, max_tokens=4)  # no sequence slot until dec finishes
    batch, _ = step(sched)
    assert pairs(batch) == [(dec, 1), (long, 8)]
    drive(sched)
    assert [s.num_completion_tokens for s in (dec, long, short)] == [3, 4, 4]
    assert_all_blocks_free(sched)


def test_a_long_prompt_gets_no_tokens_when_a_prefill_before_it_took_the_room():
    sched = make_scheduler(max_num_batched_tokens=12, long_prefill_token_threshold=8)
    recomputed = make_seq(sched, 4, start=100, max_tokens=100)
    for _ in range(17):
        step(sched)
    long = make_seq(sched, 40, start=200, max_tokens=4)
    step(sched)
    sched._preempt(recomputed)  # White-box: recomputed as a prefill of 22 tokens, ahead of the long prompt
    batch, _ = step(sched)
    assert pairs(batch) == [(long, 8), (recomputed, 4)]
    sched.running.reverse()
    short = make_seq(sched, 6, start=300, max_tokens=4)
    batch, _ = step(sched)
    assert pairs(batch) == [(recomputed, 8), (short, 4)]  # the long prompt's share, 12 - 8 - 6, is none
    drive(sched)
    assert [s.num_completion_tokens for s in (recomputed, long, short)] == [100, 4, 4]
    assert_all_blocks_free(sched)


@pytest.mark.parametrize("prefix", [False, True])
def test_short_and_long_prompts_arriving_mid_run_all_finish_with_room_left_for_the_short(prefix):
    """Short and long prompts arrive while others run, in a pool small enough to preempt: each finishes with its
    own tokens and every block comes back, also when long prompts leave room for short ones (which happens)."""
    rng = random.Random(7 + prefix)
    sched = make_scheduler(num_blocks=24, block_size=4, max_num_seqs=6, max_num_batched_tokens=16, max_model_len=64,
                           prefix=prefix, long_prefill_token_threshold=6)
    rooms = []
    room_for_short_prompts = sched._room_for_short_prompts
    sched._room_for_short_prompts = lambda budget: rooms.append(room_for_short_prompts(budget)) or rooms[-1]
    shared = [rng.randrange(10, 500) for _ in range(8)]
    seqs = []
    for _ in range(40):
        length = rng.randint(1, 6) if rng.random() < 0.6 else rng.randint(12, 40)
        prompt = shared[:rng.randint(0, min(8, length))]
        seqs.append(make_seq(sched, prompt + [rng.randrange(10, 500) for _ in range(length - len(prompt))],
                             max_tokens=rng.randint(1, 12)))
        for _ in range(rng.randint(0, 3)):
            if not sched.is_finished():
                batch = sched.schedule()
                post(sched, batch, [rng.randrange(10, 500) for _ in range(num_to_sample(batch))])
    drive(sched, sample=lambda seq: rng.randrange(10, 500))
    for seq in seqs:
        assert seq.num_completion_tokens == seq.sampling_params.max_tokens
    assert sum(room > 0 for room in rooms) > 5, "no long prompt left room: the case was not exercised"
    assert sched.num_preemptions > 0, "the pool was meant to be too small: preemption was not exercised"
    assert_all_blocks_free(sched)


def test_without_chunked_prefill_a_prompt_is_scheduled_whole_or_not_at_all():
    sched = make_scheduler(max_num_batched_tokens=10, chunked=False)
    a = make_seq(sched, 6, start=100)
    b = make_seq(sched, 6, start=200)
    c = make_seq(sched, 3, start=300)  # would fit, but stays behind b (first come, first served)
    batch, _ = step(sched)
    assert pairs(batch) == [(a, 6)]
    assert list(sched.waiting) == [b, c]
    assert b.block_table == [] and b.num_computed_tokens == 0
    d = make_seq(sched, 4, start=400)
    batch, _ = step(sched)
    assert pairs(batch) == [(a, 1), (b, 6), (c, 3)]  # the budget is used up exactly
    assert list(sched.waiting) == [d]
    e = make_seq(sched, 5, start=500)
    batch, _ = step(sched)
    assert pairs(batch) == [(a, 1), (b, 1), (c, 1), (d, 4)]  # 3 tokens left: e (5) is not cut
    assert list(sched.waiting) == [e] and e.block_table == [] and e.num_computed_tokens == 0
    batch, _ = step(sched)
    assert pairs(batch) == [(a, 1), (b, 1), (c, 1), (d, 1), (e, 5)]


def test_without_chunked_prefill_never_a_partial_prompt_in_a_full_run():
    sched = make_scheduler(max_num_batched_tokens=12, chunked=False, max_num_seqs=4)
    rng = random.Random(0)
    seqs = [make_seq(sched, rng.randint(1, 12), start=100 + 20 * i, max_tokens=rng.randint(1, 5)) for i in range(10)]
    while not sched.is_finished():
        batch = sched.schedule()
        assert batch
        for seq, n, start in zip(batch.seqs, batch.num_tokens, batch.starts):
            assert n == len(seq) - start - 1  # a whole prompt, or one decode token (its sampled one appended)
        post(sched, batch, [7] * num_to_sample(batch))
    assert all(s.finish_reason == "length" for s in seqs)
    assert [s.num_completion_tokens for s in seqs] == [s.sampling_params.max_tokens for s in seqs]
    assert_all_blocks_free(sched)


# ---------------------------------------------------------------- preemption

def test_preemption_by_recompute_when_blocks_run_out():
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    a, b, c = (make_seq(sched, 7, start=100 + 10 * i, max_tokens=6) for i in range(3))
    d = make_seq(sched, 7, start=200, max_tokens=6)
    batch, _ = step(sched)  # 3 x 2 blocks: the pool is full, d waits
    assert pairs(batch) == [(a, 7), (b, 7), (c, 7)]
    assert list(sched.waiting) == [d] and sched.block_manager.num_free_blocks == 0
    batch, _ = step(sched)  # each decode still fits its 2 blocks (8 tokens)
    assert pairs(batch) == [(a, 1), (b, 1), (c, 1)]
    assert sched.num_preemptions == 0
    c_tokens = list(c.token_ids)

    batch = sched.schedule()  # a and b each need a 3rd block: the newest (c) is preempted
    assert pairs(batch) == [(a, 1), (b, 1)]
    assert sched.num_preemptions == 1
    assert sched.running == [a, b]
    assert list(sched.waiting) == [c, d]  # back at the front, ahead of d
    assert c.status == SequenceStatus.WAITING
    assert c.num_computed_tokens == 0 and c.block_table == [] and c.block_hashes == []
    assert c.token_ids == c_tokens  # the generated tokens are kept, to be recomputed
    check_blocks(sched)
    post(sched, batch, [7, 7])

    steps, finished = drive(sched)
    assert set(finished) == {a, b, c, d}
    for seq in (a, b, c, d):
        assert seq.finish_reason == "length" and seq.num_completion_tokens == 6
        assert seq.status == SequenceStatus.FINISHED
    assert_all_blocks_free(sched)


def test_a_sequence_that_cannot_fit_preempts_itself_when_it_is_the_newest():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a = make_seq(sched, 8, start=100, max_tokens=4)
    b = make_seq(sched, 8, start=200, max_tokens=4)
    step(sched)  # 2 blocks each, pool full, both have 9 tokens now
    batch = sched.schedule()
    # a takes b's blocks; b, the newest, is preempted and cannot come back in this step
    assert pairs(batch) == [(a, 1)]
    assert sched.num_preemptions == 1 and list(sched.waiting) == [b]
    post(sched, batch, [7])
    drive(sched)
    assert a.num_completion_tokens == 4 and b.num_completion_tokens == 4
    assert_all_blocks_free(sched)


@pytest.mark.parametrize("retention", [False, True])
@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("chunked, threshold", [(False, 0), (True, 0), (True, 6)])
def test_every_request_finishes_under_heavy_preemption(prefix, chunked, threshold, retention):
    """Random prompts (many sharing prefixes) in a tiny KV pool: all finish, KV reads stay correct, also when
    prompts are compacted (and compacted again after preemption), and when long prompts leave room for short ones."""
    rng = random.Random(1234 + 2 * prefix + chunked)
    block_size = 4
    max_model_len = 40
    sched = make_scheduler(num_blocks=12, block_size=block_size, max_num_seqs=6,
                           max_num_batched_tokens=max_model_len if not chunked else 16,
                           max_model_len=max_model_len, chunked=chunked, prefix=prefix,
                           long_prefill_token_threshold=threshold)
    if retention:
        sched.retention = KeepThree(None)
    shared = [rng.randrange(10, 500) for _ in range(12)]
    seqs = []
    for i in range(24):
        prompt = shared[:rng.randint(0, 12)] + [rng.randrange(10, 500) for _ in range(rng.randint(1, 14))]
        seqs.append(make_seq(sched, prompt, max_tokens=rng.randint(1, 16)))
    steps, finished = drive(sched, sample=lambda seq: rng.randrange(10, 500))
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)
    for seq in seqs:
        assert seq.finish_reason == "length"
        expected = min(seq.sampling_params.max_tokens, max_model_len - seq.num_prompt_tokens)
        assert seq.num_completion_tokens == expected
    assert sched.num_preemptions > 0, "the pool was meant to be too small: preemption was not exercised"
    if prefix:
        assert sched.block_manager.num_hit_blocks > 0
    assert_all_blocks_free(sched)


# ---------------------------------------------------------------- finish reasons

def run_one(sched, seq, tokens):
    """Feed ``tokens`` as the sampled ones until seq finishes; returns the tokens consumed."""
    it = iter(tokens)
    while seq.status != SequenceStatus.FINISHED:
        batch, _ = step(sched, token=next(it))
    return seq.completion_token_ids


def test_eos_stops_unless_ignore_eos():
    sched = make_scheduler(eos=(EOS, 3))
    seq = make_seq(sched, 5, max_tokens=10)
    assert run_one(sched, seq, [11, 12, 3, 13]) == [11, 12, 3]
    assert seq.finish_reason == "stop"
    seq = make_seq(sched, 5, max_tokens=4, ignore_eos=True)
    assert run_one(sched, seq, [EOS, 3, EOS, 3, 99]) == [EOS, 3, EOS, 3]
    assert seq.finish_reason == "length"
    assert_all_blocks_free(sched)


def test_stop_token_ids_stop_even_with_ignore_eos():
    sched = make_scheduler()
    seq = make_seq(sched, 5, max_tokens=10, stop_token_ids=[55, 66], ignore_eos=True)
    assert run_one(sched, seq, [EOS, 10, 66, 11]) == [EOS, 10, 66]
    assert seq.finish_reason == "stop"


def test_max_tokens_gives_length():
    sched = make_scheduler()
    seq = make_seq(sched, 5, max_tokens=3)
    assert run_one(sched, seq, [10, 11, 12, 13]) == [10, 11, 12]
    assert seq.finish_reason == "length"
    seq = make_seq(sched, 5, max_tokens=1)
    assert run_one(sched, seq, [10, 11]) == [10]
    assert seq.finish_reason == "length"


def test_max_model_len_gives_length():
    sched = make_scheduler(max_model_len=8)
    seq = make_seq(sched, 5, max_tokens=100)
    assert run_one(sched, seq, range(10, 100)) == [10, 11, 12]
    assert len(seq) == 8 and seq.finish_reason == "length"
    assert_all_blocks_free(sched)


def test_stop_wins_over_length_on_the_same_token():
    sched = make_scheduler()
    seq = make_seq(sched, 5, max_tokens=2)
    assert run_one(sched, seq, [10, EOS]) == [10, EOS]
    assert seq.finish_reason == "stop"


def test_finished_sequences_leave_running_and_free_blocks_mid_run():
    sched = make_scheduler(num_blocks=16)
    a = make_seq(sched, 6, max_tokens=1)
    b = make_seq(sched, 6, max_tokens=5)
    _, finished = step(sched)
    assert finished == [a] and a.status == SequenceStatus.FINISHED
    assert sched.running == [b] and a.block_table == []
    assert sched.block_manager.num_free_blocks == 16 - len(b.block_table)


# ---------------------------------------------------------------- abort

def test_abort_all_frees_everything():
    sched = make_scheduler(num_blocks=8, max_num_batched_tokens=10, prefix=True)
    a = make_seq(sched, 6, start=100)
    b = make_seq(sched, 20, start=200)  # prefill in progress after the first step
    c = make_seq(sched, 30, start=300)  # waiting
    step(sched)
    assert b.num_computed_tokens == 4 and sched.waiting[0] is c
    assert sched.block_manager.num_free_blocks < 8
    sched.abort_all()
    assert sched.is_finished()
    assert sched.running == [] and not sched.waiting
    assert_all_blocks_free(sched)
    assert a.block_table == [] and b.block_table == []
    assert a.status == SequenceStatus.FINISHED and b.status == SequenceStatus.FINISHED
    # the scheduler is usable again afterwards
    d = make_seq(sched, 6, start=100, max_tokens=1)
    drive(sched)
    assert d.finish_reason == "length"
    assert_all_blocks_free(sched)


# ---------------------------------------------------------------- KV retention

class KeepThree(KVRetentionPolicy):
    """Keeps 3 entries (FakeKV keeps the last 3) of prompts longer than 3, reading the prompt's last 5 queries."""

    name = "keep-three"
    window = 5

    def num_kept(self, num_prompt_tokens):
        return min(3, num_prompt_tokens)


def retention_scheduler(**kwargs):
    sched = make_scheduler(**kwargs)
    sched.retention = KeepThree(None)
    return sched


def test_the_compacting_step_computes_the_window_and_swaps_in_fresh_blocks():
    sched = retention_scheduler(max_num_batched_tokens=8, num_blocks=16)
    seq = make_seq(sched, 20, max_tokens=2)
    progress = []
    for _ in range(3):
        batch, _ = step(sched)
        compactions = [(c.num_kept, len(c.block_table)) for c in batch.compactions]
        progress.append((batch.starts[0], batch.num_tokens[0], compactions))
    # no chunk ends inside the last 5 prompt tokens: 8, then 7 (not 8), then the window and the compaction
    assert progress == [(0, 8, []), (8, 7, []), (15, 5, [(3, 1)])]
    assert seq.num_dropped_tokens == 17 and seq.num_kv_slots == 3 and len(seq) == 21
    assert len(seq.block_table) == 1 and sched.block_manager.num_free_blocks == 15  # the prompt's 5 blocks are back
    kept_blocks = seq.block_table
    batch, _ = step(sched)  # the decode writes slot 3 of the fresh block, at position 20
    assert (batch.starts, batch.num_dropped, batch.block_tables) == ([20], [17], [kept_blocks])
    assert seq.finish_reason == "length"
    drive(sched)
    assert_all_blocks_free(sched)


def test_prompts_the_policy_keeps_whole_are_not_split_or_compacted():
    sched = retention_scheduler(max_num_batched_tokens=8)
    seq = make_seq(sched, 3, max_tokens=2)
    batch, _ = step(sched)
    assert pairs(batch) == [(seq, 3)] and batch.compactions == [] and seq.num_dropped_tokens == 0


def test_the_prefix_cache_never_serves_the_window_of_a_compacted_prompt():
    sched = retention_scheduler(max_num_batched_tokens=64, prefix=True)
    first = make_seq(sched, 20, max_tokens=1)
    drive(sched)
    assert first.finish_reason == "length"
    again = make_seq(sched, 20, max_tokens=1)
    batch, _ = step(sched)
    # blocks 0-2 (12 tokens) are cached; block 3 holds the window's first token (15): computed again
    assert again.num_cached_tokens == 12 and pairs(batch) == [(again, 8)] and len(batch.compactions) == 1


def test_a_preempted_compacted_sequence_stops_at_its_prompt_then_recomputes_the_rest():
    sched = retention_scheduler(max_num_batched_tokens=64, num_blocks=16)
    seq = make_seq(sched, 10, max_tokens=8)
    for _ in range(4):
        step(sched)
    assert seq.num_dropped_tokens == 7 and len(seq) == 14
    sched._preempt(seq)
    assert seq.num_dropped_tokens == 0 and seq.block_table == []
    batch, _ = step(sched)
    assert pairs(batch) == [(seq, 10)] and len(batch.compactions) == 1 and batch.sampling == [False]
    batch, _ = step(sched)  # the generated tokens, after the kept three entries
    assert pairs(batch) == [(seq, 4)] and batch.starts == [10] and batch.num_dropped == [7]
    assert batch.sampling == [True] and batch.compactions == []
    drive(sched)
    assert seq.num_completion_tokens == 8
    assert_all_blocks_free(sched)


def test_a_window_that_may_not_fit_a_step_is_refused():
    config = SimpleNamespace(max_num_seqs=6, max_num_batched_tokens=8, max_model_len=64, enable_chunked_prefill=True,
                             eos_token_ids=frozenset(), kvcache_block_size=4, enable_prefix_caching=False,
                             long_prefill_token_threshold=0)
    with pytest.raises(ValueError, match="reads the last 5 queries of a prompt in one step.*raise max_num_batched_tokens"):
        Scheduler.check_retention(config, KeepThree(None))
    config.max_num_batched_tokens, config.long_prefill_token_threshold = 64, 4
    with pytest.raises(ValueError, match="more than long_prefill_token_threshold=4.*raise the threshold to 5"):
        Scheduler.check_retention(config, KeepThree(None))
