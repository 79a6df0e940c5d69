"""The quota check as DRF's throttle step, so it runs on every API view (management API, the OpenAI
endpoints, and those added later) after authentication and permissions, for requests made with a key."""

from rest_framework.throttling import BaseThrottle

from citadel.accounts.permissions import api_key_of
from citadel.quotas.limiter import quota_admit


class QuotaThrottle(BaseThrottle):
    def allow_request(self, request, view) -> bool:
        api_key = api_key_of(request)
        if api_key is not None:
            quota_admit(api_key=api_key)  # raises RateLimited, answered 429 with Retry-After
        return True
