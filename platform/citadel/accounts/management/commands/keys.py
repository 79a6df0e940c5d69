"""`citadel keys create|list|revoke`: API keys for operators' scripts.

`create` prints the new key alone on the last line of its output.
"""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from citadel.accounts.models import ApiKey, Team
from citadel.accounts.services import api_key_create, api_key_get, api_key_revoke
from citadel.audit.services import Actor
from citadel.core.exceptions import CitadelError
from citadel.residency.services import data_class_get


class Command(BaseCommand):
    help = "Create, list or revoke API keys."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="Create a key; the key is printed once, on the last line.")
        create.add_argument("--user", required=True, help="Username that owns the key.")
        create.add_argument("--name", required=True, help="What the key is for, e.g. 'billing-app'.")
        create.add_argument("--expires-in-days", type=int, default=None)
        create.add_argument("--team", default=None, help="Team whose residency policies govern the key.")
        create.add_argument("--data-class", default="internal", help="Class of the data sent with the key.")
        create.add_argument("--scope", action="append", dest="scopes", default=None,
                            help="An endpoint group the key may call (inference, files, fine_tuning, management); "
                                 "repeat for several. Default: all.")
        create.add_argument("--model", action="append", dest="models", default=[],
                            help="A model the key may use; repeat for several. Default: all.")
        sub.add_parser("list", help="List keys (prefixes only).")
        revoke = sub.add_parser("revoke", help="Revoke a key by its prefix.")
        revoke.add_argument("prefix")

    def handle(self, *args, action, **options):
        actor = Actor.system("cli")
        try:
            if action == "create":
                user = get_user_model().objects.filter(username=options["user"]).first()
                if user is None:
                    raise CommandError(f"No user named {options['user']!r}: create it first (citadel createsuperuser).")
                team = None
                if options["team"]:
                    team = Team.objects.filter(name=options["team"]).first()
                    if team is None:
                        raise CommandError(f"No team named {options['team']!r}.")
                created = api_key_create(user=user, name=options["name"], actor=actor,
                                         expires_in_days=options["expires_in_days"], team=team,
                                         data_class=data_class_get(name=options["data_class"]),
                                         scopes=options["scopes"], allowed_models=options["models"])
                self.stdout.write(f"Created API key {created.api_key.prefix} for {user.get_username()}; "
                                  "store it now, it is not shown again:")
                self.stdout.write(created.key)
            elif action == "list":
                for key in ApiKey.objects.select_related("user", "team", "data_class"):
                    state = "revoked" if key.revoked_at else ("active" if key.is_active else "expired")
                    team = key.team.name if key.team else "-"
                    self.stdout.write(f"{key.prefix}\t{key.name}\t{key.user.get_username()}\t{state}\t{team}\t"
                                      f"{key.data_class.name}\t{','.join(key.scopes)}")
            elif action == "revoke":
                api_key_revoke(api_key=api_key_get(prefix=options["prefix"]), actor=actor)
                self.stdout.write(f"Revoked {options['prefix']}")
        except CitadelError as error:
            raise CommandError(error.message) from error
