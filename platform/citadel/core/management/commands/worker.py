"""`citadel worker --pool NAME`: a Celery worker that consumes one pool's queue and keeps its models loaded.

The thread pool lets concurrent requests share one loaded engine in one process (the engine
batches them); `--control` also consumes the housekeeping queue (for one-machine installs).
"""

import os
import socket

from django.core.management.base import BaseCommand, CommandError

from citadel.celery import app, pool_queue
from citadel.registry.models import WorkerPool


class Command(BaseCommand):
    help = "Run a Celery worker for one worker pool."

    def add_arguments(self, parser):
        parser.add_argument("--pool", required=True, help="The worker pool this host belongs to.")
        parser.add_argument("--name", default=None, help="Worker name; default POOL@HOSTNAME.")
        parser.add_argument("--concurrency", type=int, default=16,
                            help="Requests handled at once; the engine batches them together.")
        parser.add_argument("--control", action="store_true", help="Also run housekeeping tasks (queue 'control').")
        parser.add_argument("--loglevel", default="info")

    def handle(self, *args, pool, name, concurrency, control, loglevel, **options):
        if not WorkerPool.objects.filter(name=pool).exists():
            raise CommandError(f"No worker pool named '{pool}'. Create it with `citadel pools create {pool} --site SITE`.")
        os.environ["CITADEL_WORKER_POOL"] = pool
        # The engine's threads own this machine's cores while they decode. A fast tokenizer encoding a
        # batch chunk's prompts would start a thread pool of its own whose idle threads keep waking
        # (about a hundred times per 1,024-line batch here), each time taking a core from a step's
        # OpenMP threads mid-operation; in the caller's thread the encoding takes ~1 ms a chunk.
        # An operator's own setting wins.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        queues = [pool_queue(pool)] + (["control"] if control else [])
        app.worker_main([
            "worker", f"--hostname={name or f'{pool}@{socket.gethostname()}'}", f"--queues={','.join(queues)}",
            "--pool=threads", f"--concurrency={concurrency}", f"--loglevel={loglevel}",
            "--without-gossip", "--without-mingle",
        ])
