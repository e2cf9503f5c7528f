"""What the API and a worker process need beyond their framework, built once from the Settings."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from models.broker import BrokerPublisher, Publisher
from models.db import make_engine, make_sessionmaker
from models.settings import Settings
from models.storage import ArtifactStore


@dataclass
class Services:
    """Settings, the database engine and its sessions, the artifact store and the broker's publisher."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore
    publisher: Publisher


def make_services(settings: Settings, publisher: Publisher | None = None, engine: Engine | None = None) -> Services:
    """Services over ``settings``; a publisher or engine handed in replaces the one the settings name."""
    engine = engine or make_engine(settings.database_url)
    return Services(settings, engine, make_sessionmaker(engine), ArtifactStore(settings.artifacts_url),
                    publisher or BrokerPublisher(settings))
