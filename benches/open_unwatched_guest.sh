#!/usr/bin/env bash
# Unrelated opens, and an unrelated system call, with and without the
# sensor inside a stock kernel's guest (issue 19, "Measure"), for each way
# the sensor can see opens, side by side in the same guest:
#   fentry       fentry and fexit on do_sys_openat2 (`open_hook: auto` on
#                a kernel that allows fentry)
#   tracepoints  the syscall tracepoints of open, openat, openat2 and creat
#                (`open_hook: tracepoints`; the only choice on this VM)
# The open loop is open_unwatched.sh's; the other loop makes getppid()
# calls, which no probe of the sensor watches: any cost it shows is the
# traced system-call path that syscall tracepoints put every call on.
# Both run on the guest's own tmpfs (the shared directory is 9p, far
# slower to open), in ROUNDS rounds of: without, with fentry, with
# tracepoints. Under TCG every absolute number is inflated; only ratios
# within one round mean something.
#
#   KERNEL=debian-6.1 ROUNDS=3 OPENS=100000 bash benches/open_unwatched_guest.sh
# Needs root, gcc, a release build and the kernel unpacked under
# target/kernels (`cargo xtask vm-test --kernel NAME` fetches it once).
# KERNEL=host runs it on this machine (where fentry is refused, so the
# `auto` sensor falls back to tracepoints).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
KERNEL="${KERNEL:-debian-6.1}"
ROUNDS="${ROUNDS:-3}"
OPENS="${OPENS:-100000}"
CALLS="${CALLS:-$((OPENS * 5))}"
BIN="$PWD/target/release/keywarden"
OUT="$PWD/target/bench/open_unwatched_guest/$KERNEL"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release -p keywarden" >&2; exit 1; }
source benches/guest.sh
mkdir -p "$OUT"
sed -n '/^cat >"$OUT\/opener.c" <<.C.$/,/^C$/p' benches/open_unwatched.sh | sed '1d;$d' >"$OUT/opener.c"
gcc -O2 -o "$OUT/opener" "$OUT/opener.c"
cat >"$OUT/caller.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
/* Makes N getppid() system calls; prints calls per second. */
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%.0f\n", n / s);
    return 0;
}
C
gcc -O2 -o "$OUT/caller" "$OUT/caller.c"
"$BIN" config | sed 's/^open_hook: auto$/open_hook: tracepoints/' >"$OUT/tracepoints.yaml"
grep -q '^open_hook: tracepoints$' "$OUT/tracepoints.yaml" || { echo "no open_hook in the default configuration" >&2; exit 1; }

cat >"$OUT/guest.sh" <<SH
#!/bin/bash
exec >"$OUT/guest.log" 2>&1
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
F=\$(mktemp -d)
for i in \$(seq 0 99); do : >"\$F/data-\$i.txt"; done
echo "kernel \$(uname -r)"
# One measurement: opens/s and calls/s, with a sensor started by "\$@"
# (none without arguments).
measure() {
    local s=
    if [ \$# -gt 0 ]; then
        "\$@" >"$OUT/sensor.log" 2>&1 &
        s=\$!
        # A sensor starts in 12-13 s under TCG.
        for _ in \$(seq 1 600); do grep -q ready "$OUT/sensor.log" && break; sleep 0.2; done
        grep -o 'opens from [a-z]* [a-z]*' "$OUT/sensor.log" | head -1 >&2
    fi
    echo "\$("$OUT/opener" "\$F" $OPENS) \$("$OUT/caller" $CALLS)"
    if [ -n "\$s" ]; then kill -INT \$s; wait \$s; fi
}
for r in \$(seq 1 $ROUNDS); do
    base=\$(measure)
    fentry=\$(measure "$BIN" run --output /dev/null)
    tp=\$(measure "$BIN" run --config "$OUT/tracepoints.yaml" --output /dev/null)
    echo "round \$r base \$base auto \$fentry tracepoints \$tp"
done
echo END
SH
chmod +x "$OUT/guest.sh"
run_in_guest "$KERNEL" "$OUT" "$OUT/guest.sh"
grep -q '^END$' "$OUT/guest.log" || { echo "the guest did not finish: $OUT/guest.log" >&2; exit 1; }
python3 - "$OUT/guest.log" <<'PY'
import statistics, sys
lines = open(sys.argv[1]).read().splitlines()
print(lines[0])
print("open hooks the sensors logged:", sorted({l for l in lines if l.startswith("opens from")}))
rows = [l.split() for l in lines if l.startswith("round ")]
# round R base O C auto O C tracepoints O C
cols = {"auto": 6, "tracepoints": 9}
for what, off in (("opens", 0), ("getppid", 1)):
    for name, at in cols.items():
        ratios = [float(r[at + off]) / float(r[3 + off]) for r in rows]
        print(f"{what}: {name} median ratio {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f}) rounds {' '.join(f'{x:.3f}' for x in ratios)}")
PY
