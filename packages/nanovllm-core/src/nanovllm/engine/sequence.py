from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, where its KV lives, and how far the model has computed it."""

    _ids = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int, sample_index: int = 0):
        self.seq_id = next(Sequence._ids)
        self.sample_index = sample_index  # which of its prompt's n samples
        self.first_sample: Sequence | None = None  # sample 0 of the prompt, for the others: they wait for its KV
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.sampling_params = sampling_params
        self.block_size = block_size
        self.num_computed_tokens = 0  # tokens whose K and V are computed: the position of the next one
        self.num_dropped_tokens = 0  # of those, tokens whose K and V a retention policy freed
        self.num_cached_tokens = 0  # tokens found in the prefix cache when scheduled
        self.block_table: list[int] = []  # KV blocks by slot: slot s is block_table[s // block_size]
        self.block_hashes: list[int] = []  # hash chain of the leading full blocks already in the cache
        self.finish_reason: str | None = None
        self.text: str | None = None  # the output text once finished (cut at the stop string that ended it)
        self.logprobs: list[dict[int, float]] = []  # per output token, when SamplingParams.logprobs asks
        # per prompt token (None for the first, which nothing predicts), when prompt_logprobs asks: one sample's
        asks = sampling_params.prompt_logprobs is not None and sample_index == 0
        self.prompt_logprobs: list[dict[int, float] | None] | None = [None] * len(token_ids) if asks else None

    def __len__(self):
        return len(self.token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_kv_slots(self) -> int:
        """KV entries the sequence holds: a token at position p sits in slot p - num_dropped_tokens."""
        return self.num_computed_tokens - self.num_dropped_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]
