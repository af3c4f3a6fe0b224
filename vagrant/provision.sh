#!/usr/bin/env bash
# Runs inside each machine of vagrant/Vagrantfile, as root: installs what
# scripts/bootstrap.sh cannot (rustup, and on RHEL-like systems the
# packages bootstrap.sh installs with apt on Debian), then runs the test
# command on this machine's kernel.
#   KEYWARDEN_TEST=full   ./x.sh test (the whole suite; the default)
#   KEYWARDEN_TEST=smoke  cargo xtask vm-test --kernel host (the subset
#                         `cargo xtask vm-test` runs on every kernel)
set -euo pipefail
cd /keywarden
echo "provision: ${KEYWARDEN_MACHINE:-this machine}, kernel $(uname -r)"

if command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends curl ca-certificates git python3-venv >/dev/null
elif command -v dnf >/dev/null; then
    # bootstrap.sh's Debian packages under their RHEL names (EPEL has
    # nginx's peers wrk and bpftool's dependencies). prometheus (promtool)
    # is not packaged there: the metrics test that uses it fails.
    dnf install -y -q epel-release
    dnf install -y -q curl ca-certificates git gcc gcc-c++ make pkgconf-pkg-config \
        openssl nginx httpd mod_ssl bpftool procps-ng cmake clang nodejs wrk \
        openssh-clients openssh-server python3 systemd
else
    echo "provision: neither apt-get nor dnf; install the packages of scripts/bootstrap.sh by hand" >&2
    exit 1
fi

if ! command -v rustup >/dev/null && [ ! -x "$HOME/.cargo/bin/rustup" ]; then
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none
fi
export PATH="$HOME/.cargo/bin:$PATH"

case "${KEYWARDEN_TEST:-full}" in
    full) ./x.sh test ;;
    smoke) bash scripts/bootstrap.sh && cargo xtask vm-test --kernel host ;;
    *) echo "provision: KEYWARDEN_TEST must be full or smoke" >&2; exit 2 ;;
esac
