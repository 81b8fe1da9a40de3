"""Google Sheets rows as n8n's Sheets node returns them: the first row is the header, each
other row becomes an item keyed by it; numeric cells are parsed, column types reported."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import urllib.parse

TYPE_NAMES = {int: "number", float: "number", str: "string", bool: "boolean", type(None): "null"}


def parse_cell(value):
    if isinstance(value, str):
        text = value.strip()
        if text.upper() in ("TRUE", "FALSE"):
            return text.upper() == "TRUE"
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text.replace(",", ""))
        except ValueError:
            return text or None
    return value


def run(params, context):
    connection = context["connection"]
    sheet_range = urllib.parse.quote(params["range"], safe="")
    url = f"{connection['baseUrl']}/v4/spreadsheets/{params['sheetId']}/values/{sheet_range}"
    body = (
        http.get(
            url, headers={"Authorization": "Bearer " + connection["credentials"]["access_token"]}
        )
        .raise_for_status()
        .json()
    )
    header, *rows = body["values"]
    keys = [h.strip().lower().replace(" ", "_") for h in header]
    items = []
    for row in rows:
        padded = row + [""] * (len(keys) - len(row))
        items.append({key: parse_cell(cell) for key, cell in zip(keys, padded, strict=True)})
    column_types = {key: sorted({TYPE_NAMES[type(item[key])] for item in items}) for key in keys}
    return {"items": items, "columns": column_types}
