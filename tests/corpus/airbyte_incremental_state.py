"""An Airbyte incremental stream: IncrementalMixin's `state` property with a setter, a cursor
field, offset/limit paging, and the state moved forward as records arrive."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)


class IncrementalMixin:
    cursor_field = "updated_at"

    @property
    def state(self):
        return {self.cursor_field: self._cursor_value} if self._cursor_value else {}

    @state.setter
    def state(self, value):
        self._cursor_value = value.get(self.cursor_field)


class OffsetStream:
    limit = 4

    def __init__(self, base_url, api_key):
        self.base_url = base_url
        self.api_key = api_key

    def pages(self, path):
        offset = 0
        while True:
            body = (
                http.get(
                    self.base_url + path,
                    params={"offset": offset, "limit": self.limit},
                    headers={"X-Api-Key": self.api_key},
                )
                .raise_for_status()
                .json()
            )
            yield body["items"]
            offset += len(body["items"])
            if offset >= body["total"] or not body["items"]:
                break


class Events(OffsetStream, IncrementalMixin):
    def __init__(self, base_url, api_key, state):
        super().__init__(base_url, api_key)
        self._cursor_value = None
        self.state = state

    def read_records(self):
        for page in self.pages("/offset/events"):
            for record in page:
                if self._cursor_value and record[self.cursor_field] <= self._cursor_value:
                    continue
                yield record
                self._cursor_value = max(self._cursor_value or "", record[self.cursor_field])


def run(params, context):
    connection = context["connection"]
    stream = Events(connection["baseUrl"], connection["credentials"]["api_key"], params["state"])
    ids = [record["id"] for record in stream.read_records()]
    return {"ids": ids, "state": stream.state}
