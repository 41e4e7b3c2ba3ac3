#!/usr/bin/env bash
# CPU per wake-up, side by side in one run: C wait loops (blocking read,
# poll + read, epoll + read; benches/wait-loop.c) and each cred-watch
# binary given, each watching its own directory, while N appends (50/s)
# land next to each watched file (as a CLI's history.jsonl does). Prints
# the scheduler runtime (all threads, /proc/PID/task/*/schedstat) per
# append. Usage: benches/wakeup-cost.sh [N] [cred-watch binaries...]
# (default: 600 appends, target/release/cred-watch). Needs cc.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-600}
shift || true
[ $# -gt 0 ] || set -- "$PWD/target/release/cred-watch"
base=${CRED_WATCH_BENCH_DIR:-/var/tmp}/wakeup-cost
rm -rf "$base" && mkdir -p "$base"
cc -O2 -o "$base/wait-loop" benches/wait-loop.c
pids=() names=() dirs=()
for mode in 0 1 2 3; do
    d=$base/floor-$mode && mkdir -p "$d"
    "$base/wait-loop" "$mode" "$d" & pids+=($!)
    names+=("C wait loop: $(case $mode in 0) echo 'blocking read';; 1) echo 'poll + read';; 2) echo "epoll + read";; 3) echo "epoll (1 h timeout) + read";; esac)")
    dirs+=("$d")
done
i=0
expires=$((($(date +%s) + 7200) * 1000))
for bin in "$@"; do
    d=$base/cw-$i/claude && mkdir -p "$d" "$base/cw-$i/state" && chmod 700 "$base/cw-$i/state"
    printf '{"claudeAiOauth":{"accessToken":"sk-ant-oat01-bench","refreshToken":"sk-ant-ort01-bench","expiresAt":%d,"scopes":["user:inference"],"subscriptionType":"max"}}' "$expires" > "$d/.credentials.json"
    chmod 600 "$d/.credentials.json"
    printf '[agent]\nstate_dir = "%s"\n[[watch]]\nname = "b"\nsource = "%s/.credentials.json"\n[watch.permissions]\nfile_mode = "0644"\n' "$base/cw-$i/state" "$d" > "$base/cw-$i.toml"
    "$bin" --config "$base/cw-$i.toml" run 2>/dev/null & pids+=($!)
    names+=("$bin")
    dirs+=("$d")
    i=$((i + 1))
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
sleep 1
runtime() {
    local sum=0 t
    for t in /proc/"$1"/task/*/schedstat; do sum=$((sum + $(cut -d' ' -f1 "$t"))); done
    echo "$sum"
}
before=()
for p in "${pids[@]}"; do before+=("$(runtime "$p")"); done
for _ in $(seq 1 "$n"); do
    for d in "${dirs[@]}"; do echo '{"display":"noise"}' >> "$d/history.jsonl"; done
    sleep 0.02
done
sleep 1
floor=$((($(runtime "${pids[0]}") - ${before[0]}) / n))
echo "CPU per append ($n appends, 50/s), scheduler runtime of all threads:"
for j in "${!pids[@]}"; do
    per=$((($(runtime "${pids[$j]}") - ${before[$j]}) / n))
    awk -v name="${names[$j]}" -v per="$per" -v floor="$floor" \
        'BEGIN { printf "  %-45s %6.1f µs  %.2fx the blocking read\n", name, per / 1000, per / floor }'
done
