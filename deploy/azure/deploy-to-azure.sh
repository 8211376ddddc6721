#!/usr/bin/env bash
# Deploy colstream to Azure: ACR (images built in the cloud, no local Docker), AKS
# with an autoscaling system pool and a GPU pool (NVIDIA GPU Operator, KEDA add-on,
# Workload Identity, Azure network policies), Strimzi-run Kafka (strimzi/), a storage
# account whose "documents" container feeds the pipeline through Event Grid, and the
# application (k8s/overlays/aks) behind HTTPS (Gateway API, application routing add-on).
#
# Every external version is pinned in deploy/versions.env. Re-running is idempotent:
# existing resources are kept, secrets are reused and manifests are re-applied.

set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=/dev/null
source "$REPO_ROOT/deploy/versions.env"

usage() {
  cat << 'EOF_USAGE'
Usage: deploy/azure/deploy-to-azure.sh [--dry-run] [--help]

  --dry-run   print every az, helm and kubectl command that a run would make, run none
  -h, --help  print this help and exit (changes nothing)

Settings come from the environment:
  LETSENCRYPT_EMAIL   required unless SKIP_EVENTGRID=1 (Event Grid needs an https webhook)
  RESOURCE_GROUP (colstream-rg)  LOCATION (eastus)  AKS_CLUSTER_NAME (colstream-aks)
  SYSTEM_VM_SIZE (Standard_D8s_v5)  SYSTEM_MIN_NODES (3)  SYSTEM_MAX_NODES (6)
  GPU_VM_SIZE (Standard_NC4as_T4_v3)  GPU_MIN_NODES (1)  GPU_MAX_NODES (6)
  EMBEDDER_VARIANT (bf16 | int8)  IMAGE_TAG (git commit)  SKIP_EVENTGRID (0 | 1)
  ACR_NAME  STORAGE_ACCOUNT  IDENTITY_NAME  DNS_LABEL
Pinned versions (deploy/versions.env): Strimzi, Kafka, GPU Operator chart and driver,
cert-manager chart, Qdrant image.
EOF_USAGE
}

DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    *) printf 'error: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

# ----------------------------------------------------------------------------- settings
RESOURCE_GROUP="${RESOURCE_GROUP:-colstream-rg}"
LOCATION="${LOCATION:-eastus}"
AKS_CLUSTER_NAME="${AKS_CLUSTER_NAME:-colstream-aks}"
SYSTEM_VM_SIZE="${SYSTEM_VM_SIZE:-Standard_D8s_v5}"
# Sized from the request sum at full scale (docs/capacity.md): about 24 CPU for the
# CPU stages, Kafka and Qdrant at maximum replicas, more than three D8s_v5 nodes
# allocate, so the pool autoscales between 3 and 6 nodes.
SYSTEM_MIN_NODES="${SYSTEM_MIN_NODES:-3}"
SYSTEM_MAX_NODES="${SYSTEM_MAX_NODES:-6}"
GPU_VM_SIZE="${GPU_VM_SIZE:-Standard_NC4as_T4_v3}"
GPU_MIN_NODES="${GPU_MIN_NODES:-1}"
# Never above the partition count of documents.pages (6): more embedders idle.
GPU_MAX_NODES="${GPU_MAX_NODES:-6}"
EMBEDDER_VARIANT="${EMBEDDER_VARIANT:-bf16}"
# 1: also apply the templates of the model-migration Jobs (k8s/components/migration).
MIGRATION_JOBS="${MIGRATION_JOBS:-0}"
IMAGE_TAG="${IMAGE_TAG:-$(git -C "$REPO_ROOT" rev-parse --short=12 HEAD 2> /dev/null || echo dev)}"
NAMESPACE=colstream
SERVICE_ACCOUNT=colstream
DOCUMENTS_CONTAINER=documents
UPLOADS_CONTAINER=colstream-uploads
CLAIMS_CONTAINER=colstream-claims
LETSENCRYPT_EMAIL="${LETSENCRYPT_EMAIL:-}"
SKIP_EVENTGRID="${SKIP_EVENTGRID:-0}"

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Every az/helm/kubectl call goes through run (changes something) or query (reads).
# With --dry-run both print the command and run nothing; query then answers with a
# placeholder and an existence check (exists) answers "no", so every create is shown.
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }
run() {
  if [[ "$DRY_RUN" == 1 ]]; then show "$@"; return 0; fi
  "$@"
}
query() {
  if [[ "$DRY_RUN" == 1 ]]; then show "$@" >&2; echo "dry-run-value"; return 0; fi
  "$@"
}
exists() {
  if [[ "$DRY_RUN" == 1 ]]; then show "$@"; return 1; fi
  "$@" > /dev/null 2>&1
}

