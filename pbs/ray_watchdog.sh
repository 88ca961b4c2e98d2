#!/usr/bin/env bash
# ray_watchdog.sh AGENT_PID CMD...: run CMD (a node's `ray start --block`) and SIGKILL this whole process group
# (CMD and everything it started that stayed in the group) as soon as AGENT_PID is gone. ray_cluster.sh's node
# agent starts it with setsid, so the group is the Ray node's: an agent SIGKILLed before its cleanup ran (at the
# head's teardown deadline; CI, session 20) no longer leaves a Ray node behind it. Exits with CMD's status when
# CMD ends by itself; the agent's cleanup signals the same group, this watchdog included.
agent=$1
shift
"$@" &
cmd=$!
while kill -0 "$cmd" 2>/dev/null; do
  kill -0 "$agent" 2>/dev/null || kill -KILL 0
  sleep 0.5
done
wait "$cmd"
