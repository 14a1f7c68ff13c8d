"""Reading answers of servers that may not be a job API v1: base URLs, foreign shapes, error bodies.

Clients of the public PixCrawler platform pass base URLs that end in `/api/v1` (or `/v1`);
`api_root` strips that, since this SDK adds `/api/v1/...` itself. The platform's own API
answers in another shape than the dataset job API v1 (DESIGN §2): paginated
`{"items": [...]}` job lists, integer job ids, FastAPI's 422 `{"detail": ...}` bodies or
`{"error": {"message": ...}}`. `foreign_shape` recognises those, so that the user reads "this
server does not serve dataset chunks" instead of "malformed job manifest"; `body_message`
takes the message out of any 4xx body, whatever its shape, to show it.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from pixcrawler_engine._errors import AuthenticationError, NotFoundError, PixCrawlerError
from pixcrawler_engine.sources._http import Retryable, parse_retry_after

if TYPE_CHECKING:
    import httpx

__all__ = [
    "KEY_HINT",
    "api_root",
    "body_message",
    "foreign_shape",
    "not_a_job_api",
    "raise_for_status",
]

KEY_HINT = "check the API key (the api_key argument or the PIXCRAWLER_API_KEY variable)"

_VERSION_SUFFIX = re.compile(r"(?:/api)?/v1/*$")
_MAX_MESSAGE = 300


def api_root(base_url: str) -> str:
    """`base_url` without a trailing slash and without a trailing `/api/v1` or `/v1`."""
    return _VERSION_SUFFIX.sub("", base_url.rstrip("/"))


def foreign_shape(data: Any, *, listing: bool) -> str | None:
    """What marks `data` as another API's answer than the job API v1's; None if nothing does.

    Args:
        data: the decoded JSON of `GET /api/v1/jobs` (`listing`) or `GET /api/v1/jobs/{id}`.
        listing: whether it answers the job list.
    """
    if not isinstance(data, dict):
        return None
    if "items" in data and "jobs" not in data:
        return "a paginated {'items': [...]} job list"
    if listing:
        return None
    for key in ("job_id", "id"):
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return f"an integer job id ({key}={value})"
    if "job_id" not in data and "chunks" not in data:
        return "a job without 'job_id' and 'chunks'"
    return None


def not_a_job_api(url: str, what: str) -> PixCrawlerError:
    """The error for a server whose answer at `url` has the foreign shape `what`."""
    return PixCrawlerError(
        f"{url} answered with {what}: this server does not serve dataset chunks (job API v1). "
        "It looks like the PixCrawler platform's own API; point base_url at a dataset job API "
        "(`pixcrawler serve` of a store, or the platform's dataset export endpoint)"
    )


def raise_for_status(
    resp: httpx.Response, shown: str, *, not_found: str, job_id: str | None, has_key: bool
) -> None:
    """Raises the error an answer of the job API other than 200 means; the body is quoted.

    Raises:
        AuthenticationError: 401 (a missing or rejected key) or 403.
        NotFoundError: 404, with `not_found` as the message.
        PixCrawlerError: 422 (another API, see `not_a_job_api`) or another status.
        Retryable: 429 or 5xx (the caller's retry loop waits and tries again).
    """
    code = resp.status_code
    if code == 200:
        return
    said = ""
    if 400 <= code < 500:
        message = body_message(resp.content, resp.headers.get("content-type", ""))
        said = f" (the server said: {message})" if message else ""
    if code == 401:
        if has_key:
            raise AuthenticationError(
                f"the API key was rejected by {shown} (HTTP 401){said}: {KEY_HINT}"
            )
        raise AuthenticationError(f"{shown} wants an API key (HTTP 401){said}: {KEY_HINT}")
    if code == 403:
        what = f"job {job_id!r}" if job_id else shown
        raise AuthenticationError(
            f"the API key has no access to {what} (HTTP 403){said}: {KEY_HINT}"
        )
    if code == 404:
        raise NotFoundError(f"{not_found}{said}")
    if code == 422:  # the job API v1 never validates like this; FastAPI apps do
        raise not_a_job_api(shown, f"HTTP 422 Unprocessable Entity{said}")
    if code == 429 or code >= 500:
        after = parse_retry_after(resp.headers.get("Retry-After"))
        raise Retryable(f"HTTP {code} {resp.reason_phrase}".rstrip(), retry_after=after)
    raise PixCrawlerError(f"GET {shown} answered HTTP {code} {resp.reason_phrase}{said}".rstrip())


def body_message(body: bytes, content_type: str) -> str | None:
    """The message an error body carries (JSON `detail`, `error`, `message`, or text)."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None
    message: Any = None
    if "json" in content_type or text[:1] in "{[":
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        message = _json_message(data)
    if message is None and "html" not in content_type and not text.startswith("<"):
        message = text
    if message is None:
        return None
    message = " ".join(str(message).split())
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 3] + "..."


def _json_message(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    for key in ("detail", "error", "message"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict):  # {"error": {"message": ...}}
            inner = _json_message(value)
            if inner:
                return inner
        if isinstance(value, list) and value:  # FastAPI: [{"loc": [...], "msg": ...}, ...]
            parts = []
            for item in value:
                if isinstance(item, dict) and isinstance(item.get("msg"), str):
                    loc = item.get("loc")
                    where = ".".join(map(str, loc)) if isinstance(loc, list) else ""
                    parts.append(f"{where}: {item['msg']}" if where else item["msg"])
                elif isinstance(item, str):
                    parts.append(item)
            if parts:
                return "; ".join(parts)
    return None