if [[ "$DRY_RUN" != 1 ]]; then
  for tool in az kubectl helm openssl; do
    command -v "$tool" > /dev/null || die "$tool is required"
  done
fi
if [[ "$SKIP_EVENTGRID" != "1" && -z "$LETSENCRYPT_EMAIL" ]]; then
  die "set LETSENCRYPT_EMAIL (Event Grid needs an https webhook), or SKIP_EVENTGRID=1"
fi
[[ "$EMBEDDER_VARIANT" == "bf16" || "$EMBEDDER_VARIANT" == "int8" ]] || die "EMBEDDER_VARIANT must be bf16 or int8"

WORK="$(mktemp -d)"
LAYER=""
cleanup() { rm -rf "$WORK"; [[ -z "$LAYER" ]] || rm -rf "$LAYER"; }
trap cleanup EXIT

SUBSCRIPTION_ID="$(query az account show --query id -o tsv)"
# Globally unique names, stable across re-runs for the same subscription and group.
SUFFIX="$(printf '%s/%s' "$SUBSCRIPTION_ID" "$RESOURCE_GROUP" | sha1sum | cut -c1-8)"
ACR_NAME="${ACR_NAME:-colstreamacr${SUFFIX}}"
STORAGE_ACCOUNT="${STORAGE_ACCOUNT:-colstreamdocs${SUFFIX}}"
IDENTITY_NAME="${IDENTITY_NAME:-colstream-blob-reader}"
DNS_LABEL="${DNS_LABEL:-colstream-${SUFFIX}}"
API_HOST="${DNS_LABEL}.${LOCATION}.cloudapp.azure.com"
if [[ "$SKIP_EVENTGRID" != "1" ]]; then API_URL="https://${API_HOST}"; else API_URL="http://localhost:8000"; fi

# ----------------------------------------------------------------------------- 1. group + registry + images
log "Resource group $RESOURCE_GROUP in $LOCATION"
run az group create --name "$RESOURCE_GROUP" --location "$LOCATION" --output none

log "Container registry $ACR_NAME"
if ! exists az acr show --name "$ACR_NAME" --resource-group "$RESOURCE_GROUP" --output none; then
  run az acr create --name "$ACR_NAME" --resource-group "$RESOURCE_GROUP" --sku Standard --output none
fi
ACR_LOGIN_SERVER="$(query az acr show --name "$ACR_NAME" --query loginServer -o tsv)"

image_digest() { # repository tag
  query az acr manifest show-metadata --registry "$ACR_NAME" --name "$1:$2" --query digest -o tsv
}
build_image() { # repository tag target [build-arg]
  if ! exists az acr manifest show-metadata --registry "$ACR_NAME" --name "$1:$2"; then
    run az acr build --registry "$ACR_NAME" --image "$1:$2" --target "$3" ${4:+--build-arg "$4"} \
      --file "$REPO_ROOT/Dockerfile" "$REPO_ROOT"
  fi
}
log "Images colstream:$IMAGE_TAG (CPU) and colstream-gpu:$IMAGE_TAG (CUDA) in ACR; tags are never rebuilt"
build_image colstream "$IMAGE_TAG" cpu
build_image colstream-gpu "$IMAGE_TAG" gpu
if [[ "$EMBEDDER_VARIANT" == "int8" ]]; then
  build_image colstream-gpu "${IMAGE_TAG}-int8" gpu EXTRA_PIP_PACKAGES=bitsandbytes
