#!/usr/bin/env bash
# Demo without root and without systemd: starts the agent on
# examples/local.toml, plays what the Claude CLI does to its credentials
# file, and shows what cred-watch did. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet
BIN=target/debug/cred-watch
rm -rf demo && mkdir -p demo/.claude && chmod 700 demo/.claude

creds() { # $1: a tag; tokens are fake and obviously so
    local exp=$(( ($(date +%s) + 8 * 3600) * 1000 + $1 ))
    printf '{"claudeAiOauth":{"accessToken":"sk-ant-oat01-%s","refreshToken":"sk-ant-ort01-%s","expiresAt":%s,"scopes":["user:inference"],"subscriptionType":"max"},"mcpOAuth":{"srv":{"accessToken":"m%s"}}}\n' "demo-$1" "demo-$1" "$exp" "$1"
}
cli_write() { # what the CLI does: temp file 0600, then rename over the target
    local tmp="demo/.claude/.credentials.json.tmp.$RANDOM"
    (umask 077; creds "$1" > "$tmp"); mv "$tmp" demo/.claude/.credentials.json
}

cli_write 1
CRED_WATCH_TEST_RESTART_LOG=demo/restarts.log "$BIN" run --config examples/local.toml &
AGENT=$!
trap 'kill $AGENT 2>/dev/null || true' EXIT
sleep 0.5
echo "== token refresh (atomic rename, new inode with mode 0600)"
cli_write 2
sleep 0.5
stat -c '   source mode %a' demo/.claude/.credentials.json
stat -c '   copy %n mode %a' demo/shared/.credentials.json
echo "== a corrupted write is refused; the copy keeps the last good token"
echo '{"claudeAiOauth": {' > demo/.claude/.credentials.json
sleep 0.5
echo "== restarts recorded (systemd would be asked over D-Bus):"
cat demo/restarts.log 2>/dev/null || echo "   none"
"$BIN" status --config examples/local.toml
kill -TERM $AGENT; wait $AGENT || true
trap - EXIT
