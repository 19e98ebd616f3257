#!/usr/bin/env bash
# Fails when generated files or go.mod/go.sum are stale: regenerates them and
# checks that git sees no difference.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! git rev-parse --git-dir >/dev/null 2>&1; then
  echo "verify-generated: not a git checkout, skipping" >&2
  exit 0
fi
before=$(git status --porcelain)
go mod tidy
if [[ -d bpf ]] && grep -rqs 'go:generate' bpf; then
  go generate ./bpf/...
fi
after=$(git status --porcelain)
if [[ "$before" != "$after" ]]; then
  echo "verify: generated files or go.mod/go.sum are stale; run 'make generate' and 'go mod tidy' and commit:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  git diff --stat >&2
  exit 1
fi
echo "verify: generated files up to date"
