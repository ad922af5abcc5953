"""Turning a request into token IDs without torch: the model's chat template and its fast tokenizer.

The gateway uses this to count prompt tokens synchronously (an over-long prompt is a 400 at submit); the
tokenizer tier uses the same code to produce the IDs the worker runs, so the count the client was
charged is the count the model sees.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from inferlog.errors import ConfigError, InvalidRequest, ModelNotReady
from inferlog.messages import ChatMessage
from inferlog.models import RegisteredModel


class PromptFormatter:
    """Renders messages with the model's chat template and encodes text with its ``tokenizer.json``."""

    def __init__(self, model_dir: Path) -> None:
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ConfigError(f"{model_dir} has no tokenizer.json (prepare the model first: `inferlog prepare`)")
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config_file = model_dir / "tokenizer_config.json"
        self._config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else self._config.get("chat_template")
        self._template_source: str | None = template if isinstance(template, str) else None

    @cached_property
    def _template(self):  # type: ignore[no-untyped-def]
        if self._template_source is None:
            return None
        # The same environment transformers renders chat templates in.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_template_error
        return env.from_string(self._template_source)

    def _special(self, name: str) -> str:
        value = self._config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else ""

    @property
    def eos_token_id(self) -> int | None:
        token = self._special("eos_token")
        return self._tokenizer.token_to_id(token) if token else None

    def compile(self) -> None:
        """Compile the chat template now (raises on a template that cannot compile)."""
        _ = self._template

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text for a chat, ending with the assistant's turn opened."""
        try:
            if self._template is None:
                return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
            return self._template.render(
                messages=[m.model_dump() for m in messages],
                add_generation_prompt=True,
                bos_token=self._special("bos_token"),
                eos_token=self._special("eos_token"),
            )
        except TemplateError as exc:
            raise InvalidRequest(f"messages do not fit the model's chat template: {exc}", param="messages") from exc
        except Exception as exc:  # noqa: BLE001 - a template is code: whatever it raises is about these messages
            raise InvalidRequest(f"the model's chat template failed on these messages: {type(exc).__name__}: "
                                 f"{exc}", param="messages", code="chat_template_error") from exc

    def encode_chats(self, chats: Sequence[Sequence[ChatMessage]]) -> list[list[int]]:
        """Token IDs for each chat, encoded in one batch (the template's special tokens are in the text)."""
        return self.encode_rendered([self.render(chat) for chat in chats])

    def encode_rendered(self, texts: Sequence[str]) -> list[list[int]]:
        """Token IDs for chats already rendered (``render``), in one batch."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token IDs for raw completion prompts, with the tokenizer's own special tokens."""
        return [e.ids for e in self._tokenizer.encode_batch(list(prompts), add_special_tokens=True)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def decoder(self) -> IncrementalDecoder:
        """A decoder for one generation as it grows (what ``decode`` gives, one step at a time)."""
        return IncrementalDecoder(self._tokenizer)


class IncrementalDecoder:
    """Decodes a generation as it grows, each step only the tokens it has not seen: tokenizers'
    ``DecodeStream``, which holds back a character whose bytes span tokens until its last byte arrives.
    Re-decoding the whole list every step costs O(n) per token, O(n^2) per generation, on the thread that
    also serves the engine's outputs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._fed = 0
        self.text = ""
        """The text of the tokens seen so far, less a partial character at the end."""

    def extend(self, tokens: Sequence[int]) -> str:
        """The generation's tokens so far (a prefix of them was passed before): the text so far."""
        new = tokens[self._fed:]
        self._fed = len(tokens)
        if new:
            chunk = self._stream.step(self._tokenizer, list(new))
            if chunk:
                self.text += chunk
        return self.text


def formatter_for(model: RegisteredModel) -> tuple[PromptFormatter, int]:
    """The model's formatter (its chat template compiled) and context length; ModelNotReady (404) when its
    files are missing or unusable here (not prepared, corrupt, a template that does not compile): a request
    for it is refused, never a 500 or a crash loop. An I/O error other than a missing file (EMFILE, EIO, a
    stale mount) is an outage, not an absence: it propagates, to be retried."""
    try:
        formatter = PromptFormatter(model.directory)
        formatter.compile()
        return formatter, model.context_length()
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError | NotADirectoryError):
            raise
        problem: Exception = exc
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for a corrupt tokenizer.json
        problem = exc
    raise ModelNotReady(f"The model {model.name!r} is registered but cannot be served here: its files are not "
                        f"prepared or unusable ({type(problem).__name__}: {problem}). An operator runs "
                        "`inferlog prepare`.", param="model") from problem


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)
