"""`meshserve bench` (meshserve.loadgen): load on a real mesh over gRPC and over the gateway's OpenAI HTTP API, the
records it keeps of every request, its JSON and PNG outputs, and the command line end to end.

Nothing here judges speed (this machine's varies): only that every request is there, whole and correct.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshserve.cli.main import build_parser
from meshserve.common.channels import sync_channel
from meshserve.loadgen.grpc_target import GrpcTarget
from meshserve.loadgen.levels import LoadLevel
from meshserve.loadgen.openai_target import OpenAITarget
from meshserve.loadgen.plot import plot_levels
from meshserve.loadgen.records import tokens_per_chunk
from meshserve.loadgen.report import bench_json, table_row, write_json
from meshserve.loadgen.results import LevelResult, percentile
from meshserve.loadgen.runner import run_level
from meshserve.loadgen.target import Chunk, Reply
from meshserve.loadgen.workload import PROMPT_ID_HIGH, PROMPT_ID_LOW, RequestSpec, Workload, parse_length
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from support import free_ports

OUTPUT_TOKENS = 10
RUN_TIMEOUT_S = 120
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bench(target: Callable[[], Any], workload: Workload, level: LoadLevel) -> LevelResult:
    async def run() -> LevelResult:
        async with target() as opened:
            return await run_level(opened, workload, level)

    return asyncio.run(asyncio.wait_for(run(), RUN_TIMEOUT_S))


def small_workload(**settings: Any) -> Workload:
    lengths = {"prompt_tokens": parse_length("uniform:6-14"), "output_tokens": parse_length(str(OUTPUT_TOKENS))}
    return Workload(**lengths, **settings)


def greedy_reference(gateway_address: str, request: RequestSpec) -> inference_pb2.Completion:
    """The same prompt alone, through the unary Generate: what a greedy stream of it must carry."""
    sampling = common_pb2.SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
    message = inference_pb2.GenerateRequest(sampling=sampling)
    message.token_ids.ids.extend(request.prompt_token_ids or ())
    with sync_channel(gateway_address) as channel:
        return inference_pb2_grpc.InferenceStub(channel).Generate(message, timeout=60).completions[0]


def assert_every_request_whole(result: LevelResult, sent: int) -> None:
    assert len(result.records) == sent, f"expected {sent} records, got {len(result.records)}"
    failed = [(r.request.number, r.status, r.error) for r in result.records if not r.ok]
    assert not failed, f"requests failed: {failed}"
    for record in result.records:
        assert record.output_tokens == record.request.max_tokens, (record.request.number, record.output_tokens)
        assert len(record.itl) == record.output_tokens - 1, (record.request.number, len(record.itl))
        assert record.ttft is not None and 0 < record.ttft <= record.e2e
        assert all(gap >= 0 for gap in record.itl)
        assert record.finish_reason == "length"
    numbers = [r.request.number for r in result.records]
    assert numbers == sorted(numbers) and len(set(numbers)) == sent, numbers
    summary = result.summary
    assert (summary.requests, summary.ok, summary.errors) == (sent, sent, {})
    assert summary.output_tokens == sent * OUTPUT_TOKENS and summary.tokens_per_second > 0


@pytest.fixture(scope="module")
def grpc_closed_loop(gateway: Any) -> LevelResult:
    """Three closed-loop streams over gRPC, six requests."""
    return bench(lambda: GrpcTarget(gateway.grpc), small_workload(seed=1), LoadLevel(concurrency=3, requests=6))


def test_grpc_closed_loop_streams_every_token_of_each_prompts_greedy_reference(
    gateway: Any, grpc_closed_loop: LevelResult
) -> None:
    assert_every_request_whole(grpc_closed_loop, sent=6)
    for record in grpc_closed_loop.records:
        reference = greedy_reference(gateway.grpc, record.request)
        assert record.token_ids == list(reference.token_ids), f"request {record.request.number}"
        assert record.text == reference.text
        assert record.prompt_tokens == len(record.request.prompt_token_ids or ())


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_openai_http_closed_loop_gets_every_token(gateway: Any, endpoint: str) -> None:
    result = bench(
        lambda: OpenAITarget(gateway.base_url, endpoint=endpoint),  # the model found through GET /v1/models
        small_workload(seed=2, endpoint=endpoint),
        LoadLevel(concurrency=2, requests=4),
    )
    assert_every_request_whole(result, sent=4)
    for record in result.records:
        assert record.token_ids is None  # the OpenAI API returns text
        if endpoint == "completions":  # token-id prompts: the same greedy answer as over gRPC
            assert record.text == greedy_reference(gateway.grpc, record.request).text, record.request.number
        else:
            assert record.request.prompt_text and record.prompt_tokens


def test_open_loop_rate_over_grpc_gets_every_token(gateway: Any) -> None:
    result = bench(lambda: GrpcTarget(gateway.grpc), small_workload(seed=3), LoadLevel(rate=40.0, requests=5))
    assert_every_request_whole(result, sent=5)
    sent_at = [r.sent_at for r in result.records]
    assert sent_at == sorted(sent_at), sent_at


class FakeTarget:
    """Answers every request with its max_tokens in one message, or fails it with `status`; holds each answer
    until `hold_until_sent` requests have been sent, and counts how many are in flight at once."""

    name = model = "fake"

    def __init__(self, hold_until_sent: int = 0, status: str = "OK") -> None:
        self.sent = self.in_flight = self.most_in_flight = 0
        self.everyone_sent = asyncio.Event()
        self.hold_until_sent, self.status = hold_until_sent, status

    def describe(self) -> dict[str, object]:
        return {"api": "fake"}

    async def send(self, request: RequestSpec) -> Reply:
        reply = Reply(sent_at=time.perf_counter(), status=self.status)
        self.sent, self.in_flight = self.sent + 1, self.in_flight + 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.sent >= self.hold_until_sent:
            self.everyone_sent.set()
        await self.everyone_sent.wait()
        await asyncio.sleep(0.001)
        if self.status == "OK":
            reply.chunks = [Chunk(time.perf_counter(), request.max_tokens)]
            reply.token_ids, reply.finish_reason = [7] * request.max_tokens, "length"
        self.in_flight -= 1
        reply.ended_at = time.perf_counter()
        return reply


def run_fake(target: FakeTarget, level: LoadLevel) -> LevelResult:
    return asyncio.run(asyncio.wait_for(run_level(target, small_workload(), level), 30))


def test_open_loop_sends_on_schedule_without_waiting_for_answers() -> None:
    # No answer comes until all five are sent: a runner that waited for one before the next would time out.
    target = FakeTarget(hold_until_sent=5)
    result = run_fake(target, LoadLevel(rate=500.0, requests=5))
    assert len(result.records) == 5 and target.most_in_flight == 5


def test_closed_loop_keeps_exactly_its_concurrency_in_flight() -> None:
    target = FakeTarget(hold_until_sent=3)
    result = run_fake(target, LoadLevel(concurrency=3, requests=9))
    assert len(result.records) == 9 and all(r.ok for r in result.records)
    assert target.most_in_flight == 3


def test_failures_are_counted_by_status_and_a_level_of_them_still_reports() -> None:
    result = run_fake(FakeTarget(status="UNAVAILABLE"), LoadLevel(concurrency=2, requests=4))
    summary = result.summary
    assert (summary.requests, summary.ok, summary.errors) == (4, 0, {"UNAVAILABLE": 4})
    row = table_row(summary)
    assert row.startswith("concurrency 2") and row.endswith("UNAVAILABLE 4") and " - " in row, row


def test_json_file_holds_every_level_summary_and_record(grpc_closed_loop: LevelResult, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    write_json(path, bench_json({"api": "grpc"}, small_workload().describe(), [grpc_closed_loop]))
    document = json.loads(path.read_text())
    assert document["tool"] == "meshserve bench" and document["target"] == {"api": "grpc"}
    assert document["workload"]["output_tokens"] == str(OUTPUT_TOKENS)
    (level,) = document["levels"]
    assert level["load"] == {"concurrency": 3, "rate": None, "duration": None, "requests": 6}
    summary = level["summary"]
    for name in ("requests", "ok", "errors", "tokens_per_second", "requests_per_second", "ttft_p50", "ttft_p90"):
        assert name in summary, name
    for name in ("ttft_p99", "itl_p50", "itl_p99", "e2e_p50", "e2e_p99", "wall"):
        assert isinstance(summary[name], float), name
    assert len(level["records"]) == 6
    record = level["records"][0]
    assert record["status"] == "OK" and len(record["token_ids"]) == OUTPUT_TOKENS
    assert len(record["itl"]) == OUTPUT_TOKENS - 1 and record["request"]["max_tokens"] == OUTPUT_TOKENS
    assert {"ttft", "e2e", "sent_at", "output_tokens", "prompt_tokens", "error"} <= record.keys()


def test_plot_is_a_png_of_every_level(grpc_closed_loop: LevelResult, tmp_path: Path) -> None:
    other = LevelResult(LoadLevel(concurrency=6, requests=6), grpc_closed_loop.records, grpc_closed_loop.wall / 2)
    path = tmp_path / "bench.png"
    plot_levels([grpc_closed_loop, other], path, "test")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 200, (width, height)


def test_bench_command_runs_levels_and_writes_its_files(gateway: Any, tmp_path: Path) -> None:
    json_path, png_path = tmp_path / "run.json", tmp_path / "run.png"
    command = [sys.executable, "-m", "meshserve.cli", "bench", "--grpc", gateway.grpc, "--concurrency", "1,2"]
    command += ["--requests", "3", "--prompt-tokens", "8", "--output-tokens", "6", "--warmup", "1"]
    command += ["--json", str(json_path), "--plot", str(png_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"rc {done.returncode}\n{done.stdout}\n{done.stderr}"
    rows = [line for line in done.stdout.splitlines() if line.startswith("concurrency ")]
    assert len(rows) == 2 and all(row.split()[2:4] == ["3", "0"] for row in rows), done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    levels = json.loads(json_path.read_text())["levels"]
    assert [len(level["records"]) for level in levels] == [3, 3]
    assert all(r["output_tokens"] == 6 for level in levels for r in level["records"])
    assert png_path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--prompt-tokens", "uniform:9-3"], "1 <= LOW <= HIGH"),
        (["--output-tokens", "lots"], "is not a token count"),
        (["--output-tokens", "normal:0,3"], "MEAN >= 1"),
        (["--concurrency", "0"], "at least 1"),
        (["--concurrency", "2,x"], "comma-separated"),
        (["--rate", "-2"], "more than 0"),
        (["--concurrency", "2", "--rate", "1"], "not allowed with"),
        (["--grpc", "nohost"], "HOST:PORT"),
        (["--openai", "127.0.0.1:8000/v1"], "http://"),
        (["--duration", "0"], "more than 0"),
        (["--requests", "2.5"], "not an integer"),
    ],
)
def test_bad_flag_values_fail_with_what_is_wrong(flags: list[str], says: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["bench", *flags])
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("api", ["grpc", "openai"])
def test_an_unreachable_target_is_one_line_and_a_non_zero_exit(api: str, capsys: pytest.CaptureFixture) -> None:
    (port,) = free_ports(1)
    where = f"127.0.0.1:{port}" if api == "grpc" else f"http://127.0.0.1:{port}/v1"
    args = build_parser().parse_args(["bench", f"--{api}", where, "--requests", "1"])
    assert args.run(args) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach" in err and "Traceback" not in err, err


def test_a_plot_into_a_missing_folder_fails_before_any_load(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = build_parser().parse_args(["bench", "--grpc", "127.0.0.1:1", "--plot", str(tmp_path / "no" / "x.png")])
    assert args.run(args) == 2
    assert "no folder" in capsys.readouterr().err


def test_a_seed_makes_the_same_requests_and_every_prompt_starts_apart() -> None:
    one, two = small_workload(seed=9), small_workload(seed=9)
    assert [one.next_request() for _ in range(20)] == [two.next_request() for _ in range(20)]
    assert small_workload(seed=10).request(3) != one.request(3)
    heads = {tuple(one.request(n).prompt_token_ids[:2]) for n in range(3000)}  # type: ignore[index]
    assert len(heads) == 3000  # distinct first KV blocks: no prefix cache hit between requests
    ids = [i for n in range(50) for i in one.request(n).prompt_token_ids]  # type: ignore[union-attr]
    assert PROMPT_ID_LOW <= min(ids) and max(ids) < PROMPT_ID_HIGH


def test_length_distributions_stay_in_their_range() -> None:
    rng = random.Random(0)
    assert {parse_length("uniform:3-5").sample(rng) for _ in range(200)} == {3, 4, 5}
    assert min(parse_length("normal:2,5").sample(rng) for _ in range(200)) >= 1
    assert str(parse_length(" normal:64,16 ")) == "normal:64,16"


def test_tokens_of_events_that_carry_text_are_shared_by_their_text_and_sum_to_the_usage() -> None:
    chunks = [Chunk(0.0, None, "a"), Chunk(1.0, None, "bbbb"), Chunk(2.0, 2, "cc"), Chunk(3.0, None, "dddd")]
    counts = tokens_per_chunk(chunks, total=10)
    assert sum(counts) == 10 and counts[2] == 2 and min(counts) >= 1 and counts[1] >= counts[0]
    assert tokens_per_chunk(chunks[:2], total=None) == [1, 1]
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 99) != percentile([], 99)  # NaN
