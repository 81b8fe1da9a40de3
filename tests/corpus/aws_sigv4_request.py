"""Sign a request the AWS Signature Version 4 way (the signing-key chain of HMACs over date,
region and service) and send it; the server checks the signature."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import hashlib
import hmac
import urllib.parse
from datetime import datetime

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class SigV4Signer:
    def __init__(self, access_key, secret_key, region, service):
        self.access_key = access_key
        self._secret_key = secret_key
        self.region = region
        self.service = service

    @staticmethod
    def sign(key, msg):
        return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()

    @classmethod
    def signing_key(cls, secret_key, date_stamp, region, service):
        k_date = cls.sign(("AWS4" + secret_key).encode("utf-8"), date_stamp)
        k_region = cls.sign(k_date, region)
        k_service = cls.sign(k_region, service)
        return cls.sign(k_service, "aws4_request")

    def headers_for(self, method, url, when):
        parts = urllib.parse.urlsplit(url)
        amz_date = when.strftime("%Y%m%dT%H%M%SZ")
        date_stamp = when.strftime("%Y%m%d")
        query = sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        canonical_query = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        headers = {
            "host": parts.netloc,
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": amz_date,
        }
        signed_headers = ";".join(sorted(headers))
        canonical_headers = "".join(f"{k}:{headers[k]}\n" for k in sorted(headers))
        canonical_request = "\n".join(
            [
                method,
                parts.path or "/",
                canonical_query,
                canonical_headers,
                signed_headers,
                EMPTY_SHA256,
            ]
        )
        scope = f"{date_stamp}/{self.region}/{self.service}/aws4_request"
        string_to_sign = "\n".join(
            [
                ALGORITHM,
                amz_date,
                scope,
                hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
            ]
        )
        key = self.signing_key(self._secret_key, date_stamp, self.region, self.service)
        signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
        return {
            "x-amz-date": amz_date,
            "x-amz-content-sha256": EMPTY_SHA256,
            "Authorization": f"{ALGORITHM} Credential={self.access_key}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature}",
        }


def run(params, context):
    connection = context["connection"]
    creds = connection["credentials"]
    signer = SigV4Signer(creds["access_key_id"], creds["secret_access_key"], "eu-west-1", "s3")
    url = connection["baseUrl"] + "/sigv4/reports-bucket?list-type=2&prefix=logs%2F2026"
    when = datetime.fromisoformat(params["now"])
    response = http.get(url, headers=signer.headers_for("GET", url, when))
    checked = response.raise_for_status().json()
    return {"valid": checked["valid"], "scope": checked["scope"], "keys": checked["keys"]}
