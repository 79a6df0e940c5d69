"""`citadel pools create NAME --site SITE` and `citadel pools list`."""

from django.core.management.base import BaseCommand, CommandError

from citadel.audit.services import Actor
from citadel.core.exceptions import CitadelError
from citadel.registry.models import WorkerPool
from citadel.registry.services import pool_create


class Command(BaseCommand):
    help = "Create or list worker pools."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create")
        create.add_argument("name")
        create.add_argument("--site", default="local",
                            help="The site's name; an unknown one is created with jurisdiction 'unspecified'.")
        sub.add_parser("list")

    def handle(self, *args, action, **options):
        if action == "list":
            for pool in WorkerPool.objects.select_related("site"):
                self.stdout.write(f"{pool.name}\t{pool.site.name}\t{pool.site.jurisdiction}\t{pool.queue}")
            return
        try:
            pool = pool_create(name=options["name"], site=options["site"], actor=Actor.system("cli"))
        except CitadelError as error:
            raise CommandError(error.message) from error
        self.stdout.write(f"Created pool {pool.name} at site {pool.site.name} ({pool.site.jurisdiction}) "
                          f"(queue {pool.queue})")
