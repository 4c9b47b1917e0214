"""The ``axserving`` command: ``run`` the server, ``generate`` once without one, ``status`` and
``top`` a running server, ``models pull`` the packaged default model, ``bench serve`` load on a
server."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from axserving import __version__, model_store
from axserving.bench import options as bench_options
from axserving.config import (
    AUTO_BACKEND,
    ConfigError,
    LogLevel,
    Settings,
    load_settings,
    load_traced,
    parse_flash_attn,
    to_json,
)
from axserving.errors import APIError
from axserving.logs import setup_logging
from axserving.models import memory
from axserving.models.spec import ModelSpec, resolve
from engine_proc.spec import BACKENDS

EXIT_USAGE = 2


def _backend_option(raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {raw!r}")
    return key, value


def _max_batch_arg(raw: str) -> int | str:
    if raw == "auto":
        return raw
    try:
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {raw!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="axserving", description="OpenAI-compatible LLM serving plane")
    parser.add_argument("--version", action="version", version=f"axserving {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve a model over an OpenAI-compatible HTTP API")
    run.add_argument(
        "--model", help="serve this model alone (a GGUF file, or an MLX model directory), instead of the "
        "configured 'models' (default: the packaged SmolLM2-135M-Instruct)",
    )
    run.add_argument("--model-id", help="id clients use in 'model' for --model (default: default)")
    run.add_argument(
        "--backend", choices=[AUTO_BACKEND, *BACKENDS],
        help="engine backend for every model that names none (default: auto, by the model's architecture)",
    )
    run.add_argument("--host", help="address to bind (default: 127.0.0.1)")
    run.add_argument("--port", type=int, help="port to bind (default: 18080; 0 is not allowed here)")
    run.add_argument("--config", help="YAML settings file (default: $AXS_CONFIG, then config/serving.yaml)")
    run.add_argument("--threads", type=int, help="engine CPU threads (default: all cores)")
    run.add_argument("--ctx-size", type=int, help="context length in tokens (default: 4096)")
    run.add_argument(
        "--max-batch", type=_max_batch_arg,
        help="sequences generated together per engine step, or auto (default: auto, 16 or fewer to fit memory)",
    )
    run.add_argument(
        "--batch-size", type=int,
        help="tokens per engine step: running streams' next tokens, then prompt chunks (default: 512)",
    )
    run.add_argument(
        "--prefill-slowdown", type=float, metavar="X",
        help="while streams decode, steps that also prefill a prompt take on average at most X "
        "times a decode-only step; 0: whole --batch-size chunks, the streams wait for them (default: 4)",
    )
    run.add_argument(
        "--prefill-stall-ms", type=int, metavar="MS",
        help="the longest one step may stall decoding streams to take a prompt whole or in whole "
        "attention tiles, paid back by the steps after it (default: 500; 50: smoother, slower beside "
        "long prompts)",
    )
    run.add_argument(
        "--flash-attn", choices=["on", "off", "auto"],
        help="llama.cpp's flash attention for generation (default: auto, llama.cpp decides: on; off "
        "decoded long contexts up to 1.6x faster here, prompts ~10%% slower, and batched greedy "
        "replies may differ from lone ones in the last bits)",
    )
    run.add_argument(
        "--draft-tokens", type=int, metavar="N",
        help="prompt-lookup speculative decoding (llama.cpp): up to N tokens per sequence and step "
        "drafted from the sequence's own earlier text, verified in the same step, kept only where "
        "they are what would be drawn (replies unchanged under 256 tokens of context; past it they may "
        "fork late, as batched ones do); drafted only when the measured "
        "cost pays (here: one stream of a repeating reply up to 1.2x faster, text in bursts; rarely "
        "at 8 streams). At most 32; 0: off (default: 0)",
    )
    run.add_argument(
        "--backend-option", action="append", type=_backend_option, default=[], metavar="KEY=VALUE",
        help="backend-specific option (repeatable)",
    )

    models = sub.add_parser("models", help="manage packaged models")
    msub = models.add_subparsers(dest="models_command", required=True)
    for name, text in (("pull", "fetch (if needed) and verify the packaged default model; print its path"),
                       ("path", "same as pull: print the verified default model's path")):
        msub.add_parser(name, help=text).add_argument("--config", help="YAML settings file")
    conv = msub.add_parser("convert", help="a Q4_0/Q4_1/Q8_0/F16 GGUF into an MLX model directory (needs the mlx extra)")
    conv.add_argument("gguf", nargs="?", help="the GGUF file (default: the packaged model)")
    conv.add_argument("-o", "--output", required=True, help="the directory to write")
    conv.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    conv.add_argument("--config", help="YAML settings file (for the model cache)")

    for name, text in (("status", "a running server's models, load and latency, once"),
                       ("top", "a running server's figures, redrawn every second (Ctrl-C to quit)")):
        watch = sub.add_parser(name, help=text)
        watch.add_argument("--url", help="the server (default: http://HOST:PORT from the settings)")
        watch.add_argument("--config", help="YAML settings file (for the default URL)")
        if name == "top":
            watch.add_argument("--interval", type=float, default=1.0, help="seconds between redraws (default: 1)")
            watch.add_argument("--count", type=int, default=0, help="redraw this many times, then exit (0: until quit)")

    gen = sub.add_parser(
        "generate", help="one generation from the command line through an engine process (no server)",
    )
    gen.add_argument("-m", "--model", help="a GGUF file or an MLX model directory (default: the packaged SmolLM2-135M-Instruct)")
    gen.add_argument("-p", "--prompt", required=True, help="the user message (or, with --raw, the prompt text)")
    gen.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    gen.add_argument("--raw", action="store_true", help="complete the prompt as text, without the chat template")
    gen.add_argument("--temperature", type=float, help="sampling temperature (default: the model's, else 1)")
    gen.add_argument("--seed", type=int, help="sampling seed")
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument("--backend", choices=[AUTO_BACKEND, *BACKENDS], help="engine backend (default: auto)")
    gen.add_argument("--threads", type=int, help="engine CPU threads (default: all cores)")
    gen.add_argument("--ctx-size", type=int, help="context length in tokens (default: 4096)")
    gen.add_argument("--config", help="YAML settings file")

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    serve = bsub.add_parser(
        "serve", help="load generator against an OpenAI-compatible URL: TTFT, TPOT, ITL, throughput, failures",
    )
    bench_options.add_arguments(serve)
    serve.add_argument("--plot", metavar="PNG", help="also draw throughput and latency against concurrency here")
    serve.add_argument("--baseline", metavar="JSON",
                       help="a saved --json result: exit 1 when this run is worse by more than --tolerance")
    serve.add_argument("--tolerance", type=float, default=0.10, help="with --baseline: allowed worsening (default 0.10)")
    soak = bsub.add_parser("soak", help="steady load for --duration: throughput, p95 and RSS per window, and their drift")
    from axserving.bench.soak import add_soak_arguments

    add_soak_arguments(soak)
    check = bsub.add_parser(
        "regression-check", help="fail (exit 1) when a bench result is worse than a baseline beyond a tolerance",
    )
    check.add_argument("baseline", help="the saved `bench serve --json` result to hold to")
    check.add_argument("current", help="the new result")
    check.add_argument("--tolerance", type=float, default=0.10, help="allowed worsening per metric (default 0.10)")
    return parser


# Dotted key → the `run` flag that sets it (messages and the start-up report name the flag).
FLAGS = {
    "model.path": "--model",
    "model.id": "--model-id",
    "model_defaults.backend": "--backend",
    "rest.host": "--host",
    "rest.port": "--port",
    "model_defaults.threads": "--threads",
    "model_defaults.ctx_size": "--ctx-size",
    "model_defaults.max_batch": "--max-batch",
    "model_defaults.batch_size": "--batch-size",
    "model_defaults.prefill_slowdown": "--prefill-slowdown",
    "model_defaults.prefill_stall_ms": "--prefill-stall-ms",
    "model_defaults.flash_attn": "--flash-attn",
    "model_defaults.draft_tokens": "--draft-tokens",
    "model_defaults.backend_options": "--backend-option",
}


def _cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "model.path": args.model,
        "model.id": args.model_id,
        "model_defaults.backend": args.backend,
        "rest.host": args.host,
        "rest.port": args.port,
        "model_defaults.threads": args.threads,
        "model_defaults.ctx_size": args.ctx_size,
        "model_defaults.max_batch": args.max_batch,
        "model_defaults.batch_size": args.batch_size,
        "model_defaults.prefill_slowdown": args.prefill_slowdown,
        "model_defaults.prefill_stall_ms": args.prefill_stall_ms,
        "model_defaults.flash_attn": None if args.flash_attn is None else parse_flash_attn(args.flash_attn),
        "model_defaults.draft_tokens": args.draft_tokens,
    }
    if args.backend_option:
        overrides["model_defaults.backend_options"] = dict(args.backend_option)
    return overrides


def _fail(message: str) -> int:
    print(f"axserving: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be served on, or None when it is free.

    Granian binds with SO_REUSEPORT, so a second server (a leftover axserving, or anything else that sets it) would
    share the port silently, each taking some of the connections. A plain bind is refused while anyone listens there;
    SO_REUSEADDR lets it pass over connections of a stopped server still in TIME_WAIT.
    """
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot bind {host}:{port} (--host, rest.host): {e.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            hint = " (is another server running there? choose another with --port)" if e.errno == errno.EADDRINUSE else ""
            return f"cannot bind {host}:{port}: {e.strerror}{hint}"
    return None


def check_models(settings: Settings) -> list[ModelSpec]:
    """Resolve every configured model (fetching the packaged default once) and check that they
    fit the memory budget together, before the server starts."""
    specs = []
    budget = memory.budget(settings.lifecycle.max_memory_bytes)
    for i, entry in enumerate(settings.models):
        try:
            specs.append(resolve(entry, settings.model_defaults, settings.model_store.cache_dir, memory_budget=budget))
        except APIError as e:
            raise ConfigError(f"models.{i} ({entry.id}): {e.message}") from e
    need = sum(s.memory_bytes for s in specs)
    if need > budget:
        sizes = ", ".join(f"{s.id} {memory.fmt(s.memory_bytes)}" for s in specs)
        raise ConfigError(
            f"the configured models need about {memory.fmt(need)} ({sizes}), more than the memory budget "
            f"of {memory.fmt(budget)} (lifecycle.max_memory_bytes, AXS_MAX_MEMORY_BYTES)"
        )
    return specs


def cmd_run(args: argparse.Namespace) -> int:
    try:
        settings, sources = load_traced(_cli_overrides(args), config_path=args.config, flags=FLAGS)
    except ConfigError as e:
        return _fail(str(e))
    if not settings.api_keys and not settings.auth.allow_no_auth:
        return _fail(
            "no API key configured. Set AXS_API_KEY=key1[,key2...] to require bearer keys, "
            "or AXS_ALLOW_NO_AUTH=true to serve without authentication (loopback/testing only)."
        )
    if settings.rest.port == 0:
        return _fail("rest.port = 0: choose a port explicitly")
    busy = port_in_use(settings.rest.host, settings.rest.port)
    if busy:
        return _fail(busy)
    setup_logging(settings.logging)
    try:
        check_models(settings)
    except (ConfigError, model_store.ModelFetchError) as e:
        return _fail(str(e))

    from granian.constants import Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    from axserving.app import SETTINGS_ENV, SOURCES_ENV
    from axserving.shutdown import FORCE_SIGNAL

    os.environ[SETTINGS_ENV] = to_json(settings).decode()
    os.environ[SOURCES_ENV] = json.dumps(sources)

    class _Server(Server):  # type: ignore[misc,valid-type]
        """A second interrupt forces the worker's exit instead of waiting for its drain."""

        interrupts = 0

        def signal_handler_interrupt(self, *args: Any, **kwargs: Any) -> None:
            self.interrupts += 1
            if self.interrupts > 1:
                for worker in list(self.wrks):
                    pid = getattr(worker.inner, "pid", None)
                    if pid:
                        os.kill(pid, FORCE_SIGNAL)
            super().signal_handler_interrupt(*args, **kwargs)

    server = _Server(
        "axserving.app:create_app_from_env",
        address=settings.rest.host,
        port=settings.rest.port,
        interface=Interfaces.ASGI,
        loop=Loops.uvloop,
        workers=1,
        factory=True,
        log_level=LogLevels(settings.logging.level.value),
        log_access=False,
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.rest.header_timeout_secs * 1000)),
        # A backstop only: the worker bounds its own drain (axserving.shutdown).
        workers_kill_timeout=int(settings.lifecycle.drain_timeout_secs) + 15,
    )
    server.serve()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(config_path=args.config)
    except ConfigError as e:
        return _fail(str(e))
    setup_logging(settings.logging)
    directory = model_store.cache_dir(settings.model_store.cache_dir)
    if args.models_command == "convert" and args.gguf:
        return cmd_convert(args, Path(args.gguf))
    try:
        path = model_store.ensure(model_store.DEFAULT_MODEL, directory)
    except model_store.ModelFetchError as e:
        return _fail(str(e))
    if args.models_command == "convert":
        return cmd_convert(args, path)
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace, source: Path) -> int:
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from axserving.models.convert import ConvertError, convert

    with Progress(TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            out = convert(source, Path(args.output), progress, force=args.force)
        except ConvertError as e:
            return _fail(str(e))
    print(out)
    return 0


def _server_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    settings = load_settings(config_path=args.config)
    host = settings.rest.host if settings.rest.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{settings.rest.port}"


def cmd_watch(args: argparse.Namespace) -> int:
    from axserving import console

    try:
        url = _server_url(args)
        if args.command == "status":
            console.status(url)
        else:
            console.top(url, interval=max(0.2, args.interval), count=max(0, args.count))
    except ConfigError as e:
        return _fail(str(e))
    except console.Unreachable as e:
        print(f"axserving: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from axserving import single
    from axserving.config import ModelConfig

    overrides = {
        "model_defaults.backend": args.backend,
        "model_defaults.threads": args.threads,
        "model_defaults.ctx_size": args.ctx_size,
        "model_defaults.max_batch": 1,
    }
    try:
        flags = {k: v for k, v in FLAGS.items() if k in overrides and k != "model_defaults.max_batch"}
        settings = load_settings(overrides, config_path=args.config, flags=flags)
        if "AXS_LOG" not in os.environ:  # the text is the output: only warnings beside it
            settings = msgspec.structs.replace(
                settings, logging=msgspec.structs.replace(settings.logging, level=LogLevel.warning))
        entry = ModelConfig(id="generate", path=args.model)
        spec = resolve(
            entry, settings.model_defaults, settings.model_store.cache_dir,
            memory_budget=memory.budget(settings.lifecycle.max_memory_bytes),
        )
    except ConfigError as e:
        return _fail(str(e))
    except APIError as e:
        return _fail(f"--model: {e.message}")
    except model_store.ModelFetchError as e:
        return _fail(str(e))
    if args.max_tokens < 1 or args.max_tokens >= spec.engine.n_ctx:
        return _fail(f"-n/--max-tokens must be from 1 to {spec.engine.n_ctx - 1}, got {args.max_tokens}")
    setup_logging(settings.logging)
    sampling = single.sampling_of(args.max_tokens, args.temperature, args.seed, args.stop)
    try:
        timings = single.run(settings, spec, args.prompt, sampling, args.raw)
    except APIError as e:
        print(f"\naxserving: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(file=sys.stdout)
    print(timings.describe(), file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # Imported here: the HTTP client and the bench are not needed to serve.
    if args.bench_command == "soak":
        from axserving.bench import soak

        env_key = (os.environ.get("AXS_API_KEY") or "").split(",")[0].strip() or None
        return soak.main_with_args(args, env_key)
    if args.bench_command == "regression-check":
        import orjson

        from axserving.bench import regress

        try:
            with open(args.current, "rb") as f:
                current = orjson.loads(f.read())
            report, regressed = regress.check_files(args.baseline, current, args.tolerance)
        except (OSError, orjson.JSONDecodeError) as e:
            print(f"bench regression-check: error: {e}", file=sys.stderr)
            return 2
        print(report)
        return 1 if regressed else 0
    from axserving.bench.serving import main_with_args

    return main_with_args(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command in ("status", "top"):
        return cmd_watch(args)
    if args.command == "generate":
        return cmd_generate(args)
    return cmd_models(args)


if __name__ == "__main__":
    sys.exit(main())
