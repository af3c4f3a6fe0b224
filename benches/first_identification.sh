#!/usr/bin/env bash
# CPU the sensor spends naming a key the first time, per mechanism (issue
# 15): N processes started *before* the sensor, so it saw no key load,
# each sign once (twice for recovery) after it is ready. The sensor's
# user+system CPU (/proc/PID/stat) over that work, minus its idle rate
# over the same wall time, divided by N:
#
#   tls       `openssl s_server` (Ed25519 key, file deleted): one
#             handshake each; named by the certificate its listener
#             presents to the sensor's own handshake.
#   recovery  a process with an in-memory ECDSA P-256 key and no listener
#             signs twice; named by public-key recovery.
#   held      a process holding its Ed25519 key file open (loaded from
#             memory, so no open after the sensor started) signs once;
#             named by the search of the files it holds open.
#   seen      the same process started *after* the sensor: the open is
#             seen and the file read then (the usual path, for scale).
#
# Each phase waits until all N events are written and named, so the
# search and verification work is inside the measured interval.
#
#   N=20 bash benches/first_identification.sh     (release build, as root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${N:-20}
BIN="${KEYWARDEN_BIN:-target/release/keywarden}"
OUT="${BENCH_OUT:-target/bench/first_identification}"
rm -rf "$OUT" && mkdir -p "$OUT"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release -p keywarden" >&2; exit 1; }
hz=$(getconf CLK_TCK)

# A signer driven by signals: it loads or makes its key, prints "ready",
# and signs on each SIGUSR1 (twice in a row for `recover`).
cat >"$OUT/signer.py" <<'PY'
import ctypes, os, signal, sys
mode, path = sys.argv[1], sys.argv[2]
c = ctypes.CDLL("libcrypto.so.3")
vp = ctypes.c_void_p
for name, res, args in [
    ("EVP_PKEY_CTX_new_from_name", vp, [vp, ctypes.c_char_p, ctypes.c_char_p]),
    ("EVP_PKEY_keygen_init", ctypes.c_int, [vp]),
    ("EVP_PKEY_CTX_set_group_name", ctypes.c_int, [vp, ctypes.c_char_p]),
    ("EVP_PKEY_generate", ctypes.c_int, [vp, ctypes.POINTER(vp)]),
    ("BIO_new_mem_buf", vp, [ctypes.c_char_p, ctypes.c_int]),
    ("PEM_read_bio_PrivateKey", vp, [vp, vp, vp, vp]),
    ("EVP_MD_CTX_new", vp, []),
    ("EVP_MD_CTX_free", None, [vp]),
    ("EVP_sha256", vp, []),
    ("EVP_DigestSignInit", ctypes.c_int, [vp, vp, vp, vp, vp]),
    ("EVP_DigestSign", ctypes.c_int, [vp, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p, ctypes.c_size_t]),
]:
    f = getattr(c, name)
    f.restype, f.argtypes = res, args
if mode == "recover":
    ctx = c.EVP_PKEY_CTX_new_from_name(None, b"EC", None)
    assert c.EVP_PKEY_keygen_init(ctx) == 1 and c.EVP_PKEY_CTX_set_group_name(ctx, b"P-256") == 1
    pkey = vp()
    assert c.EVP_PKEY_generate(ctx, ctypes.byref(pkey)) == 1
    pkey, md, times = pkey.value, c.EVP_sha256(), 2
else:
    held = open(path, "rb")  # kept open for the life of the process
    data = held.read()
    pkey = c.PEM_read_bio_PrivateKey(c.BIO_new_mem_buf(data, len(data)), None, None, None)
    assert pkey
    md, times = None, 1
def sign():
    for i in range(times):
        m = c.EVP_MD_CTX_new()
        assert c.EVP_DigestSignInit(m, None, md, None, pkey) == 1
        sig = ctypes.create_string_buffer(128)
        n = ctypes.c_size_t(128)
        msg = os.urandom(32)
        assert c.EVP_DigestSign(m, sig, ctypes.byref(n), msg, len(msg)) == 1
        c.EVP_MD_CTX_free(m)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
print("ready", flush=True)
while True:
    signal.sigwait([signal.SIGUSR1])
    sign()
    print("signed", flush=True)
PY

key() { openssl genpkey -algorithm "$1" -out "$2" 2>/dev/null; }
cpu() { awk '{print $14 + $15}' "/proc/$SENSOR/stat"; }
now() { date +%s.%N; }

