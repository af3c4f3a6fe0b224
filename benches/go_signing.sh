#!/usr/bin/env bash
# The cost of the Go probes per signature, against the OpenSSL probes:
# ECDSA P-256 signing in a loop, with and without the sensor, by
# `kw-go bench` (fixtures/go-tls, the key's crypto.Signer, built with
# Go 1.19 and Go 1.24: an entry probe past the stack check and a probe on
# each `ret`) and by `openssl speed ecdsap256` (an entry probe and a
# return probe). Each round runs each signer without, then with, the
# sensor; the result is the median ratio and the median time the sensor
# adds to one signature (1/with - 1/without).
#
#   ROUNDS=5 SECONDS_PER_RUN=3 bash benches/go_signing.sh
# Needs root, a release build, Go 1.19 (golang-go) and Go 1.24 under
# target/go (cargo xtask test unpacks it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-5}"
SECS="${SECONDS_PER_RUN:-3}"
BIN="${KEYWARDEN_BIN:-target/release/keywarden}"
GO124="target/go/go1.24/usr/lib/go-1.24/bin/go"
OUT="${BENCH_OUT:-target/bench/go_signing}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release -p keywarden" >&2; exit 1; }
[[ -x "$GO124" ]] || { echo "no $GO124: run cargo xtask test once" >&2; exit 1; }

for go in go:go1.19 "$GO124":go1.24; do
    GO111MODULE=off GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GOCACHE="$OUT/cache-${go##*:}" \
        "${go%%:*}" build -o "$OUT/kw-go-${go##*:}" fixtures/go-tls/main.go
done
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$OUT/key.pem" 2>/dev/null
openssl req -x509 -new -days 2 -subj /CN=bench -key "$OUT/key.pem" -out "$OUT/key.crt" 2>/dev/null

rate() { # signer -> signatures/s
    case "$1" in
        openssl)
            openssl speed -elapsed -seconds "$SECS" ecdsap256 2>&1 |
                python3 -c "import re,sys; m=re.search(r'(\d+) 256 bits ECDSA signs? in ([\d.]+)s', sys.stdin.read(), re.I); print(f'{int(m.group(1))/float(m.group(2)):.1f}')" ;;
        *) "$OUT/kw-go-$1" bench --cert "$OUT/key.crt" --key "$OUT/key.pem" --seconds "$SECS" ;;
    esac
}

with_sensor() {
    "$BIN" run --output /dev/null 2>"$OUT/sensor.log" &
    local sensor=$!
    for _ in $(seq 1 200); do grep -q ready "$OUT/sensor.log" && break; sleep 0.05; done
    rate "$1"
    kill -INT "$sensor"; wait "$sensor" || [[ $? == 3 ]]
}

results="$OUT/results.tsv"
echo -e "round\tsigner\tbaseline\twith_sensor\tratio\tadded_us" >"$results"
for r in $(seq 1 "$ROUNDS"); do
    for signer in go1.19 go1.24 openssl; do
        base=$(rate "$signer")
        with=$(with_sensor "$signer")
        read -r ratio added < <(python3 -c "print(f'{$with / $base:.3f} {1e6 / $with - 1e6 / $base:.2f}')")
        echo -e "$r\t$signer\t$base\t$with\t$ratio\t$added" | tee -a "$results"
    done
done
python3 - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print()
print("| signer | signatures/s without (median) | with sensor (median) | median ratio | added per signature (median) |")
print("|---|---|---|---|---|")
for name in ("go1.19", "go1.24", "openssl"):
    rs = [r for r in rows if r["signer"] == name]
    med = lambda k: statistics.median(float(r[k]) for r in rs)
    print(f"| {name} | {med('baseline'):.0f} | {med('with_sensor'):.0f} | {med('ratio'):.3f} | {med('added_us'):.1f} µs |")
PY
