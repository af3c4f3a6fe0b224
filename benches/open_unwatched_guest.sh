#!/usr/bin/env bash
# Unrelated opens with and without the sensor inside a stock kernel's guest
# (issue 19, "Measure"): the same C loop as open_unwatched.sh, run on the
# guest's own tmpfs (the shared directory is 9p, far slower to open), in
# ROUNDS rounds that alternate without and with `keywarden run`. Under TCG
# every absolute number is inflated; only the ratio of the same round
# means something.
#
#   KERNEL=debian-6.1 ROUNDS=3 OPENS=100000 bash benches/open_unwatched_guest.sh
# Needs root, gcc, a release build and the kernel unpacked under
# target/kernels (`cargo xtask vm-test --kernel NAME` fetches it once).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
KERNEL="${KERNEL:-debian-6.1}"
ROUNDS="${ROUNDS:-3}"
OPENS="${OPENS:-100000}"
BIN="$PWD/target/release/keywarden"
OUT="$PWD/target/bench/open_unwatched_guest/$KERNEL"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release -p keywarden" >&2; exit 1; }
source benches/guest.sh
mkdir -p "$OUT"
sed -n '/^cat >"$OUT\/opener.c" <<.C.$/,/^C$/p' benches/open_unwatched.sh | sed '1d;$d' >"$OUT/opener.c"
gcc -O2 -o "$OUT/opener" "$OUT/opener.c"

cat >"$OUT/guest.sh" <<SH
#!/bin/bash
exec >"$OUT/guest.log" 2>&1
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
F=\$(mktemp -d)
for i in \$(seq 0 99); do : >"\$F/data-\$i.txt"; done
echo "kernel \$(uname -r)"
for r in \$(seq 1 $ROUNDS); do
    base=\$("$OUT/opener" "\$F" $OPENS)
    "$BIN" run --output /dev/null >"$OUT/sensor.log" 2>&1 &
    s=\$!
    # A sensor starts in 12-13 s under TCG.
    for _ in \$(seq 1 600); do grep -q ready "$OUT/sensor.log" && break; sleep 0.2; done
    with=\$("$OUT/opener" "\$F" $OPENS)
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
ratios = [float(r[5]) / float(r[3]) for r in rounds]
print(lines[0])
for r, x in zip(rounds, ratios):
    print(f"round {r[1]}: {r[3]} opens/s without, {r[5]} with, ratio {x:.3f}")
print(f"median ratio {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
PY
