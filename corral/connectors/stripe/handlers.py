"""Stripe's bespoke handlers: the Stripe API v1 (https://docs.stripe.com/api).

Connector code: it runs in corral's sandbox, where `http` and `log` are provided.
Stripe takes `application/x-www-form-urlencoded` bodies, not JSON: nested params
are flattened the way Stripe's own libraries do (`metadata[order]=42`,
`payment_method_types[0]=card`, booleans as `true`/`false`). The secret key is
the HTTP Basic username with an empty password (https://docs.stripe.com/api/authentication).
"""

import base64

#: connector.json's baseUrl; a connection's baseUrl overrides it.
BASE_URL = "https://api.stripe.com/v1"

#: Params that are not Stripe fields: they become headers.
NOT_FIELDS = ("idempotency_key",)


def secret_key(context):
    credentials = (context.get("connection") or {}).get("credentials") or {}
    for name in ("username", "user", "api_key"):  # the names the generic path's basic auth reads
        if credentials.get(name):
            return str(credentials[name])
    raise ValueError("the Stripe connection needs credentials.api_key (sk_live_... or rk_live_...)")


def flatten(prefix, value, fields):
    """Add `value` to `fields` under Stripe's bracket names; None is left out."""
    if value is None:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(prefix + "[" + str(key) + "]", item, fields)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            flatten(prefix + "[" + str(index) + "]", item, fields)
    elif isinstance(value, bool):
        fields[prefix] = "true" if value else "false"
    else:
        fields[prefix] = str(value)


def form(params):
    """The form fields of `params` (every param that is a Stripe field)."""
    fields = {}
    for name, value in params.items():
        if name not in NOT_FIELDS:
            flatten(name, value, fields)
    return fields


def post(context, path, params, what):
    """POST `params` form-encoded to `path`; the object Stripe returned."""
    connection = context.get("connection") or {}
    pair = (secret_key(context) + ":").encode("utf-8")
    headers = {
        "Authorization": "Basic " + base64.b64encode(pair).decode("ascii"),
        "Accept": "application/json",
    }
    if params.get("idempotency_key"):
        headers["Idempotency-Key"] = params["idempotency_key"]
    url = str(connection.get("baseUrl") or BASE_URL).rstrip("/") + path
    # `data=` with a dict: the host sends it as application/x-www-form-urlencoded.
    response = http.post(url, headers=headers, data=form(params))
    return checked(response, what)


def checked(response, what):
    """The JSON object of a successful response; an http_error naming Stripe's error."""
    status = response.status_code
    if status < 400:
        return response.json()
    error = {}
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    kind = str(error.get("type") or "api_error")
    code = error.get("decline_code") or error.get("code")
    message = "Stripe " + what + " failed with HTTP " + str(status) + ": " + kind
    if code:
        message = message + " " + str(code)
    message = message + ": " + str(error.get("message") or response.text[:300])
    if error.get("param"):
        message = message + " (param " + str(error["param"]) + ")"
    raise http.HTTPStatusError(message, status, response.headers.get("retry-after"))


def create_customer(params, context):
    """POST /v1/customers: the customer (id cus_...)."""
    customer = post(context, "/customers", params, "create customer")
    log("stripe: created customer " + str(customer.get("id")))
    return customer


def create_payment_intent(params, context):
    """POST /v1/payment_intents: the PaymentIntent (id pi_..., status, client_secret)."""
    log("stripe: creating a payment intent of " + str(params["amount"]) + " " + params["currency"])
    intent = post(context, "/payment_intents", params, "create payment intent")
    log(
        "stripe: created payment intent " + str(intent.get("id")) + ", " + str(intent.get("status"))
    )
    return intent
