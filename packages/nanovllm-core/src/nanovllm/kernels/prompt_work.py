"""How a step's prompt tokens are dealt to the paged-attention kernel's programs, planned on the host from the
step's lengths (as FlashInfer plans its work): the engine has them there before the step runs, so the kernel
neither searches for its work nor runs programs that have none, and a CUDA graph of the step takes the plan as
one more input. No triton here: the engine imports it on every platform."""
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from nanovllm.kernels import multiprocessors

PROMPT_TILE_ROWS = 64  # query rows of a prompt tile: its tokens times the query heads that share a KV head
KEY_TILE = 64  # keys a split starts at a multiple of: the kernel's key tiles (16, 32 or 64) then never straddle one
MIN_SPLIT_KEYS = 512  # fewer keys per split cost more in programs and partial outputs than they save


class PromptWork(NamedTuple):
    """A step's planned work on the device. ``items`` (int32, row 0 holds their count, then one a row): (sequence,
    its first query token of the tile, first key, end key, partial slot or -1: the tile's output written at once).
    ``combines`` (int32, row 0 holds their count, then one a row): (sequence, first query token, first slot,
    slots) of each tile whose keys were split. Both are sized for the most a step can need, so a CUDA graph
    holds them: combines for ``programs`` tiles and 2 x ``programs`` slots of partial outputs."""

    items: torch.Tensor
    combines: torch.Tensor

    @property
    def programs(self) -> int:
        return self.combines.size(0) - 1


def tile_rows(group: int) -> int:
    """Query rows of a prompt tile (the kernel's BLOCK_M): its tokens times the ``group`` heads sharing a KV head."""
    return max(PROMPT_TILE_ROWS, 1 << (group - 1).bit_length())


def tile_tokens(group: int) -> int:
    """Query tokens of a prompt tile."""
    return tile_rows(group) // group


def programs_per_kv_head(num_kv_heads: int, device: torch.device) -> int:
    """Programs per KV head for prompt tokens: two per SM, as many as fit at once (a program holds 254 registers
    a thread on an H100), so every item starts at once where the plan has no more of them than programs. On CPU
    (Triton's interpreter) two, so that each takes several items in the tests."""
    if device.type != "cuda":
        return 2
    return max(1, 2 * multiprocessors(device) // num_kv_heads)


def item_capacity(max_tokens: int, programs: int) -> int:
    """The most items a step of ``max_tokens`` query tokens is planned into: a tile per token at most, and each
    split beyond a tile's first takes a share of at least 1 / ``programs`` of the step's keys."""
    return max_tokens + programs


def plan(q_lens: np.ndarray, k_lens: np.ndarray, group: int, programs: int,
         min_split_keys: int = MIN_SPLIT_KEYS) -> tuple[np.ndarray, np.ndarray]:
    """The items and combines (without their count rows) of a step whose sequences have ``q_lens`` query tokens
    and ``k_lens`` keys each (the new ones included; a sequence without query tokens has no items).

    Each tile of query tokens sees the keys up to its last token. A tile that sees more key tiles than an even
    share of the step's (over ``programs``), and at least ``min_split_keys``, is split into parts of about that
    share. Longest first: program p takes items p, p + programs, ..., so the long ones start at once."""
    tokens = tile_tokens(group)
    q_lens, k_lens = np.asarray(q_lens, dtype=np.int64), np.asarray(k_lens, dtype=np.int64)
    tiles = -(-q_lens // tokens)
    seq = np.repeat(np.arange(len(q_lens)), tiles)
    first = (np.arange(len(seq)) - np.repeat(np.cumsum(tiles) - tiles, tiles)) * tokens
    end = np.minimum(first + tokens, q_lens[seq]) + (k_lens - q_lens)[seq]
    key_tiles = -(-end // KEY_TILE)
    share = max(min_split_keys // KEY_TILE, -(-int(key_tiles.sum()) // programs))
    per_split = -(-key_tiles // -(-key_tiles // share))  # key tiles of each split, all but the last alike
    splits = -(-key_tiles // per_split)
    tile_of = np.repeat(np.arange(len(seq)), splits)
    split = np.arange(len(tile_of)) - np.repeat(np.cumsum(splits) - splits, splits)
    lo = split * per_split[tile_of] * KEY_TILE
    hi = np.minimum(end[tile_of], lo + per_split[tile_of] * KEY_TILE)
    split_tiles = splits > 1
    first_slot = np.cumsum(np.where(split_tiles, splits, 0)) - np.where(split_tiles, splits, 0)
    slot = np.where(split_tiles[tile_of], first_slot[tile_of] + split, -1)
    items = np.stack([seq[tile_of], first[tile_of], lo, hi, slot], 1)
    items = items[np.argsort(lo - hi, kind="stable")]  # longest first
    combines = np.stack([seq, first, first_slot, splits], 1)[split_tiles]
    assert len(combines) <= programs and splits[split_tiles].sum() <= 2 * programs  # the buffers' sizes
    return items.astype(np.int32), combines.astype(np.int32)


def with_counts(rows: np.ndarray, capacity: int) -> np.ndarray:
    """``rows`` after a row holding their count, padded with zeros to ``capacity`` rows."""
    out = np.zeros((capacity + 1, rows.shape[1]), dtype=np.int32)
    out[0, 0] = len(rows)
    out[1:len(rows) + 1] = rows
    return out


def prompt_work(q_lens: np.ndarray, k_lens: np.ndarray, num_heads: int, num_kv_heads: int, device: torch.device,
                programs: int | None = None, min_split_keys: int = MIN_SPLIT_KEYS,
                to_device: Callable[[str, np.ndarray], torch.Tensor] | None = None) -> PromptWork:
    """The plan of a step (see ``plan``) on ``device``, sized to it; ``to_device(name, array)`` copies each array
    there (the engine stages it like its other inputs)."""
    programs = programs or programs_per_kv_head(num_kv_heads, device)
    to_device = to_device or (lambda name, array: torch.from_numpy(array).to(device))
    items, combines = plan(q_lens, k_lens, num_heads // num_kv_heads, programs, min_split_keys)
    return PromptWork(to_device("work_items", with_counts(items, len(items))),
                      to_device("work_combines", with_counts(combines, programs)))
