"""The web's thread counts and PostgreSQL's max_connections, chosen together (issue 11).

`citadel serve` and the Ansible roles must hold 64 concurrent token streams (each holds a gunicorn
thread) and every thread may hold a database connection; citadel.core.connection_budget has the
formula. Checked here: the defaults, the warning `citadel serve` prints against a real PostgreSQL,
and the Ansible defaults against the example inventory, with the PostgreSQL template rendered.
"""

from pathlib import Path

import jinja2
import pytest
import yaml

from citadel.core.connection_budget import (
    BEAT_CONNECTIONS,
    HEADROOM,
    SERVE_WEB_THREADS,
    SERVE_WEB_WORKERS,
    SERVE_WORKER_CONCURRENCY,
    STREAMS_TARGET,
    WORKER_OWN_CONNECTIONS,
    budget_check,
    connections_needed,
)
from citadel.core.management.commands.serve import Command

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"


def _yaml(path: str) -> dict:
    return yaml.safe_load((ANSIBLE / path).read_text())


def test_serves_defaults_hold_64_streams_with_threads_to_spare_and_the_formula_counts_every_thread():
    assert SERVE_WEB_WORKERS * SERVE_WEB_THREADS >= STREAMS_TARGET + 16
    parser = Command().create_parser("citadel", "serve")
    options = vars(parser.parse_args([]))
    assert (options["web_workers"], options["web_threads"]) == (SERVE_WEB_WORKERS, SERVE_WEB_THREADS)
    assert options["worker_concurrency"] == SERVE_WORKER_CONCURRENCY
    assert connections_needed(web_workers=2, web_threads=40, worker_concurrency=[16]) == 80 + 16 + 4 + 1


@pytest.mark.django_db
def test_serve_warns_naming_the_setting_when_its_processes_may_exceed_postgresqls_max_connections():
    budget = budget_check(needed=1)
    if budget is None:
        pytest.skip("the test database is not PostgreSQL")
    assert budget.max_connections >= 20 and budget.fits
    command = Command()
    assert command.connection_warning(web_workers=1, web_threads=1, worker_concurrency=1) is None
    threads = budget.max_connections  # surely too many, whatever the server's setting
    warning = command.connection_warning(web_workers=2, web_threads=threads, worker_concurrency=16)
    needed = 2 * threads + 16 + WORKER_OWN_CONNECTIONS + BEAT_CONNECTIONS
    assert f"may hold {needed} at once" in warning
    assert f"Raise max_connections in postgresql.conf to at least {needed + budget.reserved + HEADROOM}" in warning
    assert "--web-threads" in warning


def test_the_ansible_defaults_hold_64_streams_per_web_host_and_fit_postgresql_for_the_example_inventory():
    web = _yaml("roles/citadel_control_plane/defaults/main.yml")
    workers, threads = web["citadel_control_plane_web_workers"], web["citadel_control_plane_web_threads"]
    assert workers * threads >= 2 * STREAMS_TARGET
    default_concurrency = _yaml("roles/citadel_worker/defaults/main.yml")["citadel_worker_concurrency"]
    hosts = _yaml("inventories/example/hosts.yml")["all"]["children"]
    pools = []
    for site, group in hosts["citadel_workers"]["children"].items():
        site_pools = _yaml(f"inventories/example/group_vars/{site}/main.yml")["citadel_worker_pools"]
        pools += [pool.get("concurrency", default_concurrency) for pool in site_pools] * len(group["hosts"])
    web_hosts = len(hosts["citadel_control_plane"]["hosts"])
    needed = (connections_needed(web_workers=workers * web_hosts, web_threads=threads, worker_concurrency=pools)
              + web["citadel_control_plane_control_concurrency"] + WORKER_OWN_CONNECTIONS)
    postgresql = _yaml("roles/citadel_postgresql/defaults/main.yml")
    max_connections = postgresql["citadel_postgresql_settings"]["max_connections"]
    assert needed + 3 + HEADROOM <= max_connections, (needed, max_connections)
    template = (ANSIBLE / "roles/citadel_postgresql/templates/citadel.conf.j2").read_text()
    rendered = jinja2.Template(template).render(**postgresql)
    assert f"\nmax_connections = {max_connections}\n" in rendered
