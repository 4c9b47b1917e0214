"""The serving bench (axserving.bench): against the real server on the fake backend, metrics are
sane; against a tiny misbehaving server, 200 replies that deliver nothing or stop early are
counted as empty/truncated, never as fast successes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest

from axserving.bench.client import Call, Kind, send
from axserving.bench.options import BenchConfig, Endpoint, Target, Workload, add_arguments, config_from_args
from axserving.bench.report import LevelSummary, percentile
from axserving.bench.serving import main, run_sync
from axserving.bench.workload import arrival_gaps, max_tokens_for, prompt_text, request_body, system_prompt
from axserving.cli import build_parser
from tests.server import run_server

# The misbehaving server runs in a thread: an exception there must fail the test, not just warn.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def config(*targets: Target, **kw: object) -> BenchConfig:
    base: dict[str, object] = dict(
        targets=targets, concurrency=(1, 4), num_requests=None, duration_s=None, rounds=1, prompt_words=40,
        max_tokens=16, max_tokens_spread=0.0, ignore_eos=True, eos_token_ids=(), stream=True, endpoint=Endpoint.chat, temperature=0.0,
        warmup=1, timeout_s=30.0, json_path=None, quiet=True,
    )
    base.update(kw)
    return BenchConfig(**base)  # type: ignore[arg-type]


def test_prompts_are_distinct_and_about_the_asked_length() -> None:
    prompts = [prompt_text(i, 64) for i in range(200)]
    assert len(set(prompts)) == 200
    assert all(60 <= len(p.split()) <= 68 for p in prompts)
    assert prompt_text(7, 64) == prompt_text(7, 64)  # the same workload on every server


def test_each_run_salts_its_prompts_so_a_server_has_none_cached_from_an_earlier_run() -> None:
    t = Target("ours", "http://127.0.0.1:1", "default", None)
    first, second = _parse(), _parse()
    assert first.prompt_salt != second.prompt_salt
    a, b = (request_body(c, t, 0)["messages"][0]["content"] for c in (first, second))
    assert a.split()[:2] != b.split()[:2]  # they differ from the first words on
    assert len(a.split()) == len(b.split())
    replay = _parse("--prompt-salt", first.prompt_salt)
    assert request_body(replay, t, 0) == request_body(first, t, 0)


def test_max_tokens_spread_is_drawn_per_request_in_range_and_repeatable() -> None:
    t = Target("ours", "http://127.0.0.1:1", "default", None)
    assert {max_tokens_for(config(t, max_tokens=128), i) for i in range(50)} == {128}
    cfg = config(t, max_tokens=128, max_tokens_spread=0.5)
    drawn = [max_tokens_for(cfg, i) for i in range(400)]
    assert min(drawn) >= 64 and max(drawn) <= 128 and len(set(drawn)) > 30
    assert drawn == [max_tokens_for(cfg, i) for i in range(400)]  # the same on every server
    assert request_body(cfg, t, 3)["max_tokens"] == drawn[3]


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def _check_level(s: LevelSummary, requests: int, streamed: bool) -> None:
    assert s.requests == s.ok == requests, s
    assert s.failed == 0 and s.failures == {}
    assert s.tokens_from == "usage" and s.output_tokens == 16 * s.ok
    assert s.finish_reasons == {"length": s.ok}
    assert s.request_throughput > 0 and s.output_throughput > 0
    assert s.e2e is not None and 0 < s.e2e.p50 <= s.e2e.p90 <= s.e2e.p99 <= s.e2e.max
    if not streamed:
        assert s.ttft is None and s.tpot is None and s.itl is None
        return
    assert s.ttft is not None and s.tpot is not None and s.itl is not None
    assert 0 < s.ttft.p50 <= s.ttft.p90 <= s.ttft.p95 <= s.ttft.p99 <= s.ttft.max
    assert 0 < s.tpot.p50 <= s.tpot.p99
    assert 0 < s.itl.n <= 15 * s.ok  # at most one gap per token after the first
    assert s.ttft.p50 < s.e2e.p50


def test_against_real_server_on_fake_backend(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=5") as server:
        target = Target("ours", server.url, "default", server.api_key)
        # The fake backend echoes the prompt word by word: 40 words, so it reaches max_tokens=16.
        streamed = run_sync(config(target))
        whole = run_sync(config(target, stream=False, concurrency=(2,), num_requests=4, warmup=0))
        spread = run_sync(config(target, concurrency=(4,), num_requests=12, max_tokens_spread=0.75))
    (s,) = spread.summaries
    # Each request is judged against its own max_tokens: none is "truncated" for stopping early.
    assert s.ok == 12 and s.truncated == 0
    assert s.output_tokens == sum(max_tokens_for(spread.config, i) for i in range(12))
    assert [s.concurrency for s in streamed.summaries] == [1, 4]
    for s in streamed.summaries:
        _check_level(s, max(8, 4 * s.concurrency), streamed=True)
    (s,) = whole.summaries
    _check_level(s, 4, streamed=False)


def test_cli_writes_json_and_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=2") as server:
        args = build_parser().parse_args([
            "bench", "serve", "--url", server.url, "--api-key", str(server.api_key), "--concurrency", "2",
            "--num-requests", "4", "--max-tokens", "8", "--endpoint", "completions", "--json", str(out), "--quiet",
        ])
        from axserving.bench.serving import main_with_args

        assert main_with_args(args) == 0
    table = capsys.readouterr().out
    assert "TTFT p50" in table and "ours" in table
    body = orjson.loads(out.read_bytes())
    (level,) = body["levels"]
    assert level["ok"] == 4 and level["output_tokens"] == 32
    assert body["config"]["targets"][0]["api_key"] == "***"


# --- a tiny misbehaving server: the request's "model" picks the misbehaviour --------------------

GOOD_TOKENS = 16
RECEIVED: list[dict[str, object]] = []  # every body the misbehaving server was sent, in order
DROPPED: list[bool] = []  # "drop-once" closed a connection without answering


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk(text: str | None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text else {}
    return _sse({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def _stream_events(model: str) -> list[bytes]:
    usage = _sse({"choices": [], "usage": {"completion_tokens": GOOD_TOKENS}})
    tokens = [_chunk(f"t{i} ") for i in range(GOOD_TOKENS - 1)] + [_chunk("end", "length")]
    if model == "good":
        return [_chunk(""), *tokens, usage, b"data: [DONE]\n\n"]
    if model == "empty":
        return [b"data: [DONE]\n\n"]
    if model == "silent":  # 200 and no events at all
        return []
    if model == "no-done":  # content and a finish_reason, then the stream just ends
        return tokens
    if model == "no-finish":
        return [_chunk("a"), _chunk("b"), b"data: [DONE]\n\n"]
    if model == "short":  # stops at EOS although ignore_eos was asked
        return [_chunk("a"), _chunk("b", "stop"), _sse({"choices": [], "usage": {"completion_tokens": 2}}),
                b"data: [DONE]\n\n"]
    if model == "error-frame":
        return [_chunk("a"), _sse({"error": {"message": "engine died", "type": "engine_unavailable"}}),
                b"data: [DONE]\n\n"]
    raise AssertionError(model)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = orjson.loads(await reader.readexactly(length))
            RECEIVED.append(body)
            model = body["model"]
            if model == "drop-once" and not DROPPED:  # as a server closing a kept-alive connection
                DROPPED.append(True)
                return
            if model == "drop-once":
                model = "good"
            if model == "http-503":
                msg = b'{"error": {"message": "busy"}}'
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(msg), msg))
                await writer.drain()
                continue
            if model == "cut":  # chunked body broken off mid-stream: the connection just closes
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                ev = _chunk("a")
                writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                await writer.drain()
                await asyncio.sleep(0.01)
                return
            events = _stream_events(model)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for ev in events:
                writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                await writer.drain()
                await asyncio.sleep(0.001)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@contextmanager
def misbehaving_server() -> Iterator[str]:
    """The misbehaving server on 127.0.0.1 in a thread with its own event loop (the bench runs its own)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()
    port: list[int] = []

    async def serve() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        started.set()
        async with server:
            await stop.wait()
        # Connections still open (keep-alive) end with their handler tasks.
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def thread_main() -> None:
        loop.run_until_complete(serve())
        loop.close()

    thread = threading.Thread(target=thread_main, name="misbehaving-server", daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield f"http://127.0.0.1:{port[0]}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        assert not thread.is_alive()


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("good", Kind.ok),
        ("empty", Kind.empty),
        ("silent", Kind.empty),
        ("no-done", Kind.truncated),
        ("no-finish", Kind.truncated),
        ("short", Kind.truncated),
        ("cut", Kind.truncated),
        ("error-frame", Kind.error_frame),
        ("http-503", Kind.http_error),
    ],
)
def test_misbehaviour_is_classified(model: str, kind: Kind) -> None:
    with misbehaving_server() as url:
        call = Call(url + "/v1/chat/completions", {}, chat=True, stream=True, max_tokens=GOOD_TOKENS, ignore_eos=True)

        async def go() -> object:
            async with httpx.AsyncClient(timeout=10) as client:
                return await send(client, call, 0, {"model": model})

        out = asyncio.run(go())
    assert out.kind is kind, out  # type: ignore[attr-defined]
    if kind is Kind.ok:
        assert out.output_tokens == GOOD_TOKENS and out.tokens_from == "usage"  # type: ignore[attr-defined]


