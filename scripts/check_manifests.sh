#!/usr/bin/env bash
# Validate the deployment manifests against their schemas, offline.
#
#   bash scripts/check_manifests.sh
#
# deploy/k8s/*.yaml: kubernetes-validate (PyPI), which bundles Kubernetes' own JSON schemas for
# each release, checked strictly (unknown fields are errors) against the oldest and the newest
# release it knows. deploy/compose.yaml: check-jsonschema (PyPI) with its bundled compose-spec
# schema; deploy/kserve/*.yaml: the same with KServe's InferenceService schema, kept beside them
# (deploy/kserve/inferenceservice.schema.json, from KServe's CRD by scripts/kserve_schema.py).
# Both tools are in the dev extras: pip install -e '.[dev]'.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Kubernetes releases to check against: the oldest still in wide use, and the newest known.
K8S_VERSIONS=${K8S_VERSIONS:-"1.29 latest"}

for module in kubernetes_validate check_jsonschema; do
    if ! python3 -c "import $module" 2>/dev/null; then
        echo "FAIL: python3 cannot import $module; install the dev extras: pip install -e '.[dev]'" >&2
        exit 1
    fi
done

shopt -s nullglob
manifests=(deploy/k8s/*.yaml)
((${#manifests[@]})) || {
    echo "FAIL: no manifests in deploy/k8s" >&2
    exit 1
}

status=0
for version in $K8S_VERSIONS; do
    args=(--strict)
    if [[ $version != latest ]]; then args+=(--kubernetes-version "$version"); fi
    # kubernetes-validate only warns (exit 0) about a kind or apiVersion it has no schema for,
    # such as a typo in apiVersion: count those as failures too.
    if ! out=$(python3 -m kubernetes_validate "${args[@]}" "${manifests[@]}" 2>&1); then status=1; fi
    printf '%s\n' "$out"
    if grep -q '^WARN' <<<"$out"; then status=1; fi
done

if [[ -f deploy/compose.yaml ]]; then
    python3 -m check_jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml || status=1
fi

# deploy/kserve: KServe's own InferenceService schema, from its CRD (scripts/kserve_schema.py).
kserve=(deploy/kserve/*.yaml)
if ((${#kserve[@]})); then
    python3 -m check_jsonschema --schemafile deploy/kserve/inferenceservice.schema.json "${kserve[@]}" || status=1
fi

if ((status)); then
    echo "FAIL: manifests do not validate" >&2
else
    echo "manifests valid"
fi
exit "$status"
