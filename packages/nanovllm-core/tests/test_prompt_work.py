"""The host's plan of a step's prompt tokens for the paged-attention kernel: every query tile over every key it
sees exactly once, splits recombined from the right slots, longest items first, and within the buffers that a
CUDA graph of the step holds."""
import numpy as np
import pytest

from nanovllm.kernels.prompt_work import KEY_TILE, MIN_SPLIT_KEYS, item_capacity, plan, tile_tokens


def random_steps(count: int):
    rng = np.random.default_rng(0)
    for _ in range(count):
        num_seqs = int(rng.integers(1, 40))
        q_lens = np.where(rng.random(num_seqs) < 0.7, 1, rng.integers(1, 600, num_seqs))
        k_lens = q_lens + np.where(rng.random(num_seqs) < 0.5, rng.integers(0, 9000, num_seqs), 0)
        yield q_lens, k_lens


@pytest.mark.parametrize("group", [1, 2, 3, 4, 16, 64])
@pytest.mark.parametrize("programs", [1, 2, 33, 66])
def test_plan_covers_every_tile_and_key_once(group, programs):
    tokens = tile_tokens(group)
    for q_lens, k_lens in random_steps(30):
        items, combines = plan(q_lens, k_lens, group, programs)
        lengths = items[:, 3] - items[:, 2]
        assert (lengths > 0).all() and (np.diff(lengths) <= 0).all(), "an empty item, or not longest first"
        assert (items[:, 2] % KEY_TILE == 0).all()
        assert len(items) <= item_capacity(int(q_lens.sum()), programs)
        assert len(combines) <= programs and combines[:, 3].sum() <= 2 * programs
        tiles = {}
        for seq, first, lo, hi, slot in items.tolist():
            tiles.setdefault((seq, first), []).append((lo, hi, slot))
        expected = {(seq, first) for seq, q_len in enumerate(q_lens) for first in range(0, q_len, tokens)}
        assert set(tiles) == expected, "tiles missing or extra"
        split = {(seq, first): (first_slot, slots) for seq, first, first_slot, slots in combines.tolist()}
        ends = {(seq, first): k_lens[seq] - q_lens[seq] + min(first + tokens, q_lens[seq]) for seq, first in tiles}
        share = max(MIN_SPLIT_KEYS // KEY_TILE, -(-sum(-(-end // KEY_TILE) for end in ends.values()) // programs))
        assert (-(-lengths // KEY_TILE) <= share).all(), "an item longer than an even share"
        for (seq, first), parts in tiles.items():
            parts.sort()
            end = ends[(seq, first)]
            assert parts[0][0] == 0 and parts[-1][1] == end, "not every key the tile sees"
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])), "keys read twice or not at all"
            if len(parts) == 1:
                assert parts[0][2] == -1 and (seq, first) not in split
            else:
                first_slot, slots = split[(seq, first)]
                assert sorted(slot for _, _, slot in parts) == list(range(first_slot, first_slot + slots))
        all_slots = [slot for _, _, _, _, slot in items.tolist() if slot >= 0]
        assert sorted(all_slots) == list(range(len(all_slots))), "slots shared or skipped"


def test_a_long_chunk_is_split_evenly_over_the_programs():
    """A 128-token chunk ending a 7,000-token prompt beside 7 decodes (the latency benchmark's mixed step), 16/8
    heads, 33 programs a KV head (an H100): 4 tiles in 8 splits each, none longer than an even share."""
    q_lens, k_lens = np.array([128] + [1] * 7), np.array([7000] + [256] * 7)
    items, combines = plan(q_lens, k_lens, 2, 33)
    assert len(combines) == 4 and (combines[:, 3] == combines[0, 3]).all() and combines[0, 3] >= 7
    key_tiles = -(-(items[:, 3] - items[:, 2]) // KEY_TILE)
    assert key_tiles.max() <= -(-sum(-(-(k - q + min(f + 32, q)) // KEY_TILE) for q, k in zip(q_lens, k_lens)
                                        for f in range(0, q, 32)) // 33)
    assert len(items) <= 2 * 33 and (items[-7:, 0] > 0).all(), "the decodes last"


def test_short_tiles_are_not_split():
    items, combines = plan(np.array([512] * 16), np.array([512] * 16), 2, 33)
    assert len(combines) == 0 and (items[:, 4] == -1).all() and len(items) == 16 * 16