fi
# Qdrant comes from the registry too, imported once, so it is pinned by digest like ours.
if ! exists az acr manifest show-metadata --registry "$ACR_NAME" --name "qdrant:$QDRANT_IMAGE_TAG"; then
  run az acr import --name "$ACR_NAME" --source "docker.io/qdrant/qdrant:$QDRANT_IMAGE_TAG" --image "qdrant:$QDRANT_IMAGE_TAG"
fi
CPU_DIGEST="$(image_digest colstream "$IMAGE_TAG")"
GPU_TAG="$IMAGE_TAG"; [[ "$EMBEDDER_VARIANT" == "int8" ]] && GPU_TAG="${IMAGE_TAG}-int8"
GPU_DIGEST="$(image_digest colstream-gpu "$GPU_TAG")"
QDRANT_DIGEST="$(image_digest qdrant "$QDRANT_IMAGE_TAG")"

# ----------------------------------------------------------------------------- 2. AKS
log "AKS cluster $AKS_CLUSTER_NAME (autoscaling system pool, network policies, Workload Identity, KEDA, Gateway API)"
if ! exists az aks show --name "$AKS_CLUSTER_NAME" --resource-group "$RESOURCE_GROUP" --output none; then
  run az aks create \
    --resource-group "$RESOURCE_GROUP" --name "$AKS_CLUSTER_NAME" --location "$LOCATION" \
    --nodepool-name system --node-vm-size "$SYSTEM_VM_SIZE" \
    --enable-cluster-autoscaler --node-count "$SYSTEM_MIN_NODES" \
    --min-count "$SYSTEM_MIN_NODES" --max-count "$SYSTEM_MAX_NODES" \
    --network-plugin azure --network-policy azure \
    --enable-managed-identity --enable-oidc-issuer --enable-workload-identity --enable-keda \
    --attach-acr "$ACR_NAME" --generate-ssh-keys --output none
fi

log "GPU node pool ($GPU_VM_SIZE, tainted sku=gpu:NoSchedule, driver from the GPU Operator)"
if ! exists az aks nodepool show --cluster-name "$AKS_CLUSTER_NAME" --resource-group "$RESOURCE_GROUP" --name gpu --output none; then
  run az aks nodepool add \
    --resource-group "$RESOURCE_GROUP" --cluster-name "$AKS_CLUSTER_NAME" --name gpu \
    --node-vm-size "$GPU_VM_SIZE" --node-taints sku=gpu:NoSchedule --labels workload=embedder \
    --gpu-driver none --enable-cluster-autoscaler --node-count "$GPU_MIN_NODES" \
    --min-count "$GPU_MIN_NODES" --max-count "$GPU_MAX_NODES" --output none
fi

run az aks get-credentials --resource-group "$RESOURCE_GROUP" --name "$AKS_CLUSTER_NAME" --overwrite-existing
OIDC_ISSUER="$(query az aks show --name "$AKS_CLUSTER_NAME" --resource-group "$RESOURCE_GROUP" --query oidcIssuerProfile.issuerUrl -o tsv)"

if [[ "$SKIP_EVENTGRID" != "1" ]] && ! exists kubectl get gatewayclass approuting-istio; then
  log "Application routing add-on with the Gateway API implementation"
  run az aks update --resource-group "$RESOURCE_GROUP" --name "$AKS_CLUSTER_NAME" \
    --enable-gateway-api --enable-app-routing-istio --output none
fi

log "NVIDIA GPU Operator $GPU_OPERATOR_CHART_VERSION, driver $NVIDIA_DRIVER_VERSION"
GPU_VALUES="$WORK/gpu-values.yaml"
# The operator's daemonsets must tolerate the pool's own taint, not only nvidia.com/gpu.
cat > "$GPU_VALUES" << YAML
driver:
  version: "${NVIDIA_DRIVER_VERSION}"