start_sensor() {
    "$BIN" run --output "$OUT/events.ndjson" --inventory "$OUT/inventory.json" \
        --baselines "$OUT/baselines.json" >"$OUT/sensor.log" 2>&1 &
    SENSOR=$!
    until grep -q " ready: " "$OUT/sensor.log"; do sleep 0.1; done
    sleep 2
}

stop_sensor() { kill -INT "$SENSOR"; wait "$SENSOR" || true; }

# Named key_use events of these pids so far.
named() {
    python3 - "$OUT/events.ndjson" "$@" <<'PY'
import json, sys
pids = set(int(p) for p in sys.argv[2:])
n = 0
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["metadata"]["event_code"] != "key_use" or e["actor"]["process"]["pid"] not in pids:
        continue
    key = e.get("key") or e.get("unmapped", {}).get("key") or {}
    n += key.get("status") == "identified"
print(n)
PY
}

# measure NAME WANT PID... : idle rate, then the trigger, until WANT named
# events; prints one result row.
measure() {
    local name=$1 want=$2
    shift 2
    local a b t0 idle_rate busy got
    a=$(cpu); t0=$(now); sleep 3; b=$(cpu)
    idle_rate=$(echo "($b - $a) / $hz / ($(now) - $t0)" | bc -l)
    a=$(cpu); t0=$(now)
    trigger "$@"
    for _ in $(seq 1 300); do
        got=$(named "$@")
        ((got >= want)) && break
        sleep 0.1
    done
    b=$(cpu)
    busy=$(echo "($b - $a) / $hz - $idle_rate * ($(now) - $t0)" | bc -l)
    printf '| %s | %d | %d | %.0f ms | %.1f ms |\n' "$name" "$N" "$got" \
        "$(echo "$busy * 1000" | bc -l)" "$(echo "$busy * 1000 / $N" | bc -l)"
}

# Sends SIGUSR1 to signers; handshakes with s_servers (port file per pid).
trigger() {
    for p in "$@"; do
        if [[ -f "$OUT/port.$p" ]]; then
            openssl s_client -connect "127.0.0.1:$(cat "$OUT/port.$p")" </dev/null >/dev/null 2>&1 || true
        else
            kill -USR1 "$p"
        fi
    done
}

start_signers() { # mode -> pids in SIGNERS
    local mode=$1 i
    SIGNERS=()
    for i in $(seq 1 "$N"); do
        local k="$OUT/$mode$i.pem"
        [[ $mode == recover ]] || key ED25519 "$k"
        python3 "$OUT/signer.py" "$mode" "$k" >"$OUT/$mode$i.out" 2>&1 &
        SIGNERS+=($!)
    done
    for i in $(seq 1 "$N"); do
        until grep -q ready "$OUT/$mode$i.out"; do sleep 0.05; done
    done
}

PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; [[ -n "${SENSOR:-}" ]] && kill -INT "$SENSOR" 2>/dev/null || true; }
trap cleanup EXIT

# Everything that must run before the sensor.
SERVERS=()
for i in $(seq 1 "$N"); do
    key ED25519 "$OUT/tls$i.pem"
    openssl req -x509 -new -days 1 -subj "/CN=s$i.test" -key "$OUT/tls$i.pem" -out "$OUT/tls$i.crt" 2>/dev/null
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    openssl s_server -quiet -www -accept "127.0.0.1:$port" -key "$OUT/tls$i.pem" -cert "$OUT/tls$i.crt" </dev/null >/dev/null 2>&1 &
    SERVERS+=($!)
    echo "$port" >"$OUT/port.$!"
    until openssl s_client -connect "127.0.0.1:$port" </dev/null >/dev/null 2>&1; do sleep 0.1; done
    rm -f "$OUT/tls$i.pem"
done
start_signers recover; RECOVER=("${SIGNERS[@]}")
start_signers held; HELD=("${SIGNERS[@]}")
PIDS=("${SERVERS[@]}" "${RECOVER[@]}" "${HELD[@]}")

start_sensor
echo "| mechanism | processes | events named | sensor CPU over idle | per process |"
echo "|---|---|---|---|---|"
measure tls "$N" "${SERVERS[@]}"
measure recovery "$((2 * N))" "${RECOVER[@]}"
measure held "$N" "${HELD[@]}"
start_signers seen; PIDS+=("${SIGNERS[@]}")
measure seen "$N" "${SIGNERS[@]}"
stop_sensor
grep -o 'verifications=[0-9]* ecdsa_recoveries=[0-9]* processes_searched=[0-9]*' "$OUT/sensor.log" | tail -1
