"""Set up the fault tests' world in their private database, run as its own process
(`python -m tests.chaos.world STORE_DIR TINY_CHECKPOINT`): demo-v4 (fine-tuning) and the tiny
random model `tiny` (inference: it rarely stops early, so a job lasts long enough to be killed
mid-way) deployed on pool `chaos` at site `chaos-site`,
a `housekeeping` pool for the worker that runs beat's tasks, a policy that lets keys without a
team process, store and fine-tune internal data there, and a user whose API key is printed last."""

import sys


def main(store: str, tiny: str) -> None:
    import django

    django.setup()
    from pathlib import Path

    from django.contrib.auth import get_user_model

    from citadel.accounts.services import api_key_create
    from citadel.audit.services import Actor
    from citadel.registry.services import deployment_create, model_register, pool_create
    from citadel.residency.models import DataClass
    from citadel.residency.services import policy_create, site_create

    system = Actor.system("chaos")
    demo = Path(__file__).resolve().parents[2] / "models" / "demo-v4"
    user = get_user_model().objects.create_user("chaos", password="chaos-password-123456")
    site = site_create(name="chaos-site", jurisdiction="EU", storage_path=store, actor=system)
    model = model_register(name="demo-v4", path=str(demo), actor=system)
    pool = pool_create(name="chaos", site=site, actor=system)
    pool_create(name="housekeeping", site=site, actor=system)
    deployment_create(model=model, pool=pool, actor=system, engine_settings={"device": "cpu"})
    tiny_model = model_register(name="tiny", path=tiny, actor=system)
    deployment_create(model=tiny_model, pool=pool, actor=system, engine_settings={"device": "cpu"})
    policy_create(team=None, data_class=DataClass.objects.get(name="internal"), actor=system,
                  processing_sites=[site], storage_sites=[site], fine_tuning_allowed=True, prompt_retention="full")
    print(api_key_create(user=user, name="chaos", actor=system).key)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
