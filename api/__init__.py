"""torchyard's HTTP API: a Flask app factory over plain SQLAlchemy sessions. Never imports torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response

from api.schemas import no_content
from models.broker import Publisher
from models.settings import Settings, get_settings


class Api(Flask):
    """Flask, answering OPTIONS on a route as an API does: 204, the route's methods in Allow, no body."""

    def make_default_options_response(self) -> Response:
        """204 with Allow (Flask's own is a 200 labelled text/html)."""
        response = no_content()
        response.allow.update(super().make_default_options_response().allow)
        return response


def create_app(test_config: Mapping[str, Any] | None = None, publisher: Publisher | None = None) -> Flask:
    """Build the app from the settings; ``test_config`` keys that name a setting (``database_url``,
    ``broker_url``, …) override it, and the other (upper-case) keys go to Flask's config. Jobs are
    published through ``publisher``, by default one for the broker the settings name.
    """
    from api import (  # blueprints import the app's helpers
        artifacts,
        audit,
        dashboard,
        datasets,
        health,
        jobs,
        logs,
        me,
        network,
        sweeps,
        tags,
        workers,
    )
    from api.db import init_services
    from api.errors import register_error_handlers
    from api.metrics import init_metrics
    from api.rate_limits import init_rate_limits

    settings = app_settings(test_config or {})
    app = Api(__name__, static_folder=None)  # the dashboard's blueprint serves its own
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        # Form fields beside an upload are small; the file part alone may use the whole limit.
        MAX_FORM_MEMORY_SIZE=1024 * 1024,
        JSON_SORT_KEYS=False,
    )
    app.config.update({k: v for k, v in (test_config or {}).items() if k not in Settings.model_fields})
    init_services(app, settings, publisher)
    register_error_handlers(app)
    init_rate_limits(app, settings)
    init_metrics(app)  # GET /metrics, and the latency of every request
    dashboard.init_security_headers(app)
    for module in (jobs, sweeps, logs, network, artifacts, datasets, workers, me, audit, tags, health,
                   dashboard):
        app.register_blueprint(module.bp)
    return app


def app_settings(overrides: Mapping[str, Any]) -> Settings:
    """The process settings with the named fields replaced (validated like the environment's)."""
    base = get_settings()
    fields = {k: v for k, v in overrides.items() if k in Settings.model_fields}
    if not fields:
        return base
    return Settings.model_validate({**base.model_dump(), **fields}).resolved()
