"""Writes for single sign-on: group mappings (audited) and signing a provider's user in.

The sign-in trusts only claims from an ID token whose signature, issuer, audience, expiry and
nonce authlib has checked (views.py); this module turns them into a user and memberships.
"""

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from citadel.accounts.models import Membership, Role
from citadel.accounts.services import membership_set
from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import Conflict, InvalidRequest, NotFound, PermissionDenied
from citadel.sso.models import GroupMapping, OidcIdentity


@transaction.atomic
def group_mapping_create(*, group: str, team=None, role: str = Role.ML_ENGINEER, platform_admin: bool = False,
                         actor: Actor, request=None) -> GroupMapping:
    group = (group or "").strip()
    if not group:
        raise InvalidRequest("group must name a group of the identity provider.", param="group")
    if team is None and not platform_admin:
        raise InvalidRequest("Give a team (and a role in it), or platform_admin: true.", param="team")
    if role not in Role.values:
        raise InvalidRequest(f"role must be one of {', '.join(Role.values)}.", param="role")
    if GroupMapping.objects.filter(group=group, team=team).exists():
        raise Conflict(f"Group '{group}' is already mapped to {'team ' + team.name if team else 'the platform'}.")
    mapping = GroupMapping.objects.create(group=group, team=team, role=role, platform_admin=platform_admin)
    audit_record(actor=actor, action="sso.group_mapping.create", outcome="success", target_type="group_mapping",
                 target_id=str(mapping.pk), request=request,
                 details={"group": group, "team": team.name if team else None, "role": role,
                          "platform_admin": platform_admin})
    return mapping


@transaction.atomic
def group_mapping_delete(*, mapping: GroupMapping, actor: Actor, request=None) -> None:
    details = {"group": mapping.group, "team": mapping.team.name if mapping.team else None, "role": mapping.role}
    pk = mapping.pk
    mapping.delete()
    audit_record(actor=actor, action="sso.group_mapping.delete", outcome="success", target_type="group_mapping",
                 target_id=str(pk), request=request, details=details)


def _new_username(preferred: str, subject: str) -> str:
    User = get_user_model()
    base = (preferred or f"oidc-{subject}")[:120]
    return base if not User.objects.filter(username=base).exists() else f"{base}-{subject[:20]}"


def oidc_sign_in(*, issuer: str, claims: dict, groups_claim: str = "groups", request=None):
    """The user for verified ID-token `claims`, created on first sign-in, with memberships from the
    group mappings (replacing the ones an earlier sign-in granted). Refused (and audited, outside the
    transaction that a refusal rolls back) when no mapping applies."""
    subject = str(claims.get("sub") or "")
    if not subject:
        raise InvalidRequest("The identity provider's token has no subject.")
    groups = claims.get(groups_claim) or []
    if isinstance(groups, str):
        groups = [groups]
    groups = sorted({str(g) for g in groups})
    mappings = list(GroupMapping.objects.filter(group__in=groups).select_related("team"))
    label = str(claims.get("preferred_username") or claims.get("email") or subject)
    if not mappings:
        audit_record(actor=Actor("anonymous", "", label[:200]), action="sso.login", outcome="denied",
                     target_type="oidc_subject", target_id=subject[:200], request=request,
                     details={"issuer": issuer, "groups": groups, "reason": "no_group_mapping"})
        raise PermissionDenied("None of your identity provider groups gives access to Citadel; ask an "
                               "administrator to map one of them to a team.", code="no_group_mapping")
    return _sign_in_mapped(issuer=issuer, subject=subject, claims=claims, groups=groups, mappings=mappings,
                           request=request)


@transaction.atomic
def _sign_in_mapped(*, issuer: str, subject: str, claims: dict, groups: list[str], mappings: list, request):
    identity = OidcIdentity.objects.select_for_update().filter(issuer=issuer, subject=subject).select_related(
        "user").first()
    User = get_user_model()
    if identity is None:
        user = User.objects.create_user(_new_username(str(claims.get("preferred_username") or ""), subject),
                                        email=str(claims.get("email") or ""), password=None)
        identity = OidcIdentity.objects.create(user=user, issuer=issuer, subject=subject)
        audit_record(actor=Actor.system("sso"), action="user.create", outcome="success", target_type="user",
                     target_id=user.get_username(), request=request, details={"issuer": issuer, "subject": subject})
    user = identity.user
    if not user.is_active:
        raise PermissionDenied("This account is disabled in Citadel.", code="user_disabled")
    actor = Actor.system("sso")
    wanted = {}
    for mapping in mappings:
        if mapping.team is not None:
            wanted.setdefault(mapping.team, set()).add(mapping.role)
    order = [Role.ADMIN, Role.OPERATOR, Role.ML_ENGINEER, Role.APPLICATION, Role.AUDITOR]
    for team, roles in wanted.items():
        role = next(r for r in order if r in roles)  # one role per team: the widest of the mapped ones
        membership_set(team=team, user=user, role=role, actor=actor, source="oidc", request=request)
    stale = Membership.objects.filter(user=user, source="oidc").exclude(team__in=list(wanted))
    for membership in stale.select_related("team"):
        audit_record(actor=actor, action="team.member.remove", outcome="success", target_type="team",
                     target_id=membership.team.name, request=request,
                     details={"user": user.get_username(), "source": "oidc"})
    stale.delete()
    admin = any(m.platform_admin for m in mappings)
    if user.is_staff != admin:
        user.is_staff = admin
        user.save(update_fields=["is_staff"])
        audit_record(actor=actor, action="user.platform_admin.set", outcome="success", target_type="user",
                     target_id=user.get_username(), request=request, details={"platform_admin": admin})
    identity.last_login_at, identity.last_groups = timezone.now(), groups
    identity.save(update_fields=["last_login_at", "last_groups"])
    return user


def group_mapping_get(*, pk: int) -> GroupMapping:
    mapping = GroupMapping.objects.filter(pk=pk).select_related("team").first()
    if mapping is None:
        raise NotFound(f"No group mapping {pk}.")
    return mapping
