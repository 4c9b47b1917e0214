#!/usr/bin/env bash
# This checkout against another git revision of axserving, under the same load, in one run:
# both servers run side by side (same model, threads and venv) and perf/bench_serving.py
# alternates between them round by round, so machine noise hits both alike, then prints ratios.
#
#   perf/ab_revisions.sh REV [CONCURRENCY=8] [REQUESTS=32] [MAX_TOKENS=128] [SPREAD=0.75] [ROUNDS=3]
#
# SPREAD is bench_serving's --max-tokens-spread: with a spread, streams end at different times
# and new requests join a running batch, as with real clients. Ports 18090/18092 on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: perf/ab_revisions.sh REV [CONCURRENCY] [REQUESTS] [MAX_TOKENS] [SPREAD] [ROUNDS]}
CONC=${2:-8}
NREQ=${3:-32}
MAXTOK=${4:-128}
SPREAD=${5:-0.75}
ROUNDS=${6:-3}
PY=${PY:-$PWD/.venv/bin/python}
OUT=${OUT:-perf/results/ab_revisions}
mkdir -p "$OUT"
OTHER=$(mktemp -d /tmp/axs-ab-XXXXXX)
git worktree add --detach -q "$OTHER" "$REV"
# The C extensions are built in place by the editable install; the other tree uses this build.
cp ipc/*.so "$OTHER/ipc/" 2>/dev/null || true
THREADS=${THREADS:-2}
AXS_API_KEY=sk-ab $PY -m axserving.cli run --threads "$THREADS" --host 127.0.0.1 --port 18090 > "$OUT/this.log" 2>&1 &
THIS=$!
# One loads at a time: a server measuring its batch at load (max_batch auto) is not disturbed.
for _ in $(seq 1 240); do curl -sf http://127.0.0.1:18090/readyz >/dev/null && break; sleep 0.5; done
(cd "$OTHER" && AXS_API_KEY=sk-ab exec $PY -m axserving.cli run --threads "$THREADS" --host 127.0.0.1 --port 18092) \
  > "$OUT/other.log" 2>&1 &
THAT=$!
cleanup() {
  kill -TERM $THIS $THAT 2>/dev/null || true
  wait $THIS $THAT 2>/dev/null || true
  git worktree remove --force "$OTHER" 2>/dev/null || rm -rf "$OTHER"
  git worktree prune
}
trap cleanup EXIT
for _ in $(seq 1 240); do
  curl -sf http://127.0.0.1:18090/readyz >/dev/null && curl -sf http://127.0.0.1:18092/readyz >/dev/null && break
  sleep 0.5
done
$PY perf/bench_serving.py --url http://127.0.0.1:18090 --api-key sk-ab --name this \
  --compare http://127.0.0.1:18092 --compare-api-key sk-ab --compare-name "${REV:0:12}" \
  --concurrency "$CONC" --num-requests "$NREQ" --max-tokens "$MAXTOK" --max-tokens-spread "$SPREAD" \
  --rounds "$ROUNDS" --quiet --json "$OUT/ab.json"
