#!/usr/bin/env bash
# Run a command that runs `kdist fleet backup` through Ray, and exit with kdist's own exit code.
#
#   cluster/exit-code.sh ray submit cluster/aws.yaml cluster/backup.py -- --address auto ...
#   cluster/exit-code.sh ray job submit --address http://127.0.0.1:8265 -- kdist fleet backup ...
#
# `ray submit` and `ray job submit` pass the command's output on but exit 1 for every failure
# (3 "some files skipped", 14 "storage unreachable" and 18 "a node failed" alike), and 0 for a job
# that was stopped. kdist ends its output with the line "kdist: fleet backup exit code N"; this
# passes the output through and exits N. When no such line came (the job was stopped or killed,
# or Ray failed first) it exits with the command's own status, or 1 if that was 0: a backup that
# never said how it ended did not succeed. Only a whole line counts: a name inside one of kdist's
# lines (names are escaped, so none can break a line) never ends with the bare code.
set -o pipefail
log=$(mktemp) || exit 1
trap 'rm -f "$log"' EXIT
"$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
code=$(LC_ALL=C sed -n 's/^kdist: fleet backup exit code \([0-9]\{1,3\}\)\r\{0,1\}$/\1/p' "$log" | tail -n 1)
if [ -z "$code" ]; then
    echo "exit-code.sh: kdist never reported how the backup ended (stopped or killed?)" >&2
    [ "$status" -eq 0 ] && exit 1
    exit "$status"
fi
exit "$code"
