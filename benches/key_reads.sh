#!/usr/bin/env bash
# CPU the sensor spends per key file it reads: N distinct PEM key files
# (EC P-256 and RSA-2048, PKCS#8), each opened once for reading by one
# process, so every open is a new file version the sensor reads, checks
# and parses (nothing is served from its cache). The sensor's user+system
# CPU time (/proc/PID/stat) is read before and after; the idle cost over
# the same wall time is measured first and subtracted.
#
#   N=2000 bash benches/key_reads.sh        (release build, as root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${N:-2000}
BIN="${KEYWARDEN_BIN:-target/release/keywarden}"
OUT=target/bench/key_reads
rm -rf "$OUT" && mkdir -p "$OUT/keys"
for alg in ec rsa; do
    case $alg in
        ec) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$OUT/$alg.pem" 2>/dev/null ;;
        rsa) openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$OUT/$alg.pem" 2>/dev/null ;;
    esac
done
# Distinct files (distinct inodes), half of each algorithm.
for i in $(seq 1 "$N"); do
    if ((i % 2)); then cp "$OUT/ec.pem" "$OUT/keys/k$i.pem"; else cp "$OUT/rsa.pem" "$OUT/keys/k$i.pem"; fi
done
"$BIN" run --output "$OUT/events.ndjson" --inventory "$OUT/inventory.json" >"$OUT/log" 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true' EXIT
until grep -q " ready: " "$OUT/log"; do sleep 0.2; done
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
# Idle baseline over the same kind of interval.
a=$(cpu); start=$(date +%s.%N); sleep 5; b=$(cpu); idle_s=$(echo "$(date +%s.%N) - $start" | bc)
idle_rate=$(echo "($b - $a) / $hz / $idle_s" | bc -l)
a=$(cpu); start=$(date +%s.%N)
python3 - "$OUT/keys" "$N" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(1, n + 1):
    fd = os.open(os.path.join(d, f"k{i}.pem"), os.O_RDONLY)
    os.read(fd, 1)
    os.close(fd)
PY
# Let the sensor finish: its key reader works off the event thread.
sleep 3
b=$(cpu); wall=$(echo "$(date +%s.%N) - $start" | bc)
busy=$(echo "($b - $a) / $hz - $idle_rate * $wall" | bc -l)
kill -INT $pid; wait $pid || true
trap - EXIT
opens=$(grep -c '"secret_file_open"' "$OUT/events.ndjson" || true)
printf 'files read: %d  sensor CPU over idle: %.3f s  per file: %.0f us  secret_file_open events: %s\n' \
    "$N" "$busy" "$(echo "$busy * 1000000 / $N" | bc -l)" "$opens"
