"""`citadel model_manifest NAME`: record a model's SHA-256 manifest anew, from this host's files.

For a model registered where its folder was not visible (its manifest is empty, so workers refuse
it), or after a trusted change of its files. Audited as model.manifest.record.
"""

from django.core.management.base import BaseCommand, CommandError

from citadel.audit.services import Actor
from citadel.core.exceptions import CitadelError
from citadel.registry.selectors import model_get
from citadel.registry.services import model_manifest_record


class Command(BaseCommand):
    help = "Record a model's SHA-256 manifest from the files in its folder on this host."

    def add_arguments(self, parser):
        parser.add_argument("name", help="The registered model's name.")

    def handle(self, *args, name, **options):
        try:
            model = model_manifest_record(model=model_get(name=name), actor=Actor.system("cli"))
        except CitadelError as error:
            raise CommandError(error.message) from error
        for file, digest in sorted(model.manifest.items()):
            self.stdout.write(f"{digest}  {file}")
        self.stdout.write(f"Recorded the manifest of {model.name}: {len(model.manifest)} files.")
