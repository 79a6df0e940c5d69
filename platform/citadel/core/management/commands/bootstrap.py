"""`citadel bootstrap`: what a first `make run` needs, done once and never twice.

Creates the admin account (password generated, printed once, kept in the data dir with mode
0600), the `local` worker pool at the `local` site (storing files under the data dir), a residency
policy that lets keys without a team process, store and fine-tune on public and internal data
there (keeping prompts' metadata only; residency denies what no policy allows), and registers and
deploys the bundled demo model.
"""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from citadel.accounts.services import admin_bootstrap
from citadel.audit.services import Actor
from citadel.registry.models import Deployment, Model, WorkerPool
from citadel.registry.services import deployment_create, model_register, pool_create
from citadel.residency.models import DataClass, Policy
from citadel.residency.services import policy_create, site_update

DEMO_MODEL_NAME = "citadel-demo"
LOCAL_POOL = "local"


def demo_checkpoint() -> Path:
    """The trained demo model when the repository ships one, else a tiny random-weight
    DeepSeek-V4 checkpoint built into the data dir (seconds, no download)."""
    shipped = settings.REPO_DIR / "models" / "demo-v4"
    if (shipped / "config.json").is_file():
        return shipped
    built = settings.DATA_DIR / "models" / "tiny-deepseek-v4"
    if not (built / "config.json").is_file():
        from inference.tiny_checkpoint import build_tiny_checkpoint

        build_tiny_checkpoint(built, seed=0)
    return built


class Command(BaseCommand):
    help = "Create the admin account, the local pool and the demo model deployment if missing."

    def add_arguments(self, parser):
        parser.add_argument("--admin", default="admin", help="Username of the admin account.")

    def handle(self, *args, admin, **options):
        actor = Actor.system("bootstrap")
        password_file = settings.DATA_DIR / "admin-password"
        password = admin_bootstrap(username=admin, password_file=password_file)
        if password:
            self.stdout.write(self.style.SUCCESS(
                f"Created admin account '{admin}' with password: {password}\n"
                f"(shown once; also kept in {password_file}, readable only by you)"))
            if settings.CITADEL_MFA_REQUIRED:
                self.stdout.write("At the first console sign-in you will enrol an authenticator app (TOTP): "
                                  "administrators need a second factor (CITADEL_MFA_REQUIRED).")
        pool = WorkerPool.objects.filter(name=LOCAL_POOL).first() or pool_create(
            name=LOCAL_POOL, site="local", actor=actor, description="The workers started by `make run`.")
        if not pool.site.storage_path:  # where uploaded fine-tuning datasets and adapters live
            site_update(site=pool.site, actor=actor, storage_path=str(settings.DATA_DIR / "storage" / pool.site.name))
        for data_class in DataClass.objects.filter(name__in=["public", "internal"]):
            if not Policy.objects.filter(team=None, data_class=data_class).exists():
                policy_create(team=None, data_class=data_class, actor=actor, processing_sites=[pool.site],
                              storage_sites=[pool.site], prompt_retention=Policy.Retention.METADATA,
                              fine_tuning_allowed=True, description="Made by `citadel bootstrap` for the local demo.")
                self.stdout.write(f"Allowed '{data_class.name}' data of keys without a team at site "
                                  f"'{pool.site.name}'")
        model = Model.objects.filter(name=DEMO_MODEL_NAME).first()
        if model is None:
            path = demo_checkpoint()
            model = model_register(name=DEMO_MODEL_NAME, path=str(path), actor=actor,
                                   description="Citadel's bundled demo model.")
            self.stdout.write(f"Registered {model.name} from {path}")
        if not Deployment.objects.filter(model=model, pool=pool, status=Deployment.Status.ACTIVE).exists():
            deployment_create(model=model, pool=pool, actor=actor, engine_settings={"device": "cpu"})
            self.stdout.write(f"Deployed {model.name} on pool {pool.name}")
