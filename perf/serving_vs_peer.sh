#!/usr/bin/env bash
# Batched serving measured three ways in one run, rounds taking turns so noise hits all alike:
#   ours   = `axserving run` (this checkout) through perf/bench_serving.py
#   peer   = llama-cpp-python's own server (python -m llama_cpp.server), same model and threads
#   engine = perf/bench_engine.py, the same backend in-process with no server (the reference)
# Prints every round's tables, then medians and the ratios issue 4 asks for.
#
#   perf/serving_vs_peer.sh [ROUNDS=3] [CONCURRENCY=1,8] [MAX_TOKENS=128] [REQUESTS=16]
# Needs the perf extra: .venv/bin/pip install -e '.[perf]'. Ports 18090/18091 on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
CONC=${2:-1,8}
MAXTOK=${3:-128}
NREQ=${4:-16}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-perf/results/serving_vs_peer}
mkdir -p "$OUT"
MODEL=$($PY -m axserving.cli models path)
THREADS=${THREADS:-2}

AXS_API_KEY=sk-bench $PY -m axserving.cli run --threads "$THREADS" --host 127.0.0.1 --port 18090 \
  > "$OUT/ours.log" 2>&1 &
OURS=$!
$PY -m llama_cpp.server --model "$MODEL" --n_threads "$THREADS" --host 127.0.0.1 --port 18091 \
  --interrupt_requests False > "$OUT/peer.log" 2>&1 &
PEER=$!
trap 'kill -TERM $OURS $PEER 2>/dev/null; wait $OURS $PEER 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  curl -sf http://127.0.0.1:18090/readyz >/dev/null && curl -sf http://127.0.0.1:18091/v1/models >/dev/null && break
  sleep 0.5
done

for r in $(seq 1 "$ROUNDS"); do
  echo "=== round $r: servers"
  $PY perf/bench_serving.py --url http://127.0.0.1:18090 --api-key sk-bench --compare http://127.0.0.1:18091 \
    --eos-token-id 2 --concurrency "$CONC" --num-requests "$NREQ" --max-tokens "$MAXTOK" \
    --json "$OUT/serving_$r.json" --quiet || true
  echo "=== round $r: engine in-process"
  # At the server's engine niceness (engine.nice, 10), so background load weighs on both alike.
  $PY perf/bench_engine.py --batch "$CONC" --rounds 1 --max-tokens "$MAXTOK" --threads "$THREADS" --nice 10 \
    --json "$OUT/engine_$r.json" | tail -n +2
done

$PY - "$OUT" "$ROUNDS" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
serving = [json.load(open(f"{out}/serving_{r}.json")) for r in range(1, rounds + 1)]
engine = [json.load(open(f"{out}/engine_{r}.json")) for r in range(1, rounds + 1)]
def level(run, target, conc):
    return next(l for l in run["levels"] if l["target"] == target and l["concurrency"] == conc)
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")
concs = sorted({l["concurrency"] for l in serving[0]["levels"]})
print(f"\nmedians over {rounds} rounds (output tok/s; TTFT p95 ms; failures = errors+empty+truncated)")
print(f"{'conc':>4} {'engine':>8} {'ours':>8} {'peer':>8} {'ours/engine':>11} {'ours/peer':>9} "
      f"{'TTFT95 ours':>11} {'TTFT95 peer':>11} {'ours/peer':>9} {'fail ours':>9} {'fail peer':>9}")
for c in concs:
    eng = med(e[f"batch_{c}"]["output_tok_s"] for e in engine)
    ours = med(level(s, "ours", c)["output_throughput"] for s in serving)
    peer = med(level(s, "peer", c)["output_throughput"] for s in serving)
    def p95(s, t):
        return (level(s, t, c).get("ttft") or {}).get("p95")
    t_ours = med(p95(s, "ours") for s in serving)
    t_peer = med(p95(s, "peer") for s in serving)
    fails = {t: sum(level(s, t, c)[k] for s in serving for k in ("errors", "empty", "truncated")) for t in ("ours", "peer")}
    print(f"{c:>4} {eng:>8.1f} {ours:>8.1f} {peer:>8.1f} {ours / eng:>11.3f} {ours / peer:>9.2f} "
          f"{t_ours:>11.0f} {t_peer:>11.0f} {t_ours / t_peer:>9.3f} {fails['ours']:>9} {fails['peer']:>9}")
EOF
