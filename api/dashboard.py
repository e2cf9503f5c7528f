"""The web dashboard at ``/`` and the OpenAPI document in Swagger UI at ``/docs``: static pages and modules
from api/static (no build step, nothing fetched at run time). The pages call the API with the key the user
signs in with, so these routes need none; every answer here carries a Content-Security-Policy that lets a
page run only this app's own scripts and styles (what a user typed is always shown as text, and even text
that slipped into markup could run nothing). It owns the app's security headers: those of every answer, the
API's included, and the pages' own."""

from __future__ import annotations

from flask import Blueprint, Flask, Response

bp = Blueprint("dashboard", __name__, static_folder="static", static_url_path="/static")

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",  # Swagger UI's icons are data: URLs in its stylesheet
    "connect-src 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
))
# Every answer of the app: a browser takes a body for what its Content-Type says, and never sniffs a JSON answer,
# a problem or a downloaded log into HTML or a script.
APP_HEADERS = {"X-Content-Type-Options": "nosniff"}
# The pages' own: the policy, and no Referer that would carry a page's URL (a job id in its hash) elsewhere.
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Referrer-Policy": "no-referrer"}


def init_security_headers(app: Flask) -> None:
    """Put APP_HEADERS on every answer of ``app``, errors included (the pages add PAGE_HEADERS)."""
    app.after_request(_every_answer)


def _every_answer(response: Response) -> Response:
    response.headers.update(APP_HEADERS)
    return response


@bp.after_request
def _page(response: Response) -> Response:
    response.headers.update(PAGE_HEADERS)
    return response


@bp.get("/")
def index():
    """The dashboard: one page whose views (jobs, a job, compare, sweeps, a sweep, workers, datasets) follow the
    URL's hash."""
    return bp.send_static_file("index.html")


@bp.get("/docs")
def docs():
    """The API's OpenAPI document in Swagger UI."""
    return bp.send_static_file("docs.html")
