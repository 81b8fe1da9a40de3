"""Flatten nested API records to dotted columns for a spreadsheet step, and back."""


def flatten(record, prefix="", sep="."):
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{sep}{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name, sep))
        elif isinstance(value, list):
            flat[name] = ", ".join(str(v) for v in value)
        else:
            flat[name] = value
    return flat


def unflatten(flat, sep="."):
    nested = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(sep)
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def run(params, context):
    rows = [flatten(r) for r in params["records"]]
    columns = sorted({column for row in rows for column in row})
    table = [[row.get(column) for column in columns] for row in rows]
    return {"columns": columns, "table": table, "roundtrip": unflatten(rows[0])}
