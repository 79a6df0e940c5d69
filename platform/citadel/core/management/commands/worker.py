"""`citadel worker --pool NAME`: a Celery worker that consumes one pool's queue and keeps its models loaded.

The thread pool lets concurrent requests share one loaded engine in one process (the engine
batches them); `--control` also consumes the housekeeping queue (for one-machine installs).

`--nice N` lowers the worker's CPU priority, for a worker that shares its machine with the control
plane (`citadel serve`, a single-host install). A model running on the CPU keeps every core busy
while it decodes (its OpenMP threads spin between operations), and at equal priority the web
process, PostgreSQL and the other workers queue behind it: 64 token streams from the demo model
made other API requests wait seconds. At a lower priority the engine gets what they leave.
"""

import os
import socket

from django.core.management.base import BaseCommand, CommandError

from citadel.celery import app, pool_queue
from citadel.registry.models import WorkerPool

MAX_NICE = 19


class Command(BaseCommand):
    help = "Run a Celery worker for one worker pool."

    def add_arguments(self, parser):
        parser.add_argument("--pool", required=True, help="The worker pool this host belongs to.")
        parser.add_argument("--name", default=None, help="Worker name; default POOL@HOSTNAME.")
        parser.add_argument("--concurrency", type=int, default=16,
                            help="Requests handled at once; the engine batches them together.")
        parser.add_argument("--control", action="store_true", help="Also run housekeeping tasks (queue 'control').")
        parser.add_argument("--loglevel", default="info")
        parser.add_argument("--nice", type=int, default=0,
                            help="Lower CPU priority, 0 (none) to 19, for a worker sharing its machine with the "
                                 "control plane.")

    def handle(self, *args, pool, name, concurrency, control, loglevel, nice, **options):
        if not 0 <= nice <= MAX_NICE:
            raise CommandError(f"--nice must be from 0 to {MAX_NICE}, not {nice}.")
        if not WorkerPool.objects.filter(name=pool).exists():
            raise CommandError(f"No worker pool named '{pool}'. Create it with `citadel pools create {pool} --site SITE`.")
        if nice:
            os.nice(nice)  # before Celery starts a thread: every thread it and the engine start inherits it
        os.environ["CITADEL_WORKER_POOL"] = pool
        queues = [pool_queue(pool)] + (["control"] if control else [])
        app.worker_main([
            "worker", f"--hostname={name or f'{pool}@{socket.gethostname()}'}", f"--queues={','.join(queues)}",
            "--pool=threads", f"--concurrency={concurrency}", f"--loglevel={loglevel}",
            "--without-gossip", "--without-mingle",
        ])