def test_a_connection_closed_without_an_answer_is_sent_again_once() -> None:
    with misbehaving_server() as url:
        call = Call(url + "/v1/chat/completions", {}, chat=True, stream=True, max_tokens=GOOD_TOKENS, ignore_eos=True)

        async def go() -> object:
            async with httpx.AsyncClient(timeout=10) as client:
                return await send(client, call, 0, {"model": "drop-once"})

        DROPPED.clear()
        out = asyncio.run(go())
    assert DROPPED == [True] and out.kind is Kind.ok  # type: ignore[attr-defined]


def test_empty_peer_is_failures_not_fast_requests(capsys: pytest.CaptureFixture[str]) -> None:
    """A compare run where the peer answers 200 with nothing: all its requests are failures, its
    throughput is zero, and the ratios say so; the good server is all ok."""
    with misbehaving_server() as url:
        good = Target("ours", url, "good", None)
        bad = Target("peer", url, "empty", None)
        result = run_sync(config(good, bad, concurrency=(1, 3), num_requests=6))
        rc = main(["--url", url, "--model", "good", "--compare", url, "--compare-model", "no-done",
                   "--concurrency", "2", "--num-requests", "4", "--max-tokens", str(GOOD_TOKENS), "--quiet"])
    ours, peer = result.for_target("ours"), result.for_target("peer")
    assert [s.ok for s in ours] == [6, 6] and all(s.output_tokens == 6 * GOOD_TOKENS for s in ours)
    assert [s.empty for s in peer] == [6, 6] and all(s.ok == 0 and s.output_throughput == 0 for s in peer)
    assert all(s.ttft is None and s.e2e is None for s in peer)  # nothing timed as a fast success
    assert [r.concurrency for r in result.ratios] == [1, 3]
    assert all(r.output_throughput is None for r in result.ratios)
    assert rc == 0  # only the server under test decides the exit status
    table = capsys.readouterr().out
    assert "truncated 4" in table and "ours / theirs" in table


