"""The result-file schema of `dskc bench`, as data, and a small validator for it (no dependency).

SCHEMA uses a subset of JSON Schema: "type" (a name or a list of names: object, array, string, number, integer,
boolean, null), "required", "properties", "additionalProperties" (False or a schema), "items", "enum", "minimum".
`validate(doc)` checks that subset plus the rules a schema cannot say (a CPU smoke run is labelled as not kernel
performance; a measured "ok" row has a time; a published row names its hardware and source). Documented in
docs/bench-schema.md.
"""
from __future__ import annotations

import json
from pathlib import Path

VERSION = 1
SMOKE_LABEL = "CPU smoke run through the Triton interpreter: checks that the bench code works; NOT kernel performance"
NUM = ["number", "null"]
STR = ["string", "null"]

_CEILING = {
    "type": "object", "required": ["name", "kind", "ms", "value", "unit", "detail"], "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "kind": {"enum": ["compute", "bandwidth"]},
                   "ms": {"type": "number", "minimum": 0}, "value": {"type": "number", "minimum": 0},
                   "unit": {"enum": ["TFLOP/s", "GB/s"]}, "detail": {"type": "string"}},
}

_ROW = {
    "type": "object", "additionalProperties": False,
    "required": ["suite", "case", "stem", "shape", "impl", "kind", "status", "primary", "ms", "flops", "bytes",
                 "tflops", "gbps", "tokens_per_s", "pct_compute", "pct_bandwidth", "rel_err", "note", "hardware",
                 "source"],
    "properties": {
        "suite": {"enum": ["gemm", "moe", "mla", "model"]},
        "case": {"type": "string"}, "stem": {"type": "string"},
        "shape": {"type": "object", "additionalProperties": {"type": ["integer", "number", "string", "boolean"]}},
        "impl": {"type": "string"},
        "kind": {"enum": ["measured", "published"]},
        "status": {"enum": ["ok", "error", "skipped"]},
        "primary": {"enum": ["tflops", "gbps", "tokens_per_s"]},
        "ms": {"type": NUM, "minimum": 0}, "flops": {"type": NUM, "minimum": 0}, "bytes": {"type": NUM, "minimum": 0},
        "tflops": {"type": NUM, "minimum": 0}, "gbps": {"type": NUM, "minimum": 0},
        "tokens_per_s": {"type": NUM, "minimum": 0}, "pct_compute": {"type": NUM, "minimum": 0},
        "pct_bandwidth": {"type": NUM, "minimum": 0}, "rel_err": {"type": NUM, "minimum": 0},
        "note": {"type": "string"}, "hardware": {"type": STR}, "source": {"type": STR},
        "launches_per_step": {"type": ["integer", "null"], "minimum": 0},     # optional (model rows)
    },
}

SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["schema", "version", "suite", "mode", "label", "date", "env", "ceilings", "impls", "results",
                 "kv_cache"],
    "properties": {
        "schema": {"enum": ["dskc-bench"]},
        "version": {"enum": [VERSION]},
        "suite": {"enum": ["smoke", "gemm", "moe", "mla", "model", "headline", "rest", "all"]},
        "mode": {"enum": ["gpu", "cpu-smoke"]},
        "label": {"type": "string"},
        "date": {"type": "string"},
        "env": {"type": "object", "additionalProperties": {"type": STR},
                "required": ["device", "gpu", "driver", "cuda", "torch", "triton", "python", "dskc", "platform",
                             "git_commit"]},
        "ceilings": {"type": "object", "additionalProperties": _CEILING, "required": ["bf16_matmul", "copy"]},
        "impls": {"type": "object", "additionalProperties": {"type": "string"}},
        "results": {"type": "array", "items": _ROW},
        "kv_cache": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["model", "attn_impl", "dtype",
                                                                          "bytes_per_token"],
            "properties": {"model": {"type": "string"}, "attn_impl": {"enum": ["absorb", "naive"]},
                           "dtype": {"type": "string"}, "bytes_per_token": {"type": "integer", "minimum": 0}}}},
    },
}


class ResultSchemaError(ValueError):
    """A bench result document that does not follow SCHEMA; the message names the JSON path and the problem."""


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value, name: str) -> bool:
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def _check(value, schema: dict, path: str) -> None:
    """Raise ResultSchemaError at the first place `value` breaks `schema` (the subset documented above)."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_is(value, n) for n in names):
            raise ResultSchemaError(f"{path}: expected {' or '.join(names)}, got {type(value).__name__} {value!r:.60}")
    if "enum" in schema and value not in schema["enum"]:
        raise ResultSchemaError(f"{path}: {value!r:.60} is not one of {schema['enum']}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        raise ResultSchemaError(f"{path}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        _check_object(value, schema, path)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]")


def _check_object(value: dict, schema: dict, path: str) -> None:
    missing = [k for k in schema.get("required", ()) if k not in value]
    if missing:
        raise ResultSchemaError(f"{path}: missing required field(s) {missing}")
    props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in props:
            _check(item, props[key], f"{path}.{key}")
        elif extra is False:
            raise ResultSchemaError(f"{path}: unknown field {key!r}")
        elif isinstance(extra, dict):
            _check(item, extra, f"{path}.{key}")


def _check_rules(doc: dict) -> None:
    """What the schema cannot say: smoke labelling, times on ok rows, provenance of published rows."""
    if doc["mode"] == "cpu-smoke" and doc["label"] != SMOKE_LABEL:
        raise ResultSchemaError(f"$.label: a cpu-smoke result must carry the label {SMOKE_LABEL!r}")
    if doc["mode"] == "gpu" and not doc["env"].get("gpu"):
        raise ResultSchemaError("$.env.gpu: a gpu-mode result must name its GPU")
    for i, row in enumerate(doc["results"]):
        where = f"$.results[{i}] ({row['case']} / {row['impl']})"
        if row["kind"] == "measured" and row["status"] == "ok" and row["ms"] is None:
            raise ResultSchemaError(f"{where}: a measured ok row needs ms")
        if row["kind"] == "published" and not (row["hardware"] and row["source"]):
            raise ResultSchemaError(f"{where}: a published row must name its hardware and source")
        if row["status"] != "ok" and not row["note"]:
            raise ResultSchemaError(f"{where}: a {row['status']} row must say why in note")
        if row["status"] == "ok" and row[row["primary"]] is None:
            raise ResultSchemaError(f"{where}: an ok row needs its primary figure {row['primary']!r}")
        if row["impl"] not in doc["impls"]:
            raise ResultSchemaError(f"{where}: impl {row['impl']!r} is not described in $.impls")


def validate(doc) -> dict:
    """Check a parsed result document against SCHEMA and the rules above; returns it, or raises ResultSchemaError."""
    _check(doc, SCHEMA, "$")
    _check_rules(doc)
    return doc


def load(path) -> dict:
    """Read and validate a result file; errors name the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResultSchemaError(f"{path}: cannot read a JSON result: {exc}") from exc
    try:
        return validate(doc)
    except ResultSchemaError as exc:
        raise ResultSchemaError(f"{path}: {exc}") from None
