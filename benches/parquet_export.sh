#!/usr/bin/env bash
# The cost of Parquet export: the sensor's events/s and CPU per 1000 events
# with --parquet off and on, and Parquet bytes per event against NDJSON
# bytes per event, for the same kind of load in the same run.
#
# Load: `openssl speed -elapsed ecdsap256` (one key_use event per
# signature, tens of thousands a second). Rounds alternate off/on; the
# result is the median of each measure, and the median ratio on/off of the
# same round.
#
#   ROUNDS=5 SECONDS_PER_RUN=5 bash benches/parquet_export.sh
# Needs root, openssl and a release build (cargo build --release -p keywarden).
# Results: docs/performance.md, "Parquet export".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-5}"
SECS="${SECONDS_PER_RUN:-5}"
BIN="${KEYWARDEN_BIN:-target/release/keywarden}"
OUT="${BENCH_OUT:-target/bench/parquet_export}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release -p keywarden" >&2; exit 1; }
TICK=$(getconf CLK_TCK)

# One run: the sensor (with the extra arguments) under `openssl speed`.
# Prints: events, sensor CPU seconds, NDJSON bytes, Parquet rows, Parquet bytes.
run() {
    rm -rf "$OUT/run"; mkdir -p "$OUT/run"
    "$BIN" run --output "$OUT/run/events.ndjson" --baselines "$OUT/run/baselines.json" \
        --inventory "$OUT/run/inventory.json" "$@" 2>"$OUT/run/sensor.log" &
    local sensor=$!
    for _ in $(seq 1 400); do grep -q ' ready: ' "$OUT/run/sensor.log" && break; sleep 0.05; done
    openssl speed -elapsed -seconds "$SECS" ecdsap256 >/dev/null 2>&1
    # The CPU the sensor used, all threads, up to the stop.
    local cpu
    cpu=$(awk -v t="$TICK" '{print ($14 + $15) / t}' "/proc/$sensor/stat")
    kill -INT "$sensor"; wait "$sensor" || true
    local events ndjson rows=0 pbytes=0
    events=$(wc -l <"$OUT/run/events.ndjson")
    ndjson=$(stat -c %s "$OUT/run/events.ndjson")
    if [[ -d "$OUT/run/lake" ]]; then
        rows=$(grep -o 'parquet_rows=[0-9]*' "$OUT/run/sensor.log" | tail -1 | cut -d= -f2)
        pbytes=$(find "$OUT/run/lake" -name '*.parquet' -printf '%s\n' | awk '{s+=$1} END {print s+0}')
    fi
    echo "$events $cpu $ndjson $rows $pbytes"
}

results="$OUT/results.tsv"
echo -e "round\tparquet\tevents_per_s\tcpu_ms_per_1k\tndjson_bytes_per_event\tparquet_bytes_per_event" >"$results"
for r in $(seq 1 "$ROUNDS"); do
    for mode in off on; do
        if [[ $mode == on ]]; then
            read -r events cpu ndjson rows pbytes < <(run --parquet "$OUT/run/lake")
        else
            read -r events cpu ndjson rows pbytes < <(run)
        fi
        python3 - "$r" "$mode" "$events" "$cpu" "$ndjson" "$rows" "$pbytes" "$SECS" >>"$results" <<'PY'
import sys
r, mode, events, cpu, ndjson, rows, pbytes, secs = sys.argv[1:]
events, cpu, ndjson, rows, pbytes, secs = int(events), float(cpu), int(ndjson), int(rows or 0), int(pbytes), float(secs)
pq = f"{pbytes / rows:.1f}" if rows else "-"
print(f"{r}\t{mode}\t{events / secs:.0f}\t{cpu * 1e6 / max(events, 1):.1f}\t{ndjson / max(events, 1):.1f}\t{pq}")
PY
    done
done
cat "$results"
python3 - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
def med(mode, col):
    return statistics.median(float(r[col]) for r in rows if r["parquet"] == mode and r[col] != "-")
def ratio(col):
    by = {}
    for r in rows:
        by.setdefault(r["round"], {})[r["parquet"]] = float(r[col])
    return statistics.median(v["on"] / v["off"] for v in by.values())
for col in ["events_per_s", "cpu_ms_per_1k"]:
    print(f"{col}: off {med('off', col):.1f}, on {med('on', col):.1f}, median ratio on/off {ratio(col):.3f}")
print(f"bytes per event: NDJSON {med('on', 'ndjson_bytes_per_event'):.1f}, Parquet {med('on', 'parquet_bytes_per_event'):.1f}")
PY
