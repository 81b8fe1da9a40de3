"""An API client that refreshes its OAuth 2 access token on a 401 and retries once; the token
and its expiry are kept in single-underscore attributes behind properties."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

from datetime import datetime, timedelta


class TokenExpired(Exception):
    pass


class OAuth2Client:
    def __init__(self, base_url, credentials, now):
        self.base_url = base_url
        self._client_id = credentials["client_id"]
        self._client_secret = credentials["client_secret"]
        self._refresh_token = credentials["refresh_token"]
        self._access_token = credentials.get("access_token")
        self._expires_at = now + timedelta(minutes=5)
        self._now = now
        self.refreshes = 0

    @property
    def expired(self):
        return self._access_token is None or self._now >= self._expires_at

    @property
    def expires_at(self):
        return self._expires_at.isoformat()

    def refresh(self):
        response = http.post(
            self.base_url + "/oauth/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": self._refresh_token,
                "client_id": self._client_id,
                "client_secret": self._client_secret,
            },
        )
        token = response.raise_for_status().json()
        self._access_token = token["access_token"]
        self._expires_at = self._now + timedelta(seconds=token["expires_in"])
        self.refreshes += 1

    def get(self, path):
        if self.expired:
            self.refresh()
        for attempt in (1, 2):
            response = http.get(
                self.base_url + path, headers={"Authorization": "Bearer " + self._access_token}
            )
            if response.status_code != 401:
                return response.raise_for_status().json()
            if attempt == 2:
                raise TokenExpired("the refreshed token was refused too")
            self.refresh()


def run(params, context):
    connection = context["connection"]
    client = OAuth2Client(
        connection["baseUrl"], connection["credentials"], datetime.fromisoformat(params["now"])
    )
    me = client.get("/oauth/me")
    return {"me": me, "refreshes": client.refreshes, "expires_at": client.expires_at}
