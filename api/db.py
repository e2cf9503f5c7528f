"""The app's services (settings, database sessions, artifact store) and one session per request."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from models.db import make_engine, make_sessionmaker
from models.settings import Settings
from models.storage import ArtifactStore

EXTENSION = "torchyard"


@dataclass
class Services:
    """What a request needs beyond Flask, built once per app from its settings."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore


def init_services(app: Flask, settings: Settings) -> Services:
    """Build the app's engine, session factory and artifact store; close the request session after each."""
    engine = make_engine(settings.database_url)
    services = Services(settings, engine, make_sessionmaker(engine), ArtifactStore(settings.artifacts_url))
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
