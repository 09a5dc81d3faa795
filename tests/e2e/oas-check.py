#!/usr/bin/env python3
"""oas-check.py SPEC BODYFILE METHOD PATH STATUS: validates a JSON response
body against the response schema api/openapi.yaml gives for METHOD PATH
(a path template such as /v1/keys/{token}/{id}; "-" for a path that is no
route: the body must be an Error; a 405 for a METHOD the path does not
have: an Error too, as the contract's info says) and STATUS (a text/html
response, libmicrohttpd's own 431: the body must be HTML), with a real JSON Schema
validator (python3-jsonschema, draft 2020-12 as OpenAPI 3.1 uses). Exit 0
valid, 1 invalid (the reason on stderr), 2 no such response.

oas-check.py SPEC --manifest FILE: the same for every line of FILE
("BODYFILE METHOD PATH STATUS DESCRIPTION..."), in one process; prints
"PASS DESCRIPTION" or "FAIL DESCRIPTION: reason" per line."""
import json
import sys
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import yaml  # noqa: E402
from jsonschema import Draft202012Validator, RefResolver  # noqa: E402


def main():
    if len(sys.argv) == 4 and sys.argv[2] == "--manifest":
        with open(sys.argv[1]) as f:
            spec = yaml.safe_load(f)
        bad = 0
        with open(sys.argv[3]) as m:
            for line in m:
                body_path, method, path, status, desc = line.rstrip("\n").split(" ", 4)
                err = []
                rc = check(spec, body_path, method, path, status, err)
                if rc == 0:
                    print(f"PASS {desc}")
                else:
                    bad += 1
                    print(f"FAIL {desc}: {'; '.join(err) or 'not in the contract'}")
        return 1 if bad else 0
    spec_path, body_path, method, path, status = sys.argv[1:6]
    with open(spec_path) as f:
        spec = yaml.safe_load(f)
    err = []
    rc = check(spec, body_path, method, path, status, err)
    for e in err:
        print(f"oas-check: {e}", file=sys.stderr)
    return rc


def check(spec, body_path, method, path, status, err):
    if path == "-":  # a path that is no route: the body must be an Error
        return validate(spec, {"$ref": "#/components/schemas/Error"}, body_path, method, path, status, err)
    item = spec["paths"].get(path)
    op = (item or {}).get(method.lower())
    if op is None:
        if item is not None and status == "405":
            # a method the path does not have: info's "Any path, a method
            # it does not have" (OpenAPI has no operation to attach it to)
            return validate(spec, {"$ref": "#/components/schemas/Error"}, body_path, method, path, status, err)
        err.append(f"{method} {path} is not in the contract")
        return 2
    resp = op["responses"].get(status)
    if resp is None:
        err.append(f"{method} {path} does not document status {status}")
        return 2
    if "$ref" in resp:
        name = resp["$ref"].split("/")[-1]
        resp = spec["components"]["responses"][name]
    content = resp.get("content")
    with open(body_path, "rb") as f:
        raw = f.read()
    if not content:
        if raw.strip():
            err.append(f"{status} has no body in the contract, got {raw[:80]!r}")
            return 1
        return 0
    if "text/html" in content:  # libmicrohttpd's own refusals (431)
        if not raw.lstrip().lower().startswith(b"<html"):
            err.append(f"{status} is libmicrohttpd's HTML in the contract, got {raw[:80]!r}")
            return 1
        return 0
    if "application/json" not in content:
        return 0  # text (metrics): checked by promtool
    return validate(spec, content["application/json"]["schema"], body_path, method, path, status, err)


def validate(spec, schema, body_path, method, path, status, err):
    with open(body_path, "rb") as f:
        raw = f.read()
    try:
        body = json.loads(raw)
    except ValueError as e:
        err.append(f"not JSON: {e}: {raw[:200]!r}")
        return 1
    v = Draft202012Validator(schema, resolver=RefResolver.from_schema(spec))
    errors = sorted(v.iter_errors(body), key=lambda e: list(e.path))
    for e in errors[:5]:
        err.append(f"{method} {path} {status}: at /{'/'.join(map(str, e.path))}: {e.message}")
    return 1 if errors else 0


sys.exit(main())
