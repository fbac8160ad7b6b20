"""Tokenize, add requests, loop scheduler and model runner steps until every request is done."""
import logging
import numbers
import os
import threading
import time
import weakref

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm import plugins
from nanovllm.attention_backend import select_backend
from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner, prepare_step
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.workers import Workers
from nanovllm.expert_manager import select_expert_manager
from nanovllm.kv_retention import select_kv_retention_policy
from nanovllm.platform import detect_platform
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def resolve_model_class(hf_config) -> type:
    classes = plugins.model_classes()
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in classes:
            return classes[arch]
    raise ValueError(f"architecture {architectures or '(none in config.json)'} is not supported; installed "
                     f"architectures: {', '.join(sorted(classes)) or 'none'}. Install a plugin that provides it "
                     f"(e.g. nanovllm-models) or check NANOVLLM_PLUGINS.")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tiktoken.model")


def load_tokenizer(path: str):
    """The checkpoint's tokenizer; a folder without tokenizer files is an error (transformers would make a
    tokenizer that knows nothing, and every output would be empty text)."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): copy them "
                                f"from the original checkpoint, or pass tokenizer= the folder that has them")
    return AutoTokenizer.from_pretrained(path)


def _prompt_list(prompts) -> list:
    """vLLM's forms: one prompt (text, token ids, a prompt dict) or a list of them."""
    if isinstance(prompts, (str, dict)) or getattr(prompts, "ndim", None) == 1:
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], numbers.Integral) and not isinstance(prompts[0], bool):
        return [prompts]  # the token ids of one prompt
    return prompts


