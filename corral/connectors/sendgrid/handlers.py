"""SendGrid's bespoke handlers: the Twilio SendGrid v3 Web API
(https://www.twilio.com/docs/sendgrid/api-reference).

Connector code: it runs in corral's sandbox, where `http` and `log` are provided.
Mail Send takes a message as personalizations (who gets it), from, subject and
content; `send_mail` builds that from flat params. It answers 202 Accepted
with an empty body and the message's id in X-Message-Id, which becomes the
output; failures name SendGrid's errors ({"errors": [{"message", "field"}]}).
"""

import time

#: connector.json's baseUrl; a connection's baseUrl (the EU region) overrides it.
BASE_URL = "https://api.sendgrid.com/v3"
MAX_RECIPIENTS = 1000  # to + cc + bcc in one request


def api_headers(context):
    credentials = (context.get("connection") or {}).get("credentials") or {}
    for name in ("api_key", "token", "access_token"):
        if credentials.get(name):
            return {
                "Authorization": "Bearer " + str(credentials[name]),
                "Accept": "application/json",
            }
    raise ValueError("the SendGrid connection needs credentials.api_key (SG....)")


def address(value):
    """An address param ("a@b.co" or {"email", "name"}) as SendGrid's email object."""
    if isinstance(value, str):
        return {"email": value}
    return dict(value)


def personalization(params):
    """The one personalization: to, cc and bcc, each address once across the three."""
    result = {}
    seen = set()
    for kind in ("to", "cc", "bcc"):
        if kind not in params:
            continue
        result[kind] = [address(value) for value in params[kind]]
        for item in result[kind]:
            email = item["email"].lower()
            if email in seen:
                raise ValueError(
                    "each address may appear once across to, cc and bcc (SendGrid refuses "
                    "the message otherwise): " + item["email"] + " is there twice"
                )
            seen.add(email)
    if len(seen) > MAX_RECIPIENTS:
        raise ValueError(
            "SendGrid takes at most " + str(MAX_RECIPIENTS) + " recipients (to, cc and bcc) "
            "in one request; this message has " + str(len(seen))
        )
    if "dynamic_template_data" in params:
        result["dynamic_template_data"] = params["dynamic_template_data"]
    return result


def message(params):
    """The Mail Send request body."""
    body = {"personalizations": [personalization(params)], "from": address(params["from"])}
    if "reply_to" in params:
        body["reply_to"] = address(params["reply_to"])
    if "subject" in params:
        body["subject"] = params["subject"]
    content = []
    if "text" in params:  # SendGrid wants text/plain first
        content.append({"type": "text/plain", "value": params["text"]})
    if "html" in params:
        content.append({"type": "text/html", "value": params["html"]})
    if content:
        body["content"] = content
    for name in ("template_id", "categories", "custom_args", "send_at"):
        if name in params:
            body[name] = params[name]
    if "sandbox_mode" in params:
        body["mail_settings"] = {"sandbox_mode": {"enable": params["sandbox_mode"]}}
    return body


def reason(response):
    """SendGrid's error messages, each with the field it names, as one line."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:300] or "no body"
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, list) or not errors:
        return str(data)[:300]
    parts = []
    for error in errors:
        if not isinstance(error, dict):
            parts.append(str(error))
            continue
        text = str(error.get("message") or "no message")
        if error.get("field"):
            text = text + " (field " + str(error["field"]) + ")"
        parts.append(text)
    return "; ".join(parts)


def send_mail(params, context):
    """POST /v3/mail/send: {"accepted": true, "status": 202, "message_id": ...}."""
    connection = context.get("connection") or {}
    url = str(connection.get("baseUrl") or BASE_URL).rstrip("/") + "/mail/send"
    body = message(params)
    count = sum(len(params.get(kind) or []) for kind in ("to", "cc", "bcc"))
    log("sendgrid: sending a message to " + str(count) + " recipient(s)")
    response = http.post(url, headers=api_headers(context), json=body)
    status = response.status_code
    if status >= 400:
        retry_after = response.headers.get("retry-after")
        reset = response.headers.get("x-ratelimit-reset", "")
        if status == 429 and not retry_after and reset.isdigit():  # SendGrid sends the reset time
            retry_after = str(max(1, int(reset) - int(time.time())))
        raise http.HTTPStatusError(
            "SendGrid mail send failed with HTTP " + str(status) + ": " + reason(response),
            status,
            retry_after,
        )
    message_id = response.headers.get("x-message-id")
    log("sendgrid: accepted, message id " + str(message_id))
    return {"accepted": True, "status": status, "message_id": message_id}
