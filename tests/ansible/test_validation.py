"""validate.yml (site.yml's first play) on the example inventory: a missing required variable stops
the run before any host is touched, with a message naming the variable.

These run on this machine only: the validation play gathers no facts and its asserts run here, so
the example's hosts (which do not exist) are never contacted.
"""

import shutil

import pytest

from tests.ansible.conftest import EXAMPLE, VAULT_PASSWORD_FILE, require_ansible, run_playbook


@pytest.fixture
def package(tmp_path):
    """Something at citadel_common_package_src, which must name an existing file."""
    wheel = tmp_path / "citadel-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    return wheel


def validate(*extra: str, inventory=EXAMPLE / "hosts.yml", package=None):
    require_ansible()
    args = ["-i", str(inventory), "--vault-password-file", str(VAULT_PASSWORD_FILE), *extra]
    if package is not None:
        args += ["-e", f"citadel_common_package_src={package}"]
    return run_playbook([*args, "validate.yml"], timeout=120)


def assert_stopped_naming(run, variable: str, host: str):
    assert run.returncode != 0, run.output[-3000:]
    assert f"{variable} is not set for {host}" in run.output, run.output[-3000:]
    assert "NO MORE HOSTS LEFT" in run.output, "any_errors_fatal stops every host at the first failure"


def test_the_example_inventory_passes_validation(package):
    run = validate(package=package)
    assert run.returncode == 0, run.output[-3000:]
    assert set(run.recap) == {"fra-cp-1.example.internal", "fra-gpu-1.example.internal",
                              "fra-gpu-2.example.internal", "nyc-gpu-1.example.internal"}
    assert all(counts["failed"] == 0 and counts["changed"] == 0 for counts in run.recap.values())


@pytest.mark.parametrize(("vault_variable", "role_variable"), [
    ("vault_citadel_django_secret_key", "citadel_common_django_secret_key"),
    ("vault_citadel_audit_signing_key", "citadel_common_audit_signing_key"),
    ("vault_citadel_database_password", "citadel_common_database_password"),
])
def test_an_empty_secret_stops_the_run_naming_the_variable(package, vault_variable, role_variable):
    run = validate("-e", f"{vault_variable}=", package=package)
    assert_stopped_naming(run, role_variable, "fra-cp-1.example.internal")


def test_a_database_host_without_its_password_stops_the_run_naming_the_variable(package):
    run = validate("-e", "citadel_postgresql_password=", package=package)
    assert_stopped_naming(run, "citadel_postgresql_password", "fra-cp-1.example.internal")


def test_a_worker_without_its_site_stops_the_run_naming_the_variable(package):
    run = validate("-e", "citadel_worker_site=", package=package)
    assert_stopped_naming(run, "citadel_worker_site", "fra-gpu-1.example.internal")
    assert "Worker pool" not in run.output, "the worker's own check speaks first"


def test_secrets_missing_from_the_inventory_stop_the_run_naming_the_first_one(package, tmp_path):
    """No vault file at all: the secrets are undefined, not merely empty."""
    inventory = tmp_path / "inventory"
    shutil.copytree(EXAMPLE, inventory)
    (inventory / "group_vars" / "all" / "vault.yml").unlink()
    run = validate(inventory=inventory / "hosts.yml", package=package)
    assert_stopped_naming(run, "citadel_common_django_secret_key", "fra-cp-1.example.internal")


def test_a_pool_at_an_undeclared_site_stops_the_run(package):
    run = validate("-e", '{"citadel_control_plane_sites": []}', package=package)
    assert run.returncode != 0
    assert "Worker pool 'eu-fra-h200' is at site 'eu-fra', which citadel_control_plane_sites does not declare" in \
        run.output


def test_a_package_file_that_does_not_exist_stops_the_run(tmp_path):
    run = validate(package=tmp_path / "missing.whl")
    assert run.returncode != 0
    assert "citadel_common_package_src names" in run.output and "which is not a file on this machine" in run.output



@pytest.mark.parametrize(("broker", "url"), [
    ("redis", "redis://:example-only-broker-password@10.10.0.10:6379/0"),
    ("rabbitmq", "amqp://citadel:example-only-broker-password@10.10.0.10:5672/citadel"),
])
def test_the_broker_url_follows_the_chosen_broker(package, tmp_path, broker, url):
    """What CELERY_BROKER_URL becomes on a worker for each broker (the converge test takes Redis)."""
    require_ansible()
    playbook = tmp_path / "broker-url.yml"
    playbook.write_text("""---
- name: Show the settings a worker gets.
  hosts: nyc-gpu-1.example.internal
  gather_facts: false
  tasks:
    - name: Check the settings as site.yml does.
      ansible.builtin.import_role:
        name: citadel_common
        tasks_from: assert.yml
    - name: Show the broker URL.
      ansible.builtin.debug:
        msg: "BROKER_URL={{ citadel_common_environment['CELERY_BROKER_URL'] }}"
""")
    run = run_playbook(["-i", str(EXAMPLE / "hosts.yml"), "--vault-password-file", str(VAULT_PASSWORD_FILE),
                        "-e", f"citadel_common_broker={broker}", "-e", f"citadel_common_package_src={package}",
                        str(playbook)], timeout=120)
    assert run.returncode == 0, run.output[-3000:]
    assert f"BROKER_URL={url}" in run.output
