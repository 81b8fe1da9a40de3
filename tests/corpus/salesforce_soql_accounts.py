"""Salesforce SOQL query results followed through `nextRecordsUrl`, mapped to a hand-written
record class (dataclasses is not importable): __init__, __repr__, __eq__, from_record."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import urllib.parse


class Account:
    fields = ("Id", "Name", "Industry", "AnnualRevenue")

    def __init__(self, id, name, industry=None, revenue=0):
        self.id = id
        self.name = name
        self.industry = industry
        self.revenue = revenue

    @classmethod
    def from_record(cls, record):
        return cls(
            record["Id"], record["Name"], record.get("Industry"), record.get("AnnualRevenue") or 0
        )

    def __repr__(self):
        return f"Account(id={self.id!r}, name={self.name!r}, industry={self.industry!r})"

    def __eq__(self, other):
        if not isinstance(other, Account):
            return NotImplemented
        return self.id == other.id

    def to_dict(self):
        return {
            "id": self.id,
            "name": self.name,
            "industry": self.industry,
            "revenue": self.revenue,
        }


def query_all(base_url, token, soql):
    headers = {"Authorization": "Bearer " + token}
    url = base_url + "/services/data/v59.0/query?" + urllib.parse.urlencode({"q": soql})
    while True:
        body = http.get(url, headers=headers).raise_for_status().json()
        yield from body["records"]
        if body["done"]:
            return
        url = base_url + body["nextRecordsUrl"]


def run(params, context):
    connection = context["connection"]
    soql = "SELECT " + ", ".join(Account.fields) + " FROM Account WHERE Industry != null"
    accounts = []
    for record in query_all(connection["baseUrl"], connection["credentials"]["access_token"], soql):
        account = Account.from_record(record)
        if account not in accounts:  # the API can repeat a record across batches
            accounts.append(account)
    top = sorted(accounts, key=lambda a: (-a.revenue, a.name))
    return {"accounts": [a.to_dict() for a in top], "first": repr(top[0])}
