#!/usr/bin/env bash
# axserving against the servers a user would pick instead, on the same model and threads, every
# workload of `axserving bench serve`, the servers taking turns level by level and round by round
# so machine noise hits all alike:
#   ours          = `axserving run` (this checkout)
#   llama-server  = llama.cpp's own C++ server, built by perf/llama_server.sh from the llama.cpp
#                   the pinned llama-cpp-python vendors (the speed anchor)
#   llama_cpp     = llama-cpp-python's server (python -m llama_cpp.server), serial
#   engine        = perf/bench_engine.py: our backend in-process at batch = concurrency, no server
# Prints every workload's tables, then one summary: ours as ratios to llama-server (output tok/s,
# TTFT p50/p95, ITL p99) and to llama_cpp.server (output tok/s).
#
#   perf/serving_vs_peer.sh [ROUNDS=2] [WORKLOADS=fixed,poisson,chat-shared-prefix,long-prompts]
#
# Environment: CONC (fixed's levels, 1,8,16,32), DURATION (seconds per level and round, 20),
# RATE (poisson req/s, 2), MAX_TOKENS (128), THREADS (2), SLOTS (llama-server -np, 8),
# PEERS (llama-server,llama_cpp; drop llama_cpp to halve the run), ENGINE (1: the in-process
# reference on fixed), OURS_ARGS (extra `axserving run` flags). Needs the perf extra
# (.venv/bin/pip install -e '.[perf]'). Ports 18090, 18091, 18093 on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
WORKLOADS=${2:-fixed,poisson,chat-shared-prefix,long-prompts}
CONC=${CONC:-1,8,16,32}
DURATION=${DURATION:-20}
RATE=${RATE:-2}
MAXTOK=${MAX_TOKENS:-128}
THREADS=${THREADS:-2}
SLOTS=${SLOTS:-8}
PEERS=${PEERS:-llama-server,llama_cpp}
ENGINE=${ENGINE:-1}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-perf/results/serving_vs_peer}
mkdir -p "$OUT"
rm -f "$OUT"/*.json
MODEL=$($PY -m axserving.cli models path)
LLAMA_SERVER=$(perf/llama_server.sh)

PIDS=()
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null || true' EXIT
# shellcheck disable=SC2086
AXS_API_KEY=sk-bench $PY -m axserving.cli run --threads "$THREADS" --host 127.0.0.1 --port 18090 ${OURS_ARGS:-} \
  > "$OUT/ours.log" 2>&1 &
PIDS+=($!)
wait_ready() {
  for _ in $(seq 1 240); do curl -sf "$1" >/dev/null && return 0; sleep 0.5; done
  echo "not ready: $1" >&2
  exit 1
}
# Ours measures at load how many sequences are worth a step (max_batch auto): it loads alone,
# before the peers, so their loading does not weigh on that measurement.
wait_ready http://127.0.0.1:18090/readyz
COMPARE=()
READY=()
if [[ ,$PEERS, == *,llama-server,* ]]; then
  # Each of the SLOTS slots holds a 4096-token context, as each of ours does (ctx_size 4096 x max_batch 8).
  "$LLAMA_SERVER" --model "$MODEL" -t "$THREADS" -tb "$THREADS" -np "$SLOTS" -c $((4096 * SLOTS)) \
    --host 127.0.0.1 --port 18093 > "$OUT/llama-server.log" 2>&1 &
  PIDS+=($!)
  COMPARE+=(--compare http://127.0.0.1:18093 --compare-name llama-server)
  READY+=(http://127.0.0.1:18093/health)
fi
if [[ ,$PEERS, == *,llama_cpp,* ]]; then
  $PY -m llama_cpp.server --model "$MODEL" --n_threads "$THREADS" --n_ctx 4096 --host 127.0.0.1 --port 18091 \
    --interrupt_requests False > "$OUT/llama_cpp.log" 2>&1 &
  PIDS+=($!)
  COMPARE+=(--compare http://127.0.0.1:18091 --compare-name llama_cpp)
  READY+=(http://127.0.0.1:18091/v1/models)
fi
for url in "${READY[@]}"; do wait_ready "$url"; done

bench() {  # WORKLOAD, then extra flags
  local w=$1
  shift
  echo "=== workload $w"
  $PY -m axserving.cli bench serve --url http://127.0.0.1:18090 --api-key sk-bench "${COMPARE[@]}" \
    --eos-token-id 2 --workload "$w" --rounds "$ROUNDS" --json "$OUT/$w.json" --quiet "$@" || true
}
IFS=, read -ra WL <<< "$WORKLOADS"
for w in "${WL[@]}"; do
  case $w in
    fixed) bench fixed --concurrency "$CONC" --max-tokens "$MAXTOK" --duration "$DURATION" ;;
    poisson) bench poisson --rate "$RATE" --concurrency 32 --max-tokens "$MAXTOK" --duration "$DURATION" ;;
    # Whole conversations (8 of 4 turns each), not a duration: a cut-off one would count its
    # cheap first turns and not the long histories of its last.
    chat-shared-prefix) bench chat-shared-prefix --concurrency 8 ;;
    long-prompts) bench long-prompts --concurrency 8 --max-tokens "$MAXTOK" --duration "$DURATION" ;;
    *) echo "unknown workload $w" >&2; exit 2 ;;
  esac
done
if [[ $ENGINE == 1 && ,$WORKLOADS, == *,fixed,* ]]; then
  echo "=== engine in-process (fixed)"
  # At the server's engine niceness (engine.nice, 10), so background load weighs on both alike.
  $PY perf/bench_engine.py --batch "$CONC" --rounds "$ROUNDS" --max-tokens "$MAXTOK" --threads "$THREADS" --nice 10 \
    --json "$OUT/engine.json" | tail -n +2
fi

$PY - "$OUT" <<'EOF'
import json, math, pathlib, sys
out = pathlib.Path(sys.argv[1])
engine = json.loads((out / "engine.json").read_text()) if (out / "engine.json").exists() else {}
def f(v, d=2):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"
print("\nsummary: ours / llama-server (tok/s: > 1 is better for ours; TTFT, ITL: < 1 is better) "
      "and ours / llama_cpp.server (tok/s)")
head = (f"{'workload':<19}{'conc':>8}{'ours tok/s':>11}{'llama-srv':>10}{'tok/s':>7}{'TTFT p50':>9}"
        f"{'TTFT p95':>9}{'ITL p99':>8}{'llama_cpp':>10}{'engine':>8}{'fail':>6}")
print(head)
print("-" * len(head))
for path in sorted(out.glob("*.json")):
    if path.stem == "engine":
        continue
    run = json.loads(path.read_text())
    levels = {(l["target"], l["concurrency"], l.get("group", "")): l for l in run["levels"]}
    ratios = {(r["theirs"], r["concurrency"], r.get("group", "")): r for r in run["ratios"]}
    for (target, conc, group), ours in levels.items():
        if target != "ours":
            continue
        key = (conc, group)
        srv = ratios.get(("llama-server", *key)) or {}
        py = ratios.get(("llama_cpp", *key)) or {}
        peer = levels.get(("llama-server", *key)) or {}
        eng = engine.get(f"batch_{conc}", {}).get("output_tok_s") if path.stem == "fixed" else None
        label = f"{conc} {group}".strip()
        print(f"{path.stem:<19}{label:>8}{f(ours['output_throughput'], 1):>11}{f(peer.get('output_throughput'), 1):>10}"
              f"{f(srv.get('output_throughput')):>7}{f(srv.get('ttft_p50')):>9}{f(srv.get('ttft_p95')):>9}"
              f"{f(srv.get('itl_p99')):>8}{f(py.get('output_throughput')):>10}"
              f"{f(ours['output_throughput'] / eng if eng else None):>8}"
              f"{ours['errors'] + ours['empty'] + ours['truncated']:>6}")
EOF
