#!/usr/bin/env bash
# A profile-guided (PGO) release build of scp-gateway, in target/pgo/release/scp-gateway.
#
# 1. builds the gateway instrumented (target/pgo-gen),
# 2. trains it: the load bench's gateway rows, one short round each (bare route, full
#    policy chain, fleet mode with Redis, 1,000 APIs, tracing; 1 and 2 workers), each
#    gateway writing its profile when it exits,
# 3. merges the profiles and builds again with them (target/pgo).
#
# Needs what the load bench needs (wrk, curl, taskset; redis-server for the fleet rows)
# and llvm-profdata of the toolchain's LLVM: `rustup component add llvm-tools`.
# PGO_SECONDS sets the seconds per training row (default 4). About 10 minutes on 2 cores.
#
# Measure the result with `LOAD_GATEWAY=target/pgo/release/scp-gateway cargo bench --bench
# load`: the floor row stays a plain release build, so compare the PGO gateway with the
# plain one in the same way, not with the floor (README, "Benchmarks").
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

profdata=$(find "$(rustc --print sysroot)" -name llvm-profdata -type f 2>/dev/null | head -1)
if [ -z "$profdata" ]; then
    echo "pgo: llvm-profdata not found in the toolchain: rustup component add llvm-tools" >&2
    exit 1
fi
work=$root/target/pgo-profiles
rm -rf "$work"
mkdir -p "$work/raw"

echo "pgo: 1/3 instrumented build (target/pgo-gen)"
RUSTFLAGS="-Cprofile-generate=$work/raw" \
    cargo build --release --bin scp-gateway --target-dir "$root/target/pgo-gen"

echo "pgo: 2/3 training with the load bench's gateway rows"
LOAD_GATEWAY=$root/target/pgo-gen/release/scp-gateway \
    LOAD_ROWS=gateway LOAD_ROUNDS=1 LOAD_SECONDS=${PGO_SECONDS:-4} \
    LOAD_IDLE=0 LOAD_CALLGRIND=0 \
    cargo bench --bench load
if ! compgen -G "$work/raw/*.profraw" > /dev/null; then
    echo "pgo: the training wrote no profile (did the gateways start?)" >&2
    exit 1
fi
"$profdata" merge -o "$work/merged.profdata" "$work/raw"

echo "pgo: 3/3 build with the profile (target/pgo)"
RUSTFLAGS="-Cprofile-use=$work/merged.profdata" \
    cargo build --release --bin scp-gateway --target-dir "$root/target/pgo"
echo "pgo: built $root/target/pgo/release/scp-gateway"
