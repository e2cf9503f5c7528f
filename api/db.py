"""The app's services (settings, database sessions, artifact store, publisher) and one session per request."""

from __future__ import annotations

from flask import Flask, current_app, g
from sqlalchemy.orm import Session

from models.broker import Publisher
from models.services import Services, make_services
from models.settings import Settings

EXTENSION = "torchyard"


def init_services(app: Flask, settings: Settings, publisher: Publisher | None = None) -> Services:
    """Build the app's services (a publisher handed in replaces the broker's); close each request's session."""
    services = make_services(settings, publisher)
    app.extensions[EXTENSION] = services
    app.teardown_appcontext(close_session)
    return services


def services() -> Services:
    """The current app's services."""
    return current_app.extensions[EXTENSION]


def get_session() -> Session:
    """The request's database session, opened on first use."""
    if "db_session" not in g:
        g.db_session = services().sessions()
    return g.db_session


def close_session(_error: BaseException | None = None) -> None:
    """Close the request's session; anything not committed is rolled back."""
    session = g.pop("db_session", None)
    if session is not None:
        session.close()
