"""Validates rendered Kubernetes manifests offline, for the tests (tests/it/k8s.rs).

    validate.py --kubernetes-version 1.30.0 [--kubernetes-version ...] FILE...

Every object of every FILE (multi-document YAML, as `kubectl kustomize` prints it) must pass
strict validation (unknown fields are errors): the built-in kinds against the Kubernetes
OpenAPI schemas that kubernetes-validate (PyPI, pinned by scripts/prereqs.sh) carries, for
each version given; KEDA's kinds against keda.schema.json, with an autoscaling behavior
checked against the Kubernetes schema too. An object of any other kind is an error, never
skipped. Prints the objects as JSON ({"FILE": [objects]}) for the tests' own checks; the
errors go to standard error, and the status is 1 if there is any.
"""

import argparse
import json
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).parent


def keda_errors(obj, versions):
    schema = json.loads((HERE / "keda.schema.json").read_text())
    kind = obj.get("kind")
    if kind not in schema["$defs"] or kind[0].islower():
        return [f"no KEDA schema for kind {kind}"]
    schema["$ref"] = f"#/$defs/{kind}"
    errors = [
        "/".join(str(p) for p in e.absolute_path) + ": " + e.message
        for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)
    ]
    # KEDA hands `advanced.horizontalPodAutoscalerConfig.behavior` to the HPA it makes.
    behavior = (
        obj.get("spec", {})
        .get("advanced", {})
        .get("horizontalPodAutoscalerConfig", {})
        .get("behavior")
    )
    if behavior is not None:
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "keda-hpa"},
            "spec": {
                "scaleTargetRef": {"kind": "Deployment", "name": "x"},
                "maxReplicas": 1,
                "behavior": behavior,
            },
        }
        errors += builtin_errors(hpa, versions)
    return errors


def builtin_errors(obj, versions):
    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            errors.append(f"Kubernetes {version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"Kubernetes {version} has no {obj.get('apiVersion')} {obj.get('kind')}")
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", action="append", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    out, failed = {}, False
    for name in args.files:
        objects = [o for o in yaml.safe_load_all(pathlib.Path(name).read_text()) if o is not None]
        if not objects:
            print(f"{name}: no objects", file=sys.stderr)
            failed = True
        for obj in objects:
            where = f"{name}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            if str(obj.get("apiVersion", "")).startswith("keda.sh/"):
                errors = keda_errors(obj, args.kubernetes_version)
            else:
                errors = builtin_errors(obj, args.kubernetes_version)
            for error in errors:
                print(f"{where}: {error}", file=sys.stderr)
                failed = True
        out[name] = objects
    json.dump(out, sys.stdout)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
