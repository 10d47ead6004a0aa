#!/usr/bin/env bash
# Run a command that runs `kdist fleet backup` through Ray, and exit with kdist's own exit code.
#
#   cluster/exit-code.sh ray submit cluster/aws.yaml cluster/backup.py -- --address auto ...
#   cluster/exit-code.sh ray job submit --address http://127.0.0.1:8265 -- kdist fleet backup ...
#
# `ray submit` and `ray job submit` pass the command's output on but exit 1 for every failure
# (3 "some files skipped", 14 "storage unreachable" and 18 "a node failed" alike). kdist ends its
# output with the line "kdist: fleet backup exit code N"; this passes the output through and
# exits N, or the command's own status when that line never came (Ray itself failed first).
set -o pipefail
log=$(mktemp) || exit 1
trap 'rm -f "$log"' EXIT
"$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
code=$(sed -n 's/.*kdist: fleet backup exit code \([0-9][0-9]*\).*/\1/p' "$log" | tail -n 1)
exit "${code:-$status}"
