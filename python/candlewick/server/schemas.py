"""The request bodies of the OpenAI-compatible API, as pydantic models (unknown fields are ignored, types strict).

Besides OpenAI's fields, the vLLM-style extensions top_k, min_p, repetition_penalty, ignore_eos and stop_token_ids
are accepted, with the same meaning as in `Model.generate`, and /v1/completions takes `response_format` as chat
does (as vLLM does).
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    # strict: a string where a number belongs is an error, not a conversion; extra fields (user, metadata ...)
    # are ignored as OpenAI-compatible servers usually do
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: Union[str, list[str], None] = None
    seed: Union[int, None] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Union[dict[str, float], None] = None
    stream: bool = False
    stream_options: Union[StreamOptions, None] = None
    # vLLM-style extensions (top_k -1 means "off", as in vLLM)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: Union[list[int], None] = None

    def sampling_params(self) -> dict[str, Any]:
        """The `Model.generate` parameters this request asks for (max_new_tokens and logprobs aside)."""
        bias = None
        if self.logit_bias:
            bias = {}
            for key, value in self.logit_bias.items():
                try:
                    bias[int(key)] = value
                except ValueError:
                    raise ValueError(f"logit_bias: key {key!r} is not a token id") from None
                if not -100.0 <= value <= 100.0:
                    raise ValueError(f"logit_bias: the bias of token {key} must be between -100 and 100")
        return dict(
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=bias, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, seed=self.seed, n=self.n,
        )


# Messages per chat request, at most.
MAX_MESSAGES = 4096
# Tools per chat request, at most (OpenAI's limit).
MAX_TOOLS = 128

Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: Union[int, None] = Field(16, ge=1)
    logprobs: Union[int, None] = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: Union[int, None] = Field(None, ge=1)
    suffix: Union[str, None] = None
    response_format: Union[dict[str, Any], None] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_calls ... go to the template as they are
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        message.setdefault("content", "")
        return message


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Union[int, None] = Field(None, ge=1)
    max_completion_tokens: Union[int, None] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Union[int, None] = Field(None, ge=0, le=20)
    tools: Union[list[Any], None] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    response_format: Union[dict[str, Any], None] = None


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Union[int, None] = Field(None, ge=1)


class TokenizeRequest(BaseModel):
    """llama-server's /tokenize."""
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    """llama-server's /detokenize."""
    tokens: list[int]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Union[str, None] = None
    code: Union[str, None] = None


class ErrorResponse(BaseModel):
    """OpenAI's error object, which every 4xx and 5xx answer carries."""
    error: ErrorDetail