class LLMEngine:
    def __init__(self, model: str, **options):
        config = Config.from_options(model, **options)
        self.config = config
        hf_config = config.hf_config
        model_cls = resolve_model_class(hf_config)
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        platform = detect_platform()
        backend_cls, why = select_backend(plugins.attention_backends(), platform, config.torch_dtype, head_dim,
                                          config.kvcache_block_size, config.attention_backend)
        logger.info("attention backend: %s", why)
        # Choices that can fail do so here, before any rank starts.
        logger.debug("expert manager (for MoE layers): %s", select_expert_manager(config)[1])
        retention_cls, why = select_kv_retention_policy(config)
        logger.info("KV retention: %s", why)
        retention = retention_cls(config)
        Scheduler.check_retention(config, retention)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        config.eos_token_ids |= {self.tokenizer.eos_token_id} - {None}
        self.retention_window = retention.window
        if config.tensor_parallel_size > 1:  # every rank in its own process, watched
            self.model_runner = Workers(config, model_cls, backend_cls)
        else:
            self.model_runner = ModelRunner(config, 0, model_cls, backend_cls)
        config.fit_kv_capacity(self.model_runner.num_kvcache_blocks)  # the ranks lowered their own copies
        self.scheduler = Scheduler(config, self.model_runner.num_kvcache_blocks, retention)
        self.async_scheduling = config.async_scheduling
        self._in_flight = None  # the launched step whose sampled tokens are not read yet
        self._generate_lock = threading.Lock()
        # At garbage collection or interpreter exit, whichever comes first; holds the runner, not the engine.
        self._exit = weakref.finalize(self, self.model_runner.exit)

    def exit(self):
        """Release the model, its KV cache and the tensor-parallel ranks now (also done when the engine is
        garbage-collected, or at exit)."""
        self._exit()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.exit()

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> Sequence:
        if sampling_params.n != 1:
            raise ValueError(f"add_request makes one sequence; n={sampling_params.n} samples need generate()")
        seq = Sequence(self._validated_token_ids(prompt), self._validated_params(sampling_params),
                       self.config.kvcache_block_size)
        self.scheduler.add(seq)
        return seq

    def validate_request(self, prompt, sampling_params: SamplingParams) -> list[int]:
        """A prompt's token ids, after the checks generate() makes of a prompt and its sampling params (a
        ValueError or TypeError names what is wrong); queues nothing, so a batch job can fail one bad row alone."""
        self._validated_params(sampling_params)
        return self._validated_token_ids(prompt)

    def _validated_token_ids(self, prompt) -> list[int]:
        """A prompt's token ids: a string is tokenized; a list, tuple or 1-D integer numpy or torch array is taken
        as token ids, each checked; vLLM's {"prompt": text} and {"prompt_token_ids": ids} are too."""
        if isinstance(prompt, dict):
            if set(prompt) not in ({"prompt"}, {"prompt_token_ids"}):
                raise ValueError(f"a prompt dict has one key, 'prompt' (text) or 'prompt_token_ids'; got "
                                 f"{sorted(prompt)}")
            prompt = prompt.get("prompt", prompt.get("prompt_token_ids"))
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:  # numpy and torch arrays give their elements as Python numbers
            token_ids = prompt.tolist() if hasattr(prompt, "tolist") else prompt
            if not isinstance(token_ids, (list, tuple)):
                raise TypeError(f"a prompt must be a string or a list of token ids, not {type(prompt).__name__}")
            token_ids = list(token_ids)
        if not token_ids:
            raise ValueError("prompt is empty; give at least one token")
        if not set(map(type, token_ids)) <= {int}:  # plain ints (the common case) need no check one by one
            not_ints = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
            if not_ints:
                raise TypeError(f"token id {not_ints[0]!r} is a {type(not_ints[0]).__name__}; token ids are "
                                f"integers")
            token_ids = [int(t) for t in token_ids]
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens, more than max_model_len="
                             f"{self.config.max_model_len}; shorten it or raise max_model_len")
        self._check_vocabulary(token_ids, "the prompt's token ids")
        return token_ids

    def _check_vocabulary(self, token_ids, what: str):
        vocab_size = self.config.hf_config.vocab_size
        if token_ids and not (0 <= min(token_ids) and max(token_ids) < vocab_size):
            bad = next(t for t in token_ids if not 0 <= t < vocab_size)
            raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {vocab_size}); check {what} "
                             f"against this model's tokenizer")

    def _validated_params(self, params) -> SamplingParams:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, not {type(params).__name__}")
        self._check_vocabulary(params.stop_token_ids, "stop_token_ids")
        return params

    def step(self) -> tuple[list[Sequence], int, int]:
        """Schedule and launch one step; returns finished sequences, prefill and decode tokens launched.

        With async scheduling the step's sampled tokens are read back in the next call, so the CPU
        schedules and prepares step N+1 while the GPU runs step N.
        """
        batch = self.scheduler.schedule()
        launched = None
        if batch:
            inputs = prepare_step(batch, self.config.kvcache_block_size, self.retention_window,
                                  self.config.eos_token_ids)
            launched = (batch, self.model_runner.execute(inputs))
        finished = self._read_in_flight()  # the previous step's tokens, while this one runs
        self._in_flight = launched
        if not self.async_scheduling:
            finished += self._read_in_flight()
        return finished, batch.num_prefill_tokens, batch.num_decode_tokens

    def _read_in_flight(self) -> list[Sequence]:
        """Wait for the launched step's sampled tokens and put them in place; the sequences that finished."""
        if self._in_flight is None:
            return []
        (batch, sampled), self._in_flight = self._in_flight, None
        finished = self.scheduler.update(batch, sampled.tolist(), self._stop_string_hit, sampled.logprobs(),
                                         sampled.prompt_logprobs())
        for seq in finished:  # decoded now, while the GPU runs the next step
            if seq.text is None:
                seq.text = self.tokenizer.decode(seq.completion_token_ids, skip_special_tokens=True)
        return finished

    def _stop_string_hit(self, seq: Sequence, end: int) -> bool:
        """Whether the output up to token ``end`` holds a stop string; if so its text, cut there, is kept."""
        params = seq.sampling_params
        if end - seq.num_prompt_tokens <= params.min_tokens:  # as vLLM: no stop before min_tokens
            return False
        # only the tail can hold a stop string the last token completed: decode it alone
        tail = max(seq.num_prompt_tokens, end - max(map(len, params.stop)) - 4)
        if not any(stop in self.tokenizer.decode(seq.token_ids[tail:end], skip_special_tokens=True)
                   for stop in params.stop):
            return False
        text = self.tokenizer.decode(seq.token_ids[seq.num_prompt_tokens:end], skip_special_tokens=True)
        hits = [(text.find(stop), stop) for stop in params.stop if stop in text]
        if not hits:
            return False
        position, stop = min(hits)
        seq.text = text[:position + len(stop) if params.include_stop_str_in_output else position]
        return True

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self._in_flight is None

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        """Generate for every prompt (text, token ids or vLLM's prompt dicts; one or a list); returns, in prompt
        order, dicts with text, token_ids, finish_reason, num_cached_tokens.

        Calls from several threads on one engine run one after the other."""
        with self._generate_lock:
            if not self._exit.alive:
                raise RuntimeError("this engine has exited (exit() or the end of its with block); build a new LLM")
            return self._generate(prompts, sampling_params, use_tqdm)

    def _generate(self, prompts, sampling_params, use_tqdm: bool) -> list[dict]:
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts; give one, "
                             f"or one per prompt")
        # all checked before any is queued
        token_ids = [self._validated_token_ids(p) for p in prompts]
        sampling_params = [self._validated_params(p) for p in sampling_params]
        # n samples of a prompt are n sequences; the prefix cache shares the prompt's full KV blocks among them
        samples = [[Sequence(ids, sp, self.config.kvcache_block_size, index) for index in range(sp.n)]
                   for ids, sp in zip(token_ids, sampling_params)]
        for group in samples:
            for seq in group[1:]:
                seq.first_sample = group[0]
        # later samples queue behind every first one: their wait holds up no prompt
        seqs = [group[0] for group in samples] + [seq for group in samples for seq in group[1:]]
        for seq in seqs:
            self.scheduler.add(seq)
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            while not self.is_finished():
                start = time.perf_counter()
                finished, num_prefill, num_decode = self.step()
                elapsed = time.perf_counter() - start
                if num_prefill:
                    prefill_tps = num_prefill / elapsed
                if num_decode:
                    decode_tps = num_decode / elapsed
                bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s", refresh=False)
                bar.update(len(finished))
        finally:
            bar.close()
            if not self.is_finished():  # an error mid-way: leave no request or block behind
                self._in_flight = None
                self.scheduler.abort_all()
        return [self._output(group) for group in samples]

    def _output(self, samples: list[Sequence]) -> dict:
        """A prompt's output: its first sample's fields; with n > 1 also "outputs", every sample's."""
        outputs = [{"text": seq.text, "token_ids": seq.completion_token_ids, "finish_reason": seq.finish_reason,
                    "num_cached_tokens": seq.num_cached_tokens}
                   | ({"logprobs": seq.logprobs} if seq.sampling_params.logprobs is not None else {})
                   | ({"prompt_logprobs": seq.prompt_logprobs} if seq.prompt_logprobs is not None else {})
                   for seq in samples]
        return outputs[0] if len(outputs) == 1 else {**outputs[0], "outputs": outputs}
