"""site.yml applied to a real Debian 12 root file system through Ansible's chroot connection:
what it installs and writes, then a second run that changes nothing, then a run with a rebuilt
package of the same version, which is installed again.

A chroot has no running systemd, so services are installed and enabled but not started, and the
database user and database are not made in the chroot's PostgreSQL. Migrations, `citadel bootstrap`
and the sites and pools run against this machine's PostgreSQL when it answers (the chroot shares
the network), in a database made for the test. The end-to-end tests (tests/e2e) run gunicorn,
Celery workers and beat as real processes against PostgreSQL and Redis. See ansible/README.md, "What the converge test covers".
"""

import os
import stat

import pytest

from tests.ansible.conftest import HOST_POSTGRES, build_wheel, run_playbook
from tests.conftest import require

pytestmark = [pytest.mark.converge, pytest.mark.timeout(1200)]

SECRET_KEY = "example-only-django-secret-key-0c5f1e7a9b3d4e6f8a2b4c6d8e0f1a3b5c7d9e1f"


@pytest.fixture(scope="module")
def converged(converge_target):
    run = run_playbook(converge_target.playbook_args, log=converge_target.work / "first-run.log", timeout=900)
    print(f"first converge: {run.seconds:.0f} s")
    assert run.returncode == 0, f"the first run failed:\n{run.output[-8000:]}"
    converge_target.first = run
    return converge_target


def owner(path) -> tuple[str, str, int]:
    """(user, group, permission bits) of a path inside the chroot, by the chroot's own names."""
    info = path.stat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def chroot_ids(target, user: str) -> tuple[int, int]:
    line = next(line for line in target.path("/etc/passwd").read_text().splitlines() if line.startswith(f"{user}:"))
    fields = line.split(":")
    return int(fields[2]), int(fields[3])


def test_the_first_run_changes_the_host_and_fails_nothing(converged):
    recap = converged.first.recap["converge"]
    assert recap["failed"] == 0 and recap["unreachable"] == 0
    assert recap["changed"] > 10


def test_the_service_user_cannot_log_in_and_owns_the_data_directories(converged):
    passwd = dict(line.split(":", 1) for line in converged.path("/etc/passwd").read_text().splitlines())
    fields = passwd["citadel"].split(":")
    assert fields[4] == "/var/lib/citadel" and fields[5] == "/usr/sbin/nologin"
    uid, gid = chroot_ids(converged, "citadel")
    assert uid < 1000, "a system user"
    for path in ["/var/lib/citadel", "/var/log/citadel", "/srv/citadel/models", "/var/cache/citadel/kv"]:
        assert owner(converged.path(path)) == (uid, gid, 0o750), path
    assert owner(converged.path("/etc/citadel")) == (0, gid, 0o750)
    assert owner(converged.path("/opt/citadel/venv"))[:2] == (0, 0), "the code is root's, not the service's"


def test_the_environment_file_holds_the_settings_and_only_the_service_group_reads_it(converged):
    env_file = converged.path("/etc/citadel/citadel.env")
    _, gid = chroot_ids(converged, "citadel")
    assert owner(env_file) == (0, gid, 0o640)
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if line and line[0] != "#")
    assert values["DJANGO_SETTINGS_MODULE"] == "'citadel.settings.production'"
    assert values["DJANGO_SECRET_KEY"] == f"'{SECRET_KEY}'"  # from the example vault
    assert values["CITADEL_AUDIT_SIGNING_KEY"] == "'NfeHx58lI6SAKjqrKmjJGMh5uB+PGlt9fxucB/U9itI='"
    user, name = ("postgres", converged.database) if converged.database else ("citadel", "citadel")
    assert values["DATABASE_URL"] == f"'postgres://{user}:example-only-database-password@127.0.0.1:5432/{name}'"
    assert values["CELERY_BROKER_URL"] == "'redis://:example-only-broker-password@127.0.0.1:6379/0'"
    assert values["CITADEL_DATA_DIR"] == "'/var/lib/citadel'"
    assert values["ALLOWED_HOSTS"] == "'citadel.example.org'"


