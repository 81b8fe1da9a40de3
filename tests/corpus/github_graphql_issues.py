"""GitHub's GraphQL API with cursor pagination through `pageInfo { hasNextPage endCursor }`;
edges flattened to nodes, labels gathered."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

QUERY = """
query($owner: String!, $name: String!, $after: String) {
  repository(owner: $owner, name: $name) {
    issues(first: 2, after: $after, states: OPEN) {
      pageInfo { hasNextPage endCursor }
      edges { cursor node { number title labels(first: 5) { nodes { name } } } }
    }
  }
}
"""


def graphql(url, token, variables):
    response = http.post(
        url,
        json={"query": QUERY, "variables": variables},
        headers={"Authorization": "bearer " + token},
    )
    body = response.raise_for_status().json()
    if body.get("errors"):
        raise RuntimeError("; ".join(e["message"] for e in body["errors"]))
    return body["data"]


def issues(url, token, owner, name):
    variables = {"owner": owner, "name": name, "after": None}
    while True:
        page = graphql(url, token, variables)["repository"]["issues"]
        yield from (edge["node"] for edge in page["edges"])
        if not page["pageInfo"]["hasNextPage"]:
            break
        variables = {**variables, "after": page["pageInfo"]["endCursor"]}


def run(params, context):
    connection = context["connection"]
    owner, name = params["repository"].split("/")
    nodes = list(
        issues(connection["baseUrl"] + "/graphql", connection["credentials"]["token"], owner, name)
    )
    return {
        "issues": [
            {
                "number": n["number"],
                "title": n["title"],
                "labels": [label["name"] for label in n["labels"]["nodes"]],
            }
            for n in nodes
        ],
        "labels": sorted({label["name"] for n in nodes for label in n["labels"]["nodes"]}),
    }
