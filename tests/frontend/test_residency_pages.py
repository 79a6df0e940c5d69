"""Console residency administration (Django test client): sites with their pools, data classes and
policies for auditors and platform administrators; platform administrators create, edit and delete
policies through citadel.residency.services (each change audited, each refusal next to its field,
deleting confirmed first); other roles are refused; the dry-run page keeps working beside it.
"""

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from citadel.accounts.models import Role, Team
from citadel.accounts.services import membership_set
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.registry.services import pool_create
from citadel.residency.models import DataClass, Policy, Site
from citadel.residency.services import policy_create, site_create

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("test")
ADMIN_PAGE, NEW = "/residency/admin/", "/residency/policies/new/"


@pytest.fixture
def world():
    users = get_user_model().objects
    red, blue = Team.objects.create(name="red"), Team.objects.create(name="blue")
    found = {"root": users.create_user("root", password="x" * 16, is_staff=True), "red": red, "blue": blue}
    for name, team, role in (("audrey", red, Role.AUDITOR), ("otto", red, Role.OPERATOR),
                             ("erin", red, Role.ML_ENGINEER), ("lead", red, Role.ADMIN)):
        found[name] = users.create_user(name, password="x" * 16)
        membership_set(team=team, user=found[name], role=role, actor=SYSTEM)
    found["frankfurt"] = site_create(name="frankfurt", jurisdiction="DE", region="eu-central", actor=SYSTEM)
    found["virginia"] = site_create(name="virginia", jurisdiction="US", actor=SYSTEM)
    pool_create(name="gpu-fra", site=found["frankfurt"], actor=SYSTEM)
    internal = DataClass.objects.get(name="internal")
    found["red_policy"] = policy_create(team=red, data_class=internal, actor=SYSTEM,
                                        processing_sites=[found["frankfurt"]], storage_sites=[found["frankfurt"]])
    found["blue_policy"] = policy_create(team=blue, data_class=internal, actor=SYSTEM,
                                         processing_jurisdictions=["US"], description="blue secret")
    return found


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def text(response) -> str:
    return response.content.decode()


def test_an_auditor_reads_sites_pools_data_classes_and_their_teams_policies_without_edit_links(world):
    page = signed_in(world["audrey"]).get(ADMIN_PAGE)
    assert page.status_code == 200
    body = text(page)
    assert "frankfurt" in body and "<code>gpu-fra</code>" in body and "<code>restricted</code>" in body
    assert f'id="policy-{world["red_policy"].pk}"' in body
    assert f'id="policy-{world["blue_policy"].pk}"' not in body  # another team's policy, as the API hides it
    assert "New policy" not in body and "/edit/" not in body and "/delete/" not in body


def test_a_platform_administrator_sees_every_policy_and_filters_them(world):
    root = signed_in(world["root"])
    body = text(root.get(ADMIN_PAGE))
    assert f'id="policy-{world["blue_policy"].pk}"' in body and 'id="new-policy"' in body
    only_blue = text(root.get(ADMIN_PAGE, {"team": "blue"}))
    assert f'id="policy-{world["blue_policy"].pk}"' in only_blue
    assert f'id="policy-{world["red_policy"].pk}"' not in only_blue
    assert "No policies match" in text(root.get(ADMIN_PAGE, {"data_class": "restricted"}))


def test_policies_paginate(world):
    for n in range(30):
        data_class = DataClass.objects.create(name=f"class-{n}", rank=100 + n)
        policy_create(team=None, data_class=data_class, actor=SYSTEM)
    root = signed_in(world["root"])
    first = text(root.get(ADMIN_PAGE))
    assert first.count('<tr id="policy-') == 25 and "Page 1 of 2" in first
    assert text(root.get(ADMIN_PAGE, {"page": 2})).count('<tr id="policy-') == 7


def test_a_platform_administrator_creates_a_policy_and_it_is_audited(world):
    root = signed_in(world["root"])
    assert root.get(NEW).status_code == 200
    response = root.post(NEW, {"team": "red", "data_class": "confidential", "processing_sites": ["frankfurt"],
                               "storage_jurisdictions": "DE, EU", "prompt_retention": "redacted",
                               "retention_days": "30", "fine_tuning_allowed": "on"})
    assert response.status_code == 302 and response["Location"].startswith(ADMIN_PAGE)
    policy = Policy.objects.get(team=world["red"], data_class__name="confidential")
    assert [s.name for s in policy.processing_sites.all()] == ["frankfurt"]
    assert policy.storage_jurisdictions == ["DE", "EU"] and policy.retention_days == 30
    assert policy.prompt_retention == "redacted" and policy.fine_tuning_allowed
    record = AuditRecord.objects.get(action="residency.policy.create", target_id=str(policy.pk))
    assert record.actor_label == "root" and record.details["after"]["storage_jurisdictions"] == ["DE", "EU"]
    assert "Created policy" in text(root.get(response["Location"]))


