"""The sampling extensions clients written for vLLM send (`extra_body`): min_tokens, skip_special_tokens,
spaces_between_special_tokens, include_stop_str_in_output. Through the unmodified `openai` client, through
the gateway's gRPC API, and against the worker itself (failover resume), on the built-in model."""

from __future__ import annotations

import grpc
import openai
import pytest

from meshserve.common.errors import MeshError, bad_request_fields
from meshserve.common.tokenizer import ModelTokenizer
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from worker_client import generate_on_worker, violated_fields

MODEL = "meshserve-tiny"


@pytest.fixture(scope="module")
def inference(gateway):
    with grpc.insecure_channel(gateway.grpc) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def grpc_tokens(inference, prompt: str, **sampling) -> list[int]:
    request = inference_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(**sampling))
    return list(inference.Generate(request, timeout=60).completions[0].token_ids)


def test_min_tokens_holds_off_a_stop_token_that_would_end_at_once(client, inference):
    first = grpc_tokens(inference, "Hello", max_tokens=1, temperature=0)[0]
    stop_at_once = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=20, temperature=0, extra_body={"stop_token_ids": [first]}
    )
    assert stop_at_once.usage.completion_tokens == 1 and stop_at_once.choices[0].finish_reason == "stop"
    held_off = client.completions.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=20,
        temperature=0,
        extra_body={"stop_token_ids": [first], "min_tokens": 8},
    )
    assert held_off.usage.completion_tokens >= 8, held_off.usage
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=20,
        temperature=0,
        extra_body={"stop_token_ids": [first], "min_tokens": 8},
    )
    assert chat.usage.completion_tokens >= 8, chat.usage
    tokens = grpc_tokens(inference, "Hello", max_tokens=20, temperature=0, stop_token_ids=[first], min_tokens=8)
    assert len(tokens) >= 8 and first not in tokens[:8], tokens


def test_min_tokens_without_max_tokens_raises_the_default(client, gateway):
    reply = client.completions.create(
        model=MODEL, prompt="Hello", temperature=0, extra_body={"min_tokens": 300, "ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 300, "the default max_tokens (256) cut min_tokens short"


def test_stop_strings_are_not_looked_for_before_min_tokens(client):
    greedy = {"model": MODEL, "prompt": "Hello", "max_tokens": 30, "temperature": 0}
    full = client.completions.create(**greedy, extra_body={"ignore_eos": True}).choices[0].text
    stop = full[:3]
    at_once = client.completions.create(**greedy, stop=[stop], extra_body={"ignore_eos": True})
    assert at_once.choices[0].text == "" and at_once.choices[0].finish_reason == "stop"
    later = client.completions.create(**greedy, stop=[stop], extra_body={"ignore_eos": True, "min_tokens": 8})
    assert later.usage.completion_tokens >= 8
    assert later.choices[0].text.startswith(stop) and full.startswith(later.choices[0].text)


@pytest.mark.parametrize("stream", [False, True])
def test_include_stop_str_in_output_keeps_the_stop_string(client, stream):
    greedy = {"model": MODEL, "prompt": "Hello", "max_tokens": 30, "temperature": 0}
    full = client.completions.create(**greedy, extra_body={"ignore_eos": True}).choices[0].text
    stop = full[8:11]
    extra = {"ignore_eos": True, "include_stop_str_in_output": True}
    reply = client.completions.create(**greedy, stop=[stop], stream=stream, extra_body=extra)
    chunks = list(reply) if stream else [reply]
    text = "".join(c.choices[0].text for c in chunks)
    assert text == full[: full.index(stop) + len(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def only_special_tokens_first(tokenizer: ModelTokenizer, count: int) -> dict:
    """Sampling that makes the first `count` tokens special ones: every other token is a stop token id, so
    min_tokens masks them all; the token after those is a stop token and ends the sequence."""
    others = sorted(set(range(tokenizer.vocab_size)) - tokenizer.special_token_ids)
    return {"temperature": 0, "max_tokens": 20, "ignore_eos": True, "stop_token_ids": others, "min_tokens": count}


def hf_decode_with_spaces(tokenizer: ModelTokenizer, ids: list[int]) -> str:
    """Hugging Face's slow-tokenizer decode with spaces_between_special_tokens (its default): runs of text
    and special tokens are separate pieces, joined with one space."""
    pieces, run = [], []
    for token_id in ids:
        if token_id in tokenizer.special_token_ids:
            pieces += [tokenizer.decode(run)] if run else []
            pieces.append(tokenizer.decode([token_id], skip_special_tokens=False))
            run = []
        else:
            run.append(token_id)
    return " ".join(pieces + ([tokenizer.decode(run)] if run else []))


def test_skip_special_tokens_false_shows_them_spaced_as_hf_decodes(client, inference, tokenizer):
    sampling = only_special_tokens_first(tokenizer, 3)
    ids = grpc_tokens(inference, "Hello", **sampling)
    assert len(ids) == 4 and set(ids[:3]) <= tokenizer.special_token_ids, ids
    body = {"model": MODEL, "prompt": "Hello", "temperature": 0, "max_tokens": 20}
    extra = {key: sampling[key] for key in ("ignore_eos", "stop_token_ids", "min_tokens")}

    def text(**options) -> str:
        return client.completions.create(**body, extra_body={**extra, **options}).choices[0].text

    # The fourth token is a stop token id: as in vLLM its text is left out unless include_stop_str_in_output.
    kept = ids[:3]
    assert text() == "", "special tokens leaked into the text"
    assert text(include_stop_str_in_output=True) == tokenizer.decode(ids) == tokenizer.decode(ids[3:])
    shown = text(skip_special_tokens=False, spaces_between_special_tokens=False)
    assert shown == tokenizer.decode(kept, skip_special_tokens=False)
    assert shown.startswith(tokenizer.decode(ids[:1], skip_special_tokens=False))
    spaced = text(skip_special_tokens=False)
    assert spaced == hf_decode_with_spaces(tokenizer, kept) and spaced.count(" ") > shown.count(" ")
    assert text(skip_special_tokens=False, spaces_between_special_tokens=True) == spaced


def test_skip_special_tokens_false_through_grpc(inference, tokenizer):
    sampling = only_special_tokens_first(tokenizer, 3)
    request = inference_pb2.GenerateRequest(
        prompt="Hello", sampling=common_pb2.SamplingParams(**sampling, skip_special_tokens=False)
    )
    completion = inference.Generate(request, timeout=60).completions[0]
    assert completion.text == hf_decode_with_spaces(tokenizer, list(completion.token_ids)[:-1])  # stop token left out
    assert tokenizer.decode(completion.token_ids[:1], skip_special_tokens=False) in completion.text
    request.sampling.spaces_between_special_tokens = False
    completion = inference.Generate(request, timeout=60).completions[0]
    assert completion.text == tokenizer.decode(completion.token_ids[:-1], skip_special_tokens=False)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"min_tokens": 5}, "min_tokens: must be at most max_tokens (4), got 5"),
        ({"min_tokens": -1}, "min_tokens: must be at least 0, got -1"),
        ({"min_tokens": "8"}, "min_tokens: must be an integer, got a string"),
        ({"min_tokens": True}, "min_tokens: must be an integer, got a boolean"),
        ({"min_tokens": 2.5}, "min_tokens: must be an integer, got a number"),
        ({"skip_special_tokens": "false"}, "skip_special_tokens: must be true or false, got a string"),
        ({"skip_special_tokens": 0}, "skip_special_tokens: must be true or false, got an integer"),
        ({"spaces_between_special_tokens": 1}, "spaces_between_special_tokens: must be true or false, got an integer"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output: must be true or false, got a string"),
    ],
)
def test_bad_extension_values_are_refused_saying_what_to_send(client, extra, message):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body=extra
        )
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == next(iter(extra)), error
    assert error["message"] == message and error["type"] == "invalid_request_error", error


