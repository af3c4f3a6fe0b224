#!/usr/bin/env bash
# Installs everything keywarden needs to build and test on a fresh Debian
# machine: the pinned Rust toolchain with rust-src, bpf-linker linked against
# that toolchain's own LLVM, and the Debian packages the tests drive.
# Idempotent: every step checks first, so a second run takes a second or two.
#
# KEYWARDEN_BOOTSTRAP=build installs only what building the sensor needs
# (the toolchain, bpf-linker, a C compiler): deploy/Dockerfile's build
# stage uses it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLCHAIN="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")"
BPF_LINKER_VERSION="0.13.0"
# LLVM major of the pinned rustc; bpf-linker must match it.
BPF_LINKER_FEATURE="llvm-23"
LLVM_PREFIX="${KEYWARDEN_LLVM_PREFIX:-/opt/keywarden/llvm-$TOOLCHAIN}"
# prometheus (96 MB installed) is there for its promtool: the metrics test
# checks a scrape with `promtool check metrics`.
# systemd: `systemd-analyze verify` checks deploy/systemd/keywarden.service
# (sensor/tests/deploy.rs); installing it does not change the init system.
# golang-go, gnutls-bin, libnss3-tools: the other crypto stacks the tests
# run (a Go TLS server, gnutls-serv, certutil).
# vagrant: `vagrant validate` checks vagrant/Vagrantfile (sensor/tests/vagrant.rs).
# qemu-system-x86, kmod, busybox-static: `cargo xtask vm-test` boots stock
# kernels with virtme-ng (it installs them itself too, with virtme-ng and
# the kernels, under target/).
# pebble: the ACME test CA the rotation tests start (sensor/tests/rotate.rs).
APT_PACKAGES=(nginx curl openssl ca-certificates build-essential pkg-config bpftool procps cmake clang nodejs wrk openssh-client openssh-server apache2 prometheus systemd vagrant qemu-system-x86 kmod busybox-static golang-go gnutls-bin libnss3-tools pebble)
MODE="${KEYWARDEN_BOOTSTRAP:-all}"
case "$MODE" in
    all) ;;
    build) APT_PACKAGES=(ca-certificates build-essential pkg-config) ;;
    *) printf 'bootstrap: KEYWARDEN_BOOTSTRAP must be all or build, not %s\n' "$MODE" >&2; exit 2 ;;
esac
# kubernetes-validate checks deploy/kubernetes offline against this
# Kubernetes version (sensor/tests/deploy.rs reads both from here).
KUBERNETES_VALIDATE_VERSION="1.37.0"
# DuckDB reads the sensor's Parquet files back in sensor/tests/parquet.rs
# (pytz: DuckDB's Python API needs it for timestamps with a time zone).
DUCKDB_VERSION="2.0.1"
PYTZ_VERSION="2026.6"
KUBERNETES_VERSION="1.31.0"
# ocsf-json-schema bundles the official OCSF schema exports (1.0 to 1.8)
# and builds the JSON Schema of a class with its profiles; jsonschema
# checks events against it (scripts/ocsf_validate.py; the test suite reads
# both pins from here).
OCSF_JSON_SCHEMA_VERSION="1.2.0"
JSONSCHEMA_VERSION="4.26.0"

log() { printf 'bootstrap: %s\n' "$*" >&2; }

export PATH="$HOME/.cargo/bin:$PATH"

if ! command -v rustup >/dev/null; then
    log "rustup is missing; install it first (https://rustup.rs)"; exit 1
fi
rustup set auto-self-update disable >/dev/null 2>&1 || true

if ! rustup toolchain list | grep -q "^$TOOLCHAIN"; then
    log "installing Rust $TOOLCHAIN with rust-src"
    rustup toolchain install "$TOOLCHAIN" --profile minimal --component rust-src,clippy,rustfmt
elif ! rustup +"$TOOLCHAIN" component list --installed | grep -q '^rust-src'; then
    log "adding rust-src to $TOOLCHAIN"
    rustup +"$TOOLCHAIN" component add rust-src
fi

SYSROOT="$(rustc +"$TOOLCHAIN" --print sysroot)"
LIBLLVM="$(cd "$SYSROOT/lib" && ls libLLVM.so.*-rust-* | head -n1)"
mkdir -p "$LLVM_PREFIX/lib"
ln -sf "$SYSROOT/lib/$LIBLLVM" "$LLVM_PREFIX/lib/libLLVM.so"
ln -sf "$SYSROOT/lib/$LIBLLVM" "$LLVM_PREFIX/lib/$LIBLLVM"

if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    log "building bpf-linker $BPF_LINKER_VERSION against $LIBLLVM (about a minute)"
    LLVM_PREFIX="$LLVM_PREFIX" cargo +"$TOOLCHAIN" install --locked \
        --no-default-features --features "$BPF_LINKER_FEATURE" \
        "bpf-linker@$BPF_LINKER_VERSION"
fi

missing=()
if ! command -v dpkg-query >/dev/null; then
    # Not Debian: vagrant/provision.sh installs the equivalents on RHEL-like
    # systems; elsewhere, install them by hand.
    log "not a Debian system: skipping the packages ${APT_PACKAGES[*]}"
    APT_PACKAGES=()
fi
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ "$MODE" == build ]]; then
    exit 0
fi

# Python with the `cryptography` wheel, which carries its own OpenSSL: the
# tests sign with it. A venv under target/ keeps it out of the system.
VENV="$ROOT/target/pyvenv"
if ! "$VENV/bin/python" -c 'import cryptography' 2>/dev/null; then
    log "creating $VENV with the cryptography wheel"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --only-binary=:all: cryptography
fi
# And kubernetes-validate, pinned, which validates the Kubernetes manifests
# against the schemas of a pinned Kubernetes version without a cluster.
if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$KUBERNETES_VALIDATE_VERSION"; then
    log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $VENV"
    "$VENV/bin/pip" install -q --only-binary=:all: "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
# And the OCSF validator's two packages, pinned.
pinned_version() {
    "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true
}
if [[ "$(pinned_version ocsf-json-schema)" != "$OCSF_JSON_SCHEMA_VERSION" ]] \
    || [[ "$(pinned_version jsonschema)" != "$JSONSCHEMA_VERSION" ]]; then
    log "installing ocsf-json-schema $OCSF_JSON_SCHEMA_VERSION and jsonschema $JSONSCHEMA_VERSION into $VENV"
    "$VENV/bin/pip" install -q --only-binary=:all: \
        "ocsf-json-schema==$OCSF_JSON_SCHEMA_VERSION" "jsonschema==$JSONSCHEMA_VERSION"
fi
if ! "$VENV/bin/python" -c "import duckdb, pytz, sys; sys.exit(duckdb.__version__ != '$DUCKDB_VERSION' or pytz.__version__ != '$PYTZ_VERSION')" 2>/dev/null; then
    log "installing duckdb $DUCKDB_VERSION and pytz $PYTZ_VERSION into $VENV"
    "$VENV/bin/pip" install -q --only-binary=:all: "duckdb==$DUCKDB_VERSION" "pytz==$PYTZ_VERSION"
fi
