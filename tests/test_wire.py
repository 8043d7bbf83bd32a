"""The mesh's one stream message: StreamChunk is the public GenerateStreamResponse without the request id,
so the gateway reads the router's and aggregator's bytes as the public message; chunks join correctly."""

from __future__ import annotations

from meshserve.common.stream_chunks import joined
from meshserve.v1 import common_pb2, inference_pb2


def test_every_stream_chunk_field_is_the_public_field_of_the_same_number_and_type():
    public = {f.number: f for f in inference_pb2.GenerateStreamResponse.DESCRIPTOR.fields}
    internal = common_pb2.StreamChunk.DESCRIPTOR.fields
    assert internal
    for field in internal:
        twin = public.get(field.number)
        assert twin is not None, f"StreamChunk.{field.name} has no public field {field.number}"
        assert (twin.name, twin.type, twin.is_repeated) == (field.name, field.type, field.is_repeated), field.name
        assert twin.message_type == field.message_type and twin.enum_type == field.enum_type, field.name
        assert twin.has_presence == field.has_presence, field.name
    # The one public field the mesh does not carry is the request id, which the edge adds.
    assert set(public) - {f.number for f in internal} == {1} and public[1].name == "request_id"


def test_a_chunk_read_as_the_public_message_keeps_everything():
    chunk = common_pb2.StreamChunk(
        index=3,
        token_ids=[1, 2],
        text="hé",
        finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=2, total_tokens=6),
        logprobs=[common_pb2.TokenLogprob(token_id=1, logprob=-0.5)],
        error=common_pb2.ErrorStatus(code=3, message="bad"),
        mean_logprob=-0.25,
        final=True,
    )
    public = inference_pb2.GenerateStreamResponse.FromString(chunk.SerializeToString())
    public.request_id = "r-1"
    assert public.index == 3 and list(public.token_ids) == [1, 2] and public.text == "hé"
    assert public.finish_reason == common_pb2.FINISH_REASON_STOP and public.usage.total_tokens == 6
    assert public.logprobs[0].logprob == -0.5 and public.error.message == "bad"
    assert public.HasField("mean_logprob") and public.mean_logprob == -0.25 and public.final


def test_chunks_ready_together_join_into_one():
    first = common_pb2.StreamChunk(index=1, token_ids=[1], text="a", logprobs=[common_pb2.TokenLogprob(token_id=1)])
    second = common_pb2.StreamChunk(index=1, token_ids=[2, 3], text="bc")
    last = common_pb2.StreamChunk(
        index=1,
        token_ids=[4],
        text="d",
        finish_reason=common_pb2.FINISH_REASON_LENGTH,
        usage=common_pb2.Usage(prompt_tokens=2, completion_tokens=4, total_tokens=6),
        logprobs=[common_pb2.TokenLogprob(token_id=4)],
    )
    one = joined([first, second, last])
    assert list(one.token_ids) == [1, 2, 3, 4] and one.text == "abcd" and one.index == 1
    assert [lp.token_id for lp in one.logprobs] == [1, 4]
    assert one.finish_reason == common_pb2.FINISH_REASON_LENGTH and one.usage.completion_tokens == 4
    alone = common_pb2.StreamChunk(token_ids=[9])
    assert joined([alone]) is alone
