#!/usr/bin/env bash
# Run a command under a hard memory limit (a memory cgroup), as on a machine with only that much memory.
# Anonymous memory above the limit gets the command killed; file-backed pages (page cache, mapped weights)
# are reclaimed, as the kernel does under memory pressure. Prints the cgroup's peak usage and how often
# the limit was hit. Needs root and a writable memory cgroup (v1 /sys/fs/cgroup/memory or v2).
# Usage: benchmarks/with_memory_limit.sh 6G command [args...]
set -euo pipefail
limit=${1:?usage: $0 LIMIT command [args...]}
shift
bytes=$(numfmt --from=iec "$limit")
name="vggt-trt-limit-$$"
if [ -w /sys/fs/cgroup/memory ]; then
    cg=/sys/fs/cgroup/memory/$name
    mkdir "$cg"
    echo "$bytes" > "$cg/memory.limit_in_bytes"
    peak_file=memory.max_usage_in_bytes
elif [ -w /sys/fs/cgroup/cgroup.subtree_control ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
    cg=/sys/fs/cgroup/$name
    mkdir "$cg"
    echo "$bytes" > "$cg/memory.max"
    peak_file=memory.peak
else
    echo "$0: no writable memory cgroup (needs root and cgroup v1 /sys/fs/cgroup/memory or v2 with the memory controller)" >&2
    exit 2
fi
cleanup() { rmdir "$cg" 2>/dev/null || true; }
trap cleanup EXIT
status=0
bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$cg" "$@" || status=$?
echo "memory limit $limit ($bytes bytes): peak cgroup usage $(cat "$cg/$peak_file") bytes" >&2
[ -f "$cg/memory.failcnt" ] && echo "limit reached $(cat "$cg/memory.failcnt") times (pages reclaimed)" >&2
[ "$status" = 137 ] && echo "the command was killed (SIGKILL): out of memory under the limit" >&2
exit $status
