#!/usr/bin/env bash
# `make alerts`: the alert rules are valid, do what their unit tests say, and the compose rules
# file (docker/alerts.yml) and the Kubernetes PrometheusRule hold the same groups; the compose
# Prometheus configuration that loads the rules is valid too.
#
# promtool comes from Debian's `prometheus` package. Without it the promtool checks are skipped
# with a warning on a workstation, and fail in CI (CI set), where a skipped check is a hole.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

plain=docker/alerts.yml
operator=k8s/monitoring/prometheusrule.yaml

# The PrometheusRule's spec, one indentation level out, must be the plain file from `groups:` on.
if ! diff -u --label "$plain" --label "$operator (spec, unindented)" \
    <(sed -n '/^groups:/,$p' "$plain") \
    <(sed -n '/^spec:/,$p' "$operator" | tail -n +2 | sed 's/^  //'); then
    echo "alerts: $operator differs from $plain; copy the groups over, indented under spec:" >&2
    exit 1
fi
echo "alerts: $operator holds the same groups as $plain"

if ! command -v promtool >/dev/null; then
    if [[ -n "${CI:-}" ]]; then
        echo "alerts: promtool is required in CI: apt-get install prometheus" >&2
        exit 1
    fi
    echo "alerts: WARNING promtool not installed (apt-get install prometheus): rules not checked" >&2
    exit 0
fi
promtool check config docker/prometheus.yml
promtool test rules tests/alerts/rules_test.yml
