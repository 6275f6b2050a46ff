#!/usr/bin/env bash
# Build the training image (infra/docker/Dockerfile), smoke-test it, and optionally push it to Amazon ECR.
#
#   bash infra/docker/build_and_push.sh                 # build + smoke test, tag eqface-train:<version>
#   bash infra/docker/build_and_push.sh --push          # ... then create the ECR repository if needed,
#                                                       #     log in, tag and push; prints the image URI
# Environment (all optional):
#   AWS_REGION       default us-east-1 (the region of ray_cluster.yaml)
#   AWS_ACCOUNT_ID   default: from `aws sts get-caller-identity`
#   ECR_REPOSITORY   default eqface-train
#   TAG              default: the version in pyproject.toml (ray_cluster.yaml's docker.image uses it)
#   TORCH_INDEX_URL  a PyTorch wheel index for another CUDA build (see the Dockerfile)
# Needs docker with BuildKit and, for --push, the AWS CLI v2 with credentials allowed to use ECR
# (ecr:CreateRepository, ecr:GetAuthorizationToken, ecr:*Layer*, ecr:PutImage, ecr:DescribeRepositories).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

PUSH=false
case "${1:-}" in
  --push) PUSH=true ;;
  "") ;;
  *) echo "usage: $0 [--push]" >&2; exit 2 ;;
esac

REGION="${AWS_REGION:-us-east-1}"
REPOSITORY="${ECR_REPOSITORY:-eqface-train}"
TAG="${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)}"
[ -n "$TAG" ] || { echo "build_and_push.sh: no TAG and no version in pyproject.toml" >&2; exit 2; }
LOCAL_IMAGE="$REPOSITORY:$TAG"

echo "[image] building $LOCAL_IMAGE (context: $ROOT)" >&2
DOCKER_BUILDKIT=1 docker build \
  --file infra/docker/Dockerfile \
  --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}" \
  --tag "$LOCAL_IMAGE" \
  .

echo "[image] smoke test: imports, non-root user, repository as working dir" >&2
docker run --rm "$LOCAL_IMAGE" bash -c '
  set -e
  test "$(id -u)" != 0
  test -f flows/eqface.py
  python - <<PY
import importlib.util, torch, ray, mlflow
assert torch.version.cuda, "CPU-only torch"
assert importlib.util.find_spec("flows") is not None     # from the working dir ...
import flows
assert all("site-packages" not in p for p in flows.__path__), list(flows.__path__)  # ... not site-packages
print("torch", torch.__version__, "cuda", torch.version.cuda, "ray", ray.__version__, "mlflow", mlflow.__version__)
PY
  python -c "from flows.config import load_config; load_config([\"configs/default.yaml\", \"configs/ms1mv3_r100.yaml\"])"
'

if [ "$PUSH" != true ]; then
  echo "[image] built $LOCAL_IMAGE (not pushed; add --push)" >&2
  exit 0
fi

ACCOUNT="${AWS_ACCOUNT_ID:-$(aws sts get-caller-identity --query Account --output text)}"
REGISTRY="$ACCOUNT.dkr.ecr.$REGION.amazonaws.com"
REMOTE_IMAGE="$REGISTRY/$REPOSITORY:$TAG"

if ! aws ecr describe-repositories --region "$REGION" --repository-names "$REPOSITORY" >/dev/null 2>&1; then
  echo "[image] creating ECR repository $REPOSITORY (immutable tags, scan on push)" >&2
  aws ecr create-repository --region "$REGION" --repository-name "$REPOSITORY" \
    --image-tag-mutability IMMUTABLE --image-scanning-configuration scanOnPush=true >/dev/null
fi
# The ECR login token goes straight from the AWS CLI into docker's credential store, never onto argv.
aws ecr get-login-password --region "$REGION" | docker login --username AWS --password-stdin "$REGISTRY"
docker tag "$LOCAL_IMAGE" "$REMOTE_IMAGE"
docker push "$REMOTE_IMAGE"
echo "[image] pushed; set docker.image in ray_cluster.yaml to:" >&2
echo "$REMOTE_IMAGE"
