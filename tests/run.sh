#!/usr/bin/env bash
# The test command: unit and integration tests, and — as root on a host with
# systemd-nspawn — the package build, lintian, and the end-to-end suite on a
# real systemd. CI sets CRED_WATCH_E2E=required so nothing is skipped there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ] && command -v systemd-nspawn >/dev/null && command -v cargo-deb >/dev/null; then
    bash packaging/deb/build.sh # cargo deb, after generating the completions it packages
    if command -v lintian >/dev/null; then
        # lintian warns when run as root; its verdict is the exit status.
        lintian --fail-on error,warning target/debian/cred-watch_*.deb 2> >(grep -v 'root privileges' >&2)
        echo "lintian: 0 errors, 0 warnings"
    fi
    CRED_WATCH_E2E_ROOTFS=$(tests/e2e/rootfs.sh)
    export CRED_WATCH_E2E_ROOTFS
    # The pinned Claude Code CLI for tests/e2e_claude_cli.rs. Only an
    # unreachable package registry lets that suite skip (it says so).
    cli_status=0
    CRED_WATCH_E2E_CLAUDE=$(tests/e2e/claude-cli.sh) || cli_status=$?
    case $cli_status in
    0) ;;
    3) CRED_WATCH_E2E_CLAUDE=unreachable ;;
    *) echo "tests/run.sh: installing the Claude Code CLI failed" >&2; exit 1 ;;
    esac
    export CRED_WATCH_E2E_CLAUDE
elif [ "${CRED_WATCH_E2E:-}" = required ]; then
    echo "tests/run.sh: end-to-end tests required but not root or no systemd-nspawn/cargo-deb" >&2
    exit 1
fi
cargo test --no-fail-fast