def test_field_errors_are_shown_next_to_their_fields_and_nothing_is_saved(world):
    root = signed_in(world["root"])
    before = Policy.objects.count()
    response = root.post(NEW, {"team": "red", "data_class": "", "retention_days": "soon",
                               "processing_sites": ["atlantis"]})
    assert response.status_code == 400
    body = text(response)
    assert re.search(r'id="error-data_class" role="alert">[^<]+', body)
    assert re.search(r'id="error-retention_days" role="alert">A valid integer is required', body)
    unspecified = root.post(NEW, {"data_class": "public", "processing_jurisdictions": "unspecified"})
    assert ('id="error-processing_jurisdictions" role="alert">processing_jurisdictions cannot list '
            '&#x27;unspecified&#x27;') in text(unspecified)
    unknown_site = root.post(NEW, {"data_class": "public", "processing_sites": ["atlantis"]})
    assert 'id="error-processing_sites" role="alert">No site named atlantis.' in text(unknown_site)
    duplicate = root.post(NEW, {"team": "red", "data_class": "internal"})
    assert duplicate.status_code == 400
    assert re.search(r'id="error-data_class" role="alert">A policy for team &#x27;red&#x27; and data class '
                     r'&#x27;internal&#x27; already exists', text(duplicate))
    assert Policy.objects.count() == before
    assert not AuditRecord.objects.filter(action="residency.policy.create", actor_label="root").exists()


def test_editing_a_policy_prefills_the_form_and_audits_before_and_after(world):
    root = signed_in(world["root"])
    url = f"/residency/policies/{world['red_policy'].pk}/edit/"
    form = text(root.get(url))
    assert 'value="frankfurt" checked' in form and '<option value="red" selected>' in form
    response = root.post(url, {"team": "red", "data_class": "internal", "processing_sites": ["frankfurt", "virginia"],
                               "prompt_retention": "metadata"})
    assert response.status_code == 302
    policy = Policy.objects.get(pk=world["red_policy"].pk)
    assert sorted(s.name for s in policy.processing_sites.all()) == ["frankfurt", "virginia"]
    record = AuditRecord.objects.get(action="residency.policy.update", target_id=str(policy.pk))
    assert record.details["before"]["processing_sites"] == ["frankfurt"]
    assert record.details["after"]["processing_sites"] == ["frankfurt", "virginia"]
    assert root.get("/residency/policies/999999/edit/").status_code == 404


def test_deleting_a_policy_asks_first_then_deletes_and_audits(world):
    root = signed_in(world["root"])
    url = f"/residency/policies/{world['blue_policy'].pk}/delete/"
    confirm = root.get(url)
    assert confirm.status_code == 200 and 'id="confirm-delete"' in text(confirm)
    assert Policy.objects.filter(pk=world["blue_policy"].pk).exists()  # asking deletes nothing
    assert root.post(url).status_code == 302
    assert not Policy.objects.filter(pk=world["blue_policy"].pk).exists()
    assert AuditRecord.objects.get(action="residency.policy.delete").details["before"]["team"] == "blue"


@pytest.mark.parametrize("name", ["otto", "erin", "lead"])
def test_roles_other_than_auditors_and_platform_administrators_are_refused(world, name):
    client = signed_in(world[name])
    assert client.get(ADMIN_PAGE).status_code == 403
    assert client.get(NEW).status_code == 403
    assert client.post(NEW, {"data_class": "public"}).status_code == 403
    assert client.post(f"/residency/policies/{world['red_policy'].pk}/delete/").status_code == 403
    assert Policy.objects.filter(pk=world["red_policy"].pk).exists()


def test_an_auditor_cannot_open_or_post_the_editor(world):
    auditor = signed_in(world["audrey"])
    assert auditor.get(NEW).status_code == 403
    assert auditor.get(f"/residency/policies/{world['red_policy'].pk}/edit/").status_code == 403
    assert auditor.post(f"/residency/policies/{world['red_policy'].pk}/delete/").status_code == 403
    assert Policy.objects.filter(pk=world["red_policy"].pk).exists()


