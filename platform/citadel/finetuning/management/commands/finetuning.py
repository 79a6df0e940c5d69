"""`citadel finetuning recover`: run beat's fine-tuning sweep once, now.

For operators who want a job back without waiting for beat (after a host died), and for scripts
and tests that play beat. See citadel.finetuning.services.jobs_recover for what it does.
"""

import json

from django.core.management.base import BaseCommand

from citadel.finetuning.services import jobs_recover


class Command(BaseCommand):
    help = "Fine-tuning housekeeping: `recover` requeues or fails jobs whose worker died and resends lost ones."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("recover", help="Requeue (to resume from checkpoint) or fail jobs whose worker died; "
                                       "resend queued jobs whose message may be lost.")

    def handle(self, *args, action, **options):
        if action == "recover":
            self.stdout.write(json.dumps(jobs_recover()))
