"""{% console_menu %}: the role's menu (frontend.nav) for the base template."""

from django import template

from frontend.nav import menu_for

register = template.Library()


@register.simple_tag(takes_context=True)
def console_menu(context) -> list[dict]:
    request = context.get("request")
    if request is None:
        return []
    return menu_for(request.user, request.path)
