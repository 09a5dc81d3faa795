#!/usr/bin/env python3
"""oas-check.py SPEC BODYFILE METHOD PATH STATUS: validates a JSON response
body against the response schema api/openapi.yaml gives for METHOD PATH
(a path template such as /v1/keys/{token}/{id}) and STATUS, with a real
JSON Schema validator (python3-jsonschema, draft 2020-12 as OpenAPI 3.1
uses). Exit 0 valid, 1 invalid (the reason on stderr), 2 no such response."""
import json
import sys
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import yaml  # noqa: E402
from jsonschema import Draft202012Validator, RefResolver  # noqa: E402


def main():
    spec_path, body_path, method, path, status = sys.argv[1:6]
    with open(spec_path) as f:
        spec = yaml.safe_load(f)
    if path == "-":  # a path that is no route: the body must be an Error
        return validate(spec, {"$ref": "#/components/schemas/Error"}, body_path, method, path, status)
    op = spec["paths"].get(path, {}).get(method.lower())
    if op is None:
        print(f"oas-check: {method} {path} is not in the contract", file=sys.stderr)
        return 2
    resp = op["responses"].get(status)
    if resp is None:
        print(f"oas-check: {method} {path} does not document status {status}", file=sys.stderr)
        return 2
    if "$ref" in resp:
        name = resp["$ref"].split("/")[-1]
        resp = spec["components"]["responses"][name]
    content = resp.get("content")
    with open(body_path, "rb") as f:
        raw = f.read()
    if not content:
        if raw.strip():
            print(f"oas-check: {status} has no body in the contract, got {raw[:80]!r}", file=sys.stderr)
            return 1
        return 0
    if "application/json" not in content:
        return 0  # text (metrics): checked by promtool
    return validate(spec, content["application/json"]["schema"], body_path, method, path, status)


def validate(spec, schema, body_path, method, path, status):
    with open(body_path, "rb") as f:
        raw = f.read()
    try:
        body = json.loads(raw)
    except ValueError as e:
        print(f"oas-check: not JSON: {e}: {raw[:200]!r}", file=sys.stderr)
        return 1
    v = Draft202012Validator(schema, resolver=RefResolver.from_schema(spec))
    errors = sorted(v.iter_errors(body), key=lambda e: list(e.path))
    for e in errors[:5]:
        print(f"oas-check: {method} {path} {status}: at /{'/'.join(map(str, e.path))}: {e.message}", file=sys.stderr)
    return 1 if errors else 0


sys.exit(main())
