"""The web dashboard at ``/`` and the OpenAPI document in Swagger UI at ``/docs``: static pages and modules
from api/static (no build step, nothing fetched at run time). The pages call the API with the key the user
signs in with, so these routes need none; every answer here carries a Content-Security-Policy that lets a
page run only this app's own scripts and styles (what a user typed is always shown as text, and even text
that slipped into markup could run nothing)."""

from __future__ import annotations

from flask import Blueprint, Response

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
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@bp.after_request
def _secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


@bp.get("/")
def index():
    """The dashboard: one page whose views (jobs, a job, compare, workers, datasets) follow the URL's hash."""
    return bp.send_static_file("index.html")


@bp.get("/docs")
def docs():
    """The API's OpenAPI document in Swagger UI."""
    return bp.send_static_file("docs.html")
