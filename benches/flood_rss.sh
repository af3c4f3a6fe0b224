#!/usr/bin/env bash
# The sensor's memory at idle and under a flood of secret-file opens
# (issue 16, row 4): PROCS processes, as nobody, open distinct nonexistent
# `*.key` names at RATE opens/s in all for DURATION seconds. Each open
# fails, but the probe sees it at syscall entry and every name matches the
# default watch list's `**/*.key`. Prints VmRSS at idle, the highest VmRSS
# sampled during the flood, VmHWM at the end, the opens made, the events
# written, the last shedding warning, the `stopped:` line and the exit
# status (3: events were shed).
#
#   RATE=10000 DURATION=10 bash benches/flood_rss.sh
#   RATE=0 ...   opens as fast as the processes can (the row 4 attack)
# Needs root, python3, setpriv (util-linux) and a release build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RATE="${RATE:-10000}"
DURATION="${DURATION:-10}"
PROCS="${PROCS:-2}"
IDLE="${IDLE:-30}"
BIN="${KEYWARDEN_BIN:-target/release/keywarden}"
OUT="${BENCH_OUT:-target/bench/flood_rss}"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release -p keywarden" >&2; exit 1; }
rm -rf "$OUT"
mkdir -p "$OUT"
NAMES=$(mktemp -d /tmp/kw-flood.XXXXXX)
chmod 0777 "$NAMES"
trap 'rm -rf "$NAMES"' EXIT

# argv: directory, tag, opens/s for this process (0: no limit), seconds.
FLOOD='
import os, sys, time
d, tag, rate, secs = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
start = time.monotonic()
n = 0
while True:
    t = time.monotonic() - start
    if t >= secs:
        break
    due = n + 1000 if rate == 0 else t * rate
    while n < due:
        try:
            os.close(os.open(f"{d}/{tag}-{n}.key", os.O_RDONLY))
        except OSError:
            pass
        n += 1
    if rate:
        time.sleep(0.001)
print(n)
'

kib() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$sensor/status"; }

"$BIN" run --output "$OUT/events.ndjson" --baselines "$OUT/baselines.json" --inventory "$OUT/inventory.json" 2>"$OUT/sensor.log" &
sensor=$!
for _ in $(seq 1 1200); do grep -q " ready: " "$OUT/sensor.log" && break; sleep 0.05; done
grep -q " ready: " "$OUT/sensor.log" || { echo "sensor not ready" >&2; cat "$OUT/sensor.log" >&2; exit 1; }
sleep "$IDLE"
idle=$(kib VmRSS)

# As nobody, python3 must not come from root's PATH (a pyenv shim under
# /root is not readable by nobody).
PYTHON="${PYTHON:-/usr/bin/python3}"
per_proc=$("$PYTHON" -c "print($RATE / $PROCS)")
floods=()
for p in $(seq 1 "$PROCS"); do
    setpriv --reuid=65534 --regid=65534 --clear-groups \
        "$PYTHON" -c "$FLOOD" "$NAMES" "p$p" "$per_proc" "$DURATION" >"$OUT/opens-$p" &
    floods+=("$!")
done
peak=0
while kill -0 "${floods[@]}" 2>/dev/null; do
    now=$(kib VmRSS)
    (( now > peak )) && peak=$now
    sleep 0.2
done
wait "${floods[@]}"
opens=$(cat "$OUT"/opens-* | awk '{ s += $1 } END { print s }')
# Let the sensor drain the ring and close the last coalescing windows.
sleep 3
hwm=$(kib VmHWM)
kill -INT "$sensor"
status=0
wait "$sensor" || status=$?

echo "idle VmRSS:             $((idle / 1024)) MiB (after ${IDLE} s)"
echo "flood:                  $opens opens in ${DURATION} s by $PROCS processes (RATE=$RATE)"
echo "peak VmRSS sampled:     $((peak / 1024)) MiB"
echo "VmHWM at the end:       $((hwm / 1024)) MiB"
echo "events written:         $(wc -l <"$OUT/events.ndjson")"
echo "secret_file_open:       $(grep -c '"event_code":"secret_file_open"' "$OUT/events.ndjson" || true)"
echo "last shedding warning:  $(grep -o 'events shed under load[^"]*' "$OUT/events.ndjson" | tail -1 || true)"
echo "stopped line:           $(grep 'stopped:' "$OUT/sensor.log" | tail -1)"
echo "exit status:            $status"
