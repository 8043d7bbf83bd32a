"""OpenAI's request bodies, declared: the fields each endpoint takes, their types, and where each one goes in
the GenerateRequest (`Proto`).

As strict as the proto behind them: unknown fields are refused, a boolean is never a number, an integer
fits its proto type (a whole float such as 4.0 is the integer 4: JSON has a single number type), a float is
finite and fits a float32, text is valid Unicode. What depends on the model (max_tokens against the context,
top_k and token ids against the vocabulary) and ranges the proto cannot express are checked once, for both
APIs, by gateway/validation.py. Which fields are taken follows vLLM: OpenAI's, plus its sampling extensions
(top_k, min_p, repetition_penalty, min_tokens, stop_token_ids, skip_special_tokens, ...), which the `openai`
package sends through `extra_body`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag
from pydantic_core import PydanticCustomError

from meshserve.common.enums import PRIORITY_BY_NAME

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Proto:
    """The GenerateRequest field a request field fills. With `copy` (the default) http_openai sets its value
    there as it is; the prompt and the messages (copy=False) it translates itself. Errors the proto-level
    checks raise about `path`, or about a field in `also`, are reported under the request field's name."""

    path: str
    also: tuple[str, ...] = ()
    copy: bool = True


# Union members are tagged so that pydantic picks one by the JSON type and reports only its errors; the
# tags show up in error locations, which openai_errors leaves out.
UNION_TAGS = frozenset({"string", "token_ids", "list"})


def _whole_float_as_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _fits_float32(value: Any) -> Any:
    # float32 on the wire: a larger number would silently become infinity.
    if isinstance(value, int | float) and not isinstance(value, bool) and not abs(value) <= FLOAT32_MAX:
        raise PydanticCustomError("float32", f"must be a finite number, at most {FLOAT32_MAX:.7g} in size")
    return value


