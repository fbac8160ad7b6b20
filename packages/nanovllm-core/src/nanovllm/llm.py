from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams


class LLM(LLMEngine):
    """``LLM(model_path, **options).generate(prompts, sampling_params)``, as in vLLM."""

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template_kwargs: dict | None = None, add_generation_prompt: bool = True) -> list[dict]:
        """Generate a reply to a conversation (a list of {"role", "content"} messages) or to each of a list of
        them. ``chat_template_kwargs`` go to the template, e.g. {"enable_thinking": False} for Qwen3."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(conversation, chat_template_kwargs, add_generation_prompt)
                   for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def chat_prompt(self, messages: list[dict], chat_template_kwargs: dict | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The text prompt of one conversation, by the tokenizer's chat template."""
        if self.tokenizer.chat_template is None:
            raise ValueError(f"the tokenizer of {self.config.model!r} has no chat template; use generate() instead")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **(chat_template_kwargs or {}))