daemonsets:
  tolerations:
    - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
    - {key: sku, operator: Equal, value: gpu, effect: NoSchedule}
node-feature-discovery:
  worker:
    tolerations:
      - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
      - {key: sku, operator: Equal, value: gpu, effect: NoSchedule}
YAML
run helm upgrade --install gpu-operator gpu-operator --repo https://helm.ngc.nvidia.com/nvidia \
  --version "$GPU_OPERATOR_CHART_VERSION" --namespace gpu-operator --create-namespace \
  --values "$GPU_VALUES" --wait --timeout 15m

# ----------------------------------------------------------------------------- 3. storage + identity
log "Storage account $STORAGE_ACCOUNT with containers $DOCUMENTS_CONTAINER, $UPLOADS_CONTAINER, $CLAIMS_CONTAINER"
if ! exists az storage account show --name "$STORAGE_ACCOUNT" --resource-group "$RESOURCE_GROUP" --output none; then
  run az storage account create --name "$STORAGE_ACCOUNT" --resource-group "$RESOURCE_GROUP" \
    --location "$LOCATION" --sku Standard_LRS --kind StorageV2 --min-tls-version TLS1_2 \
    --allow-blob-public-access false --output none
fi
STORAGE_ID="$(query az storage account show --name "$STORAGE_ACCOUNT" --resource-group "$RESOURCE_GROUP" --query id -o tsv)"
for container in "$DOCUMENTS_CONTAINER" "$UPLOADS_CONTAINER" "$CLAIMS_CONTAINER"; do
  if ! exists az storage container-rm show --storage-account "$STORAGE_ACCOUNT" --resource-group "$RESOURCE_GROUP" --name "$container"; then
    run az storage container-rm create --storage-account "$STORAGE_ACCOUNT" --resource-group "$RESOURCE_GROUP" \
      --name "$container" --output none
  fi
done
# Claim checks are only needed while documents.pages holds the page (7 days).
POLICY_FILE="$WORK/lifecycle.json"
cat > "$POLICY_FILE" << JSON
{"rules": [{"enabled": true, "name": "expire-claim-checks", "type": "Lifecycle",
  "definition": {"actions": {"baseBlob": {"delete": {"daysAfterModificationGreaterThan": 8}}},
                 "filters": {"blobTypes": ["blockBlob"], "prefixMatch": ["${CLAIMS_CONTAINER}/"]}}}]}
JSON
run az storage account management-policy create --account-name "$STORAGE_ACCOUNT" \
  --resource-group "$RESOURCE_GROUP" --policy "@$POLICY_FILE" --output none

log "Managed identity $IDENTITY_NAME, federated with $NAMESPACE/$SERVICE_ACCOUNT"
if ! exists az identity show --name "$IDENTITY_NAME" --resource-group "$RESOURCE_GROUP" --output none; then
  run az identity create --name "$IDENTITY_NAME" --resource-group "$RESOURCE_GROUP" --location "$LOCATION" --output none
fi
IDENTITY_CLIENT_ID="$(query az identity show --name "$IDENTITY_NAME" --resource-group "$RESOURCE_GROUP" --query clientId -o tsv)"
IDENTITY_PRINCIPAL_ID="$(query az identity show --name "$IDENTITY_NAME" --resource-group "$RESOURCE_GROUP" --query principalId -o tsv)"
assign_role() { # role scope
  if [[ -z "$(query az role assignment list --assignee "$IDENTITY_PRINCIPAL_ID" --role "$1" --scope "$2" --query '[0].id' -o tsv)" ||
        "$DRY_RUN" == 1 ]]; then
    run az role assignment create --assignee-object-id "$IDENTITY_PRINCIPAL_ID" --assignee-principal-type ServicePrincipal \
      --role "$1" --scope "$2" --output none
  fi
}
assign_role "Storage Blob Data Reader" "$STORAGE_ID"
assign_role "Storage Blob Data Contributor" "$STORAGE_ID/blobServices/default/containers/$UPLOADS_CONTAINER"
assign_role "Storage Blob Data Contributor" "$STORAGE_ID/blobServices/default/containers/$CLAIMS_CONTAINER"
if ! exists az identity federated-credential show --name colstream-k8s --identity-name "$IDENTITY_NAME" \
    --resource-group "$RESOURCE_GROUP" --output none; then
  run az identity federated-credential create --name colstream-k8s --identity-name "$IDENTITY_NAME" \
    --resource-group "$RESOURCE_GROUP" --issuer "$OIDC_ISSUER" \
    --subject "system:serviceaccount:${NAMESPACE}:${SERVICE_ACCOUNT}" \
    --audiences api://AzureADTokenExchange --output none
