#!/usr/bin/env bash
# The cost of the network-peer hook per TCP receive, inside a stock
# kernel's guest (issue 19, "Measure"): Linux 6.1 has no sock_recv_length
# tracepoint, and the sensor takes peers from an fexit program on
# tcp_recvmsg there; 6.3 and later use the tracepoint. A C program
# receives COUNT 64-byte messages over one loopback TCP connection, one
# recv() each, in ROUNDS rounds that alternate without and with
# `keywarden run`. Under TCG every absolute number is inflated; only the
# ratio of the same round, and the time added per receive next to the
# other kernel's, mean something.
#
#   KERNEL=debian-6.1 ROUNDS=3 COUNT=200000 bash benches/recv_guest.sh
#   KERNEL=host ...    # this machine's kernel, not in a guest
# Needs root, gcc, a release build and the kernel unpacked under
# target/kernels (`cargo xtask vm-test --kernel NAME` fetches it once).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
KERNEL="${KERNEL:-debian-6.1}"
ROUNDS="${ROUNDS:-3}"
COUNT="${COUNT:-200000}"
BIN="$PWD/target/release/keywarden"
OUT="$PWD/target/bench/recv_guest/$KERNEL"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release -p keywarden" >&2; exit 1; }
source benches/guest.sh
mkdir -p "$OUT"
cat >"$OUT/receiver.c" <<'C'
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
/* A child sends N 64-byte messages over loopback TCP; the parent receives
 * them one recv() (one tcp_recvmsg) each; prints receives per second. */
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(ls, (void *)&a, sizeof a) || listen(ls, 1) || getsockname(ls, (void *)&a, &len)) {
        perror("listen");
        return 1;
    }
    char buf[64] = {0};
    pid_t child = fork();
    if (child == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (void *)&a, sizeof a)) { perror("connect"); _exit(1); }
        for (long i = 0; i < n; i++)
            if (write(s, buf, sizeof buf) != sizeof buf) { perror("write"); _exit(1); }
        _exit(0);
    }
    int c = accept(ls, NULL, NULL);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++)
        if (recv(c, buf, sizeof buf, MSG_WAITALL) != sizeof buf) { perror("recv"); return 1; }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    waitpid(child, NULL, 0);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%.0f\n", n / s);
    return 0;
}
C
gcc -O2 -o "$OUT/receiver" "$OUT/receiver.c"

cat >"$OUT/guest.sh" <<SH
#!/bin/bash
exec >"$OUT/guest.log" 2>&1
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
echo "kernel \$(uname -r)"
for r in \$(seq 1 $ROUNDS); do
    base=\$("$OUT/receiver" $COUNT)
    "$BIN" run --output /dev/null >"$OUT/sensor.log" 2>&1 &
    s=\$!
    # A sensor starts in 12-13 s under TCG.
    for _ in \$(seq 1 600); do grep -q ready "$OUT/sensor.log" && break; sleep 0.2; done
    with=\$("$OUT/receiver" $COUNT)
    grep -o 'network peers from[^"]*\|signatures carry no network peer' "$OUT/sensor.log" | head -1
    kill -INT \$s; wait \$s
    echo "round \$r base \$base with \$with"
done
echo END
SH
chmod +x "$OUT/guest.sh"
run_in_guest "$KERNEL" "$OUT" "$OUT/guest.sh"
grep -q '^END$' "$OUT/guest.log" || { echo "the guest did not finish: $OUT/guest.log" >&2; exit 1; }
python3 - "$OUT/guest.log" <<'PY'
import statistics, sys
lines = open(sys.argv[1]).read().splitlines()
rounds = [l.split() for l in lines if l.startswith("round ")]
mechanism = next((l for l in lines if "peer" in l), "mechanism not logged")
ratios = [float(r[5]) / float(r[3]) for r in rounds]
added = [1e6 / float(r[5]) - 1e6 / float(r[3]) for r in rounds]
print(lines[0], "-", mechanism)
for r, x, us in zip(rounds, ratios, added):
    print(f"round {r[1]}: {r[3]} receives/s without, {r[5]} with, ratio {x:.3f}, +{us:.2f} us per receive")
print(f"median ratio {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}), "
      f"median +{statistics.median(added):.2f} us per receive")
PY
