"""The API key that guards the UI and the API alike when the server listens beyond this machine.

Scripts send ``Authorization: Bearer KEY``. A browser signs in once on ``/login``, which
sets a cookie holding an HMAC of the key (never the key itself; HttpOnly, SameSite=Strict).
The guard is one ASGI middleware in front of everything the server answers (the JSON API,
the Gradio page, its assets and its event streams), so no route can be forgotten.
"""

from __future__ import annotations

import hashlib
import hmac
import html
from http.cookies import SimpleCookie
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

COOKIE = "tunelab_session"
LOGIN_PATH = "/login"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def session_token(api_key: str) -> str:
    return hmac.new(api_key.encode(), b"tunelab-webui-session", hashlib.sha256).hexdigest()


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class KeyGuard:
    """ASGI middleware: lets a request through only with the key (header) or the session cookie."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key
        self.token = session_token(api_key)

    def allowed(self, headers: dict[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _equal(given.strip(), self.api_key):
            return True
        cookie = SimpleCookie(headers.get("cookie", ""))
        return COOKIE in cookie and _equal(cookie[COOKIE].value, self.token)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] == LOGIN_PATH:
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if self.allowed(headers):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        wants_page = scope["method"] == "GET" and "text/html" in headers.get("accept", "")
        if wants_page:
            response: Any = RedirectResponse(LOGIN_PATH, status_code=303)
        else:
            from fastapi.responses import JSONResponse

            response = JSONResponse({"error": "missing or invalid API key: send 'Authorization: Bearer <key>' "
                                              "with the key the web UI was started with, or sign in at /login."},
                                    status_code=401)
        await response(scope, receive, send)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>tunelab — sign in</title>
<style>body{{font-family:system-ui,sans-serif;max-width:24rem;margin:6rem auto}}input,button{{font-size:1rem;
padding:.4rem;width:100%;margin:.3rem 0}}.e{{color:#b00}}</style></head><body><h2>tunelab web UI</h2>
<p>This server was started with <code>--api-key</code>. Enter that key.</p>{error}
<form method="post" action="{path}"><input type="password" name="key" id="key" placeholder="API key" autofocus>
<button type="submit">Sign in</button></form></body></html>"""


def login_router(api_key: str) -> APIRouter:
    router = APIRouter()
    token = session_token(api_key)

    def page(error: str = "", status: int = 200) -> HTMLResponse:
        shown = f'<p class="e">{html.escape(error)}</p>' if error else ""
        return HTMLResponse(_PAGE.format(error=shown, path=LOGIN_PATH), status_code=status)

    @router.get(LOGIN_PATH)
    async def login_form() -> HTMLResponse:
        return page()

    @router.post(LOGIN_PATH)
    async def login(request: Request) -> Any:
        form = await request.form()
        if not _equal(str(form.get("key", "")), api_key):
            return page("That is not the key this server was started with.", 401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    return router