fi

# ----------------------------------------------------------------------------- 4. Kafka (Strimzi)
log "Strimzi $STRIMZI_VERSION operator (Pod Security restricted) watching namespace $NAMESPACE"
run kubectl apply -f "$REPO_ROOT/strimzi/namespace.yaml"
run helm upgrade --install strimzi oci://quay.io/strimzi-helm/strimzi-kafka-operator \
  --version "$STRIMZI_VERSION" --namespace strimzi --create-namespace \
  --set "watchNamespaces={$NAMESPACE}" \
  --set "extraEnvs[0].name=STRIMZI_POD_SECURITY_PROVIDER_CLASS" --set "extraEnvs[0].value=restricted" \
  --wait --timeout 10m
log "Kafka $KAFKA_VERSION cluster, topics and users (strimzi/)"
run kubectl apply -k "$REPO_ROOT/strimzi"
run kubectl -n "$NAMESPACE" wait kafka/colstream --for=condition=Ready --timeout=20m
run kubectl -n "$NAMESPACE" wait kafkauser --all --for=condition=Ready --timeout=5m
run kubectl -n "$NAMESPACE" wait kafkatopic --all --for=condition=Ready --timeout=5m

# ----------------------------------------------------------------------------- 5. secrets
log "Secrets colstream-secrets and colstream-api-keys (generated once, kept across re-runs)"
existing_secret() { # secret key
  query kubectl -n "$NAMESPACE" get secret "$1" -o "jsonpath={.data.$2}" 2> /dev/null | base64 -d 2> /dev/null || true
}
QDRANT_API_KEY="$(existing_secret colstream-secrets QDRANT_API_KEY)"
EVENTGRID_SECRET="$(existing_secret colstream-secrets COLSTREAM_EVENTGRID__SHARED_SECRET)"
API_KEYS_JSON="$(existing_secret colstream-api-keys keys\\.json)"
[[ -n "$QDRANT_API_KEY" ]] || QDRANT_API_KEY="$(openssl rand -hex 24)"
[[ -n "$EVENTGRID_SECRET" ]] || EVENTGRID_SECRET="$(openssl rand -hex 24)"
if [[ -z "$API_KEYS_JSON" ]]; then
  API_KEYS_JSON="[{\"name\": \"operator\", \"key\": \"$(openssl rand -hex 32)\", \"scopes\": [\"read\", \"write\", \"delete\", \"admin\"]}]"
fi
printf '%s' "$API_KEYS_JSON" > "$WORK/keys.json"
run kubectl -n "$NAMESPACE" create secret generic colstream-secrets \
  --from-literal=QDRANT_API_KEY="$QDRANT_API_KEY" \
  --from-literal=COLSTREAM_EVENTGRID__SHARED_SECRET="$EVENTGRID_SECRET" \
  --dry-run=client -o yaml > "$WORK/secrets.yaml"
run kubectl -n "$NAMESPACE" create secret generic colstream-api-keys --from-file=keys.json="$WORK/keys.json" \
  --dry-run=client -o yaml > "$WORK/api-keys.yaml"
run kubectl apply -f "$WORK/secrets.yaml" -f "$WORK/api-keys.yaml"

