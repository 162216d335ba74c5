"""Token authentication: `Authorization: Bearer TOKEN`, or a cookie set by a login form.

The cookie holds an HMAC of the token, not the token itself, and is
HttpOnly and SameSite=Strict (so another site's form cannot post with it).
Tokens are compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import unicodedata
from urllib.parse import unquote, urlsplit

from flask import Flask, Request, Response, redirect, render_template, request

from pipeline.web.failures import Unauthorized

COOKIE = "cbir_auth"
LOGIN_PATHS = ("/login", "/logout")


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only: 127.0.0.0/8, ::1 or localhost."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name may resolve anywhere: treat it as exposed


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "replace")


class TokenAuth:
    """Checks requests against one token."""

    def __init__(self, token: str):
        self._token = _bytes(token)
        self.cookie_value = hmac.new(self._token, b"cbir login cookie", hashlib.sha256).hexdigest()

    def matches(self, token: str) -> bool:
        return hmac.compare_digest(_bytes(token), self._token)

    def allows(self, req: Request) -> bool:
        scheme, _, credentials = req.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.matches(credentials.strip()):
            return True
        cookie = req.cookies.get(COOKIE)
        return cookie is not None and hmac.compare_digest(_bytes(cookie), _bytes(self.cookie_value))


MAX_NEXT = 16_384  # a results page marking many ids has a long URL; past this, "/"
MAX_DECODES = 8  # percent-decodings tried; each costs a pass over the target
# Never in a path of this server as sent: controls (browsers drop tab, CR and LF anywhere
# in a URL, so "/<TAB>/evil" is "//evil"), spaces, and backslashes (read as "/").
_UNSAFE = re.compile(r"[\x00-\x20\x7f\\]")
_DROPPED = re.compile(r"[\t\n\r]")


def _is_own_path(url: str) -> bool:
    """Whether `url`, read as a browser reads it, is a path here without empty or dot
    segments ("//host", "/.//host": another site, or a path that turns into one)."""
    url = _DROPPED.sub("", url).replace("\\", "/")
    if not url.startswith("/") or url.startswith("//"):
        return False
    segments = urlsplit(url).path.split("/")
    return all(s not in ("", ".", "..") for s in segments[1:-1]) and segments[-1] not in (".", "..")


def safe_next(target: str | None) -> str:
    """A path on this server to go back to after logging in, exactly as given; else "/".

    Kept only when it is printable ASCII and a path of this server in every form something
    on the way might turn it into: as sent, percent-decoded again and again until nothing
    changes (at most MAX_DECODES times), and each form with compatibility characters folded
    (NFKC: U+FF0F is "/"). So "//x", "/%5Cx", "/%2F%2Fx", "/%09/x", "/.//x" and
    "javascript:" give "/".
    """
    if not target or len(target) > MAX_NEXT or not target.isascii() or _UNSAFE.search(target):
        return "/"
    forms = [target]
    for _ in range(MAX_DECODES):
        decoded = unquote(forms[-1])
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    else:  # still changing: no page of this server is encoded so many times over
        return "/"
    folded = [unicodedata.normalize("NFKC", form) for form in forms]
    return target if all(_is_own_path(form) for form in forms + folded) else "/"


def login_page(message: str = "", status: int = 401, next_path: str = "/") -> Response:
    html = render_template("login.html", message=message, next=safe_next(next_path))
    return Response(html, status=status, mimetype="text/html")


def install(app: Flask, auth: TokenAuth | None) -> None:
    """The login form, and a check of every other request when a token is set."""

    if auth is not None:

        @app.before_request
        def require_token():
            if request.path in LOGIN_PATHS or auth.allows(request):
                return None
            if request.path.startswith("/api/"):
                raise Unauthorized("a token is required: send 'Authorization: Bearer TOKEN'")
            back = request.full_path.rstrip("?") if request.method == "GET" else "/"
            return login_page(next_path=back)

    @app.get("/login")
    def login_form():
        if auth is None:
            return redirect("/", 303)
        return login_page(status=200, next_path=request.args.get("next"))

    @app.post("/login")
    def login():
        target = safe_next(request.form.get("next"))
        if auth is None:
            return redirect(target, 303)
        if not auth.matches(request.form.get("token", "")):
            return login_page("wrong token", 401, target)
        response = redirect(target, 303)
        response.set_cookie(COOKIE, auth.cookie_value, httponly=True, samesite="Strict")
        return response

    @app.get("/logout")
    def logout():
        response = redirect("/login", 303)
        response.delete_cookie(COOKIE, httponly=True, samesite="Strict")
        return response
