"""Notion's bespoke handlers: the Notion API, version 2022-06-28
(https://developers.notion.com/reference).

Connector code: it runs in corral's sandbox, where `http` and `log` are provided.
"""

#: connector.json's baseUrl and Notion-Version; a connection's baseUrl overrides the first.
BASE_URL = "https://api.notion.com/v1"
NOTION_VERSION = "2022-06-28"
MAX_TEXT = 2000  # characters in one rich text object
MAX_BLOCKS = 100  # blocks in one request


def api_headers(context):
    credentials = (context.get("connection") or {}).get("credentials") or {}
    for name in ("token", "access_token", "api_key"):
        if credentials.get(name):
            return {
                "Authorization": "Bearer " + str(credentials[name]),
                "Notion-Version": NOTION_VERSION,
                "Accept": "application/json",
            }
    raise ValueError("the Notion connection needs credentials.token (an integration token)")


def rich_text(text):
    """`text` as rich text objects of at most MAX_TEXT characters each."""
    return [
        {"type": "text", "text": {"content": text[start : start + MAX_TEXT]}}
        for start in range(0, len(text), MAX_TEXT)
    ]


def paragraphs(content):
    """Plain text as paragraph blocks, one per paragraph (split on blank lines)."""
    blocks = []
    for part in content.replace("\r\n", "\n").split("\n\n"):
        part = part.strip("\n")
        if part.strip():
            blocks.append(
                {
                    "object": "block",
                    "type": "paragraph",
                    "paragraph": {"rich_text": rich_text(part)},
                }
            )
    return blocks


def checked(response, what):
    """The JSON object of a successful response; an http_error naming Notion's error code."""
    status = response.status_code
    if status < 400:
        return response.json()
    code, message = "error", response.text[:300]
    try:
        data = response.json()
        code = str(data.get("code") or code)
        message = str(data.get("message") or message)
    except (ValueError, AttributeError):
        pass
    raise http.HTTPStatusError(
        "Notion " + what + " failed with HTTP " + str(status) + ": " + code + ": " + message,
        status,
        response.headers.get("retry-after"),
    )


def create_page(params, context):
    """POST /v1/pages: the new page (id, url, properties, ...)."""
    if params.get("parent_database_id"):
        parent = {"database_id": params["parent_database_id"]}
        title_property = params.get("title_property") or "Name"
    else:
        parent = {"page_id": params["parent_page_id"]}
        title_property = params.get("title_property") or "title"
    properties = dict(params.get("properties") or {})
    if "title" in params:
        if title_property in properties:
            raise ValueError(
                "give the title either as `title` or as properties["
                + repr(title_property)
                + "], not both"
            )
        properties[title_property] = {"title": rich_text(params["title"])}
    children = list(params.get("children") or [])
    if params.get("content"):
        children = children + paragraphs(params["content"])
    if len(children) > MAX_BLOCKS:
        raise ValueError(
            "Notion takes at most " + str(MAX_BLOCKS) + " blocks when it creates a page; "
            "this page has " + str(len(children))
        )
    body = {"parent": parent, "properties": properties}
    if children:
        body["children"] = children
    if params.get("icon_emoji"):
        body["icon"] = {"type": "emoji", "emoji": params["icon_emoji"]}
    if params.get("cover_url"):
        body["cover"] = {"type": "external", "external": {"url": params["cover_url"]}}
    connection = context.get("connection") or {}
    url = str(connection.get("baseUrl") or BASE_URL).rstrip("/") + "/pages"
    page = checked(http.post(url, headers=api_headers(context), json=body), "create page")
    log("notion: created page " + str(page.get("id")))
    return page
