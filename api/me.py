"""The caller's own account: ``GET /me`` says who they are, what they may use and where they stand."""

from __future__ import annotations

from flask import Blueprint

from api.auth import current_user, require_user
from api.db import get_session, services
from api.schemas import API_PREFIX, FairShareOut, MeOut, QuotaOut, json_response
from models import dispatch
from models.quotas import QUOTAS, all_quotas

bp = Blueprint("me", __name__, url_prefix=f"{API_PREFIX}/me")
bp.before_request(require_user)


@bp.get("")
def me():
    """Who the caller is: name, role, share, each quota's limit and use, standing in fair share."""
    session, user, settings = get_session(), current_user(), services().settings
    overrides = user.quotas or {}
    quotas = [QuotaOut(name=q.name, counts=QUOTAS[q.name][0], limit=q.limit, use=q.use,
                       overridden=q.name in overrides) for q in all_quotas(session, settings, user)]
    # The dispatcher's own reckoning (one read of recent jobs); a user with nothing recent isn't in it.
    state = dispatch.user_states(session, services(), {user.id}).get(user.id)
    standing = FairShareOut(active_jobs=state.active if state else 0, usage_seconds=state.usage if state else 0.0,
                            half_life_seconds=settings.fairshare_half_life_seconds)
    return json_response(MeOut(name=user.name, role=user.role, share=user.share, quotas=quotas, fair_share=standing))