def test_the_extensions_vllm_clients_send_with_their_defaults_are_accepted(client):
    """What a client written for vLLM sends on every request; each of these alone used to be a 400."""
    defaults = {
        "skip_special_tokens": True,
        "spaces_between_special_tokens": True,
        "min_tokens": 0,
        "include_stop_str_in_output": False,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "ignore_eos": False,
        "stop_token_ids": [],
    }
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, extra_body=defaults
    )
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content == plain.choices[0].message.content


def test_min_tokens_beyond_the_context_is_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="Hi", extra_body={"min_tokens": 5000})
    assert caught.value.body["param"] == "min_tokens" and "context of 2048" in caught.value.body["message"]


def test_min_tokens_above_max_tokens_is_invalid_argument_through_grpc(inference, mesh):
    sampling = common_pb2.SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(grpc.RpcError) as caught:
        inference.Generate(inference_pb2.GenerateRequest(prompt="Hi", sampling=sampling), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["sampling.min_tokens"] and "max_tokens (4)" in caught.value.details()
    with pytest.raises(MeshError) as caught:
        request = common_pb2.TokenRequest(prompt_token_ids=[5, 6], sampling=sampling)
        generate_on_worker(mesh.channel(mesh.worker), request, timeout=30)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["sampling.min_tokens"]


@pytest.mark.parametrize("seed", [None, 7])
def test_a_resumed_sequence_continues_exactly_under_min_tokens(mesh, tokenizer, seed):
    """Failover: the worker that takes over counts the resumed tokens toward min_tokens (its mask and its
    stop checks) and draws on from the same generator state, so it goes on exactly as the first would have."""
    worker = mesh.channel(mesh.worker)
    prompt = tokenizer.encode("Hello")

    def generate(sampling: common_pb2.SamplingParams, resumed: list[int] = ()) -> tuple[list[int], int]:
        request = common_pb2.TokenRequest(prompt_token_ids=prompt, sampling=sampling, resume_token_ids=resumed)
        chunks = generate_on_worker(worker, request)
        return [t for chunk in chunks for t in chunk.token_ids], chunks[-1].finish_reason

    sampling = common_pb2.SamplingParams(max_tokens=24, ignore_eos=True)
    if seed is None:
        sampling.temperature = 0
    else:
        sampling.seed = seed
    free, _ = generate(sampling)
    # A token first drawn past min_tokens: as a stop token it ends the sequence there, just after min_tokens.
    stop_at = next(i for i in range(8, len(free)) if free[i] not in free[:8])
    sampling.stop_token_ids.append(free[stop_at])
    sampling.min_tokens = 8
    whole, finish = generate(sampling)
    if seed is None:  # greedy: masking a token it never picked before min_tokens changes nothing
        assert whole == free[: stop_at + 1] and finish == common_pb2.FINISH_REASON_STOP, (whole, free)
    for cut in (3, 7):
        rest, rest_finish = generate(sampling, whole[:cut])
        assert whole[:cut] + rest == whole and rest_finish == finish, cut
