"""Make the sites and worker pools the inventory names, when missing (run by Ansible through
`citadel shell --command`, with the inventory's topology as JSON in CITADEL_TOPOLOGY).

Existing ones are left alone; one that disagrees with the inventory (another jurisdiction, a pool
at another site) stops the play: residency depends on it, so change it through the management
API, which audits the change. Prints one line per thing it created."""
import json
import os
import sys

from citadel.audit.services import Actor
from citadel.registry.models import WorkerPool
from citadel.registry.services import pool_create
from citadel.residency.models import Site
from citadel.residency.services import site_create

topology = json.loads(os.environ["CITADEL_TOPOLOGY"])
actor = Actor.system("ansible")
problems = []
for wanted in topology["sites"]:
    jurisdiction = wanted.get("jurisdiction") or "unspecified"
    site = Site.objects.filter(name=wanted["name"]).first()
    if site is None:
        site = site_create(name=wanted["name"], jurisdiction=jurisdiction, region=wanted.get("region", ""),
                           storage_path=wanted.get("storage_path", ""), description=wanted.get("description", ""),
                           actor=actor)
        print(f"created site {site.name} ({site.jurisdiction})")
    elif site.jurisdiction.casefold() != jurisdiction.casefold():
        problems.append(f"Site '{site.name}' has jurisdiction '{site.jurisdiction}' in Citadel but '{jurisdiction}' "
                        "in the inventory: change one of them (the management API audits the change).")
for wanted in topology["pools"]:
    pool = WorkerPool.objects.select_related("site").filter(name=wanted["name"]).first()
    if pool is None:
        pool = pool_create(name=wanted["name"], site=wanted["site"], description=wanted.get("description", ""),
                           actor=actor)
        print(f"created pool {pool.name} at site {pool.site.name} (queue {pool.queue})")
    elif pool.site.name != wanted["site"]:
        problems.append(f"Worker pool '{pool.name}' is at site '{pool.site.name}' in Citadel but at "
                        f"'{wanted['site']}' in the inventory: change one of them.")
if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
