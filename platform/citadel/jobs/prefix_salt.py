"""The prefix-cache namespace of an inference job, derived by the server, never taken from the client.

The engine reuses the cached prompt prefixes of earlier requests only between requests with the
same `cache_salt` (inference/engine/prefix_cache.py). A shared prefix cache would let one tenant
learn, from how fast its answers start, what another tenant's prompts begin with; so the worker
salts every job with an HMAC of the team its API key belongs to (every key of a team shares the
team's cached prefixes, no other team's), keyed by SECRET_KEY so a salt reveals nothing and cannot be
guessed. A key without a team is its own namespace. Nothing in a request's body is read here.
"""

import hashlib
import hmac

from django.conf import settings


def job_cache_salt(job) -> str | None:
    """The cache salt of `job` (an inference job or a batch): from its team, else its API key; None
    for jobs made by neither."""
    if job.team_id is not None:
        subject = f"team:{job.team_id}"
    elif job.api_key_id is not None:
        subject = f"key:{job.api_key_id}"
    else:
        return None
    message = f"citadel-prefix-cache:{subject}".encode()
    return hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).hexdigest()
