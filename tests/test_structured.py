"""Constrained decoding over gRPC: the random-weights built-in model's output follows a JSON Schema, a regex,
a choice or a grammar whatever the seed; bad grammars are refused before any worker is used."""

from __future__ import annotations

import json
import re
import signal

import grpc
import jsonschema
import pytest

from meshserve.common.errors import bad_request_fields
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc
from support import WAIT_S, workers_behind_a_router

# Bounded strings, numbers and arrays: a random model draws about uniformly among allowed tokens, so an
# unbounded string would end only by chance (or at max_tokens, unfinished).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "zip": {"type": "integer", "maximum": 99999}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{1,6} (is|was) [0-9]{1,3}"
CHOICES = ["yes", "no", 'it depends "quoted"']


def structured_request(seed: int, **structured) -> inference_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(
        max_tokens=200, temperature=1.0, seed=seed, structured=common_pb2.StructuredOutput(**structured)
    )
    return inference_pb2.GenerateRequest(prompt="Describe someone", sampling=sampling)


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.gateway) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def test_json_schema_outputs_validate_for_every_seed(stub):
    for seed in range(20):
        reply = stub.Generate(structured_request(seed, json_schema=json.dumps(PERSON)), timeout=60)
        (completion,) = reply.completions
        assert completion.finish_reason == common_pb2.FINISH_REASON_STOP, (seed, completion.text)
        jsonschema.validate(json.loads(completion.text), PERSON)


def test_a_regex_a_choice_and_a_grammar_are_followed(stub):
    for seed in range(10):
        text = stub.Generate(structured_request(seed, regex=REGEX), timeout=60).completions[0].text
        assert re.fullmatch(REGEX, text), (seed, text)
        choice = common_pb2.Choices(choices=CHOICES)
        assert stub.Generate(structured_request(seed, choice=choice), timeout=60).completions[0].text in CHOICES
        lark = 'start: "(" NUMBER ("," NUMBER)* ")"\nNUMBER: /[0-9]{1,2}/'
        text = stub.Generate(structured_request(seed, grammar=lark), timeout=60).completions[0].text
        assert re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2})*\)", text), (seed, text)
        whole = stub.Generate(structured_request(seed, json_object=True), timeout=60).completions[0]
        if whole.finish_reason == common_pb2.FINISH_REASON_STOP:  # an object's strings are unbounded here
            assert isinstance(json.loads(whole.text), dict)


def test_streamed_constrained_output_is_the_whole_output_in_pieces(stub):
    request = structured_request(7, json_schema=json.dumps(PERSON))
    whole = stub.Generate(request, timeout=60).completions[0]
    chunks = list(stub.GenerateStream(request, timeout=60))
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)


def test_constrained_and_free_sequences_share_a_step_and_n_keeps_its_meaning(stub):
    """n=3 of one constrained request go through the aggregator together: each is valid and each seed's own."""
    request = structured_request(3, json_schema=json.dumps(PERSON))
    request.n = 3
    reply = stub.Generate(request, timeout=60)
    assert len(reply.completions) == 3
    for completion in reply.completions:
        jsonschema.validate(json.loads(completion.text), PERSON)
    free = inference_pb2.GenerateRequest(prompt="Describe someone", sampling=common_pb2.SamplingParams(max_tokens=8))
    assert stub.Generate(free, timeout=60).completions[0].text is not None


def test_best_of_and_a_batch_keep_their_meaning_with_a_constraint(stub):
    request = structured_request(5, json_schema=json.dumps(PERSON))
    request.best_of = 3
    (best,) = stub.Generate(request, timeout=60).completions
    jsonschema.validate(json.loads(best.text), PERSON)
    batch = structured_request(6, regex=REGEX)
    batch.ClearField("prompt")
    for prompt in ("First", "Second", "Third"):
        batch.batch.inputs.add(prompt=prompt)
    reply = stub.Generate(batch, timeout=60)
    assert len(reply.completions) == 3
    assert all(re.fullmatch(REGEX, c.text) for c in reply.completions), [c.text for c in reply.completions]


@pytest.mark.parametrize(
    ("structured", "field", "says"),
    [
        ({"json_schema": "{not json"}, "sampling.structured.json_schema", "is not JSON"),
        ({"json_schema": '{"type": "frob"}'}, "sampling.structured.json_schema", "frob"),
        ({"json_schema": "[1, 2]"}, "sampling.structured.json_schema", "must be a JSON Schema"),
        ({"regex": "a(b"}, "sampling.structured.regex", "unclosed group"),
        ({"regex": ""}, "sampling.structured.regex", "is empty"),
        ({"choice": common_pb2.Choices()}, "sampling.structured.choice", "at least one"),
        ({"choice": common_pb2.Choices(choices=["a", ""])}, "sampling.structured.choice", "choice 1 is empty"),
        ({"grammar": "start: undefined_rule"}, "sampling.structured.grammar", "undefined_rule"),
        ({"regex": "a" * 70_000}, "sampling.structured.regex", "at most 65536"),
    ],
)
def test_a_bad_grammar_is_refused_naming_the_field_before_any_worker_is_used(mesh, stub, structured, field, says):
    with grpc.insecure_channel(mesh.router) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        before = router.Stats(router_pb2.RouterStatsRequest(), timeout=5).dispatched
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(structured_request(1, **structured), timeout=30)
        assert router.Stats(router_pb2.RouterStatsRequest(), timeout=5).dispatched == before
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == [field]
    assert says in caught.value.details() and len(caught.value.details()) < 1000


def test_a_constrained_stream_resumed_after_its_worker_is_killed_still_validates(loop_thread, cache_dir, tmp_path):
    """The next worker replays the tokens already sent through the grammar's matcher: its state goes on
    where it was, so the output is the uninterrupted one (greedy, and seeded), and valid."""
    with workers_behind_a_router(loop_thread, 2, cache_dir, tmp_path) as mesh:
        stub = mesh.router
        for failovers, temperature in enumerate((0.0, 0.9), start=1):
            sampling = common_pb2.SamplingParams(
                max_tokens=200, temperature=temperature, seed=17,
                structured=common_pb2.StructuredOutput(json_schema=json.dumps(PERSON)),
            )  # fmt: skip
            request = common_pb2.TokenRequest(prompt_token_ids=[5, 6, 7, 8], sampling=sampling)
            reference = list(stub.Generate(request, timeout=WAIT_S))
            tokens: list[int] = []
            text = ""
            killed = None
            for chunk in stub.Generate(request, timeout=WAIT_S):
                tokens.extend(chunk.token_ids)
                text += chunk.text
                if killed is None and len(tokens) >= 8:
                    stats = stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
                    killed = next(w.address for w in stats.workers if w.in_flight and w.up)
                    mesh.process(killed).send_signal(signal.SIGKILL)
            assert killed is not None, "the output was done before its worker could be killed"
            assert stub.Stats(router_pb2.RouterStatsRequest(), timeout=5).failovers == failovers
            assert tokens == [t for c in reference for t in c.token_ids]
            assert text == "".join(c.text for c in reference)
            jsonschema.validate(json.loads(text), PERSON)
            mesh.restart(killed)  # the next request needs a worker to fail over to again
