"""A connector in its smallest form: params in, JSON out, a log line on the way."""

import hashlib
import json


def run(params, context):
    name = params.get("name", "world")
    log("greeting", name)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    return {"greeting": "hello, " + name, "params_sha256": digest[:12]}
