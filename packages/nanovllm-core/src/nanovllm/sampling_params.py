import math
import numbers
from dataclasses import dataclass

MAX_SEED = 2**64 - 1
MAX_LOGPROBS = 20  # as vLLM's default max_logprobs  # what torch.Generator.manual_seed takes


def checked_number(name: str, value, integer: bool = False) -> float | int:
    """``value`` as a Python int or float; a bool, a string, None, NaN or infinity is an error naming it."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}; give {'an integer' if integer else 'a number'}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not a finite number")
    return int(value) if integer else float(value)


def checked_seed(name: str, value) -> int:
    value = checked_number(name, value, integer=True)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name}={value} is outside [0, 2**64 - 1]; choose a seed in that range")
    return value


@dataclass
class SamplingParams:
    """How to pick the tokens of one request. temperature 0 means greedy, as in vLLM."""

    n: int = 1  # samples of the prompt
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # strings that end the output (cut before them, unless include_stop_str_in_output)
    include_stop_str_in_output: bool = False
    seed: int | None = None
    min_tokens: int = 0  # tokens before eos or a stop token may end the output
    min_p: float = 0.0  # drop tokens less probable than min_p times the most probable one
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output: logit / p if > 0, else * p
    presence_penalty: float = 0.0  # subtracted from the logit of each token already in the output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    logprobs: int | None = None  # per output token, the log-probabilities of it and of the top this many
    prompt_logprobs: int | None = None  # per prompt token after the first, as logprobs (no prefix cache then)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def __post_init__(self):
        self.temperature = checked_number("temperature", self.temperature)
        self.top_k = checked_number("top_k", self.top_k, integer=True)
        self.top_p = checked_number("top_p", self.top_p)
        self.max_tokens = checked_number("max_tokens", self.max_tokens, integer=True)
        self.n = checked_number("n", self.n, integer=True)
        if self.n < 1:
            raise ValueError(f"n={self.n} is below 1; ask for at least one sample")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is negative; use 0 for greedy or a positive value to sample")
        if not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k={self.top_k} is invalid; use -1 (all tokens) or a positive count")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is outside (0, 1]; use 1.0 to keep all tokens")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} is below 1; ask for at least one token")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos={self.ignore_eos!r} is a {type(self.ignore_eos).__name__}; give True or False")
        if isinstance(self.stop_token_ids, (str, bytes)):
            raise TypeError(f"stop_token_ids={self.stop_token_ids!r} is a string; give a list of token ids")
        self.stop_token_ids = tuple(checked_number("stop_token_ids", t, integer=True) for t in self.stop_token_ids)
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={list(self.stop_token_ids)} holds a negative id; token ids start at 0")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(text, str) and text for text in self.stop):
            raise ValueError(f"stop={list(self.stop)!r} must be non-empty strings")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise TypeError(f"include_stop_str_in_output={self.include_stop_str_in_output!r} is not True or False")
        if self.seed is not None:
            self.seed = checked_seed("seed", self.seed)
        self.min_tokens = checked_number("min_tokens", self.min_tokens, integer=True)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is outside [0, max_tokens={self.max_tokens}]")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, checked_number(name, getattr(self, name), integer=True))
                if not 0 <= getattr(self, name) <= MAX_LOGPROBS:
                    raise ValueError(f"{name}={getattr(self, name)} is outside [0, {MAX_LOGPROBS}]")
        self.min_p = checked_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p} is outside [0, 1]; use 0 to keep all tokens")
        self.repetition_penalty = checked_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be positive; 1 is none")
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, checked_number(name, getattr(self, name)))
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}={getattr(self, name)} is outside [-2, 2] (as in vLLM and OpenAI's API)")
