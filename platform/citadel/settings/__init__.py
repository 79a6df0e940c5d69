"""Settings split by environment: base (shared), local (`make run`), test, production.

Every value comes from the environment through django-environ; see base.py for the list.
"""
