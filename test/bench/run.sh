#!/usr/bin/env bash
# make bench: every benchmark, each measuring against a baseline taken in the
# same run (these machines are noisy). Results as JSON under _out/bench/.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p _out/bench
echo "== preflight: 1 vs 20 lab nodes"
go run ./test/bench/preflight --kpfree bin/kpfree --nodes 20 --rounds 5 --out _out/bench/preflight.json
echo "== agent: ClusterIP vs direct at 1/10k/50k Services, change->map, full resync, RSS"
go run ./test/bench/agent --out _out/bench/agent.json
echo "== nodeport: NodePort (node A -> pod on node B) vs direct to the pod, at 1 and 50k Services"
go run ./test/bench/nodeport --agent bin/kpfree-agent --services 50000 --out _out/bench/nodeport.json