def test_the_virtual_environment_has_citadel_from_this_checkout_and_the_pinned_torch(converged):
    python = "/opt/citadel/venv/bin/python"
    out = converged.run(python, "-c", "import citadel, celery, django, gunicorn, psycopg, torch, inference, finetune; "
                        "print(torch.__version__, django.get_version())").stdout.split()
    assert out[0] == "2.13.0+cpu" and out[1].startswith("5.2")
    installed = converged.run(python, "-m", "pip", "show", "citadel").stdout
    assert "Version: 0.1.0" in installed
    # redis asks for async-timeout below Python 3.11.3 (Debian's is 3.11.2), for its asyncio client only.
    problems = converged.run(python, "-m", "pip", "check", check=False).stdout.strip().splitlines()
    assert [line for line in problems if "async-timeout" not in line] == []


def test_citadel_checks_its_production_settings_with_the_rendered_environment(converged):
    """`citadel check --deploy` through the installed command: the settings file is complete
    (production settings refuse to start without a secret) and the service user can read it."""
    done = converged.run("/usr/local/bin/citadel", "check", "--deploy", "--fail-level", "ERROR")
    assert done.returncode == 0


def test_static_files_are_collected_into_the_data_directory_as_the_service_user(converged):
    static = converged.path("/var/lib/citadel/static")
    uid, _ = chroot_ids(converged, "citadel")
    assert (static / "admin").is_dir()
    assert static.stat().st_uid == uid
    assert list(static.rglob("htmx*.js")), "django-htmx's scripts are there"


def test_the_control_plane_units_run_gunicorn_the_housekeeping_worker_and_beat(converged):
    units = converged.path("/etc/systemd/system")
    web = (units / "citadel-web.service").read_text()
    assert ("ExecStart=/opt/citadel/venv/bin/gunicorn citadel.wsgi:application --bind=127.0.0.1:8000 "
            "--worker-class=gthread") in web
    for text in [web, (units / "citadel-control.service").read_text(), (units / "citadel-beat.service").read_text()]:
        assert "User=citadel" in text and "EnvironmentFile=/etc/citadel/citadel.env" in text
    assert "celery -A citadel worker --queues=control" in (units / "citadel-control.service").read_text()
    assert "celery -A citadel beat" in (units / "citadel-beat.service").read_text()
    wants = units / "multi-user.target.wants"
    for unit in ["citadel-web", "citadel-control", "citadel-beat", "nginx", "postgresql", "redis-server"]:
        assert (wants / f"{unit}.service").is_symlink(), f"{unit} is enabled at boot"


def test_each_pool_of_the_site_gets_its_own_worker_unit_with_its_site_and_gpus(converged):
    units = converged.path("/etc/systemd/system")
    h200 = (units / "citadel-worker-eu-fra-h200.service").read_text()
    assert "Description=Citadel worker for pool eu-fra-h200 at site eu-fra" in h200
    assert "citadel worker --pool=eu-fra-h200 --name=eu-fra-h200@%H --concurrency=32" in h200
    assert "Environment=CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6" in h200
    assert "Environment=CITADEL_KV_CACHE_DIR=/var/cache/citadel/kv" in h200
    finetune = (units / "citadel-worker-eu-fra-finetune.service").read_text()
    assert "--concurrency=1" in finetune and "CUDA_VISIBLE_DEVICES=7" in finetune
    for pool in ["eu-fra-h200", "eu-fra-finetune"]:
        assert (units / "multi-user.target.wants" / f"citadel-worker-{pool}.service").is_symlink()


def test_nginx_serves_tls_with_a_self_signed_certificate_and_a_valid_configuration(converged):
    # Links inside the chroot are absolute, so they are read, not followed, from out here.
    enabled = converged.path("/etc/nginx/sites-enabled")
    assert os.readlink(enabled / "citadel.conf") == "/etc/nginx/sites-available/citadel.conf"
    assert not os.path.lexists(enabled / "default")
    text = converged.path("/etc/nginx/sites-available/citadel.conf").read_text()
    assert "listen 443 ssl http2;" in text and "server 127.0.0.1:8000;" in text
    assert "proxy_buffering off;" in text and "X-Forwarded-Proto $scheme" in text
    assert owner(converged.path("/etc/ssl/citadel/citadel.key")) == (0, 0, 0o600)
    subject = converged.run("openssl", "x509", "-in", "/etc/ssl/citadel/citadel.crt", "-noout", "-subject").stdout
    assert "citadel.example.org" in subject
    converged.run("nginx", "-t")


