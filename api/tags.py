"""Tags and experiments: the job listing's ``tag`` and ``experiment`` filters, and the caller's tags."""

from __future__ import annotations

from flask import Blueprint, request
from werkzeug.datastructures import MultiDict

from api.auth import require_user, visible
from api.db import get_session
from api.errors import validation_error
from api.pagination import int_arg, one_arg
from api.schemas import API_PREFIX, TagCount, TagList, json_response
from models.experiments import tag_counts
from models.spec import MAX_TAGS, Problem
from models.tables import Job
from models.text import label_problem, tag_problem

bp = Blueprint("tags", __name__, url_prefix=API_PREFIX)
bp.before_request(require_user)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def label_filters(args: MultiDict[str, str]) -> tuple[list[str], str | None]:
    """The ``tag`` (repeatable: a job must carry each) and ``experiment`` arguments of a job listing, held to
    the rules their spec fields follow; 422 naming the argument otherwise."""
    tags, experiment = args.getlist("tag"), one_arg(args, "experiment")
    problems = []
    if len(tags) > MAX_TAGS:
        problems.append(Problem("tag", f"at most {MAX_TAGS} tags (a job carries no more), not {len(tags)}"))
    problems += [Problem("tag", problem) for tag in tags if (problem := tag_problem(tag))]
    if experiment is not None and (problem := label_problem(experiment)):
        problems.append(Problem("experiment", problem))
    if problems:
        raise validation_error(problems, "Invalid query argument")
    return tags, experiment


@bp.get("/tags")
def list_tags():
    """The tags of the caller's jobs (an admin's: every user's), each with how many jobs carry it."""
    limit = int_arg(request.args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    counts = tag_counts(get_session(), visible(Job), limit)
    return json_response(TagList(tags=[TagCount(tag=tag, jobs=jobs) for tag, jobs in counts]))