def test_failures_of_the_server_under_test_exit_1() -> None:
    with misbehaving_server() as url:
        assert main(["--url", url, "--model", "short", "--concurrency", "1", "--num-requests", "2", "--quiet"]) == 1


# --- workloads ---------------------------------------------------------------------------------


def _parse(*argv: str) -> BenchConfig:
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(["--url", "http://127.0.0.1:1", *argv]))


def test_workload_presets_and_their_errors() -> None:
    assert (_parse().max_tokens, _parse().prompt_words, _parse().max_tokens_spread) == (128, 64, 0.0)
    chat = _parse("--workload", "chat-shared-prefix")
    assert chat.workload is Workload.chat_shared_prefix and (chat.max_tokens, chat.prompt_words) == (64, 24)
    assert _parse("--workload", "chat-shared-prefix", "--max-tokens", "9").max_tokens == 9  # a flag beats the preset
    poisson = _parse("--workload", "poisson", "--rate", "2.5")
    assert poisson.rate == 2.5 and poisson.max_tokens_spread == 0.75
    for argv, message in (
        (("--workload", "poisson"), "needs --rate"),
        (("--workload", "long-prompts", "--rate", "1"), "--rate applies"),
        (("--workload", "chat-shared-prefix", "--endpoint", "completions"), "needs --endpoint chat"),
        (("--compare", "http://a", "--compare-name", "x", "--compare-name", "y"), "2 --compare-name for 1"),
        (("--compare", "http://a", "--compare-name", "ours"), "must differ"),
        (("--turns", "0"), "--turns = 0"),
    ):
        with pytest.raises(ValueError, match=message):
            _parse(*argv)
    three = _parse("--compare", "http://a", "--compare", "http://b", "--compare-name", "llama-server")
    assert [(t.name, t.url) for t in three.targets] == [
        ("ours", "http://127.0.0.1:1"), ("llama-server", "http://a"), ("peer2", "http://b")]


