#!/usr/bin/env bash
# Rotation benchmarks (issue 17, docs/performance.md "Rotation"):
#  1. one rotation, plan to verified, through the local CA and through
#     pebble (ACME) on loopback: ROUNDS each, median and range;
#  2. clients at a steady rate of new TLS handshakes (benches/tls_load.py,
#     each one verified against the CA and the name) while one key is
#     rotated and, later, while a rotation is rolled back after a real
#     reload (its sensor check cannot pass: no sensor writes the events
#     file it watches). Failed handshakes, and the rate before, during
#     and after each;
#  3. KEYS keys of one nginx rotated in bulk (`rotate --keys`).
#
#   KEYS=100 ROUNDS=5 LOAD_RATE=100 bash benches/rotation.sh
# Results in target/bench/rotation/results.txt.
# Needs root, nginx, openssl, pebble, python3 and a release build
# (cargo build --release -p keywarden). The sensor runs once, to make the
# inventory the rotations plan from.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
BIN="$ROOT/${KEYWARDEN_BIN:-target/release/keywarden}"
KEYS="${KEYS:-100}"
ROUNDS="${ROUNDS:-5}"
RATE="${LOAD_RATE:-100}"
OUT="${BENCH_OUT:-target/bench/rotation}"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release -p keywarden" >&2; exit 1; }
rm -rf "$OUT"; mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
W="$OUT/work"; mkdir -p "$W/keys"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
spki() { openssl pkey -in "$1" -pubout -outform DER | sha256sum | cut -d' ' -f1; }
now() { date +%s.%N; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# The local CA; two nginx: a small one (SMALL names: the single rounds
# and the load test, each on a key of its own: a rotated key is not in
# the inventory any more) and a big one (KEYS names, for the bulk run).
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$W/ca.key" 2>/dev/null
openssl req -x509 -new -days 2 -subj "/CN=bench CA" -key "$W/ca.key" -out "$W/ca.crt" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
SMALL=$((2 * ROUNDS + 2))
# nginx_with NAME PORT PREFIX COUNT: keys PREFIX000.. with certificates,
# and an nginx serving them all on PORT.
nginx_with() {
    local name=$1 port=$2 prefix=$3 count=$4 servers="" i
    mkdir -p "$W/$name"
    for i in $(seq -f %03g 0 $((count - 1))); do
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$W/keys/$prefix$i.pem" 2>/dev/null
        openssl req -x509 -new -days 2 -subj "/CN=$prefix$i.test" -key "$W/keys/$prefix$i.pem" \
            -CA "$W/ca.crt" -CAkey "$W/ca.key" -out "$W/keys/$prefix$i.test.crt" \
            -addext "subjectAltName=DNS:$prefix$i.test" -addext basicConstraints=critical,CA:FALSE
        servers+="server { listen 127.0.0.1:$port ssl; server_name $prefix$i.test; ssl_certificate $W/keys/$prefix$i.test.crt; ssl_certificate_key $W/keys/$prefix$i.pem; ssl_session_cache off; ssl_session_tickets off; location / { return 200 \"$prefix$i\\n\"; } }
"
    done
    cat >"$W/$name/nginx.conf" <<EOF
daemon off;
worker_processes 2;
pid $W/$name/nginx.pid;
error_log $W/$name/error.log;
events { worker_connections 1024; }
http {
access_log off;
client_body_temp_path $W/$name; proxy_temp_path $W/$name; fastcgi_temp_path $W/$name; uwsgi_temp_path $W/$name; scgi_temp_path $W/$name;
$servers}
EOF
    /usr/sbin/nginx -c "$W/$name/nginx.conf" & pids+=($!)
}
PS=$(free_port); PB=$(free_port)
nginx_with small "$PS" s "$SMALL"
nginx_with big "$PB" k "$KEYS"

# pebble, for the ACME rounds.
mkdir -p "$W/pebble"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$W/pebble/tls.key" 2>/dev/null
openssl req -x509 -new -days 2 -subj /CN=pebble -key "$W/pebble/tls.key" -CA "$W/ca.crt" -CAkey "$W/ca.key" \
    -addext subjectAltName=IP:127.0.0.1,DNS:localhost -addext basicConstraints=critical,CA:FALSE \
    -out "$W/pebble/tls.crt"
PP=$(free_port); PM=$(free_port)
cat >"$W/pebble/pebble.json" <<EOF
{"pebble": {"listenAddress": "127.0.0.1:$PP", "managementListenAddress": "127.0.0.1:$PM",
 "certificate": "$W/pebble/tls.crt", "privateKey": "$W/pebble/tls.key", "httpPort": $(free_port),
 "tlsPort": $(free_port), "ocspResponderURL": "", "externalAccountBindingRequired": false}}
EOF
PEBBLE_VA_ALWAYS_VALID=1 PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 \
    pebble -config "$W/pebble/pebble.json" >"$W/pebble/log" 2>&1 & pids+=($!)

# The sensor's configuration: the default with this run's paths.
"$BIN" config | sed \
    -e "s|^key_paths:|key_paths:\n  - $W/keys|" \
    -e "s|inventory: /var/lib/keywarden/inventory.json|inventory: $W/inventory.json|" \
    -e "s|journal_dir: /var/lib/keywarden/rotations|journal_dir: $W/journal|" \
    -e "s|  local_ca: null|  local_ca: { key: $W/ca.key, cert: $W/ca.crt, crl: $W/ca.crl }|" \
    -e "s|  acme: null|  acme: { directory: \"https://127.0.0.1:$PP/dir\", root: $W/ca.crt, account: $W/acme-account.json }|" \
    -e "s|  verify_timeout_ms: 10000|  verify_timeout_ms: 3000|" \
    >"$W/keywarden.yaml"
for _ in $(seq 1 100); do curl -s --cacert "$W/ca.crt" "https://127.0.0.1:$PP/dir" >/dev/null && break; sleep 0.1; done

# The inventory: the sensor sees every key sign once.
"$BIN" run --config "$W/keywarden.yaml" --output "$W/events.ndjson" 2>"$W/sensor.log" & sensor=$!
for _ in $(seq 1 600); do grep -q ' ready: ' "$W/sensor.log" && break; sleep 0.1; done
for i in $(seq -f %03g 0 $((SMALL - 1))); do
    curl -s --cacert "$W/ca.crt" --resolve "s$i.test:$PS:127.0.0.1" "https://s$i.test:$PS/" >/dev/null
done
for i in $(seq -f %03g 0 $((KEYS - 1))); do
    curl -s --cacert "$W/ca.crt" --resolve "k$i.test:$PB:127.0.0.1" "https://k$i.test:$PB/" >/dev/null
done
kill -INT $sensor; wait $sensor || true

results="$OUT/results.txt"
: >"$results"
say() { echo "$*" | tee -a "$results"; }

# 1. One rotation, plan to verified.
n=0
for ca in local acme; do
    times=()
    for r in $(seq 1 "$ROUNDS"); do
        key="$W/keys/s$(printf %03d $n).pem"; n=$((n + 1))
        t0=$(now)
        "$BIN" rotate --config "$W/keywarden.yaml" --key "$(spki "$key")" --ca "$ca" >"$OUT/one-$ca-$r.log" 2>&1 \
            || { echo "rotation $ca $r failed: $OUT/one-$ca-$r.log" >&2; exit 1; }
        t1=$(now)
        times+=("$(echo "$t1 - $t0" | bc)")
    done
    say "one rotation via $ca, $ROUNDS rounds, seconds: $(printf '%s\n' "${times[@]}" | sort -n | tr '\n' ' ')"
    say "  median $(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p") s"