# ----------------------------------------------------------------------------- 6. TLS
if [[ "$SKIP_EVENTGRID" != "1" ]]; then
  log "cert-manager $CERT_MANAGER_CHART_VERSION (Gateway API support) and a Let's Encrypt issuer"
  run helm upgrade --install cert-manager cert-manager --repo https://charts.jetstack.io \
    --version "$CERT_MANAGER_CHART_VERSION" --namespace cert-manager --create-namespace \
    --set crds.enabled=true --set config.enableGatewayAPI=true --wait --timeout 10m
  cat > "$WORK/issuer.yaml" << YAML
apiVersion: cert-manager.io/v1
kind: ClusterIssuer
metadata:
  name: letsencrypt
spec:
  acme:
    server: https://acme-v02.api.letsencrypt.org/directory
    email: ${LETSENCRYPT_EMAIL}
    privateKeySecretRef:
      name: letsencrypt-account-key
    solvers:
      - http01:
          gatewayHTTPRoute:
            parentRefs:
              - {name: colstream, namespace: ${NAMESPACE}, kind: Gateway, sectionName: http}
YAML
  run kubectl apply -f "$WORK/issuer.yaml"
fi

# ----------------------------------------------------------------------------- 7. application
log "colstream (k8s/overlays/aks, embedder $EMBEDDER_VARIANT, images pinned by tag and digest)"
# Environment-specific values go into a throw-away kustomization layered on the
# committed overlay; kustomize only accepts relative paths, so it sits next to it.
LAYER="$REPO_ROOT/k8s/overlays/.deploy-$$"
mkdir -p "$LAYER"
{
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../aks\n'
  if [[ "$EMBEDDER_VARIANT" == "int8" || "$MIGRATION_JOBS" == "1" ]]; then printf 'components:\n'; fi
  if [[ "$EMBEDDER_VARIANT" == "int8" ]]; then printf '  - ../../components/int8\n'; fi
  # The migration Jobs' templates (docs/operations.md), with MIGRATION_JOBS=1.
  if [[ "$MIGRATION_JOBS" == "1" ]]; then printf '  - ../../components/migration\n'; fi
  cat << YAML
images:
  - {name: colstream, newName: ${ACR_LOGIN_SERVER}/colstream, newTag: "${IMAGE_TAG}", digest: "${CPU_DIGEST}"}
  - {name: colstream-gpu, newName: ${ACR_LOGIN_SERVER}/colstream-gpu, newTag: "${GPU_TAG}", digest: "${GPU_DIGEST}"}
  - {name: colstream-int8, newName: ${ACR_LOGIN_SERVER}/colstream-gpu, newTag: "${GPU_TAG}", digest: "${GPU_DIGEST}"}
  - {name: qdrant/qdrant, newName: ${ACR_LOGIN_SERVER}/qdrant, newTag: "${QDRANT_IMAGE_TAG}", digest: "${QDRANT_DIGEST}"}
configMapGenerator:
  - name: colstream-config
    behavior: merge
    literals:
      - COLSTREAM_BLOB__AZURE_ACCOUNTS=["${STORAGE_ACCOUNT}"]
      - COLSTREAM_BLOB__AZURE_UPLOAD_ACCOUNT=${STORAGE_ACCOUNT}
      - COLSTREAM_API__PUBLIC_URL=${API_URL}
patches:
  - target: {kind: ServiceAccount, name: ${SERVICE_ACCOUNT}}
    patch: |-
      - {op: replace, path: /metadata/annotations/azure.workload.identity~1client-id, value: "${IDENTITY_CLIENT_ID}"}
  - target: {kind: Gateway, name: colstream}
    patch: |-
      - {op: replace, path: /spec/listeners/0/hostname, value: "${API_HOST}"}
      - {op: replace, path: /spec/listeners/1/hostname, value: "${API_HOST}"}
      - {op: replace, path: /spec/infrastructure/annotations/service.beta.kubernetes.io~1azure-dns-label-name, value: "${DNS_LABEL}"}
  - target: {kind: HTTPRoute, name: colstream-api}
    patch: |-
      - {op: replace, path: /spec/hostnames/0, value: "${API_HOST}"}
YAML
  if [[ "$SKIP_EVENTGRID" == "1" ]]; then
    # shellcheck disable=SC2016  # $patch is kustomize syntax, not a shell variable
    printf '  - target: {kind: Gateway, name: colstream}\n    patch: |-\n      $patch: delete\n      apiVersion: gateway.networking.k8s.io/v1\n      kind: Gateway\n      metadata: {name: colstream}\n'
    # shellcheck disable=SC2016
    printf '  - target: {kind: HTTPRoute, name: colstream-api}\n    patch: |-\n      $patch: delete\n      apiVersion: gateway.networking.k8s.io/v1\n      kind: HTTPRoute\n      metadata: {name: colstream-api}\n'
  fi
} > "$LAYER/kustomization.yaml"
# A Job's pod template is immutable: remove the finished topics Job so the apply
# recreates it with the new image instead of failing.
run kubectl -n "$NAMESPACE" delete job colstream-topics --ignore-not-found --wait=true
run kubectl apply --server-side --force-conflicts -k "$LAYER"
run kubectl -n "$NAMESPACE" wait job/colstream-topics --for=condition=Complete --timeout=10m
for deployment in colstream-api colstream-splitter colstream-sink colstream-webhooks colstream-embedder; do
  # The embedder's first start downloads the model weights into the shared cache.
  run kubectl -n "$NAMESPACE" rollout status "deployment/$deployment" --timeout=30m
