"""Hugging Face tokenizers without transformers (which imports torch): encoding, chat templates, decoding.

Reads the same files `transformers` does (tokenizer.json, tokenizer_config.json,
chat_template.jinja) so the gateway and the worker tokenise exactly as the model expects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import Undefined
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


class ChatTemplateError(ValueError):
    pass


class ModelTokenizer:
    def __init__(self, files: Mapping[str, bytes]) -> None:
        if "tokenizer.json" not in files:
            raise ValueError("tokenizer.json is missing: only fast (tokenizers-library) tokenizers are supported")
        self.tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        config: dict[str, Any] = json.loads(files.get("tokenizer_config.json", b"{}"))
        special_map: dict[str, Any] = json.loads(files.get("special_tokens_map.json", b"{}"))
        self.bos_token = _token_text(config.get("bos_token", special_map.get("bos_token")))
        self.eos_token = _token_text(config.get("eos_token", special_map.get("eos_token")))
        self.chat_template = _chat_template(config, files.get("chat_template.jinja"))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_token_ids = frozenset(
            token_id for token_id, token in self.tokenizer.get_added_tokens_decoder().items() if token.special
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelTokenizer:
        return cls(read_tokenizer_files(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, not encode: only it releases the GIL while Rust tokenises, so a long prompt tokenised in a
        # thread (asyncio.to_thread) leaves the event loop running; its result is the same.
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The conversation as the model's template writes it; `tools` (OpenAI's shape) for templates that
        describe them."""
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template; send a prompt or token ids instead")
        try:
            return (
                _jinja()
                .from_string(self.chat_template)
                .render(
                    messages=list(messages),
                    tools=list(tools) if tools else None,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                )
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template rejected the messages: {exc}") from exc

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        # Templates write the BOS token themselves; adding it again would double it (as transformers does).
        return self.encode(self.render_chat(messages, add_generation_prompt, tools), add_special_tokens=False)

    def detokenizer(
        self,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> IncrementalDetokenizer:
        # Hugging Face's slow tokenizers space every added token; only the special ones are here, so that text
        # without them (skip_special_tokens, the default) is exactly what the fast decode gives, as in vLLM.
        spaced = self.special_token_ids if spaces_between_special_tokens and not skip_special_tokens else frozenset()
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens, spaced)


class IncrementalDetokenizer:
    """Turns generated ids into text deltas; never emits half a UTF-8 character.

    With skip_special_tokens false the text holds special tokens too (`</s>`, `<|end|>`); the tokens in
    `spaced_ids` then stand apart by one space from the text and tokens next to them, as Hugging Face's
    decode joins added tokens with spaces_between_special_tokens (its default): `hello </s> <|end|>`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaced_ids: frozenset[int] = frozenset(),
    ) -> None:
        self._tokenizer = tokenizer
        # The prompt's tail gives the decoder context (leading spaces, merged bytes).
        self._stream = DecodeStream(ids=list(prompt_ids[-8:]), skip_special_tokens=skip_special_tokens)
        self._spaced_ids = spaced_ids
        # Whether the last piece of text was a spaced token; None before the first piece. The prompt does not
        # count: as in decode(output_ids), the output's first piece never starts with an added space.
        self._after_spaced: bool | None = None

    def add(self, token_id: int) -> str:
        text = self._stream.step(self._tokenizer, token_id) or ""
        if not self._spaced_ids or not text:
            return text
        spaced = token_id in self._spaced_ids
        if self._after_spaced is not None and (spaced or self._after_spaced):
            text = " " + text
        self._after_spaced = spaced
        return text


def read_tokenizer_files(path: str | Path) -> dict[str, bytes]:
    directory = Path(path)
    return {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).exists()}


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):  # older configs store AddedToken dicts
        return token.get("content")
    return token


def _chat_template(config: Mapping[str, Any], template_file: bytes | None) -> str | None:
    if template_file is not None:
        return template_file.decode("utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template


_JINJA: ImmutableSandboxedEnvironment | None = None


def _jinja() -> ImmutableSandboxedEnvironment:
    global _JINJA
    if _JINJA is None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception

        def tojson(value: Any, indent: int | None = None) -> str:
            # A message without a field the template writes as JSON (a tool message's tool_call_id) is the
            # template refusing the messages, not a server fault.
            if isinstance(value, Undefined):
                raise TemplateError(
                    f"it writes {value._undefined_name or 'a value'!r} as JSON; the messages leave it out"
                )
            try:
                return json.dumps(value, ensure_ascii=False, indent=indent)
            except (TypeError, ValueError) as exc:
                raise TemplateError(f"it cannot write a value as JSON ({exc})") from None

        env.filters["tojson"] = tojson
        _JINJA = env
    return _JINJA
