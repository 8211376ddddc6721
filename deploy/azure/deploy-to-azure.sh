#!/usr/bin/env bash
# Deploy colstream to Azure: ACR (image built in the cloud, no local Docker),
# AKS with a system pool and a GPU pool (NVIDIA GPU Operator, KEDA add-on,
# Workload Identity), Strimzi-run Kafka (strimzi/), a storage account whose
# "documents" container feeds the pipeline through Event Grid, and the
# application (k8s/overlays/aks) behind HTTPS.
#
# Usage:  LETSENCRYPT_EMAIL=you@example.com deploy/azure/deploy-to-azure.sh
# Every setting below can be overridden from the environment. Re-running the
# script is safe: existing resources are kept and manifests are re-applied.
#
# Needs: az (>= 2.72.2 for --gpu-driver), kubectl, helm, openssl, git.

set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# ----------------------------------------------------------------------------- settings
RESOURCE_GROUP="${RESOURCE_GROUP:-colstream-rg}"
LOCATION="${LOCATION:-eastus}"
AKS_CLUSTER_NAME="${AKS_CLUSTER_NAME:-colstream-aks}"
SYSTEM_VM_SIZE="${SYSTEM_VM_SIZE:-Standard_D8s_v5}"
# Kafka (3 controllers + 3 brokers), Qdrant, splitter, sink and api share these.
SYSTEM_NODE_COUNT="${SYSTEM_NODE_COUNT:-3}"
# One GPU per embedder pod. T4 (16 GB) runs ColQwen2 in fp16 or INT8; for more
# pages per second use Standard_NC24ads_A100_v4 or Standard_NC40ads_H100_v5.
GPU_VM_SIZE="${GPU_VM_SIZE:-Standard_NC4as_T4_v3}"
GPU_MIN_NODES="${GPU_MIN_NODES:-1}"
# Never above the partition count of documents.pages (6): more embedders idle.
GPU_MAX_NODES="${GPU_MAX_NODES:-6}"
# bf16 (default) or int8 (bitsandbytes; see k8s/components/int8).
EMBEDDER_VARIANT="${EMBEDDER_VARIANT:-bf16}"
IMAGE_TAG="${IMAGE_TAG:-$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || date +%Y%m%d%H%M%S)}"
STRIMZI_VERSION="${STRIMZI_VERSION:-0.48.0}"
NAMESPACE=colstream
SERVICE_ACCOUNT=colstream
DOCUMENTS_CONTAINER=documents
UPLOADS_CONTAINER=colstream-uploads
CLAIMS_CONTAINER=colstream-claims
LETSENCRYPT_EMAIL="${LETSENCRYPT_EMAIL:-}"
# 1 = no public ingress and no Event Grid (then LETSENCRYPT_EMAIL is not needed).
SKIP_EVENTGRID="${SKIP_EVENTGRID:-0}"

log() { printf '\n\033[1;34m==> %s\033[0m\n' "$*"; }
die() { printf '\033[1;31merror: %s\033[0m\n' "$*" >&2; exit 1; }

for tool in az kubectl helm openssl; do
  command -v "$tool" > /dev/null || die "$tool is required"
done
if [[ "$SKIP_EVENTGRID" != "1" && -z "$LETSENCRYPT_EMAIL" ]]; then
  die "set LETSENCRYPT_EMAIL (Event Grid needs an https webhook), or SKIP_EVENTGRID=1"
fi
[[ "$EMBEDDER_VARIANT" == "bf16" || "$EMBEDDER_VARIANT" == "int8" ]] || die "EMBEDDER_VARIANT must be bf16 or int8"

SUBSCRIPTION_ID="$(az account show --query id -o tsv)"
# Globally unique names, stable across re-runs for the same subscription and group.
SUFFIX="$(printf '%s/%s' "$SUBSCRIPTION_ID" "$RESOURCE_GROUP" | sha1sum | cut -c1-8)"
ACR_NAME="${ACR_NAME:-colstreamacr${SUFFIX}}"
STORAGE_ACCOUNT="${STORAGE_ACCOUNT:-colstreamdocs${SUFFIX}}"
IDENTITY_NAME="${IDENTITY_NAME:-colstream-blob-reader}"
DNS_LABEL="${DNS_LABEL:-colstream-${SUFFIX}}"
API_HOST="${DNS_LABEL}.${LOCATION}.cloudapp.azure.com"
if [[ "$SKIP_EVENTGRID" != "1" ]]; then
  API_URL="https://${API_HOST}"
