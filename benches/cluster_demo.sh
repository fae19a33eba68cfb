#!/usr/bin/env bash
# The reference pipeline through a local cluster: a scheduler and two executors (the same silt
# binary, on 127.0.0.1), `silt run` through them into ./lake, the tasks each executor ran, then
# every process stopped, also on failure or Ctrl-C. Usage: cluster_demo.sh PATH/TO/silt
set -euo pipefail
SILT=${1:?usage: cluster_demo.sh PATH/TO/silt}
DIR=$(mktemp -d)
PIDS=()
stop() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap stop EXIT INT TERM
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing listens on $1" >&2; return 1; }
S=$(port)
"$SILT" scheduler --bind 127.0.0.1:"$S" 2>"$DIR/scheduler.log" & PIDS+=($!)
wait_port "$S"
for i in 1 2; do
  E=$(port); while [ "$E" -ge 65535 ]; do E=$(port); done
  mkdir -p "$DIR/e$i"
  "$SILT" executor --scheduler 127.0.0.1:"$S" --bind 127.0.0.1:"$E" --concurrent-tasks 2 \
    --work-dir "$DIR/e$i" --heartbeat-secs 2 2>"$DIR/executor$i.log" & PIDS+=($!)
  wait_port "$E"
done
sleep 3
"$SILT" --cluster df://127.0.0.1:"$S" run
"$SILT" tables
for i in 1 2; do
  echo "executor $i ran $(grep -c ': task ' "$DIR/executor$i.log" || true) tasks"
done
