"""Stripe charges as an Airbyte CDK HttpStream: a base stream class, a subclass per resource,
cursor pagination with `starting_after`, parse_response as a generator."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)


class HttpStream:
    primary_key = "id"
    page_size = 3

    def __init__(self, base_url, api_key):
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.requests_made = 0

    @property
    def url_base(self):
        return self._base_url + "/v1/"

    def path(self):
        raise NotImplementedError

    def request_headers(self):
        return {"Authorization": "Bearer " + self._api_key}

    def request_params(self, next_page_token):
        params = {"limit": self.page_size}
        if next_page_token:
            params.update(next_page_token)
        return params

    def next_page_token(self, response):
        body = response.json()
        if body.get("has_more") and body["data"]:
            return {"starting_after": body["data"][-1][self.primary_key]}
        return None

    def parse_response(self, response):
        yield from response.json()["data"]

    def read_records(self):
        token = None
        while True:
            response = http.get(
                self.url_base + self.path(),
                params=self.request_params(token),
                headers=self.request_headers(),
            )
            self.requests_made += 1
            response.raise_for_status()
            yield from self.parse_response(response)
            token = self.next_page_token(response)
            if token is None:
                break


class Charges(HttpStream):
    def __init__(self, base_url, api_key, currency=None):
        super().__init__(base_url, api_key)
        self.currency = currency

    def path(self):
        return "charges"

    def parse_response(self, response):
        for record in super().parse_response(response):
            if self.currency is None or record["currency"] == self.currency:
                yield {"id": record["id"], "amount": record["amount"] / 100}


def run(params, context):
    connection = context["connection"]
    stream = Charges(
        connection["baseUrl"], connection["credentials"]["api_key"], params.get("currency")
    )
    records = list(stream.read_records())
    log("read", len(records), "charges in", stream.requests_made, "requests")
    return {
        "records": records,
        "requests": stream.requests_made,
        "total": sum(r["amount"] for r in records),
    }
