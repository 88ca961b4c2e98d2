#!/usr/bin/env bash
# Test harness (not product code): give a namespace "node" its own node-local storage. When NX_NODE_LOCAL names a
# directory, mount a fresh tmpfs over it in this process's mount namespace (`ip netns exec` makes one per command,
# with mounts not propagated back), so each node sees its own empty copy, as real node-local disks are; then run
# the command.
set -euo pipefail
if [[ -n "${NX_NODE_LOCAL:-}" ]]; then
  mount -t tmpfs -o size=64m,mode=0755 nxnodelocal "$NX_NODE_LOCAL"
fi
exec "$@"
