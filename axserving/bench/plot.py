"""``bench serve --plot PATH``: throughput and latency against concurrency, one line per server,
as a PNG (matplotlib, drawn off-screen; installed with the ``perf`` or ``test`` extra)."""

from __future__ import annotations

from collections.abc import Sequence

from axserving.bench.report import LevelSummary


def write_png(path: str, summaries: Sequence[LevelSummary], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write the file only
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or the perf extra)") from None
    main = [s for s in summaries if not s.group]  # the workload's main requests, not long-prompts' long ones
    targets = list(dict.fromkeys(s.target for s in main))
    fig, (thr, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in targets:
        levels = sorted((s for s in main if s.target == target), key=lambda s: s.concurrency)
        conc = [s.concurrency for s in levels]
        thr.plot(conc, [s.output_throughput for s in levels], marker="o", label=target)
        for name, pick, style in (
            ("TTFT p50", lambda s: s.ttft.p50 if s.ttft else None, "-"),
            ("TTFT p95", lambda s: s.ttft.p95 if s.ttft else None, "--"),
            ("ITL p99", lambda s: s.itl.p99 if s.itl else None, ":"),
        ):
            points = [(c, v) for c, s in zip(conc, levels, strict=True) if (v := pick(s)) is not None]
            if points:
                lat.plot(*zip(*points, strict=True), style, marker="o", label=f"{target} {name}")
    thr.set(title="output throughput", xlabel="concurrency", ylabel="tokens/s")
    lat.set(title="latency", xlabel="concurrency", ylabel="ms", yscale="log")
    for ax in (thr, lat):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
