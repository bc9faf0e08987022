"""Instruction data: rows of `prompt` / `completion`, or chat `messages`, as token ids and the spans
of them the loss sees.

A prompt/completion row is the prompt's tokens (with the model's own BOS, if it adds one) then the
completion's and the end-of-text token; the loss sees the completion and the end. A `messages`
row is rendered with the model's chat template (`tokenizer_config.json`, as transformers renders
it: a sandboxed Jinja environment) and tokenized as one text; the loss sees each assistant turn —
its span found by rendering the conversation up to before the turn (with the generation prompt)
and up to its end, and kept as the tokens whose text lies inside. Spans are [start, end) token
offsets, flattened, stored beside the tokens (`supervised`); a document without spans is all
supervised.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from trainer.tokenizer import Tokenizer


class InstructionError(ValueError):
    """A row that cannot be turned into an example; its message is one line."""


def pair_example(tokenizer: Tokenizer, prompt: str, completion: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, supervised spans) of a prompt/completion row."""
    head = tokenizer.encode(prompt, special=True)
    tail = tokenizer.encode(completion, special=False) + [tokenizer.eos_id]
    return np.asarray(head + tail, dtype=np.int32), np.asarray([len(head), len(head) + len(tail)], dtype=np.int32)


def chat_example(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, supervised spans) of a conversation rendered with the tokenizer's chat template
    (which it must have)."""
    if not (isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                               for m in messages)):
        raise InstructionError("`messages` must be a list of {role, content}")
    render = _renderer(tokenizer.chat_template, tuple(sorted(tokenizer.template_tokens.items())))
    text = render(messages, False)
    chars = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            if not (text.startswith(through) and through.startswith(before)):
                raise InstructionError("the chat template renders a conversation's prefix differently from the "
                                       "conversation itself: its assistant turns cannot be located")
            chars.append((len(before), len(through)))
    ids, offsets = tokenizer.encode_offsets(text)
    starts = np.asarray([o[0] for o in offsets], dtype=np.int64)
    supervised = np.zeros(len(ids), dtype=bool)
    for a, b in chars:
        supervised |= (starts >= a) & (starts < b)
    return np.asarray(ids, dtype=np.int32), runs(supervised)


def runs(mask: np.ndarray) -> np.ndarray:
    """[start, end) pairs of the True runs of a boolean array, flattened."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.stack([np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]], axis=1).reshape(-1).astype(np.int32)


@functools.lru_cache(maxsize=4)
def _renderer(template: str, tokens: tuple[tuple[str, str], ...]):
    """The template compiled once: a function (messages, add_generation_prompt) → text."""
    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}`, which some templates wrap assistant text in: rendered as is."""

        tags = {"generation"}

        def parse(self, parser) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=generation_prompt, **dict(tokens))
        except TemplateError as err:
            raise InstructionError(f"the chat template refused the row ({err})") from None

    return render
