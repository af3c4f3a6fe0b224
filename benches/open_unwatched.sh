#!/usr/bin/env bash
# Cost of the sensor's openat probe to opens it does not care about: a tight
# C loop opening and closing unwatched files, with and without the sensor,
# and with the sensor enforcing a block rule (fanotify marks on another
# directory) and a kill rule. Runs alternate; the results are median ratios
# of opens/s against the baseline of the same round.
#
#   ROUNDS=5 OPENS=1000000 bash benches/open_unwatched.sh
# OTHER_BIN=PATH adds, in each round, a run with another build of the
# sensor (default configuration), to compare two builds side by side.
# BPF_STATS=1 turns on the kernel's per-program statistics
# (kernel.bpf_stats_enabled, restored after) and records, for each sensor
# run, the mean nanoseconds per call of the open programs, in
# $OUT/bpf_stats.tsv: the probes' own cost, without the noise of the
# open loop's rate.
# Needs root, gcc and a release build (cargo xtask bench does the build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${ROUNDS:-5}"
OPENS="${OPENS:-1000000}"
BIN="${KEYWARDEN_BIN:-target/release/keywarden}"
OUT="${BENCH_OUT:-target/bench/open_unwatched}"
mkdir -p "$OUT/files"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release -p keywarden" >&2; exit 1; }
for i in $(seq 0 99); do : >"$OUT/files/data-$i.txt"; done

cat >"$OUT/opener.c" <<'C'
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
/* Opens and closes N unwatched files; prints opens per second. */
int main(int argc, char **argv) {
    long n = atol(argv[2]);
    char path[4096];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/data-%ld.txt", argv[1], i % 100);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) { perror(path); return 1; }
        close(fd);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%.0f\n", n / s);
    return 0;
}
C
gcc -O2 -o "$OUT/opener" "$OUT/opener.c"

mkdir -p "$OUT/guarded"
cat >"$OUT/rules.yaml" <<YAML
rules:
  - id: bench-block
    severity: high
    event: secret_file_open
    match:
      file.path: $PWD/$OUT/guarded/**
    allow:
      - exe_path: /usr/bin/head
    actions: [alert, block]
  - id: bench-kill
    severity: high
    event: key_use
    match:
      key.spki_sha256: $(printf '0%.0s' $(seq 1 64))
    actions: [kill]
YAML

# Starts the sensor with extra arguments, runs the opener, stops the sensor.
with_sensor() {
    with_binary "$BIN" "$@"
}

with_binary() {
    local bin="$1"
    shift
    "$bin" run --output /dev/null "$@" 2>"$OUT/sensor.log" &
    local sensor=$!
    for _ in $(seq 1 200); do grep -q ready "$OUT/sensor.log" && break; sleep 0.05; done
    "$OUT/opener" "$OUT/files" "$OPENS"
    [[ -n "${BPF_STATS:-}" ]] && program_costs "$bin" >>"$OUT/bpf_stats.tsv"
    kill -INT "$sensor"; wait "$sensor"
}

# One line per open program of the running sensor (the only one: bpftool
# may not say which process holds a program): binary, program, calls,
# mean ns per call.
program_costs() {
    bpftool prog show -j | python3 -c '
import json, sys
for p in json.load(sys.stdin):
    if p.get("name", "") in ("open_exit", "openat_enter", "do_sys_openat2_e", "do_sys_openat2_x") \
            and p.get("run_cnt"):
        print("%s\t%s\t%d\t%.0f" % (sys.argv[1], p["name"], p["run_cnt"], p["run_time_ns"] / p["run_cnt"]))
' "$1"
}

if [[ -n "${BPF_STATS:-}" ]]; then
    stats_before=$(sysctl -n kernel.bpf_stats_enabled)
    trap 'sysctl -qw kernel.bpf_stats_enabled="$stats_before"' EXIT
    sysctl -qw kernel.bpf_stats_enabled=1
    : >"$OUT/bpf_stats.tsv"
fi

results="$OUT/results.tsv"
echo -e "round\tbaseline\twith_sensor\tratio\twith_rules\trules_ratio\twith_other\tother_ratio" >"$results"
for r in $(seq 1 "$ROUNDS"); do
    base=$("$OUT/opener" "$OUT/files" "$OPENS")
    with=$(with_sensor)
    rules=$(with_sensor --rules "$OUT/rules.yaml")
    other="$base"
    [[ -n "${OTHER_BIN:-}" ]] && other=$(with_binary "$OTHER_BIN")
    ratio=$(python3 -c "print(f'{$with / $base:.3f}')")
    rratio=$(python3 -c "print(f'{$rules / $base:.3f}')")
    oratio=$(python3 -c "print(f'{$other / $base:.3f}')")
    echo -e "$r\t$base\t$with\t$ratio\t$rules\t$rratio\t$other\t$oratio" | tee -a "$results"
done
python3 - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = lambda k: statistics.median(float(r[k]) for r in rows)
print()
print("| opens/s without (median) | with sensor (median) | median ratio | with block + kill rules (median) | median ratio |")
print("|---|---|---|---|---|")
print(f"| {med('baseline'):.0f} | {med('with_sensor'):.0f} | {med('ratio'):.3f} | {med('with_rules'):.0f} | {med('rules_ratio'):.3f} |")
PY
if [[ -n "${OTHER_BIN:-}" ]]; then
    python3 - "$results" "$OTHER_BIN" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
r = [float(x["other_ratio"]) for x in rows]
print(f"\nOTHER_BIN {sys.argv[2]}: median ratio {statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})")
PY
fi
if [[ -n "${BPF_STATS:-}" ]]; then
    python3 - "$OUT/bpf_stats.tsv" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    bin, prog, calls, ns = line.split("\t")
    runs[(bin, prog)].append(float(ns))
print("\n| sensor binary | program | runs | mean ns per call (median of runs) |")
print("|---|---|---|---|")
for (bin, prog), ns in sorted(runs.items()):
    print(f"| {bin} | {prog} | {len(ns)} | {statistics.median(ns):.0f} |")
PY
fi