done

# 2. Handshakes under load, during a rotation and during a rollback.
LOAD_SECONDS=40
LOADED="s$(printf %03d $((2 * ROUNDS)))"
OTHER="s$(printf %03d $((2 * ROUNDS + 1)))"
python3 benches/tls_load.py 127.0.0.1 "$PS" "$LOADED.test" "$W/ca.crt" "$RATE" "$LOAD_SECONDS" "$OUT/load.tsv" & load=$!
t_start=$(now)
sleep 8
a0=$(echo "$(now) - $t_start" | bc)
"$BIN" rotate --config "$W/keywarden.yaml" --key "$(spki "$W/keys/$LOADED.pem")" >"$OUT/load-rotate.log" 2>&1
a1=$(echo "$(now) - $t_start" | bc)
sleep 8
b0=$(echo "$(now) - $t_start" | bc)
# Another key of the same nginx. The sensor check watches a file nobody
# writes: it fails after the handshake check passed, and the rotation is
# rolled back (two reloads of the nginx the clients talk to).
: >"$W/nobody-writes.ndjson"
set +e
"$BIN" rotate --config "$W/keywarden.yaml" --key "$(spki "$W/keys/$OTHER.pem")" \
    --sensor-events "$W/nobody-writes.ndjson" --drain-ms 500 >"$OUT/load-rollback.log" 2>&1
rc=$?
set -e
b1=$(echo "$(now) - $t_start" | bc)
wait $load
say "load: $RATE new handshakes/s to $LOADED.test for ${LOAD_SECONDS}s; rotation at ${a0}-${a1}s, rollback (exit $rc) at ${b0}-${b1}s"
python3 - "$OUT/load.tsv" "$a0" "$a1" "$b0" "$b1" <<'PY' | tee -a "$results"
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
a0, a1, b0, b1 = map(float, sys.argv[2:6])
def window(lo, hi, name):
    sel = [r for r in rows if lo <= int(r[0]) < hi]
    ok = sum(int(r[1]) for r in sel); bad = sum(int(r[2]) for r in sel)
    secs = max(len(sel), 1)
    errs = sorted({r[3] for r in sel if r[3]})
    print(f"  {name:<16} {lo:5.0f}-{hi:5.0f} s  {ok / secs:7.1f} ok/s  failed {bad}" + (f"  ({errs[0]})" if errs else ""))
import math
window(0, math.floor(a0), "before")
window(math.floor(a0), math.ceil(a1), "rotation")
window(math.ceil(a1), math.floor(b0), "between")
window(math.floor(b0), math.ceil(b1), "rollback")
window(math.ceil(b1), len(rows), "after")
print(f"  total failed handshakes: {sum(int(r[2]) for r in rows)} of {sum(int(r[1]) + int(r[2]) for r in rows)}")
PY

# 3. Every key of the nginx, in bulk.
for i in $(seq -f %03g 0 $((KEYS - 1))); do spki "$W/keys/k$i.pem"; done >"$W/all.txt"
t0=$(now)
set +e
"$BIN" rotate --config "$W/keywarden.yaml" --keys "$W/all.txt" --concurrency 4 >"$OUT/bulk.log" 2>&1
rc=$?
set -e
t1=$(now)
say "bulk: $KEYS keys of one nginx, exit $rc, $(echo "$t1 - $t0" | bc) s wall: $(grep -E '^[0-9]+ keys: ' "$OUT/bulk.log")"
echo "logs in $OUT"
