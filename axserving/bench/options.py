"""The serving bench's settings: command-line flags, parsed once into a typed :class:`BenchConfig`.

Kept free of heavy imports so ``axserving --help`` and ``axserving run`` do not pay for the bench.
"""

from __future__ import annotations

import argparse
import enum
import random
from dataclasses import dataclass


class Endpoint(enum.StrEnum):
    chat = "chat"
    completions = "completions"


class Workload(enum.StrEnum):
    """What the clients do (see :mod:`axserving.bench.workload`)."""

    fixed = "fixed"  # every worker sends requests back to back, each its own prompt
    poisson = "poisson"  # requests arrive at random (--rate), with spread output lengths
    chat_shared_prefix = "chat-shared-prefix"  # conversations sharing a long system prompt, several turns each
    long_prompts = "long-prompts"  # short streams running while long prompts arrive among them


# Per workload, the flags it changes when they are not given (the rest keep their plain defaults).
PRESETS: dict[Workload, dict[str, object]] = {
    Workload.fixed: {},
    Workload.poisson: {"max_tokens_spread": 0.75},
    Workload.chat_shared_prefix: {"prompt_words": 24, "max_tokens": 64},
    Workload.long_prompts: {"max_tokens": 128},
}
DEFAULTS: dict[str, object] = {"prompt_words": 64, "max_tokens": 128, "max_tokens_spread": 0.0}


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
    workload: Workload = Workload.fixed
    rate: float | None = None  # Poisson arrivals per second (open loop); None: closed loop
    seed: int = 0  # arrival times and drawn lengths
    prompt_salt: str = ""  # in every prompt: a run's prompts are new to a server that served earlier runs
    system_words: int = 800  # chat-shared-prefix: words of the shared system prompt
    turns: int = 4  # chat-shared-prefix: user turns per conversation
    long_words: int = 1200  # long-prompts: words of each long prompt
    long_interval_s: float = 2.0  # long-prompts: pause between one long request's end and the next
    long_max_tokens: int = 16  # long-prompts: max_tokens of a long request

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


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {raw!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's flags, shared by ``axserving bench serve`` and ``perf/bench_serving.py``."""
    p.add_argument("--url", required=True, help="server under test (base URL, e.g. http://127.0.0.1:18080)")
    p.add_argument("--model", default="default", help="'model' sent to --url (default: default)")
    p.add_argument("--api-key", help="bearer key for --url (default: $AXS_API_KEY's first key, if set)")
    p.add_argument("--name", default="ours", help="label for --url in the report (default: ours)")
    p.add_argument("--compare", metavar="URL", action="append", default=[],
                   help="run the same workload against this server too, alternating (repeatable)")
    p.add_argument("--compare-model", help="'model' sent to every --compare server (default: same as --model)")
    p.add_argument("--compare-api-key", help="bearer key for every --compare server (default: none)")
    p.add_argument("--compare-name", action="append", default=[],
                   help="label for the --compare server in the same position (default: peer, peer2, ...)")
    p.add_argument(
        "--workload", choices=[w.value for w in Workload], default=Workload.fixed.value,
        help="fixed: each of the concurrency's workers sends requests back to back (default); "
        "poisson: requests arrive at random at --rate per second, at most the concurrency in flight, output "
        "lengths spread; chat-shared-prefix: as many conversations as the concurrency, all with one long "
        "system prompt, each continuing over --turns turns (its replies sent back); long-prompts: the "
        "concurrency's short streams run back to back while one more client sends --long-words prompts among "
        "them (their latencies are reported apart, as group 'long')",
    )
    p.add_argument("--rate", type=_positive_float, metavar="REQ/S",
                   help="Poisson arrivals at this mean rate (open loop; the concurrency caps requests in flight); "
                        "needed by --workload poisson, usable with fixed")
    p.add_argument("--seed", type=int, default=0, help="seed for arrival times and drawn lengths (default 0)")
    p.add_argument("--prompt-salt", metavar="TEXT",
                   help="put TEXT in every prompt (default: a random number per run, so no server answers a prompt "
                        "from the cache of an earlier run; give the same TEXT to replay a run's prompts exactly)")
    p.add_argument("--system-words", type=int, default=800,
                   help="chat-shared-prefix: words of the shared system prompt (default 800, ~1k tokens)")
    p.add_argument("--turns", type=int, default=4, help="chat-shared-prefix: turns per conversation (default 4)")
    p.add_argument("--long-words", type=int, default=1200,
                   help="long-prompts: words per long prompt (default 1200, ~1.5k tokens)")
    p.add_argument("--long-interval", type=float, default=2.0, metavar="S",
                   help="long-prompts: seconds between one long request's end and the next's start (default 2)")
    p.add_argument("--long-max-tokens", type=int, default=16, help="long-prompts: max_tokens of a long request (default 16)")
    p.add_argument("--concurrency", type=_positive_ints, default=(1, 4, 8), help="levels, e.g. 1,4,8 (default)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--num-requests", type=int, help="requests per level and round (default: max(8, 4 x level))")
    amount.add_argument("--duration", type=float, help="seconds per level and round instead of a request count")
    p.add_argument("--rounds", type=int, default=1, help="repeat every level this often, alternating servers (default 1)")
    p.add_argument("--prompt-words", type=int,
                   help="words of generated prompt text per request (default 64; chat-shared-prefix: 24 per turn)")
    p.add_argument("--max-tokens", type=int, help="max_tokens per request (default 128; chat-shared-prefix: 64)")
    p.add_argument(
        "--max-tokens-spread", type=float, metavar="R",
        help="draw each request's max_tokens uniformly from [max_tokens x (1 - R), max_tokens], the same "
        "per request index on every server, so streams finish at different times and new requests "
        "join a running batch (default 0: all alike; poisson: 0.75)",
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
    """Validate the parsed flags into a :class:`BenchConfig`; ``ValueError`` names the bad flag.
    Flags left out take the workload's preset, else the plain default."""
    workload = Workload(args.workload)
    preset = {**DEFAULTS, **PRESETS[workload]}
    prompt_words = args.prompt_words if args.prompt_words is not None else preset["prompt_words"]
    max_tokens = args.max_tokens if args.max_tokens is not None else preset["max_tokens"]
    spread = args.max_tokens_spread if args.max_tokens_spread is not None else preset["max_tokens_spread"]
    assert isinstance(prompt_words, int) and isinstance(max_tokens, int) and isinstance(spread, float)
    for flag, value, low in (
        ("--num-requests", args.num_requests, 1), ("--rounds", args.rounds, 1),
        ("--prompt-words", prompt_words, 1), ("--max-tokens", max_tokens, 1),
        ("--warmup", args.warmup, 0), ("--system-words", args.system_words, 1), ("--turns", args.turns, 1),
        ("--long-words", args.long_words, 1), ("--long-max-tokens", args.long_max_tokens, 1),
    ):
        if value is not None and value < low:
            raise ValueError(f"{flag} = {value}: must be >= {low}")
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"--max-tokens-spread = {spread}: must be in [0, 1)")
    if args.duration is not None and args.duration <= 0:
        raise ValueError(f"--duration = {args.duration}: must be > 0")
    if args.timeout <= 0:
        raise ValueError(f"--timeout = {args.timeout}: must be > 0")
    if args.long_interval < 0:
        raise ValueError(f"--long-interval = {args.long_interval}: must be >= 0")
    if workload is Workload.poisson and args.rate is None:
        raise ValueError("--workload poisson needs --rate (requests per second)")
    if args.rate is not None and workload in (Workload.chat_shared_prefix, Workload.long_prompts):
        raise ValueError(f"--rate applies to the fixed and poisson workloads, not {workload.value}")
    if workload is Workload.chat_shared_prefix and args.endpoint != Endpoint.chat.value:
        raise ValueError("--workload chat-shared-prefix needs --endpoint chat")
    if len(args.compare_name) > len(args.compare):
        raise ValueError(f"{len(args.compare_name)} --compare-name for {len(args.compare)} --compare")
    targets = [Target(args.name, args.url, args.model, args.api_key or env_api_key)]
    for k, url in enumerate(args.compare):
        name = args.compare_name[k] if k < len(args.compare_name) else ("peer" if k == 0 else f"peer{k + 1}")
        targets.append(Target(name, url, args.compare_model or args.model, args.compare_api_key))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"server labels must differ: {names} (--name, --compare-name)")
    return BenchConfig(
        targets=tuple(targets),
        concurrency=tuple(args.concurrency),
        num_requests=args.num_requests,
        duration_s=args.duration,
        rounds=args.rounds,
        prompt_words=prompt_words,
        max_tokens=max_tokens,
        max_tokens_spread=spread,
        ignore_eos=args.ignore_eos,
        eos_token_ids=tuple(args.eos_token_id),
        stream=args.stream,
        endpoint=Endpoint(args.endpoint),
        temperature=args.temperature,
        warmup=args.warmup,
        timeout_s=args.timeout,
        json_path=args.json_path,
        quiet=args.quiet,
        workload=workload,
        rate=args.rate,
        seed=args.seed,
        prompt_salt=args.prompt_salt if args.prompt_salt is not None else f"{random.randrange(10**6):06d}",
        system_words=args.system_words,
        turns=args.turns,
        long_words=args.long_words,
        long_interval_s=args.long_interval,
        long_max_tokens=args.long_max_tokens,
    )