def _valid_unicode(text: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which are not text (nor UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = "is not valid Unicode text (lone surrogate at character {at})"
        raise PydanticCustomError("unicode", message, {"at": exc.start}) from None
    return text


def _priority(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in PRIORITY_BY_NAME:
        return PRIORITY_BY_NAME[value.lower()]
    raise PydanticCustomError("priority", f"must be one of {', '.join(PRIORITY_BY_NAME)}")


def _only(allowed: tuple[Any, ...], why: str) -> AfterValidator:
    """A field OpenAI defines for a feature meshserve lacks: taken only with the values that ask nothing of it."""

    def check(value: Any) -> Any:
        if value not in allowed:
            raise PydanticCustomError("unsupported", why)
        return value

    return AfterValidator(check)


def _json_kind(value: Any) -> str | None:
    return "string" if isinstance(value, str) else "list" if isinstance(value, list) else None


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _batch_prompt_kind(value: Any) -> str | None:
    return "string" if isinstance(value, str) else "token_ids" if isinstance(value, list) else None


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "string"
    if isinstance(value, list) and value:
        return "token_ids" if all(_is_token_id(v) for v in value) else "list"
    return None


def _union(kinds: Any, error_type: str, message: str) -> Discriminator:
    return Discriminator(kinds, custom_error_type=error_type, custom_error_message=message)


Text = Annotated[str, AfterValidator(_valid_unicode)]
UInt32 = Annotated[int, BeforeValidator(_whole_float_as_int), Field(ge=0, le=UINT32_MAX)]
PositiveUInt32 = Annotated[int, BeforeValidator(_whole_float_as_int), Field(ge=1, le=UINT32_MAX)]
UInt64 = Annotated[int, BeforeValidator(_whole_float_as_int), Field(ge=0, le=UINT64_MAX)]
Float32 = Annotated[float, BeforeValidator(_fits_float32)]
# vLLM's -1 (and 0) is "off", which the proto says with 0.
TopK = Annotated[
    int, BeforeValidator(_whole_float_as_int), Field(ge=-1, le=UINT32_MAX), AfterValidator(lambda k: max(k, 0))
]
TokenIds = list[Annotated[int, Field(ge=0, le=UINT32_MAX)]]
Priority = Annotated[int, BeforeValidator(_priority)]
Stop = Annotated[
    Annotated[Text, Tag("string")] | Annotated[list[Text], Tag("list")],
    _union(_json_kind, "stop_type", "must be a string or a list of strings"),
    AfterValidator(lambda stop: [stop] if isinstance(stop, str) else stop),
]
BatchPrompt = Annotated[
    Annotated[Text, Tag("string")] | Annotated[TokenIds, Tag("token_ids")],
    _union(_batch_prompt_kind, "prompt_item_type", "must be a string or a list of token ids"),
]
Prompt = Annotated[
    Annotated[Text, Tag("string")] | Annotated[TokenIds, Tag("token_ids")] | Annotated[list[BatchPrompt], Tag("list")],
    _union(_prompt_kind, "prompt_type", "must be a non-empty string or list: a prompt, token ids, or a list of either"),
]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(OpenAIModel):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


Schema = dict[str, Any] | bool


# Constrained output: openai_structured.py turns these into the request's StructuredOutput.
class JsonSchemaFormat(OpenAIModel):
    name: Annotated[Text, Field(min_length=1, max_length=64)]
    description: Text | None = None
    json_schema: Annotated[Schema, Field(alias="schema")] = True
    # Always enforced here: every token is drawn from those the schema allows.
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(OpenAIModel):
    """vLLM's extension (extra_body={"structured_outputs": {...}}): one of its fields."""

    json_: Annotated[Schema | Text | None, Field(alias="json")] = None
    json_object: bool | None = None
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None


class TextPart(BaseModel):
    # Other keys of a part or a message (name, cache_control, ...) ask nothing of us: ignored, as they were.
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: Text


Content = Annotated[
    Annotated[Text, Tag("string")] | Annotated[list[TextPart], Tag("list")],
    _union(_json_kind, "content_type", "must be a string or a list of text parts"),
]


class MessageFunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: Text
    arguments: Text  # JSON text, as the model wrote it


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    id: Text
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    # An assistant's earlier calls, and a tool message's answer to one of them.
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: Text | None = None
    name: Text | None = None

    @property
    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class FunctionDefinition(OpenAIModel):
    name: Text
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; none: any object
    strict: bool | None = None  # a required or named call is always held to its schema


class ToolDefinition(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: Text


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class GenerationRequest(OpenAIModel):
    """The fields both endpoints take."""

    model: Annotated[Text | None, Proto("model")] = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Annotated[PositiveUInt32 | None, Proto("n")] = None
    max_tokens: Annotated[PositiveUInt32 | None, Proto("sampling.max_tokens")] = None
    stop: Annotated[Stop | None, Proto("sampling.stop")] = None
    seed: Annotated[UInt64 | None, Proto("sampling.seed")] = None
    temperature: Annotated[Float32 | None, Proto("sampling.temperature")] = None
    top_p: Annotated[Float32 | None, Proto("sampling.top_p")] = None
    presence_penalty: Annotated[Float32 | None, Proto("sampling.presence_penalty")] = None
    frequency_penalty: Annotated[Float32 | None, Proto("sampling.frequency_penalty")] = None
    user: Text | None = None
    logit_bias: Annotated[dict[str, Any] | None, _only((None, {}), "is not supported")] = None
    # meshserve's (as vLLM's): not OpenAI's.
    priority: Annotated[Priority | None, Proto("priority")] = None
    # Only requests of the same tenant with the same salt share cached prompt blocks (vLLM's name).
    cache_salt: Annotated[Text | None, Proto("cache_salt")] = None
    top_k: Annotated[TopK | None, Proto("sampling.top_k")] = None
    min_p: Annotated[Float32 | None, Proto("sampling.min_p")] = None
    repetition_penalty: Annotated[Float32 | None, Proto("sampling.repetition_penalty")] = None
    ignore_eos: Annotated[bool | None, Proto("sampling.ignore_eos")] = None
    stop_token_ids: Annotated[TokenIds | None, Proto("sampling.stop_token_ids")] = None
    min_tokens: Annotated[UInt32 | None, Proto("sampling.min_tokens")] = None
    skip_special_tokens: Annotated[bool | None, Proto("sampling.skip_special_tokens")] = None
    spaces_between_special_tokens: Annotated[bool | None, Proto("sampling.spaces_between_special_tokens")] = None
    include_stop_str_in_output: Annotated[bool | None, Proto("sampling.include_stop_str_in_output")] = None
    # Constrained output (openai_structured.py): OpenAI's, vLLM's, and vLLM's older names; one of them.
    response_format: Annotated[ResponseFormat | None, Proto("sampling.structured", copy=False)] = None
    structured_outputs: Annotated[StructuredOutputs | None, Proto("sampling.structured", copy=False)] = None
    guided_json: Annotated[dict[str, Any] | bool | Text | None, Proto("sampling.structured", copy=False)] = None
    guided_regex: Annotated[Text | None, Proto("sampling.structured", copy=False)] = None
    guided_choice: Annotated[list[Text] | None, Proto("sampling.structured", copy=False)] = None
    guided_grammar: Annotated[Text | None, Proto("sampling.structured", copy=False)] = None


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[
        list[ChatMessage],
        Proto("messages", also=("prompt", "input", "token_ids"), copy=False),
        Field(description="a list of {role, content} objects"),
    ]
    # OpenAI's newer name for max_tokens; a request may send both only if they agree.
    max_completion_tokens: Annotated[PositiveUInt32 | None, Proto("sampling.max_tokens")] = None
    logprobs: Annotated[bool | None, Proto("sampling.logprobs")] = None
    top_logprobs: Annotated[UInt32 | None, Proto("sampling.top_logprobs")] = None
    tools: Annotated[list[ToolDefinition] | None, Proto("tools", copy=False)] = None
    tool_choice: Annotated[
        Literal["auto", "none", "required"] | NamedToolChoice | None, Proto("tool_choice", copy=False)
    ] = None
    # OpenAI's deprecated names for the two above.
    functions: Annotated[Any, _only((None, []), "is deprecated and not taken; send tools")] = None
    function_call: Annotated[Any, _only((None, "none"), "is deprecated and not taken; send tool_choice")] = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: Any = None


class CompletionRequest(GenerationRequest):
    prompt: Annotated[
        Prompt,
        Proto("prompt", also=("token_ids", "input", "batch.inputs"), copy=False),
        Field(description="a string, a list of token ids, or a list of either"),
    ]
    # The number of alternatives per token (0: only the chosen one's log-probability).
    logprobs: Annotated[UInt32 | None, Proto("sampling.top_logprobs")] = None
    best_of: Annotated[PositiveUInt32 | None, Proto("best_of")] = None
    echo: Annotated[
        bool | None, _only((None, False), "is not supported; the prompt is not repeated in the completion")
    ] = None
    suffix: Annotated[Text | None, _only((None, ""), "is not supported (no fill-in-the-middle)")] = None


OpenAIRequestBody = ChatCompletionRequest | CompletionRequest


def proto_marker(model: type[BaseModel], name: str) -> Proto | None:
    return next((m for m in model.model_fields[name].metadata if isinstance(m, Proto)), None)
