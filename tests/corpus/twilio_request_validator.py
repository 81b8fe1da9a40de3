"""Twilio's request validation, as its helper library writes it: base64 of HMAC-SHA1 over the
URL plus the sorted POST parameters, compared in constant time."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import base64
import hashlib
import hmac


class RequestValidator:
    def __init__(self, token):
        self._token = token.encode("utf-8")

    def compute_signature(self, uri, params):
        s = uri
        for param_name in sorted(params):
            s += param_name + params[param_name]
        mac = hmac.new(self._token, s.encode("utf-8"), hashlib.sha1)
        return base64.b64encode(mac.digest()).decode("utf-8")

    def validate(self, uri, params, signature):
        return hmac.compare_digest(self.compute_signature(uri, params), signature)


def run(params, context):
    connection = context["connection"]
    delivery = http.get(connection["baseUrl"] + "/webhooks/twilio").json()
    validator = RequestValidator(connection["credentials"]["auth_token"])
    signature = delivery["headers"]["X-Twilio-Signature"]
    form = delivery["form"]
    tampered = dict(form, Body=form["Body"] + "!")
    return {
        "valid": validator.validate(delivery["url"], form, signature),
        "tampered_valid": validator.validate(delivery["url"], tampered, signature),
        "from": form["From"],
        "body": form["Body"],
    }
