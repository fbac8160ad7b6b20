from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams


class LLM(LLMEngine):
    """``LLM(model_path, **options).generate(prompts, sampling_params)``, as in vLLM."""

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template_kwargs: dict | None = None, add_generation_prompt: bool = True) -> list[dict]:
        """Generate a reply to a conversation (a list of {"role", "content"} messages) or to each of a list of
        them. ``chat_template_kwargs`` go to the template, e.g. {"enable_thinking": False} for Qwen3."""
        if self.tokenizer.chat_template is None:
            raise ValueError(f"the tokenizer of {self.config.model!r} has no chat template; use generate() instead")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **(chat_template_kwargs or {}))
                   for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)
