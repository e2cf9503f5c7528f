"""The bounds of one page of a list (jobs, datasets, the audit log): the API holds requests to them, and the
CLI offers the same range, so a bad --limit is said before anything is sent."""

MAX_LIMIT = 100
