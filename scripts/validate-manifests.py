#!/usr/bin/env python3
"""Strict Kubernetes schema validation of manifests we emit.

Usage: validate-manifests.py FILE...   (YAML streams or JSON; `-` reads stdin)

Every object is validated with kubernetes-validate (PyPI), against the official schemas of
Kubernetes 1.31 and of the newest release it knows, in strict mode: an unknown or
misspelled field is an error, not silently dropped as the API server's default would do.
Custom resources (Prometheus Operator's PodMonitor and PrometheusRule) have no official
schema: their standard part, the ObjectMeta, is validated, and their kind is checked
against the list we ship. Exits 1 listing every error.
"""
import json
import sys

import kubernetes_validate
import yaml

VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def objects(path):
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        if doc.get("kind", "").endswith("List") and "items" in doc:
            yield from doc["items"]
        else:
            yield doc


def main():
    errors, checked = [], 0
    for path in sys.argv[1:]:
        for obj in objects(path):
            kind, api = obj.get("kind"), obj.get("apiVersion")
            name = f"{path}: {kind} {obj.get('metadata', {}).get('name')}"
            target = obj
            if (api, kind) in CUSTOM_KINDS:
                target = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
                if not isinstance(obj.get("spec"), dict):
                    errors.append(f"{name}: no spec")
            for version in VERSIONS:
                try:
                    kubernetes_validate.validate(target, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    errors.append(f"{name} (Kubernetes {version}): {where}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError:
                    errors.append(f"{name}: no schema for {api} {kind} in Kubernetes {version}")
            checked += 1
    for e in errors:
        print(f"INVALID {e}", file=sys.stderr)
    if checked == 0:
        print("no objects to validate", file=sys.stderr)
        return 1
    if errors:
        print(f"{len(errors)} errors in {checked} objects", file=sys.stderr)
        return 1
    print(f"{checked} objects valid against Kubernetes {' and '.join(VERSIONS)} (strict)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
