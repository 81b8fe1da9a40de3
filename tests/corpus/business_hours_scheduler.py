"""Calendly-style scheduling: each request names a time in the invitee's UTC offset; move it
to the next slot inside the host's business hours (09:00-17:00, Monday to Friday)."""

from datetime import UTC, datetime, time, timedelta, timezone

OPEN, CLOSE = time(9, 0), time(17, 0)


def next_business_slot(moment, duration):
    current = moment
    for _ in range(14):
        if current.weekday() >= 5:
            current = datetime.combine(
                current.date() + timedelta(days=7 - current.weekday()), OPEN, tzinfo=current.tzinfo
            )
            continue
        start_of_day = datetime.combine(current.date(), OPEN, tzinfo=current.tzinfo)
        end_of_day = datetime.combine(current.date(), CLOSE, tzinfo=current.tzinfo)
        if current < start_of_day:
            current = start_of_day
        if current + duration <= end_of_day:
            return current
        current = datetime.combine(current.date() + timedelta(days=1), OPEN, tzinfo=current.tzinfo)
    raise ValueError("no slot within two weeks")


def run(params, context):
    host_tz = timezone(timedelta(hours=params["host_offset_hours"]))
    duration = timedelta(minutes=params["duration_minutes"])
    slots = []
    for request in params["requests"]:
        wanted = datetime.fromisoformat(request).astimezone(host_tz)
        slot = next_business_slot(wanted, duration)
        slots.append(
            {
                "requested": request,
                "slot": slot.isoformat(),
                "slot_utc": slot.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ"),
                "moved_by_minutes": int((slot - wanted).total_seconds() // 60),
            }
        )
    return slots
