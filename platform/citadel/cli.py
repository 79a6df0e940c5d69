"""The `citadel` console script: Django's management commands under Citadel's name.

`citadel keys create ...`, `citadel worker --pool gpu-a`, `citadel serve`: every operator command is a
management command, so `python manage.py X` and `citadel X` are the same thing.
"""

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    platform_dir = Path(__file__).resolve().parent.parent
    if str(platform_dir) not in sys.path:
        sys.path.insert(0, str(platform_dir))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "citadel.settings.local")
    from django.core.management import execute_from_command_line

    execute_from_command_line(["citadel", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
