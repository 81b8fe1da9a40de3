"""PagerDuty's bespoke handler: the Events API v2
(https://developer.pagerduty.com/docs/events-api-v2/overview/).

Connector code: it runs in corral's sandbox, where `http` and `log` are provided.
Events go to another host than the REST API (events.pagerduty.com, not
api.pagerduty.com) and authenticate by the integration's routing key in the
body, not by a header: the generic path can build neither, so `send_event` is
bespoke and takes the routing key from the connection's credentials (a
workflow's params never carry it). The REST functions (list_incidents) go
through the generic path with the definition's `Authorization: Token token=`.
"""

import urllib.parse

EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
#: PagerDuty's REST hosts, and the events host of each (the EU service region has its own).
EVENTS_HOSTS = {
    "api.pagerduty.com": "events.pagerduty.com",
    "api.eu.pagerduty.com": "events.eu.pagerduty.com",
}
PAYLOAD_FIELDS = (
    "summary",
    "source",
    "severity",
    "timestamp",
    "component",
    "group",
    "class",
    "custom_details",
)
EVENT_FIELDS = ("dedup_key", "images", "links", "client", "client_url")


def events_url(context):
    """Where events go: PagerDuty's events host for its REST host; else <baseUrl>/v2/enqueue."""
    base = str((context.get("connection") or {}).get("baseUrl") or "").rstrip("/")
    if not base:
        return EVENTS_URL
    host = (urllib.parse.urlsplit(base).hostname or "").lower()
    if host in EVENTS_HOSTS:
        return "https://" + EVENTS_HOSTS[host] + "/v2/enqueue"
    return base + "/v2/enqueue"


def routing_key(context):
    credentials = (context.get("connection") or {}).get("credentials") or {}
    for name in ("routing_key", "integration_key"):
        if credentials.get(name):
            return str(credentials[name])
    raise ValueError(
        "the PagerDuty connection needs credentials.routing_key (the integration key of an "
        "Events API v2 integration on the service) to send events"
    )


def event(params, key):
    """The Events API v2 body: routing_key, event_action, the payload on a trigger."""
    body = {"routing_key": key, "event_action": params["event_action"]}
    for name in EVENT_FIELDS:
        if name in params:
            body[name] = params[name]
    if params["event_action"] == "trigger":
        body["payload"] = {name: params[name] for name in PAYLOAD_FIELDS if name in params}
    else:
        ignored = [name for name in PAYLOAD_FIELDS if name in params]
        if ignored:  # PagerDuty drops them on acknowledge and resolve: say so, do not fail
            log("pagerduty: " + ", ".join(ignored) + " apply to trigger events only; not sent")
    return body


def reason(response):
    """PagerDuty's status, message and errors ({"status", "message", "errors": [...]})."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:300] or "no body"
    if not isinstance(data, dict):
        return str(data)[:300]
    parts = [str(data[name]) for name in ("status", "message") if data.get(name)]
    text = ": ".join(parts) or str(data)[:300]
    errors = data.get("errors")
    if isinstance(errors, list) and errors:
        text = text + " (" + "; ".join(str(error) for error in errors) + ")"
    return text


def send_event(params, context):
    """POST /v2/enqueue: PagerDuty's answer ({"status": "success", "message", "dedup_key"})."""
    body = event(params, routing_key(context))
    action = params["event_action"]
    log("pagerduty: sending a " + action + " event")
    response = http.post(
        events_url(context),
        headers={"Accept": "application/json"},
        json=body,
    )
    status = response.status_code
    if status >= 400:  # 429 and 5xx are worth retrying (PagerDuty says so): keep the status
        message = "PagerDuty " + action + " event failed with HTTP " + str(status)
        raise http.HTTPStatusError(
            message + ": " + reason(response), status, response.headers.get("retry-after")
        )
    answer = response.json()
    log("pagerduty: " + str(answer.get("message")) + ", dedup_key " + str(answer.get("dedup_key")))
    return answer
