"""`citadel batches recover`: run beat's batch sweep once, now.

For operators who want a batch moving again without waiting for beat (after a host died), and for
scripts and tests that play beat. See citadel.batches.services.batches_recover for what it does.
"""

import json
from datetime import timedelta

from django.core.management.base import BaseCommand

from citadel.batches.services import batches_recover


class Command(BaseCommand):
    help = "Batch housekeeping: `recover` takes back dead workers' lines and resends batches whose message was lost."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        recover = sub.add_parser("recover", help="Lines of dead workers back to pending; batches with pending lines "
                                                 "and no recent dispatch sent again; expired and finished ones ended.")
        recover.add_argument("--resend-after", type=float, default=60.0,
                             help="Seconds since the last dispatch before a batch is sent again (60).")

    def handle(self, *args, action, **options):
        if action == "recover":
            result = batches_recover(resend_after=timedelta(seconds=options["resend_after"]))
            self.stdout.write(json.dumps(result))