def test_arrivals_are_exponential_and_the_same_on_every_server() -> None:
    t = Target("ours", "http://127.0.0.1:1", "default", None)
    cfg = config(t, rate=4.0)
    gaps = arrival_gaps(cfg, 0)
    drawn = [next(gaps) for _ in range(4000)]
    again = arrival_gaps(cfg, 0)
    assert drawn[:50] == [next(again) for _ in range(50)]
    assert 0.23 < sum(drawn) / len(drawn) < 0.27  # mean 1/rate
    later = arrival_gaps(cfg, 100)
    assert next(later) != drawn[0]  # the next round is not a replay of this one


def test_open_loop_keeps_arrivals_and_caps_requests_in_flight() -> None:
    """Poisson arrivals: every request is sent and answered, and no more than the concurrency are
    in flight at once, however fast they arrive."""
    with misbehaving_server() as url:
        t = Target("ours", url, "good", None)
        RECEIVED.clear()
        fast = run_sync(config(t, concurrency=(2,), num_requests=12, rate=1000.0, warmup=0))
        slow = run_sync(config(t, concurrency=(8,), num_requests=6, rate=20.0, warmup=0))
    (s,) = fast.summaries
    assert s.ok == 12 and len(RECEIVED) == 18
    (r,) = slow.summaries
    assert r.ok == 6
    # At 20/s for 6 arrivals the level lasts about 0.3 s of gaps (exponential, seeded): not a burst.
    assert r.duration_s > sum(next(g) for g in [arrival_gaps(slow.config, 0)] for _ in range(5)) * 0.9


def test_chat_shared_prefix_sends_history_back_with_the_shared_system_prompt() -> None:
    with misbehaving_server() as url:
        t = Target("ours", url, "good", None)
        RECEIVED.clear()
        result = run_sync(config(t, concurrency=(2,), workload=Workload.chat_shared_prefix, turns=3,
                                 num_requests=6, warmup=0, system_words=50))
    (s,) = result.summaries
    assert s.ok == 6 and s.group == ""
    system = system_prompt(50)
    convs: dict[str, list[list[dict[str, str]]]] = {}
    for body in RECEIVED:
        messages = body["messages"]
        assert isinstance(messages, list) and messages[0] == {"role": "system", "content": system}
        convs.setdefault(messages[1]["content"], []).append(messages)
    assert len(convs) == 2 and all(len(turns) == 3 for turns in convs.values())
    reply = "".join(f"t{i} " for i in range(GOOD_TOKENS - 1)) + "end"
    for turns in convs.values():
        assert [len(m) for m in turns] == [2, 4, 6]
        for m in turns[1:]:
            assert m[2] == {"role": "assistant", "content": reply}  # the server's own reply goes back
            assert turns[-1][: len(m)] == m  # each turn extends the last


