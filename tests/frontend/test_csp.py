"""The console works under a strict Content-Security-Policy: the header is on every console response,
allows only the site's own scripts and styles, and no template carries inline script or style that the
policy would block (script without src, <style>, style="", on*= handlers, hx-on)."""

import re
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

TEMPLATES = Path(__file__).resolve().parents[2] / "frontend" / "templates"
INLINE = {
    "script without src": re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I),
    "<style> element": re.compile(r"<style[\s>]", re.I),
    "style attribute": re.compile(r"\sstyle\s*=", re.I),
    "event handler attribute": re.compile(r"\son[a-z]+\s*=", re.I),
    "hx-on attribute": re.compile(r"\shx-on[:-]", re.I),
}


def directives(header: str) -> dict[str, list[str]]:
    parts = (part.strip().split() for part in header.split(";") if part.strip())
    return {words[0]: words[1:] for words in parts}


def test_no_console_template_contains_inline_script_or_style():
    offences = []
    for template in sorted(TEMPLATES.rglob("*.html")):
        text = template.read_text()
        for what, pattern in INLINE.items():
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                offences.append(f"{template.relative_to(TEMPLATES)}:{line}: {what}")
    assert not offences, "inline code the Content-Security-Policy blocks:\n" + "\n".join(offences)


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/models/", "/playground/", "/account/", "/usage/", "/teams/",
                                  "/keys/"])
def test_every_console_page_carries_a_policy_that_allows_only_the_sites_own_scripts_and_styles(path):
    client = Client()
    client.force_login(get_user_model().objects.create_user("csp", password="x" * 16, is_staff=True))
    response = client.get(path)
    assert response.status_code == 200
    policy = directives(response["Content-Security-Policy"])
    assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in response["Content-Security-Policy"]
    assert "'unsafe-eval'" not in response["Content-Security-Policy"]


@pytest.mark.django_db
def test_htmx_is_told_not_to_inject_styles_nor_evaluate_code():
    response = Client().get("/login/")
    assert directives(response["Content-Security-Policy"])["script-src"] == ["'self'"]
    page = response.content.decode()
    assert '"includeIndicatorStyles": false' in page and '"allowEval": false' in page
