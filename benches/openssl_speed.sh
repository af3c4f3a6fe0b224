#!/usr/bin/env bash
# Signing throughput of `openssl speed -elapsed` with and without the sensor.
#
# Runs alternate (A = no sensor, B = sensor running) so drift in the VM hits
# both sides alike; the result per algorithm is the median of B/A over the
# rounds. It also checks that the sensor saw every signature (events from
# the speed process == signatures it reports) and lost none.
#
#   ROUNDS=5 SECONDS_PER_RUN=3 bash benches/openssl_speed.sh
# Needs root and a release build (cargo xtask bench does both).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-5}"
SECS="${SECONDS_PER_RUN:-3}"
ALGS="${ALGS:-ecdsap256 ed25519 rsa2048}"
BIN="${KEYWARDEN_BIN:-target/release/keywarden}"
OUT="${BENCH_OUT:-target/bench/openssl_speed}"
mkdir -p "$OUT"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release -p keywarden" >&2; exit 1; }

# sign/s and the number of signatures from `openssl speed` output.
speed() { # alg log -> prints "rate count pid"
    local alg="$1" log="$2"
    openssl speed -elapsed -seconds "$SECS" "$alg" >"$log" 2>&1 &
    local pid=$!
    wait "$pid"
    python3 - "$log" "$pid" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"(\d+) \d+ bits (?:\S+ signs?|private RSA.s) in ([\d.]+)s", text, re.I)
if not m:
    sys.exit("no sign count in openssl speed output:\n" + text)
count, secs = int(m.group(1)), float(m.group(2))
print(f"{count / secs:.1f} {count} {sys.argv[2]}")
PY
}

start_sensor() {
    rm -f "$OUT/events.ndjson"
    # KEYWARDEN_ARGS: extra `run` arguments, e.g. "--config FILE".
    # shellcheck disable=SC2086
    "$BIN" run ${KEYWARDEN_ARGS:-} --output "$OUT/events.ndjson" 2>"$OUT/sensor.log" &
    SENSOR=$!
    for _ in $(seq 1 200); do grep -q ready "$OUT/sensor.log" && return; sleep 0.05; done
    echo "sensor not ready" >&2; cat "$OUT/sensor.log" >&2; exit 1
}

stop_sensor() {
    # Exit status 3: events were shed; the row's `lost` column shows it.
    kill -INT "$SENSOR"; wait "$SENSOR" || [[ $? == 3 ]]
}

results="$OUT/results.tsv"
echo -e "alg\tround\tbaseline\twith_sensor\tratio\tsignatures\tevents\tlost" >"$results"
for alg in $ALGS; do
    for r in $(seq 1 "$ROUNDS"); do
        read -r base _ _ < <(speed "$alg" "$OUT/a.log")
        start_sensor
        read -r with count pid < <(speed "$alg" "$OUT/b.log")
        stop_sensor
        lost=$(sed -n 's/.*lost_sign=\([0-9]*\).*lost_data=\([0-9]*\).*lost_other=\([0-9]*\).*/\1+\2+\3/p' "$OUT/sensor.log" | tail -1)
        events=$(python3 - "$OUT/events.ndjson" "$pid" <<'PY'
import json, sys
pid = int(sys.argv[2])
n = 0
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["metadata"]["event_code"] == "key_use" and e["actor"]["process"]["pid"] == pid and e["status_id"] == 1:
        n += 1
print(n)
PY
)
        ratio=$(python3 -c "print(f'{$with / $base:.3f}')")
        echo -e "$alg\t$r\t$base\t$with\t$ratio\t$count\t$events\t$((lost))" | tee -a "$results"
        rm -f "$OUT/events.ndjson"
    done
done

python3 - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print()
print("| algorithm | baseline sign/s (median) | with sensor (median) | median ratio | signatures | events | lost |")
print("|---|---|---|---|---|---|---|")
for alg in dict.fromkeys(r["alg"] for r in rows):
    rs = [r for r in rows if r["alg"] == alg]
    med = lambda k: statistics.median(float(r[k]) for r in rs)
    sigs = sum(int(r["signatures"]) for r in rs)
    evs = sum(int(r["events"]) for r in rs)
    lost = sum(int(r["lost"]) for r in rs)
    print(f"| {alg} | {med('baseline'):.0f} | {med('with_sensor'):.0f} | {med('ratio'):.3f} | {sigs} | {evs} | {lost} |")
PY
