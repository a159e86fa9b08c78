#!/usr/bin/env bash
# Long runs of the parser property tests (src/fuzz.rs, src/repo/codec_fuzz.rs,
# crates/walvault-wal/src/fuzz.rs): each target alone with CASES cases (default 20000; the normal
# suite runs 256-512). Prints one line per target: name, cases, seconds, result. A failure keeps
# proptest's minimal input in proptest-regressions/ beside the test file: commit it, fix the
# parser, and the normal suite replays it from then on.
#
#   bench/fuzz.sh [CASES] [filter]
set -uo pipefail
cd "$(dirname "$0")/.."
cases=${1:-20000}
filter=${2:-}
targets=(
    "walvault repo::codec_fuzz::codec_objects"
    "walvault fuzz::manifests"
    "walvault fuzz::segment_summaries"
    "walvault fuzz::object_keys"
    "walvault fuzz::fragment_chains"
    "walvault fuzz::spool_names"
    "walvault fuzz::config_files"
    "walvault fuzz::replication_messages"
    "walvault-wal fuzz::timeline_histories"
    "walvault-wal fuzz::backup_history_files"
    "walvault-wal fuzz::wal_file_names"
    "walvault-wal fuzz::page_headers"
    "walvault-wal fuzz::streamed_pages"
    "walvault-wal fuzz::wal_records"
)
cargo test -q -p walvault -p walvault-wal --lib --no-run 2>/dev/null || { echo "build failed" >&2; exit 2; }
failed=0
printf '%-22s %-40s %8s %8s %s\n' crate target cases seconds result
for t in "${targets[@]}"; do
    read -r crate name <<<"$t"
    [[ -n "$filter" && "$name" != *"$filter"* ]] && continue
    start=$(date +%s)
    if PROPTEST_CASES=$cases cargo test -q -p "$crate" --lib "$name" -- --exact >/tmp/fuzz-$$.log 2>&1; then
        result=ok
    else
        result=FAILED
        failed=1
        grep -E "minimal failing input|panicked" /tmp/fuzz-$$.log | head -3 >&2
    fi
    printf '%-22s %-40s %8s %8s %s\n' "$crate" "$name" "$cases" "$(($(date +%s) - start))" "$result"
done
rm -f /tmp/fuzz-$$.log
exit $failed