def test_long_prompts_arrive_among_short_streams_and_are_reported_apart(tmp_path: Path) -> None:
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=5") as server:
        t = Target("ours", server.url, "default", server.api_key)
        result = run_sync(config(t, concurrency=(2,), num_requests=8, workload=Workload.long_prompts,
                                 long_words=300, long_interval_s=0.05, long_max_tokens=4))
    short, long = result.summaries
    assert (short.group, long.group) == ("", "long") and long.level == "2 long"
    assert short.ok == 8 and short.output_tokens == 8 * 16
    assert long.ok >= 1 and long.failed == 0 and long.output_tokens == 4 * long.ok


def test_three_servers_rotate_and_each_peer_gets_ratios() -> None:
    with misbehaving_server() as url:
        targets = (Target("ours", url, "good", None), Target("a", url, "good", None), Target("b", url, "empty", None))
        RECEIVED.clear()
        result = run_sync(config(*targets, concurrency=(1, 2), num_requests=2, rounds=2, warmup=0))
    assert [(r.theirs, r.concurrency) for r in result.ratios] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert all(r.output_throughput is not None and r.itl_p99 is not None for r in result.ratios[:2])
    assert all(r.output_throughput is None for r in result.ratios[2:])
    # The order rotates turn by turn: the empty server ("b") went first, second and third once each.
    models = [b["model"] for b in RECEIVED]
    assert len(models) == 3 * 2 * 2 * 2
    firsts = [models[k * 6] for k in range(4)]
    assert firsts[:3].count("empty") == 1
    assert "ITL p99" in render_of(result)


def render_of(result: object) -> str:
    from axserving.bench.report import render

    return render(result.summaries, result.ratios)  # type: ignore[attr-defined]


# --- the other bench modes ---------------------------------------------------------------------


def test_plot_baseline_and_regression_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--plot writes a PNG; a rerun against its own result as --baseline passes at a loose
    tolerance; regression-check fails a result that is slower than the baseline."""
    base, png = tmp_path / "base.json", tmp_path / "curve.png"
    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=2") as server:
        common = ["bench", "serve", "--url", server.url, "--api-key", str(server.api_key), "--concurrency", "1,2",
                  "--num-requests", "4", "--max-tokens", "8", "--quiet"]
        from axserving.cli import main as cli

        assert cli([*common, "--json", str(base), "--plot", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert cli([*common, "--baseline", str(base), "--tolerance", "50"]) == 0
    assert "no regression beyond 5000%" in capsys.readouterr().out
    slower = orjson.loads(base.read_bytes())
    for level in slower["levels"]:
        level["output_throughput"] *= 0.5
        level["ttft"]["p95"] *= 3
    cur = tmp_path / "slower.json"
    cur.write_bytes(orjson.dumps(slower))
    assert cli(["bench", "regression-check", str(base), str(cur), "--tolerance", "0.2"]) == 1
    out = capsys.readouterr().out
    assert out.count("REGRESSED") == 4 and "-50.0%" in out and "+200.0%" in out  # 2 levels x 2 metrics
    assert cli(["bench", "regression-check", str(base), str(base)]) == 0
    assert cli(["bench", "regression-check", str(base), str(tmp_path / "missing.json")]) == 2


def test_soak_reports_windows_memory_and_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from axserving.cli import main as cli

    with run_server(tmp_path, "--backend", "fake", "--backend-option", "delay_ms=2") as server:
        rc = cli(["bench", "soak", "--url", server.url, "--api-key", str(server.api_key), "--concurrency", "2",
                  "--duration", "3", "--window", "1", "--max-tokens", "8", "--quiet", "--max-rss-growth", "5"])
        assert cli(["bench", "soak", "--url", server.url, "--concurrency", "2"]) == 2  # no --duration
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert all(int(r[1]) > 0 and r[2] == "0" and r[-1] != "-" for r in rows)  # requests, no failures, RSS
    assert "last window against the first" in out and "verdict: steady" in out
