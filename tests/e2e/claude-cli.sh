#!/usr/bin/env bash
# Installs (once) the pinned Claude Code CLI that tests/e2e_claude_cli.rs
# runs inside the nspawn container, and prints the directory holding
# node_modules/.bin/claude. Cached beside the rootfs. Exits 3 when the
# package registry cannot be reached (the only case where that suite may
# skip), 1 on any other failure.
set -euo pipefail
VERSION=2.1.330
CACHE=${CRED_WATCH_E2E_CLAUDE_CACHE:-/var/cache/cred-watch-e2e}
DIR="$CACHE/claude-code-$VERSION"
if [ -e "$DIR/.cred-watch-complete" ] && [ -x "$DIR/node_modules/.bin/claude" ]; then
    echo "$DIR"
    exit 0
fi
command -v npm >/dev/null || { echo "claude-cli.sh: npm is not installed" >&2; exit 1; }
if ! npm view "@anthropic-ai/claude-code@$VERSION" version >/dev/null 2>&1; then
    echo "claude-cli.sh: the package registry cannot be reached (npm view @anthropic-ai/claude-code@$VERSION failed)" >&2
    exit 3
fi
mkdir -p "$CACHE"
tmp=$(mktemp -d "$CACHE/.claude-code-$VERSION.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# The runnable program is the native binary of the optional package
# @anthropic-ai/claude-code-linux-x64, linked as node_modules/.bin/claude.
npm install --prefix "$tmp" --no-audit --no-fund --loglevel=error "@anthropic-ai/claude-code@$VERSION" >&2
file=$(readlink -f "$tmp/node_modules/.bin/claude")
head -c 4 "$file" | grep -q ELF || { echo "claude-cli.sh: node_modules/.bin/claude is not the native program" >&2; exit 1; }
"$tmp/node_modules/.bin/claude" --version | grep -q "^$VERSION" || { echo "claude-cli.sh: wrong version" >&2; exit 1; }
chmod 755 "$tmp"
touch "$tmp/.cred-watch-complete"
rm -rf "$DIR"
mv "$tmp" "$DIR"
trap - EXIT
echo "$DIR"
