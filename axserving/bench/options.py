"""The serving bench's settings: command-line flags, parsed once into a typed :class:`BenchConfig`.

Kept free of heavy imports so ``axserving --help`` and ``axserving run`` do not pay for the bench.
"""

from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass


class Endpoint(enum.StrEnum):
    chat = "chat"
    completions = "completions"


@dataclass(frozen=True)
class Target:
    """One server under test."""

    name: str
    url: str  # base URL, with or without a trailing /v1
    model: str
    api_key: str | None

    @property
    def v1(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"


@dataclass(frozen=True)
class BenchConfig:
    targets: tuple[Target, ...]
    concurrency: tuple[int, ...]
    num_requests: int | None  # per level and round; None: scale with concurrency (see requests_for)
    duration_s: float | None  # per level and round, instead of a request count
    rounds: int
    prompt_words: int
    max_tokens: int
    max_tokens_spread: float  # 0: every request asks max_tokens; r: drawn in [max_tokens*(1-r), max_tokens]
    ignore_eos: bool
    eos_token_ids: tuple[int, ...]
    stream: bool
    endpoint: Endpoint
    temperature: float
    warmup: int
    timeout_s: float
    json_path: str | None
    quiet: bool

    def requests_for(self, concurrency: int) -> int:
        """Requests per level and round when no count or duration was given: enough that every
        worker sends a few, so the level is not measured on its ramp-up alone."""
        if self.num_requests is not None:
            return self.num_requests
        return max(8, 4 * concurrency)


def _positive_ints(raw: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {raw!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {raw!r}")
    return values


def _ints(raw: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {raw!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's flags, shared by ``axserving bench serve`` and ``perf/bench_serving.py``."""
    p.add_argument("--url", required=True, help="server under test (base URL, e.g. http://127.0.0.1:18080)")
    p.add_argument("--model", default="default", help="'model' sent to --url (default: default)")
    p.add_argument("--api-key", help="bearer key for --url (default: $AXS_API_KEY's first key, if set)")
    p.add_argument("--name", default="ours", help="label for --url in the report (default: ours)")
    p.add_argument("--compare", metavar="URL", help="run the same workload against this server too, alternating")
    p.add_argument("--compare-model", help="'model' sent to --compare (default: same as --model)")
    p.add_argument("--compare-api-key", help="bearer key for --compare (default: none)")
    p.add_argument("--compare-name", default="peer", help="label for --compare in the report (default: peer)")
    p.add_argument("--concurrency", type=_positive_ints, default=(1, 4, 8), help="levels, e.g. 1,4,8 (default)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--num-requests", type=int, help="requests per level and round (default: max(8, 4 x level))")
    amount.add_argument("--duration", type=float, help="seconds per level and round instead of a request count")
    p.add_argument("--rounds", type=int, default=1, help="repeat every level this often, alternating servers (default 1)")
    p.add_argument("--prompt-words", type=int, default=64, help="words of generated prompt text per request (default 64)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default 128)")
    p.add_argument(
        "--max-tokens-spread", type=float, default=0.0, metavar="R",
        help="draw each request's max_tokens uniformly from [max_tokens x (1 - R), max_tokens], the same "
        "per request index on every server, so streams finish at different times and new requests "
        "join a running batch (default 0: all alike)",
    )
    p.add_argument(
        "--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
        help="send ignore_eos (the vLLM extension) so every request runs to max_tokens (default on); "
        "a stream that stops short is then counted as truncated",
    )
    p.add_argument(
        "--eos-token-id", type=_ints, default=(), metavar="ID[,ID]",
        help="also send logit_bias {ID: -100} for these tokens, for servers that ignore ignore_eos "
        "(llama_cpp.server); with SmolLM2-Instruct use 2 (<|im_end|>)",
    )
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="stream responses (default on)")
    p.add_argument("--endpoint", choices=[e.value for e in Endpoint], default="chat", help="API to call (default chat)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests per server before the run (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds (default 600)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write the full results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the final tables")


def config_from_args(args: argparse.Namespace, env_api_key: str | None = None) -> BenchConfig:
    """Validate the parsed flags into a :class:`BenchConfig`; ``ValueError`` names the bad flag."""
    for flag, value, low in (
        ("--num-requests", args.num_requests, 1), ("--rounds", args.rounds, 1),
        ("--prompt-words", args.prompt_words, 1), ("--max-tokens", args.max_tokens, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value is not None and value < low:
            raise ValueError(f"{flag} = {value}: must be >= {low}")
    if not 0.0 <= args.max_tokens_spread < 1.0:
        raise ValueError(f"--max-tokens-spread = {args.max_tokens_spread}: must be in [0, 1)")
    if args.duration is not None and args.duration <= 0:
        raise ValueError(f"--duration = {args.duration}: must be > 0")
    if args.timeout <= 0:
        raise ValueError(f"--timeout = {args.timeout}: must be > 0")
    targets = [Target(args.name, args.url, args.model, args.api_key or env_api_key)]
    if args.compare:
        if args.compare_name == args.name:
            raise ValueError(f"--compare-name = {args.compare_name!r}: same as --name")
        targets.append(Target(args.compare_name, args.compare, args.compare_model or args.model, args.compare_api_key))
    return BenchConfig(
        targets=tuple(targets),
        concurrency=tuple(args.concurrency),
        num_requests=args.num_requests,
        duration_s=args.duration,
        rounds=args.rounds,
        prompt_words=args.prompt_words,
        max_tokens=args.max_tokens,
        max_tokens_spread=args.max_tokens_spread,
        ignore_eos=args.ignore_eos,
        eos_token_ids=tuple(args.eos_token_id),
        stream=args.stream,
        endpoint=Endpoint(args.endpoint),
        temperature=args.temperature,
        warmup=args.warmup,
        timeout_s=args.timeout,
        json_path=args.json_path,
        quiet=args.quiet,
    )
