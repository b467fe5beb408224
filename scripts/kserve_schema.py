"""Write deploy/kserve/inferenceservice.schema.json from KServe's InferenceService CRD.

    python scripts/kserve_schema.py path/to/serving.kserve.io_inferenceservices.yaml [--commit SHA]

The CRD is in KServe's repository (config/crd/full/) and in each release's manifests. Its
v1beta1 `openAPIV3Schema` becomes a JSON Schema that check-jsonschema validates
deploy/kserve/*.yaml against offline (scripts/check_manifests.sh), made strict: an object with
listed properties takes no others (unless marked x-kubernetes-preserve-unknown-fields), so a
misspelt field fails here instead of being pruned silently by the API server.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parent.parent / "deploy" / "kserve" / "inferenceservice.schema.json"


def strict(node: Any) -> None:
    if isinstance(node, dict):
        closed = not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node
        if node.get("type") == "object" and "properties" in node and closed:
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("crd", help="serving.kserve.io_inferenceservices.yaml")
    p.add_argument("--commit", default="unknown", help="the KServe commit or release it comes from")
    args = p.parse_args()
    crd = yaml.safe_load(Path(args.crd).read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema = version["schema"]["openAPIV3Schema"]
    strict(schema)
    schema["properties"]["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    schema["properties"]["kind"] = {"const": "InferenceService"}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    comment = (
        f"KServe's InferenceService CRD, v1beta1 openAPIV3Schema, from {Path(args.crd).name} "
        f"at {args.commit}; made strict by scripts/kserve_schema.py"
    )
    document = {"$schema": "http://json-schema.org/draft-07/schema#", "$comment": comment, **schema}
    OUT.write_text(json.dumps(document, separators=(",", ":")))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
