"""Deployment checks (`citadel check --deploy`): settings that weaken sign-in are reported, so that
turning them off for a lab is never silently carried into production."""

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.security, deploy=True)
def identity_settings(app_configs, **kwargs):
    warnings = []
    if not settings.CITADEL_MFA_REQUIRED:
        warnings.append(checks.Warning(
            "CITADEL_MFA_REQUIRED is off: administrators and operators sign in without a second factor.",
            hint="Unset CITADEL_MFA_REQUIRED (it defaults to true).", id="citadel.W101"))
    if settings.CITADEL_OIDC_ISSUER and settings.CITADEL_OIDC_MFA_FROM_PROVIDER:
        warnings.append(checks.Warning(
            "CITADEL_OIDC_MFA_FROM_PROVIDER trusts the identity provider to ask administrators for a second factor.",
            hint="Make sure the provider requires one for the groups mapped to admin and operator roles.",
            id="citadel.W102"))
    if settings.CITADEL_OIDC_ISSUER and not settings.CITADEL_OIDC_ISSUER.startswith("https://"):
        warnings.append(checks.Warning("CITADEL_OIDC_ISSUER is not https: tokens would travel in clear.",
                                       id="citadel.W103"))
    if settings.CITADEL_LOGIN_MAX_FAILURES > 10:
        warnings.append(checks.Warning(
            f"CITADEL_LOGIN_MAX_FAILURES is {settings.CITADEL_LOGIN_MAX_FAILURES}: more than 10 guesses per account "
            "before a lockout.", id="citadel.W104"))
    return warnings
