"""A Pipedrive client put together from mixins with cooperative super().__init__(**kwargs),
paging with `additional_data.pagination` (more_items_in_collection, next_start)."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)


class ApiBase:
    def __init__(self, base_url, **kwargs):
        super().__init__(**kwargs)
        self.base_url = base_url.rstrip("/")

    def __repr__(self):
        return f"<{type(self).__name__} {self.base_url}>"


class TokenAuthMixin:
    def __init__(self, api_token, **kwargs):
        super().__init__(**kwargs)
        self._api_token = api_token

    def auth_params(self):
        return {"api_token": self._api_token}


class PaginationMixin:
    def __init__(self, page_size=2, **kwargs):
        super().__init__(**kwargs)
        self.page_size = page_size

    def paginate(self, path):
        start = 0
        while True:
            query = {"start": start, "limit": self.page_size, **self.auth_params()}
            body = http.get(self.base_url + path, params=query).raise_for_status().json()
            yield from body["data"] or []
            pagination = body["additional_data"]["pagination"]
            if not pagination["more_items_in_collection"]:
                break
            start = pagination["next_start"]


class PipedriveClient(PaginationMixin, TokenAuthMixin, ApiBase):
    pass


def run(params, context):
    connection = context["connection"]
    client = PipedriveClient(
        base_url=connection["baseUrl"],
        api_token=connection["credentials"]["api_token"],
        page_size=2,
    )
    won = {}
    for deal in client.paginate("/v1/deals"):
        if deal["status"] == "won":
            won[deal["owner_name"]] = won.get(deal["owner_name"], 0) + deal["value"]
    return {"won_by_owner": won, "client": repr(client).split(" ")[0] + ">"}
