#!/usr/bin/env bash
# Flower runner smoke test: the same config through the in-process runner, Flower's
# simulation engine and a loopback deployment must give the same summary.json; then a
# deployment in which one SuperNode is killed mid-run must leave that node out for a round,
# let it rejoin, finish, and leave no process behind.
#
#   scripts/flower_smoke.sh                  # tiny synthetic data, ~10 min on 2 busy cores
#   CONFIG=configs/demo.toml SETS="--set train.rounds=2" scripts/flower_smoke.sh   # the demo tree
#
# Needs the Flower extra: pip install -e ".[flower]". Writes under ${OUT:-runs/flower-smoke}.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
PY=${PY:-.venv/bin/python}
WORLDLM=("$PY" -m worldlm)
OUT=${OUT:-runs/flower-smoke}
SETS=${SETS:-}
rm -rf "$OUT" && mkdir -p "$OUT"

if [[ -z "${CONFIG:-}" ]]; then  # the tests' tiny synthetic 7-node tree (seconds per round)
  "$PY" scripts/tiny_config.py "$OUT"
  CONFIG=$OUT/config.toml
fi
# shellcheck disable=SC2086
run() { local t0=$SECONDS; "${WORLDLM[@]}" "$@" --quiet $SETS; echo "  $1 ${*: -1}: $((SECONDS - t0)) s"; }

same() { "$PY" scripts/flower_equal.py "$2" "$1" | sed 's/^/  /'; }  # summaries, models, metrics

echo "1. in-process runner, simulation engine, loopback deployment ($CONFIG)"
run train "$CONFIG" --out "$OUT/local"
run train "$CONFIG" --runner flower-sim --out "$OUT/sim"
run deploy-local "$CONFIG" --out "$OUT/deploy"
same "$OUT/local" "$OUT/sim"
same "$OUT/local" "$OUT/deploy"

echo "2. kill SuperNode 'fr' in round 1; deploy-local restarts it and it rejoins"
KILL="$OUT/kill"
# shellcheck disable=SC2086
"${WORLDLM[@]}" deploy-local "$CONFIG" --out "$KILL" --quiet --set train.rounds=3 $SETS \
  --restart-dead --node-timeout 60 &
DEPLOY=$!
trap 'kill -TERM $DEPLOY 2>/dev/null || true' EXIT  # deploy-local stops its own processes on SIGTERM
until [[ -f "$KILL/metrics.jsonl" ]] && grep -q '"round":1,"stage":' "$KILL/metrics.jsonl"; do
  kill -0 $DEPLOY 2>/dev/null || { echo "deploy-local ended early"; exit 1; }
  sleep 1
done
VICTIM=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['supernode:fr'])" "$KILL/flower/pids.json")
echo "  round 1 started; kill -9 SuperNode fr (pid $VICTIM)"
kill -9 "$VICTIM"
wait $DEPLOY
trap - EXIT
"$PY" - "$KILL" <<'EOF'
import json, sys
out = sys.argv[1]
records = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
left = sorted({(r["round"], r["message"]) for r in records if r.get("event") == "left_out" and r["node"] == "fr"})
back = [r["round"] for r in records if r.get("event") == "rejoined" and r["node"] == "fr"]
summary = json.load(open(f"{out}/summary.json"))
print(f"  fr left out of: {left}; rejoined in round(s) {back}; missing at the end: {summary.get('missing_nodes', [])}")
assert left and back and "missing_nodes" not in summary, "fr should be left out once and rejoin"
assert json.load(open(f"{out}/flower/pids.json")) == {}, "deploy-local left processes running"
EOF
for pid in $(cat "$KILL/flower/pids.json" "$OUT/deploy/flower/pids.json" | tr -dc '0-9 \n'); do
  if kill -0 "$pid" 2>/dev/null; then echo "process $pid still running"; exit 1; fi
done
echo "flower smoke: OK"