else
  API_URL="http://localhost:8000"
fi

# ----------------------------------------------------------------------------- 1. group + registry
log "Resource group $RESOURCE_GROUP in $LOCATION"
az group create --name "$RESOURCE_GROUP" --location "$LOCATION" --output none

log "Container registry $ACR_NAME"
if ! az acr show --name "$ACR_NAME" --resource-group "$RESOURCE_GROUP" --output none 2> /dev/null; then
  az acr create --name "$ACR_NAME" --resource-group "$RESOURCE_GROUP" --sku Standard --output none
fi
ACR_LOGIN_SERVER="$(az acr show --name "$ACR_NAME" --query loginServer -o tsv)"

log "Building colstream:$IMAGE_TAG in ACR (takes a while: torch with CUDA is several GB)"
az acr build --registry "$ACR_NAME" --image "colstream:${IMAGE_TAG}" --file "$REPO_ROOT/Dockerfile" "$REPO_ROOT"
if [[ "$EMBEDDER_VARIANT" == "int8" ]]; then
  az acr build --registry "$ACR_NAME" --image "colstream:${IMAGE_TAG}-int8" \
    --build-arg EXTRA_PIP_PACKAGES=bitsandbytes --file "$REPO_ROOT/Dockerfile" "$REPO_ROOT"
fi

# ----------------------------------------------------------------------------- 2. AKS
log "AKS cluster $AKS_CLUSTER_NAME (OIDC issuer, Workload Identity, KEDA add-on)"
if ! az aks show --name "$AKS_CLUSTER_NAME" --resource-group "$RESOURCE_GROUP" --output none 2> /dev/null; then
  az aks create \
    --resource-group "$RESOURCE_GROUP" \
    --name "$AKS_CLUSTER_NAME" \
    --location "$LOCATION" \
    --nodepool-name system \
    --node-count "$SYSTEM_NODE_COUNT" \
    --node-vm-size "$SYSTEM_VM_SIZE" \
    --enable-managed-identity \
    --enable-oidc-issuer \
    --enable-workload-identity \
    --enable-keda \
    --attach-acr "$ACR_NAME" \
    --generate-ssh-keys \
    --output none
fi

log "GPU node pool ($GPU_VM_SIZE, tainted sku=gpu:NoSchedule, driver left to the GPU Operator)"
if ! az aks nodepool show --cluster-name "$AKS_CLUSTER_NAME" --resource-group "$RESOURCE_GROUP" --name gpu --output none 2> /dev/null; then
  az aks nodepool add \
    --resource-group "$RESOURCE_GROUP" \
    --cluster-name "$AKS_CLUSTER_NAME" \
    --name gpu \
    --node-vm-size "$GPU_VM_SIZE" \
    --node-taints sku=gpu:NoSchedule \
    --labels workload=embedder \
    --gpu-driver none \
    --enable-cluster-autoscaler \
    --node-count "$GPU_MIN_NODES" \
    --min-count "$GPU_MIN_NODES" \
    --max-count "$GPU_MAX_NODES" \
    --output none
fi

az aks get-credentials --resource-group "$RESOURCE_GROUP" --name "$AKS_CLUSTER_NAME" --overwrite-existing
OIDC_ISSUER="$(az aks show --name "$AKS_CLUSTER_NAME" --resource-group "$RESOURCE_GROUP" --query oidcIssuerProfile.issuerUrl -o tsv)"

log "NVIDIA GPU Operator"
helm repo add nvidia https://helm.ngc.nvidia.com/nvidia --force-update > /dev/null
helm repo update nvidia > /dev/null
GPU_VALUES="$(mktemp)"
trap 'rm -f "$GPU_VALUES"' EXIT
# The operator's daemonsets must tolerate the pool's own taint, not only nvidia.com/gpu.
cat > "$GPU_VALUES" << 'YAML'
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
helm upgrade --install gpu-operator nvidia/gpu-operator \
  --namespace gpu-operator --create-namespace \
  --values "$GPU_VALUES" --wait --timeout 15m

