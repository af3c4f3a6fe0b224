#!/usr/bin/env bash
# keywarden's two entry points. Both set up a fresh machine first (pinned
# Rust toolchain with rust-src, bpf-linker, Debian packages), then:
#   ./x.sh run  [ARGS]   build and run the sensor with the embedded default
#                        configuration (extra ARGS go to `keywarden run`)
#   ./x.sh test [ARGS]   run the whole test suite (as root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/bootstrap.sh
export PATH="$HOME/.cargo/bin:$PATH"
cmd="${1:-}"
shift || true
case "$cmd" in
    run) exec cargo xtask run "$@" ;;
    test) exec cargo xtask test "$@" ;;
    *) echo "usage: ./x.sh run|test [ARGS]" >&2; exit 2 ;;
esac