def test_the_dry_run_page_still_answers_beside_the_editor(world):
    page = signed_in(world["root"]).get("/residency/")
    assert page.status_code == 200 and 'id="dry-run"' in text(page)


# Sites and data classes ----------------------------------------------------------------------------------

def test_a_platform_administrator_creates_edits_and_deletes_a_site_each_audited(world):
    root = signed_in(world["root"])
    assert 'id="new-site"' in text(root.get(ADMIN_PAGE))
    created = root.post("/residency/sites/new/", {"name": "paris", "jurisdiction": "FR", "region": "eu-west"})
    assert created.status_code == 302 and "Saved+site+paris" in created["Location"]
    paris = Site.objects.get(name="paris")
    assert (paris.jurisdiction, paris.region) == ("FR", "eu-west")
    assert AuditRecord.objects.get(action="residency.site.create", target_id="paris").actor_label == "root"
    edit = f"/residency/sites/{paris.pk}/edit/"
    assert 'value="FR"' in text(root.get(edit))
    assert root.post(edit, {"name": "paris", "jurisdiction": "EU", "region": "eu-west"}).status_code == 302
    record = AuditRecord.objects.get(action="residency.site.update", target_id="paris")
    assert (record.details["before"]["jurisdiction"], record.details["after"]["jurisdiction"]) == ("FR", "EU")
    delete = f"/residency/sites/{paris.pk}/delete/"
    assert 'id="confirm-delete"' in text(root.get(delete))
    assert root.post(delete).status_code == 302
    assert AuditRecord.objects.filter(action="residency.site.delete", target_id="paris").exists()


def test_site_refusals_are_shown_next_to_their_fields(world):
    root = signed_in(world["root"])
    empty = root.post("/residency/sites/new/", {"name": "", "jurisdiction": "EU"})
    assert empty.status_code == 400 and 'id="error-name" role="alert">name must not be empty.' in text(empty)
    taken = root.post("/residency/sites/new/", {"name": "frankfurt", "jurisdiction": "DE"})
    assert "A site named &#x27;frankfurt&#x27; already exists." in text(taken)
    blank = root.post("/residency/sites/new/", {"name": "oslo", "jurisdiction": ""})
    assert 'id="error-jurisdiction" role="alert">jurisdiction must not be empty' in text(blank)
    in_use = root.post(f"/residency/sites/{world['frankfurt'].pk}/delete/")
    assert in_use.status_code == 409 and "still has worker pools (gpu-fra)" in text(in_use)
    assert root.get("/residency/sites/999999/edit/").status_code == 404


def test_a_platform_administrator_manages_data_classes_and_built_ins_keep_their_names(world):
    root = signed_in(world["root"])
    created = root.post("/residency/data-classes/new/", {"name": "phi", "rank": "40", "audit_retention_days": "3650"})
    assert created.status_code == 302
    phi = DataClass.objects.get(name="phi")
    assert (phi.rank, phi.audit_retention_days) == (40, 3650)
    assert AuditRecord.objects.filter(action="residency.data_class.create", target_id="phi").exists()
    bad = root.post("/residency/data-classes/new/", {"name": "Health Data", "rank": "high"})
    assert bad.status_code == 400
    assert 'id="error-name" role="alert">name must be a slug' in text(bad)
    assert 'id="error-rank" role="alert">rank must be a whole number' in text(bad)
    internal = DataClass.objects.get(name="internal")
    renamed = root.post(f"/residency/data-classes/{internal.pk}/edit/", {"name": "inside", "rank": "10"})
    assert "is a built-in data class and keeps its name" in text(renamed)
    in_use = root.post(f"/residency/data-classes/{internal.pk}/delete/")
    assert in_use.status_code == 409 and "built-in data class and cannot be deleted" in text(in_use)
    assert root.post(f"/residency/data-classes/{phi.pk}/delete/").status_code == 302
    assert not DataClass.objects.filter(name="phi").exists()


@pytest.mark.parametrize("name", ["audrey", "otto", "lead"])
def test_only_platform_administrators_change_sites_and_data_classes(world, name):
    client = signed_in(world[name])
    for url in ("/residency/sites/new/", f"/residency/sites/{world['virginia'].pk}/edit/",
                "/residency/data-classes/new/"):
        assert client.get(url).status_code == 403, url
    assert client.post(f"/residency/sites/{world['virginia'].pk}/delete/").status_code == 403
    assert Site.objects.filter(name="virginia").exists()
