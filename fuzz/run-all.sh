#!/bin/bash
# Runs the given targets in parallel for $SECS seconds each; logs to /tmp/fuzz-<target>.log
cd "$(dirname "$0")"
for t in "$@"; do
  RUSTC_BOOTSTRAP=1 cargo fuzz run -O $t corpus/$t -- -max_total_time=${SECS:-620} -rss_limit_mb=2048 -print_final_stats=1 > /tmp/fuzz-$t.log 2>&1 &
done
wait
