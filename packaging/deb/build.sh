#!/usr/bin/env bash
# Builds target/debian/cred-watch_*.deb from a clean clone: the release
# binary, the shell completions it generates from its own command line
# (assets of the package, under target/completions/), then cargo deb on
# that same binary. Arguments go to cargo deb.
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release
bin="${CARGO_TARGET_DIR:-target}/release/cred-watch"
mkdir -p target/completions
"$bin" completions bash >target/completions/cred-watch.bash
"$bin" completions zsh >target/completions/_cred-watch
"$bin" completions fish >target/completions/cred-watch.fish
cargo deb --no-build "$@"
