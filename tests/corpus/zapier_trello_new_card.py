"""A Zapier polling trigger, "New Card" on a Trello board: newest first, each with a unique
`id` (Zapier dedupes on it), closed cards left out."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

from datetime import datetime


class Z:
    """The bit of Zapier's `z` object a trigger uses."""

    def __init__(self, base_url, key, token):
        self.base_url = base_url
        self.auth = {"key": key, "token": token}

    def request(self, path, params=None):
        query = dict(self.auth)
        query.update(params or {})
        response = http.get(self.base_url + path, params=query)
        response.raise_for_status()
        return response.json()


def perform(z, bundle):
    cards = z.request("/1/boards/" + bundle["inputData"]["board"] + "/cards", {"fields": "all"})
    seen = set()
    results = []
    for card in sorted(cards, key=lambda c: c["dateLastActivity"], reverse=True):
        if card["closed"] or card["id"] in seen:
            continue
        seen.add(card["id"])
        when = datetime.fromisoformat(card["dateLastActivity"])
        results.append({"id": card["id"], "name": card["name"], "day": when.strftime("%a %d %b")})
    return results


def run(params, context):
    creds = context["connection"]["credentials"]
    z = Z(context["connection"]["baseUrl"], creds["key"], creds["token"])
    return perform(z, {"inputData": params})
