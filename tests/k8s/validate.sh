#!/usr/bin/env bash
# Validates Shoal's Kubernetes manifests offline; no cluster needed (`make k8s-check`).
#
# Renders k8s/, k8s/monitoring and k8s/node-agent with `kubectl kustomize` into target/k8s/,
# validates every built-in resource strictly (unknown fields rejected) with kubernetes-validate,
# checks the ServiceMonitor's structure, holds every pod to Shoal's security and probe policy,
# checks that the node agent overlay's pieces fit together, and checks the
# Grafana dashboard's queries against the exported metric names. The checks themselves are in
# tests/k8s/check.py. Installs kubernetes-validate and PyYAML into target/k8s/venv when they are
# not already available.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# A version kubernetes-validate ships schemas for; override with K8S_VERSION=1.31.0 etc.
k8s_version="${K8S_VERSION:-1.30.0}"
out=target/k8s
venv="$out/venv"
mkdir -p "$out"

die() {
  echo "k8s-check: $*" >&2
  echo "k8s-check: 0 passed, 1 failed"
  exit 1
}

command -v kubectl >/dev/null || die "kubectl not found: it renders the kustomize trees (no cluster is contacted)"
command -v python3 >/dev/null || die "python3 not found: the checks are written in Python"

if command -v kubernetes-validate >/dev/null && python3 -c 'import yaml' 2>/dev/null; then
  kv=kubernetes-validate
  py=python3
else
  if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    echo "k8s-check: installing kubernetes-validate and PyYAML into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "could not create a venv in $venv (is python3-venv installed?)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate>=1.30' PyYAML \
      || die "pip could not install kubernetes-validate and PyYAML"
  fi
  kv="$venv/bin/kubernetes-validate"
  py="$venv/bin/python"
fi

echo "k8s-check: $("$kv" --version 2>&1 | head -n1 | sed 's/^/kubernetes-validate /'), schemas for Kubernetes $k8s_version"
exec "$py" tests/k8s/check.py --kubernetes-validate "$kv" --kubernetes-version "$k8s_version" --out "$out"