def test_postgresql_and_redis_are_configured_for_citadel(converged):
    conf = converged.path("/etc/postgresql/15/main/conf.d/citadel.conf").read_text()
    assert "listen_addresses = 'localhost'" in conf and "password_encryption = scram-sha-256" in conf
    hba = converged.path("/etc/postgresql/15/main/pg_hba.conf").read_text()
    assert "host    citadel    citadel    10.10.0.0/16    scram-sha-256" in hba
    redis = converged.path("/etc/redis/redis.conf").read_text().splitlines()
    assert "requirepass example-only-broker-password" in redis and "bind 127.0.0.1 -::1" in redis


def test_the_control_plane_migrated_bootstrapped_and_made_the_sites_and_pools_on_postgresql(converged):
    """`citadel migrate`, `citadel bootstrap` and the topology script, run by the play from the
    chroot's virtual environment against this machine's PostgreSQL."""
    require(converged.database is not None, "PostgreSQL on 127.0.0.1:5432")
    import psycopg

    with psycopg.connect(HOST_POSTGRES.rsplit("/", 1)[0] + f"/{converged.database}") as connection:
        sites = dict(connection.execute("SELECT name, jurisdiction FROM residency_site").fetchall())
        pools = dict(connection.execute("SELECT p.name, s.name FROM registry_workerpool p "
                                        "JOIN residency_site s ON s.id = p.site_id").fetchall())
        admins = connection.execute("SELECT count(*) FROM auth_user WHERE username = 'admin'").fetchone()[0]
        audited = connection.execute("SELECT count(*) FROM audit_auditrecord WHERE actor_id = 'ansible' "
                                     "OR actor_label = 'ansible'").fetchone()[0]
    assert sites["eu-fra"] == "EU" and sites["us-nyc"] == "US"
    assert pools["eu-fra-h200"] == "eu-fra" and pools["eu-fra-finetune"] == "eu-fra"
    assert pools["local"] == "local", "citadel bootstrap's demo pool"
    assert admins == 1
    assert audited >= 4, "sites and pools are created through the services, which audit them"
    uid, _ = chroot_ids(converged, "citadel")
    assert owner(converged.path("/var/lib/citadel/admin-password"))[::2] == (uid, 0o600)


def test_a_second_run_changes_nothing(converged):
    run = run_playbook(converged.playbook_args, log=converged.work / "second-run.log", timeout=900)
    print(f"second converge: {run.seconds:.0f} s")
    assert run.returncode == 0, f"the second run failed:\n{run.output[-8000:]}"
    assert run.recap["converge"]["changed"] == 0, f"changed on the second run: {run.changed_tasks()}"
    assert run.recap["converge"]["failed"] == 0



def test_a_rebuilt_package_of_the_same_version_is_installed_again_and_nothing_else_changes(converged, tmp_path):
    """A checkout between releases: same version, new content. pip alone would keep the old one."""
    wheel = build_wheel(tmp_path, mark="rebuilt by the converge test")
    run = run_playbook([*converged.playbook_args, "-e", f"citadel_common_package_src={wheel}"],
                       log=converged.work / "third-run.log", timeout=900)
    print(f"third converge (rebuilt package): {run.seconds:.0f} s")
    assert run.returncode == 0, f"the run failed:\n{run.output[-8000:]}"
    assert run.changed_tasks() == [
        "citadel_common : Copy the Citadel package built from a checkout to the host.",
        "citadel_common : Install the copied package again when it is not the one installed last.",
        "citadel_common : Remember which package file is installed.",
        # The reinstalled package's static files are newer than the collected ones: collected again.
        "citadel_control_plane : Collect the static files.",
    ]
    installed = converged.run("/opt/citadel/venv/bin/python", "-c",
                              "import citadel, pathlib; print(pathlib.Path(citadel.__file__).read_text())").stdout
    assert "# rebuilt by the converge test" in installed
