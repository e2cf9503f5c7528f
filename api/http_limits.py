"""What the HTTP server refuses before the app sees a request, under ``torchyard api`` and ``torchyard serve``
alike (both run gunicorn with api/gunicorn_worker.py): a request line or headers past their limits, and a body
whose length is ambiguous. Each refusal is a problem naming its limit by gunicorn's name for it; the server
writes it with api.errors.raw_problem and closes the connection.
"""

from __future__ import annotations

from api.errors import ApiError

# "METHOD /path?query HTTP/1.1" in bytes: gunicorn's most (and a 200-character id or cursor fits many times).
MAX_REQUEST_LINE = 8190
# Header fields of one request, and the bytes of one ("Name: value"): gunicorn's defaults.
MAX_HEADER_FIELDS = 100
MAX_HEADER_FIELD_BYTES = 8190


def request_line_too_long() -> ApiError:
    """414: the request line (method, path, query) is past MAX_REQUEST_LINE."""
    return ApiError(414, "URI Too Long", f"the request line (method, path and query) is longer than "
                    f"{MAX_REQUEST_LINE} bytes (limit_request_line)", kind="uri-too-long")


def headers_too_large() -> ApiError:
    """431: too many header fields, or one too long."""
    return ApiError(431, "Request Header Fields Too Large", f"a request has at most {MAX_HEADER_FIELDS} header "
                    f"fields (limit_request_fields), each at most {MAX_HEADER_FIELD_BYTES} bytes "
                    "(limit_request_field_size)", kind="headers-too-large")


def ambiguous_length() -> ApiError:
    """400: the body's length can't be told one way only (a request smuggling shape)."""
    return ApiError(400, "Bad Request", "the request's body length is ambiguous: send one Content-Length (digits "
                    "only), or Transfer-Encoding: chunked without a Content-Length", kind="ambiguous-length")


def gunicorn_limit_options() -> list[str]:
    """gunicorn's command-line options for these limits."""
    return ["--limit-request-line", str(MAX_REQUEST_LINE), "--limit-request-fields", str(MAX_HEADER_FIELDS),
            "--limit-request-field_size", str(MAX_HEADER_FIELD_BYTES)]