# ----------------------------------------------------------------------------- 3. storage + identity
log "Storage account $STORAGE_ACCOUNT with containers $DOCUMENTS_CONTAINER, $UPLOADS_CONTAINER, $CLAIMS_CONTAINER"
if ! az storage account show --name "$STORAGE_ACCOUNT" --resource-group "$RESOURCE_GROUP" --output none 2> /dev/null; then
  az storage account create \
    --name "$STORAGE_ACCOUNT" \
    --resource-group "$RESOURCE_GROUP" \
    --location "$LOCATION" \
    --sku Standard_LRS \
    --kind StorageV2 \
    --min-tls-version TLS1_2 \
    --allow-blob-public-access false \
    --output none
fi
STORAGE_ID="$(az storage account show --name "$STORAGE_ACCOUNT" --resource-group "$RESOURCE_GROUP" --query id -o tsv)"
for container in "$DOCUMENTS_CONTAINER" "$UPLOADS_CONTAINER" "$CLAIMS_CONTAINER"; do
  # container-rm goes through ARM, so no data-plane role is needed to run this script.
  az storage container-rm create --storage-account "$STORAGE_ACCOUNT" --resource-group "$RESOURCE_GROUP" \
    --name "$container" --output none 2> /dev/null || true
done
# Claim checks (page images too big for a Kafka record) are only needed while
# documents.pages still holds the page: drop them after the topic's 7-day retention.
POLICY_FILE="$(mktemp)"
trap 'rm -f "$GPU_VALUES" "$POLICY_FILE"' EXIT
cat > "$POLICY_FILE" << JSON
{"rules": [{"enabled": true, "name": "expire-claim-checks", "type": "Lifecycle",
  "definition": {"actions": {"baseBlob": {"delete": {"daysAfterModificationGreaterThan": 8}}},
                 "filters": {"blobTypes": ["blockBlob"], "prefixMatch": ["${CLAIMS_CONTAINER}/"]}}}]}
JSON
az storage account management-policy create --account-name "$STORAGE_ACCOUNT" \
  --resource-group "$RESOURCE_GROUP" --policy "@$POLICY_FILE" --output none

log "Managed identity $IDENTITY_NAME, federated with $NAMESPACE/$SERVICE_ACCOUNT"
if ! az identity show --name "$IDENTITY_NAME" --resource-group "$RESOURCE_GROUP" --output none 2> /dev/null; then
  az identity create --name "$IDENTITY_NAME" --resource-group "$RESOURCE_GROUP" --location "$LOCATION" --output none
fi
IDENTITY_CLIENT_ID="$(az identity show --name "$IDENTITY_NAME" --resource-group "$RESOURCE_GROUP" --query clientId -o tsv)"
IDENTITY_PRINCIPAL_ID="$(az identity show --name "$IDENTITY_NAME" --resource-group "$RESOURCE_GROUP" --query principalId -o tsv)"

assign_role() { # role scope
  if [[ -z "$(az role assignment list --assignee "$IDENTITY_PRINCIPAL_ID" --role "$1" --scope "$2" --query '[0].id' -o tsv)" ]]; then
    az role assignment create --assignee-object-id "$IDENTITY_PRINCIPAL_ID" --assignee-principal-type ServicePrincipal \
      --role "$1" --scope "$2" --output none
  fi
}
# Read any document in the account; write only the pipeline's own containers.
assign_role "Storage Blob Data Reader" "$STORAGE_ID"
assign_role "Storage Blob Data Contributor" "$STORAGE_ID/blobServices/default/containers/$UPLOADS_CONTAINER"
assign_role "Storage Blob Data Contributor" "$STORAGE_ID/blobServices/default/containers/$CLAIMS_CONTAINER"

if ! az identity federated-credential show --name colstream-k8s --identity-name "$IDENTITY_NAME" \
    --resource-group "$RESOURCE_GROUP" --output none 2> /dev/null; then
  az identity federated-credential create \
    --name colstream-k8s \
    --identity-name "$IDENTITY_NAME" \
    --resource-group "$RESOURCE_GROUP" \
    --issuer "$OIDC_ISSUER" \
    --subject "system:serviceaccount:${NAMESPACE}:${SERVICE_ACCOUNT}" \
    --audiences api://AzureADTokenExchange \
    --output none
