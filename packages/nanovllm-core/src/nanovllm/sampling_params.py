from dataclasses import dataclass


@dataclass
class SamplingParams:
    """How to pick the tokens of one request. temperature 0 means greedy, as in vLLM."""

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is negative; use 0 for greedy or a positive value to sample")
        if not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k={self.top_k} is invalid; use -1 (all tokens) or a positive count")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is outside (0, 1]; use 1.0 to keep all tokens")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} is below 1; ask for at least one token")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is not an integer")
        self.stop_token_ids = tuple(self.stop_token_ids)
