"""Slack's bespoke handlers: the Slack Web API (https://api.slack.com/web).

Connector code: it runs in corral's sandbox, where `http` and `log` are provided.
Slack answers most failures with HTTP 200 and {"ok": false, "error": "<code>"};
`call` turns that into a failure whose message names Slack's error code, so a
workflow never mistakes a refused message for a sent one.
"""

#: connector.json's baseUrl; a connection's baseUrl overrides it.
BASE_URL = "https://slack.com/api"

#: Error codes Slack documents as temporary: they end as a retryable HTTP error.
TRANSIENT = ("internal_error", "fatal_error", "service_unavailable", "request_timeout")


class SlackError(Exception):
    """Slack answered {"ok": false}: the message names the method and Slack's error code."""


def token(context):
    credentials = (context.get("connection") or {}).get("credentials") or {}
    for name in ("token", "access_token", "bot_token"):
        if credentials.get(name):
            return str(credentials[name])
    raise ValueError("the Slack connection needs credentials.token (xoxb-... or xoxp-...)")


def details(data):
    """What Slack adds to an error: the scope it needed, the arguments it refused."""
    extra = []
    if data.get("needed"):
        extra.append("needed scope " + str(data["needed"]))
    if data.get("provided"):
        extra.append("token has " + str(data["provided"]))
    if data.get("errors"):
        extra.append("errors: " + ", ".join(str(item) for item in data["errors"]))
    messages = (data.get("response_metadata") or {}).get("messages")
    if messages:
        extra.append("; ".join(str(item) for item in messages))
    return " (" + "; ".join(extra) + ")" if extra else ""


def call(context, method, payload):
    """POST `payload` as JSON to Slack's `method`; Slack's answer when it says ok."""
    connection = context.get("connection") or {}
    url = str(connection.get("baseUrl") or BASE_URL).rstrip("/") + "/" + method
    response = http.post(
        url,
        headers={
            "Authorization": "Bearer " + token(context),
            "Content-Type": "application/json; charset=utf-8",
        },
        json=payload,
    )
    response.raise_for_status()  # 429 (ratelimited, with Retry-After) and 5xx: retryable
    try:
        data = response.json()
    except ValueError:
        raise SlackError(
            "Slack "
            + method
            + " answered HTTP "
            + str(response.status_code)
            + " with a body that is not JSON"
        ) from None
    if not isinstance(data, dict):
        raise SlackError("Slack " + method + " answered something other than a JSON object")
    if data.get("ok") is not True:
        error = str(data.get("error") or "unknown_error")
        message = "Slack " + method + " failed: " + error + details(data)
        if error == "ratelimited":
            raise http.HTTPStatusError(message, 429, response.headers.get("retry-after"))
        if error in TRANSIENT:
            raise http.HTTPStatusError(message, 503, response.headers.get("retry-after"))
        raise SlackError(message)
    if data.get("warning"):
        log("slack " + method + " warning: " + str(data["warning"]))
    return data


def message_payload(params, names):
    return {name: params[name] for name in names if name in params}


def post_message(params, context):
    """chat.postMessage: Slack's answer ({"ok": true, "channel", "ts", "message"})."""
    payload = message_payload(
        params,
        (
            "channel",
            "text",
            "blocks",
            "attachments",
            "thread_ts",
            "reply_broadcast",
            "mrkdwn",
            "unfurl_links",
            "unfurl_media",
            "username",
            "icon_emoji",
            "icon_url",
        ),
    )
    data = call(context, "chat.postMessage", payload)
    log("slack: posted message " + str(data.get("ts")) + " to " + str(data.get("channel")))
    return data


def update_message(params, context):
    """chat.update: Slack's answer ({"ok": true, "channel", "ts", "text"})."""
    payload = message_payload(params, ("channel", "ts", "text", "blocks", "attachments"))
    return call(context, "chat.update", payload)
