"""Prompt templates, by name: how a benchmark problem becomes the text the model continues.

What it is
    `TEMPLATES` maps a name to a `Template` (optional system prompt + user message = problem + suffix):
      - "qwen_boxed": user = problem + "\\nPlease reason step by step, and put your final answer within
        \\boxed{}.", no system message (the chat template may insert its default one, as Qwen2.5's does).
      - "mimo": the same user message with an explicitly EMPTY system prompt (MiMo's evaluation setting).
      - "plain": the problem text as is, never chat-formatted (synthetic tasks, base models).
    `format_prompt(problem, template, tokenizer)` applies the tokenizer's chat template with
    `add_generation_prompt=True` when it has one (and the template is not "plain"); otherwise it returns
    the user message as plain text. `Template.add_special_tokens(tokenizer)` is the one rule for the
    tokenizer's own special tokens (BOS): added unless the chat template already wrote them. Training
    rollouts, evaluation and the benches all encode through these two, so a prompt is encoded the same
    way everywhere.

How it departs from the references
    Qwen2.5-Math's own evaluation puts the step-by-step instruction in the SYSTEM prompt; "qwen_boxed"
    follows the R1-Zero / SimpleRL / DAPO-era convention of appending it to the user turn. Add a template
    here (one line) rather than formatting prompts elsewhere, so every result records which one it used.

How to use
    >>> format_prompt("1+1?", "qwen_boxed")
    '1+1?\\nPlease reason step by step, and put your final answer within \\\\boxed{}.'
"""

from __future__ import annotations

from dataclasses import dataclass

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Template:
    suffix: str = ""  # appended to the problem to form the user message
    system: str | None = None  # None: no system message; "": an explicitly empty one
    chat: bool = True  # False: never apply a chat template

    def chat_formatted(self, tokenizer) -> bool:
        """True when `render` applies the tokenizer's chat template."""
        return self.chat and tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))

    def add_special_tokens(self, tokenizer) -> bool:
        """Whether encoding the rendered prompt adds the tokenizer's special tokens: not after a chat
        template (which writes its own), always otherwise (a plain prompt gets its BOS)."""
        return not self.chat_formatted(tokenizer)

    def render(self, problem: str, tokenizer=None) -> str:
        """The prompt string for `problem` (concatenation, not str.format: problems contain braces)."""
        user = problem + self.suffix
        if not self.chat_formatted(tokenizer):
            return user
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


TEMPLATES: dict[str, Template] = {
    "qwen_boxed": Template(suffix="\n" + BOXED_INSTRUCTION),
    "mimo": Template(suffix="\n" + BOXED_INSTRUCTION, system=""),
    "plain": Template(chat=False),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; valid: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def format_prompt(problem: str, template: str, tokenizer=None) -> str:
    """`get_template(template).render(problem, tokenizer)`."""
    return get_template(template).render(problem, tokenizer)
