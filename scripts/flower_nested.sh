#!/usr/bin/env bash
# Nested federations on Flower: a SuperLink and coordinator per inner node on 127.0.0.1.
#  1. `deploy-local --nested` must give the in-process runner's summary.json, final models and records;
#  2. faults: kill -9 region fr-it's SuperLink when round 1 starts and SuperNode uk (under region uk-ru)
#     when round 2 starts; with --restart-dead each sits out that round (left_out), is restarted and
#     rejoins; the run finishes and leaves no process behind.
#
#   scripts/flower_nested.sh                        # the tests' tiny 7-node tree, ~15 min on 2 busy cores
#   CONFIG=configs/demo.toml scripts/flower_nested.sh
#
# Needs the Flower extra. Writes under ${OUT:-runs/flower-nested}.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
PY=${PY:-.venv/bin/python}
WORLDLM=("$PY" -m worldlm)
OUT=${OUT:-runs/flower-nested}
rm -rf "$OUT" && mkdir -p "$OUT"

if [[ -z "${CONFIG:-}" ]]; then
  "$PY" scripts/tiny_config.py "$OUT"
  CONFIG=$OUT/config.toml
fi

echo "1. in-process runner and nested loopback deployment ($CONFIG)"
t0=$SECONDS; "${WORLDLM[@]}" train "$CONFIG" --out "$OUT/local" --quiet; echo "  in-process: $((SECONDS - t0)) s"
t0=$SECONDS; "${WORLDLM[@]}" deploy-local "$CONFIG" --nested --out "$OUT/nested" --quiet
echo "  deploy-local --nested: $((SECONDS - t0)) s"
"$PY" scripts/flower_equal.py "$OUT/nested" "$OUT/local" | sed 's/^/  /'

echo "2. kill region fr-it's SuperLink in round 1 and leaf uk's SuperNode in round 2; both rejoin"
KILL="$OUT/kill"
"${WORLDLM[@]}" deploy-local "$CONFIG" --nested --out "$KILL" --quiet --set train.rounds=4 \
  --restart-dead --node-timeout 90 &
DEPLOY=$!
trap 'kill -TERM $DEPLOY 2>/dev/null || true' EXIT  # deploy-local stops its own processes on SIGTERM
wait_round() {  # until a training record of round $1 appears in the root federation's records
  until [[ -f "$KILL/federations/root/metrics.jsonl" ]] && grep -q "\"round\":$1,\"stage\":" "$KILL/federations/root/metrics.jsonl"; do
    kill -0 $DEPLOY 2>/dev/null || { echo "deploy-local ended early"; exit 1; }
    sleep 1
  done
}
pid_of() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$KILL/flower/pids.json" "$1"; }
wait_round 1; P=$(pid_of superlink:fr-it); echo "  round 1 started; kill -9 fr-it's SuperLink (pid $P)"; kill -9 "$P"
wait_round 2; P=$(pid_of supernode:uk); echo "  round 2 started; kill -9 SuperNode uk (pid $P)"; kill -9 "$P"
wait $DEPLOY
trap - EXIT
"$PY" - "$KILL" <<'EOF'
import json, sys
out = sys.argv[1]
records = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
def left(node):
    return sorted({(r["round"], r["message"]) for r in records if r.get("event") == "left_out" and r["node"] == node})
def up(src, dst):
    return sorted({r["round"] for r in records if r.get("event") == "edge" and r["src"] == src and r["dst"] == dst})
summary = json.load(open(f"{out}/summary.json"))
print(f"  fr-it left out of: {left('fr-it')}; fr-it -> root updates in rounds {up('fr-it', 'root')}")
print(f"  uk left out of: {left('uk')}; uk -> uk-ru updates in rounds {up('uk', 'uk-ru')}")
print(f"  rejoined: {sorted((r['round'], r['node']) for r in records if r.get('event') == 'rejoined')}")
print(f"  missing at the end: {summary.get('missing_nodes', [])}; mean ppl {summary['mean_ppl']:.1f}")
assert left("fr-it") and left("uk"), "the killed region and leaf should each be left out of a round"
assert up("fr-it", "root")[-1] == 3 and up("uk", "uk-ru")[-1] == 3, "both should be back by the last round"
assert "missing_nodes" not in summary
assert json.load(open(f"{out}/flower/pids.json")) == {}, "deploy-local left processes running"
EOF
for pid in $(cat "$KILL/flower/pids.json" "$OUT/nested/flower/pids.json" | tr -dc '0-9 \n'); do
  if kill -0 "$pid" 2>/dev/null; then echo "process $pid still running"; exit 1; fi
done
echo "flower nested: OK"
