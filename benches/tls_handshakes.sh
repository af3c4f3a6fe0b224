#!/usr/bin/env bash
# TLS handshakes per second with and without the sensor: nginx (system
# OpenSSL), the rustls fixture (aws-lc-rs), the Go fixture (fixtures/go-tls,
# Go 1.24) and gnutls-serv (GnuTLS), a new connection and a full
# handshake per request (`Connection: close`, no session reuse), driven by
# wrk on loopback. Runs alternate without/with the sensor; the result is
# the median ratio of requests/s against the baseline of the same round.
#
#   ROUNDS=5 SECONDS_PER_RUN=5 bash benches/tls_handshakes.sh
# Needs root, nginx, wrk, a release build and the TLS fixtures
# (cargo xtask bench builds the sensor; cargo xtask test builds fixtures).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-5}"
SECS="${SECONDS_PER_RUN:-5}"
BIN="${KEYWARDEN_BIN:-target/release/keywarden}"
RUSTLS="fixtures/tls-programs/target/release/kw-rustls"
OUT="${BENCH_OUT:-target/bench/tls_handshakes}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release -p keywarden" >&2; exit 1; }
[[ -x "$RUSTLS" ]] || cargo build --release -j2 --manifest-path fixtures/tls-programs/Cargo.toml

mkdir -p "$OUT/keys"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$OUT/keys/server.pem" 2>/dev/null
openssl req -x509 -new -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -addext basicConstraints=critical,CA:FALSE -key "$OUT/keys/server.pem" -out "$OUT/keys/server.crt" 2>/dev/null
# The sensor knows the key from key_paths, as a deployment would.
"$BIN" config | sed "s|^key_paths:|key_paths:\n  - $OUT/keys|" >"$OUT/keywarden.yaml"

NGINX_PORT=18481
RUSTLS_PORT=18482
GO_PORT=18483
GNUTLS_PORT=18484
GO124="target/go/go1.24/usr/lib/go-1.24/bin/go"
[[ -x "$GO124" ]] || { echo "no $GO124: run cargo xtask test once" >&2; exit 1; }
GO111MODULE=off GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GOCACHE="$OUT/gocache" \
    "$GO124" build -o "$OUT/kw-go" fixtures/go-tls/main.go
cat >"$OUT/nginx.conf" <<CONF
daemon off;
worker_processes 1;
pid $OUT/nginx.pid;
error_log $OUT/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $OUT; proxy_temp_path $OUT; fastcgi_temp_path $OUT;
  uwsgi_temp_path $OUT; scgi_temp_path $OUT;
  server {
    listen 127.0.0.1:$NGINX_PORT ssl;
    ssl_certificate $OUT/keys/server.crt; ssl_certificate_key $OUT/keys/server.pem;
    ssl_session_cache off; ssl_session_tickets off;
    location / { return 200 "ok"; }
  }
}
CONF
/usr/sbin/nginx -c "$OUT/nginx.conf" &
NGINX=$!
"$RUSTLS" server --provider aws-lc-rs --cert "$OUT/keys/server.crt" --key "$OUT/keys/server.pem" \
    --listen "127.0.0.1:$RUSTLS_PORT" >/dev/null &
RUSTLS_PID=$!
"$OUT/kw-go" server --cert "$OUT/keys/server.crt" --key "$OUT/keys/server.pem" \
    --listen "127.0.0.1:$GO_PORT" >/dev/null &
GO_PID=$!
gnutls-serv --http --x509certfile "$OUT/keys/server.crt" --x509keyfile "$OUT/keys/server.pem" \
    -p "$GNUTLS_PORT" >/dev/null 2>&1 &
GNUTLS_PID=$!
trap 'kill -QUIT $NGINX 2>/dev/null; kill $RUSTLS_PID $GO_PID $GNUTLS_PID 2>/dev/null; wait 2>/dev/null' EXIT
sleep 1

# Requests (= handshakes) per second for one server. gnutls-serv's HTTP
# answer has no length, which wrk counts as an error, not a request: it
# gets a Python client instead, four threads of closed-loop handshakes.
rate() {
    if [[ "$1" == "$GNUTLS_PORT" ]]; then
        python3 - "$1" "$SECS" <<'PY'
import socket, ssl, sys, threading, time
port, secs = int(sys.argv[1]), float(sys.argv[2])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.options |= ssl.OP_NO_TICKET
end = time.monotonic() + secs; counts = [0] * 4
def run(i):
    while time.monotonic() < end:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with ctx.wrap_socket(raw) as t:
                counts[i] += 1
ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
start = time.monotonic(); [t.start() for t in ts]; [t.join() for t in ts]
print(f"{sum(counts) / (time.monotonic() - start):.1f}")
PY
        return
    fi
    wrk -t1 -c4 -d"${SECS}s" -H "Connection: close" "https://127.0.0.1:$1/" |
        awk '/Requests\/sec/ {print $2}'
}

# The rate with the sensor running.
with_sensor() {
    "$BIN" run --config "$OUT/keywarden.yaml" --output /dev/null 2>"$OUT/sensor.log" &
    local sensor=$!
    for _ in $(seq 1 200); do grep -q ready "$OUT/sensor.log" && break; sleep 0.05; done
    rate "$1"
    kill -INT "$sensor"; wait "$sensor"
}

results="$OUT/results.tsv"
echo -e "round\tserver\tbaseline\twith_sensor\tratio" >"$results"
for r in $(seq 1 "$ROUNDS"); do
    for server in nginx:$NGINX_PORT rustls:$RUSTLS_PORT go:$GO_PORT gnutls:$GNUTLS_PORT; do
        name=${server%%:*}; port=${server##*:}
        base=$(rate "$port")
        with=$(with_sensor "$port")
        ratio=$(python3 -c "print(f'{$with / $base:.3f}')")
        echo -e "$r\t$name\t$base\t$with\t$ratio" | tee -a "$results"
    done
done
python3 - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print()
print("| server | handshakes/s without (median) | with sensor (median) | median ratio |")
print("|---|---|---|---|")
for name in ("nginx", "rustls", "go", "gnutls"):
    rs = [r for r in rows if r["server"] == name]
    med = lambda k: statistics.median(float(r[k]) for r in rs)
    print(f"| {name} | {med('baseline'):.0f} | {med('with_sensor'):.0f} | {med('ratio'):.3f} |")
PY
