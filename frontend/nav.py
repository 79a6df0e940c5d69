"""The console's menu, built from the permission module: each entry names the roles its page lets in
(the same role sets the page's view checks), so a person sees links only to pages they can use.

tests/frontend/test_page_walk.py holds the menu to that: every link a role sees answers 200 for it.
A page whose URL name is not defined (yet) is left out rather than breaking every page.
"""

from dataclasses import dataclass

from django.urls import NoReverseMatch, reverse

from citadel.accounts import permissions as perms

ANY = None
"""Every signed-in user."""
PLATFORM_ADMINS = frozenset()
"""Only platform administrators (no team role is enough), as role_required(frozenset()) checks."""


@dataclass(frozen=True)
class Entry:
    label: str
    url_name: str
    roles: frozenset | None = ANY
    superuser: bool = False

    def visible_to(self, user) -> bool:
        if self.superuser:
            return bool(user.is_superuser)
        return self.roles is ANY or perms.has_role(user, self.roles)


MENU = (
    Entry("Dashboard", "frontend:dashboard"),
    Entry("Models", "frontend:models"),
    Entry("Playground", "frontend:playground", perms.WRITE_ROLES),
    Entry("Fine-tuning", "frontend:finetuning"),
    Entry("Residency", "frontend:residency"),
    Entry("Policies", "frontend:residency-admin", perms.OVERSIGHT_ROLES),
    Entry("Audit", "frontend:audit", perms.OVERSIGHT_ROLES),
    Entry("Usage", "frontend:usage"),
    Entry("Teams", "frontend:teams"),
    Entry("Users", "frontend:users", PLATFORM_ADMINS),
    Entry("API keys", "frontend:keys"),
    Entry("SSO groups", "frontend:identity-sso-mappings", perms.OVERSIGHT_ROLES),
    Entry("Sign-in locks", "frontend:identity-login-locks", PLATFORM_ADMINS),
    Entry("API", "api-docs"),
    Entry("Account", "frontend:account"),
    Entry("Admin", "admin:index", superuser=True),
)


def menu_for(user, current_path: str = "") -> list[dict]:
    """The entries `user` may follow, each with its URL and whether it is the page being shown."""
    if not user.is_authenticated:
        return []
    items = []
    for entry in MENU:
        if not entry.visible_to(user):
            continue
        try:
            url = reverse(entry.url_name)
        except NoReverseMatch:
            continue
        current = current_path == url or (url != "/" and current_path.startswith(url))
        items.append({"label": entry.label, "url": url, "current": current})
    return items
