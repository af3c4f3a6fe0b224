# Sourced by the guest benches (open_unwatched_guest.sh, recv_guest.sh):
# runs a script inside a guest of a stock kernel, under qemu TCG with 2
# vCPUs and this host's root filesystem, as `cargo xtask vm-test` does.
#
#   run_in_guest KERNEL OUT SCRIPT
# OUT is the guest's writable directory; the script writes its results
# there. `KERNEL=host` runs the script directly, on this machine.
run_in_guest() {
    local kernel="$1" out="$2" script="$3"
    if [[ "$kernel" == host ]]; then
        bash "$script"
        return
    fi
    local vng="$PWD/target/vng-venv/bin/vng" vmlinuz
    [[ -x "$vng" ]] || { echo "no virtme-ng: run cargo xtask vm-test --kernel $kernel once" >&2; exit 1; }
    vmlinuz=$(ls "$PWD/target/kernels/$kernel/root/boot/"vmlinuz-* 2>/dev/null | head -1)
    [[ -n "$vmlinuz" ]] || { echo "no kernel $kernel: run cargo xtask vm-test --kernel $kernel once" >&2; exit 1; }
    PATH="$(dirname "$vng"):$PATH" timeout 1200 "$vng" -r "$vmlinuz" --force-9p --disable-kvm -m 2G -p 2 \
        --rwdir "$out" \
        --exec "env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root /bin/bash $script" \
        >"$out/vng.log" 2>&1 || true
}