done

# ----------------------------------------------------------------------------- 8. Event Grid
if [[ "$SKIP_EVENTGRID" != "1" ]]; then
  log "Waiting for the TLS certificate of $API_HOST"
  run kubectl -n "$NAMESPACE" wait certificate/colstream-api-tls --for=condition=Ready --timeout=10m
  log "Event Grid: BlobCreated/BlobDeleted in '$DOCUMENTS_CONTAINER' -> https://$API_HOST/eventgrid"
  SYSTEM_TOPIC="${STORAGE_ACCOUNT}-events"
  if ! exists az eventgrid system-topic show --name "$SYSTEM_TOPIC" --resource-group "$RESOURCE_GROUP" --output none; then
    run az eventgrid system-topic create --name "$SYSTEM_TOPIC" --resource-group "$RESOURCE_GROUP" \
      --location "$LOCATION" --topic-type Microsoft.Storage.StorageAccounts --source "$STORAGE_ID" --output none
  fi
  # Only the drop container: API uploads land in $UPLOADS_CONTAINER and are already published.
  if ! exists az eventgrid system-topic event-subscription show --name colstream-documents \
      --resource-group "$RESOURCE_GROUP" --system-topic-name "$SYSTEM_TOPIC"; then
    run az eventgrid system-topic event-subscription create --name colstream-documents \
      --resource-group "$RESOURCE_GROUP" --system-topic-name "$SYSTEM_TOPIC" --endpoint-type webhook \
      --endpoint "https://${API_HOST}/eventgrid?key=${EVENTGRID_SECRET}" \
      --included-event-types Microsoft.Storage.BlobCreated Microsoft.Storage.BlobDeleted \
      --subject-begins-with "/blobServices/default/containers/${DOCUMENTS_CONTAINER}/" \
      --max-delivery-attempts 30 --event-ttl 1440 --output none
  fi
fi

log "Done"
cat << EOF_SUMMARY
API:              $API_URL   (API key: kubectl -n $NAMESPACE get secret colstream-api-keys -o jsonpath='{.data.keys\.json}' | base64 -d)
Health:           curl $API_URL/health
Consumer lag:     kubectl -n $NAMESPACE get scaledobject,hpa
Rollback:         IMAGE_TAG=<previous tag> deploy/azure/deploy-to-azure.sh   (see docs/deploy.md)
Tear down:        az group delete --name $RESOURCE_GROUP --yes --no-wait
EOF_SUMMARY
