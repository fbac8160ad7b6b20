from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams


class LLM(LLMEngine):
    """``LLM(model_path, **options).generate(prompts, sampling_params)``, as in vLLM."""

    def chat(self, conversations: list[list[dict]], sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[dict]:
        """Generate a reply to each conversation (a list of {"role", "content"} messages)."""
        if conversations and isinstance(conversations[0], dict):
            raise TypeError("chat takes a list of conversations; wrap a single conversation in a list")
        if self.tokenizer.chat_template is None:
            raise ValueError(f"the tokenizer of {self.config.model!r} has no chat template; use generate() instead")
        prompts = [self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                   for messages in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)
