"""`citadel models register NAME PATH`, `citadel models deploy NAME --pool POOL`, `citadel models list`."""

import json

from django.core.management.base import BaseCommand, CommandError

from citadel.audit.services import Actor
from citadel.core.exceptions import CitadelError
from citadel.registry.models import Model, WorkerPool
from citadel.registry.selectors import model_get
from citadel.registry.services import deployment_create, model_register


class Command(BaseCommand):
    help = "Register, deploy or list models."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        register = sub.add_parser("register", help="Register a Hugging Face checkpoint folder.")
        register.add_argument("name")
        register.add_argument("path")
        register.add_argument("--description", default="")
        deploy = sub.add_parser("deploy", help="Serve a registered model from a worker pool.")
        deploy.add_argument("name")
        deploy.add_argument("--pool", required=True)
        deploy.add_argument("--engine-settings", default="{}", help="JSON keyword arguments for inference.LLM.")
        sub.add_parser("list")

    def handle(self, *args, action, **options):
        actor = Actor.system("cli")
        try:
            if action == "register":
                model = model_register(name=options["name"], path=options["path"], actor=actor,
                                       description=options["description"])
                self.stdout.write(f"Registered {model.name} ({model.family or 'unknown family'}) at {model.path}")
            elif action == "deploy":
                pool = WorkerPool.objects.filter(name=options["pool"]).first()
                if pool is None:
                    raise CommandError(f"No worker pool named '{options['pool']}'.")
                try:
                    engine_settings = json.loads(options["engine_settings"])
                except json.JSONDecodeError as error:
                    raise CommandError(f"--engine-settings is not valid JSON: {error}") from error
                deployment = deployment_create(model=model_get(name=options["name"]), pool=pool, actor=actor,
                                               engine_settings=engine_settings)
                self.stdout.write(f"Deployed {deployment}")
            else:
                for model in Model.objects.all():
                    self.stdout.write(f"{model.name}\t{model.family}\t{model.path}")
        except CitadelError as error:
            raise CommandError(error.message) from error
