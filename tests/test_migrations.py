"""The migrations build exactly the schema the models describe, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from migrations.apply import downgrade, upgrade
from models.db import make_engine
from models.tables import Base


def schema_diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request) -> str:
    return request.getfixturevalue(f"empty_{request.param}_url")


def test_an_empty_database_upgraded_to_head_matches_the_models(empty_url):
    upgrade(empty_url)
    assert schema_diff(empty_url) == []
    assert set(Base.metadata.tables) <= table_names(empty_url)


def test_upgrade_twice_is_a_no_op_and_downgrade_empties_the_database(empty_url):
    upgrade(empty_url)
    upgrade(empty_url)
    downgrade(empty_url)
    assert table_names(empty_url) == {"alembic_version"}
    upgrade(empty_url)
    assert schema_diff(empty_url) == []


def test_upgrade_creates_the_folder_of_a_new_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'home' / 'nested' / 'torchyard.db'}"
    upgrade(url)
    assert (tmp_path / "home" / "nested" / "torchyard.db").exists()
    assert schema_diff(url) == []


def test_jobs_stored_before_sweeps_existed_upgrade_as_ordinary_unpaused_jobs_and_downgrade_back(empty_url):
    upgrade(empty_url, "0005_experiments_and_logs")
    engine = make_engine(empty_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO users (id, name, created_at, role, share) "
                                    "VALUES ('usr_1', 'ada', CURRENT_TIMESTAMP, 'user', 1)"))
            connection.execute(text("INSERT INTO jobs (id, user_id, name, status, spec, queue, priority, epoch, "
                                    "epochs, cancel_requested, attempts, max_attempts, created_at, updated_at) VALUES "
                                    "('job_1', 'usr_1', 'j', 'queued', '{}', 'cpu', 1, 0, 2, false, 0, 3, "
                                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        upgrade(empty_url)
        with engine.connect() as connection:
            row = connection.execute(text("SELECT sweep_id, sweep_trial, stop_at_epoch, paused FROM jobs")).one()
        assert tuple(row) == (None, None, None, False)
        downgrade(empty_url, "0005_experiments_and_logs")
        assert "sweeps" not in table_names(empty_url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id FROM jobs")).scalar_one() == "job_1"
    finally:
        engine.dispose()


def test_artifacts_stored_before_the_running_total_are_counted_by_the_upgrade(empty_url):
    upgrade(empty_url, "0007_scale_indexes")
    engine = make_engine(empty_url)
    try:
        with engine.begin() as connection:
            for user in ("usr_1", "usr_2", "usr_3"):
                connection.execute(text(f"INSERT INTO users (id, name, created_at, role, share) "
                                        f"VALUES ('{user}', '{user}', CURRENT_TIMESTAMP, 'user', 1)"))
            for job, user in (("job_1", "usr_1"), ("job_2", "usr_1"), ("job_3", "usr_2")):
                connection.execute(text(
                    "INSERT INTO jobs (id, user_id, name, status, spec, queue, priority, epoch, epochs, "
                    "cancel_requested, attempts, max_attempts, created_at, updated_at, paused) VALUES "
                    f"('{job}', '{user}', 'j', 'succeeded', '{{}}', 'cpu', 1, 2, 2, false, 1, 3, CURRENT_TIMESTAMP, "
                    "CURRENT_TIMESTAMP, false)"))
            for number, (job, size) in enumerate((("job_1", 100), ("job_1", 20), ("job_2", 3), ("job_3", 4000))):
                connection.execute(text(
                    "INSERT INTO artifacts (id, job_id, kind, name, uri, size, sha256, created_at) VALUES "
                    f"('art_{number}', '{job}', 'weights', 'f{number}', 'file:///f', {size}, 'x', CURRENT_TIMESTAMP)"))
        upgrade(empty_url)
        with engine.connect() as connection:
            jobs = dict(connection.execute(text("SELECT id, stored_bytes FROM jobs")).all())
            users = dict(connection.execute(text("SELECT user_id, artifacts FROM stored_bytes")).all())
        assert jobs == {"job_1": 120, "job_2": 3, "job_3": 4000}
        assert users == {"usr_1": 123, "usr_2": 4000}  # usr_3 has none: no row, which reads as 0
        downgrade(empty_url, "0007_scale_indexes")
        assert "stored_bytes" not in table_names(empty_url)
    finally:
        engine.dispose()
