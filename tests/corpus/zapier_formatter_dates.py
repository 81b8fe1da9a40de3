"""Zapier's Formatter "Date / Time" step: add or subtract time, convert between UTC offsets,
format; the operation is picked by name among the class's public static methods."""

import re
from datetime import datetime, timedelta, timezone

OFFSET_RE = re.compile(r"^([+-])(\d{2}):(\d{2})$")


class DateFormatter:
    @staticmethod
    def parse_offset(text):
        sign, hours, minutes = OFFSET_RE.match(text).groups()
        delta = timedelta(hours=int(hours), minutes=int(minutes))
        return timezone(-delta if sign == "-" else delta)

    @staticmethod
    def add_time(value, amounts):
        return value + timedelta(**amounts)

    @staticmethod
    def to_offset(value, offset):
        return value.astimezone(DateFormatter.parse_offset(offset))

    @staticmethod
    def start_of_month(value):
        return value.replace(day=1, hour=0, minute=0, second=0, microsecond=0)

    @classmethod
    def operations(cls):
        return [name for name in dir(cls) if not name.startswith("_") and name != "operations"]


def run(params, context):
    value = datetime.fromisoformat(params["date"])
    steps = []
    for step in params["steps"]:
        operation = step["op"]
        if operation not in DateFormatter.operations():
            raise ValueError("unknown operation " + operation)
        value = getattr(DateFormatter, operation)(value, *step.get("args", []))
        steps.append(value.isoformat())
    return {
        "steps": steps,
        "formatted": value.strftime(params.get("format", "%Y-%m-%d %H:%M %z")),
        "weekday": value.strftime("%A"),
        "operations": DateFormatter.operations(),
    }