fi

# ----------------------------------------------------------------------------- 4. Kafka (Strimzi)
log "Strimzi $STRIMZI_VERSION operator watching namespace $NAMESPACE"
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
helm upgrade --install strimzi oci://quay.io/strimzi-helm/strimzi-kafka-operator \
  --version "$STRIMZI_VERSION" \
  --namespace strimzi --create-namespace \
  --set "watchNamespaces={$NAMESPACE}" \
  --wait --timeout 10m

log "Kafka cluster, topics and users (strimzi/)"
kubectl apply -k "$REPO_ROOT/strimzi"
kubectl -n "$NAMESPACE" wait kafka/colstream --for=condition=Ready --timeout=20m
kubectl -n "$NAMESPACE" wait kafkauser --all --for=condition=Ready --timeout=5m
kubectl -n "$NAMESPACE" wait kafkatopic --all --for=condition=Ready --timeout=5m

# ----------------------------------------------------------------------------- 5. secrets
log "Secret colstream-secrets (kept across re-runs)"
existing_secret() { # key
  kubectl -n "$NAMESPACE" get secret colstream-secrets -o "jsonpath={.data.$1}" 2> /dev/null | base64 -d 2> /dev/null || true
}
QDRANT_API_KEY="$(existing_secret QDRANT_API_KEY)"
EVENTGRID_SECRET="$(existing_secret COLSTREAM_EVENTGRID__SHARED_SECRET)"
QDRANT_API_KEY="${QDRANT_API_KEY:-$(openssl rand -hex 24)}"
EVENTGRID_SECRET="${EVENTGRID_SECRET:-$(openssl rand -hex 24)}"
kubectl -n "$NAMESPACE" create secret generic colstream-secrets \
  --from-literal=QDRANT_API_KEY="$QDRANT_API_KEY" \
  --from-literal=COLSTREAM_EVENTGRID__SHARED_SECRET="$EVENTGRID_SECRET" \
  --dry-run=client -o yaml | kubectl apply -f -

# ----------------------------------------------------------------------------- 6. ingress + TLS
if [[ "$SKIP_EVENTGRID" != "1" ]]; then
  log "ingress-nginx (public name $API_HOST) and cert-manager"
  helm repo add ingress-nginx https://kubernetes.github.io/ingress-nginx --force-update > /dev/null
  helm repo add jetstack https://charts.jetstack.io --force-update > /dev/null
  helm repo update ingress-nginx jetstack > /dev/null
  helm upgrade --install ingress-nginx ingress-nginx/ingress-nginx \
    --namespace ingress-nginx --create-namespace \
    --set-string "controller.service.annotations.service\.beta\.kubernetes\.io/azure-dns-label-name=$DNS_LABEL" \
    --set-string "controller.service.annotations.service\.beta\.kubernetes\.io/azure-load-balancer-health-probe-request-path=/healthz" \
    --wait --timeout 10m
  helm upgrade --install cert-manager jetstack/cert-manager \
    --namespace cert-manager --create-namespace \
    --set crds.enabled=true \
    --wait --timeout 10m
  kubectl apply -f - << YAML
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
          ingress:
            ingressClassName: nginx
YAML
fi

