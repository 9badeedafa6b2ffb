#!/usr/bin/env bash
# render-manifests.sh: renders deploy/kubernetes/ from the Helm chart deploy/helm/npd (one
# source of truth): `helm template npd deploy/helm/npd --namespace kube-system` with the
# chart's default values, one file per template (rbac.yaml, configmap.yaml, daemonset.yaml,
# service.yaml). Run it after changing the chart or config/*.json; a test
# (tests/tests/chart.rs) fails while the committed files differ from a fresh rendering.
#
# Usage:
#   deploy/helm/render-manifests.sh           first copies config/*.json (the default rules the
#                                             agent embeds) into the chart's files/rules/, then
#                                             writes deploy/kubernetes/
#   deploy/helm/render-manifests.sh OUT_DIR   renders into OUT_DIR only, changing nothing else
#
# helm: $HELM, else the pinned helm that deploy/helm/install-helm.sh installs into the cache.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
chart=$root/deploy/helm/npd
HEADER="# Generated from the Helm chart deploy/helm/npd by deploy/helm/render-manifests.sh: do not edit by hand."

if (($# == 0)); then
    out=$root/deploy/kubernetes
    rm -f -- "$chart"/files/rules/*.json
    cp -- "$root"/config/*.json "$chart/files/rules/"
elif (($# == 1)); then
    out=$1
else
    sed -n '/^# Usage:/,/^#$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
helm=${HELM:-$("$root/deploy/helm/install-helm.sh")}

tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
"$helm" template npd "$chart" --namespace kube-system --output-dir "$tmp" >/dev/null
mkdir -p -- "$out"
# Files rendered before and no longer produced by the chart go.
for f in "$out"/*.yaml; do
    [[ -f $f ]] && head -n 1 -- "$f" | grep -qxF "$HEADER" && rm -f -- "$f"
done
for f in "$tmp"/npd/templates/*.yaml; do
    { echo "$HEADER"; cat -- "$f"; } >"$out/$(basename "$f")"
done
echo "rendered $(cd "$tmp/npd/templates" && ls | tr '\n' ' ')into $out" >&2
