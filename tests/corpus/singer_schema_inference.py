"""Infer a JSON Schema from sample records, the way Singer taps for schemaless sources do:
types merged across records, nested objects and arrays walked recursively."""

import re

DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")


def json_type(value):
    if value is None:
        return "null"
    if type(value) is bool:
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    return "string"


def infer(value):
    kind = json_type(value)
    schema = {"type": [kind]}
    if kind == "object":
        schema["properties"] = {key: infer(item) for key, item in value.items()}
    elif kind == "array":
        schema["items"] = merge_all([infer(item) for item in value]) if value else {}
    elif kind == "string" and DATE_TIME.match(value):
        schema["format"] = "date-time"
    return schema


def merge(a, b):
    merged = {"type": sorted(set(a.get("type", [])) | set(b.get("type", [])))}
    if "properties" in a or "properties" in b:
        left, right = a.get("properties", {}), b.get("properties", {})
        merged["properties"] = {
            key: merge(left.get(key, {"type": ["null"]}), right.get(key, {"type": ["null"]}))
            for key in sorted(set(left) | set(right))
        }
    if "items" in a or "items" in b:
        merged["items"] = merge(a.get("items", {}), b.get("items", {}))
    if a.get("format") == b.get("format") and "format" in a:
        merged["format"] = a["format"]
    return merged


def merge_all(schemas):
    result = schemas[0]
    for schema in schemas[1:]:
        result = merge(result, schema)
    return result


def run(params, context):
    return merge_all([infer(record) for record in params["records"]])
