"""Slack's conversations.history with `response_metadata.next_cursor`, counted with closures
(nonlocal) and a Counter of who posted."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

from collections import Counter


def make_tally():
    messages = 0
    threads = 0

    def tally(message):
        nonlocal messages, threads
        messages += 1
        if message.get("reply_count"):
            threads += 1
        return messages, threads

    return tally


def run(params, context):
    connection = context["connection"]
    headers = {"Authorization": "Bearer " + connection["credentials"]["bot_token"]}
    query = {"channel": params["channel"], "limit": 3}
    tally = make_tally()
    posters = Counter()
    cursor = None
    totals = (0, 0)
    while True:
        if cursor:
            query["cursor"] = cursor
        body = http.get(
            connection["baseUrl"] + "/api/conversations.history", params=query, headers=headers
        ).json()
        if not body.get("ok"):
            raise RuntimeError("slack error: " + str(body.get("error")))
        for message in body["messages"]:
            if message.get("subtype") == "channel_join":
                continue
            totals = tally(message)
            posters[message["user"]] += 1
        cursor = body.get("response_metadata", {}).get("next_cursor")
        if not cursor:
            break
    return {
        "messages": totals[0],
        "threads": totals[1],
        "top_posters": [user for user, _ in posters.most_common(2)],
    }
