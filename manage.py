#!/usr/bin/env python
"""Django's command-line utility for Citadel; the `citadel` console script is the same entry point."""

import os
import sys
from pathlib import Path

# The control plane lives in platform/ under the import name `citadel` (see DESIGN.md).
sys.path.insert(0, str(Path(__file__).resolve().parent / "platform"))

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "citadel.settings.local")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