# ----------------------------------------------------------------------------- 7. application
log "colstream (k8s/overlays/aks, embedder $EMBEDDER_VARIANT, image $ACR_LOGIN_SERVER/colstream:$IMAGE_TAG)"
# The environment-specific values go into a throw-away kustomization layered on
# the committed overlay, so no committed file is edited. It lives next to the
# overlay because kustomize only accepts relative paths to other kustomizations.
LAYER="$(mktemp -d "$REPO_ROOT/k8s/overlays/.deploy-XXXXXX")"
trap 'rm -rf "$GPU_VALUES" "$POLICY_FILE" "$LAYER"' EXIT
{
  cat << YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../aks
YAML
  if [[ "$EMBEDDER_VARIANT" == "int8" ]]; then
    printf 'components:\n  - ../../components/int8\n'
  fi
  cat << YAML
images:
  - name: colstream
    newName: ${ACR_LOGIN_SERVER}/colstream
    newTag: "${IMAGE_TAG}"
  - name: colstream-int8
    newName: ${ACR_LOGIN_SERVER}/colstream
    newTag: "${IMAGE_TAG}-int8"
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
      - op: replace
        path: /metadata/annotations/azure.workload.identity~1client-id
        value: "${IDENTITY_CLIENT_ID}"
  - target: {kind: Ingress, name: colstream-api}
    patch: |-
      - op: replace
        path: /spec/rules/0/host
        value: ${API_HOST}
      - op: replace
        path: /spec/tls/0/hosts/0
        value: ${API_HOST}
YAML
  if [[ "$SKIP_EVENTGRID" == "1" ]]; then
    cat << YAML
  - target: {kind: Ingress, name: colstream-api}
    patch: |-
      \$patch: delete
      apiVersion: networking.k8s.io/v1
      kind: Ingress
      metadata:
        name: colstream-api
YAML
  fi
} > "$LAYER/kustomization.yaml"
kubectl apply -k "$LAYER"

for deployment in colstream-api colstream-splitter colstream-sink colstream-embedder; do
  # The embedder's first start downloads the model weights.
  kubectl -n "$NAMESPACE" rollout status "deployment/$deployment" --timeout=30m
done

# ----------------------------------------------------------------------------- 8. Event Grid
if [[ "$SKIP_EVENTGRID" != "1" ]]; then
  log "Waiting for the TLS certificate of $API_HOST"
  kubectl -n "$NAMESPACE" wait certificate/colstream-api-tls --for=condition=Ready --timeout=10m

  log "Event Grid: BlobCreated/BlobDeleted in '$DOCUMENTS_CONTAINER' -> https://$API_HOST/eventgrid"
  SYSTEM_TOPIC="${STORAGE_ACCOUNT}-events"
  if ! az eventgrid system-topic show --name "$SYSTEM_TOPIC" --resource-group "$RESOURCE_GROUP" --output none 2> /dev/null; then
    az eventgrid system-topic create \
      --name "$SYSTEM_TOPIC" \
      --resource-group "$RESOURCE_GROUP" \
      --location "$LOCATION" \
      --topic-type Microsoft.Storage.StorageAccounts \
      --source "$STORAGE_ID" \
      --output none
  fi
  # The api answers the validation handshake while the subscription is created.
  # Only the drop container: API uploads land in $UPLOADS_CONTAINER and are
  # already published, so they must not come back as a second upload.
  az eventgrid system-topic event-subscription create \
    --name colstream-documents \
    --resource-group "$RESOURCE_GROUP" \
    --system-topic-name "$SYSTEM_TOPIC" \
    --endpoint-type webhook \
    --endpoint "https://${API_HOST}/eventgrid?key=${EVENTGRID_SECRET}" \
    --included-event-types Microsoft.Storage.BlobCreated Microsoft.Storage.BlobDeleted \
    --subject-begins-with "/blobServices/default/containers/${DOCUMENTS_CONTAINER}/" \
    --max-delivery-attempts 30 \
    --event-ttl 1440 \
    --output none
fi

# ----------------------------------------------------------------------------- done
log "Done"
if [[ "$SKIP_EVENTGRID" == "1" ]]; then
  echo "No public ingress: kubectl -n $NAMESPACE port-forward svc/colstream-api 8000:80"
fi
cat << EOF_SUMMARY
API:              $API_URL
Health:           curl $API_URL/health
Ingest a PDF:     curl -F file=@document.pdf "$API_URL/ingest/pdf"
Drop a document:  az storage blob upload --auth-mode login --account-name $STORAGE_ACCOUNT \\
                    --container-name $DOCUMENTS_CONTAINER --name report.pdf --file report.pdf
List documents:   curl $API_URL/documents
Qdrant dashboard: kubectl -n $NAMESPACE port-forward svc/qdrant 6333:6333  (API key: secret colstream-secrets)
Consumer lag:     kubectl -n $NAMESPACE get scaledobject,hpa
Tear down:        az group delete --name $RESOURCE_GROUP --yes --no-wait
EOF_SUMMARY
