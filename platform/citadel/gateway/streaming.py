"""Server-sent events for a running job, in OpenAI's chunk format.

Each stream holds one thread of a gunicorn gthread worker while it polls, not a whole worker
process, so many streams share a process (DESIGN.md: streams must not starve other requests).
"""

from collections.abc import Iterator

from citadel.core.exceptions import openai_error_body
from citadel.gateway.openai_format import TextOffsets, choice_logprobs, chunk_body, sse
from citadel.jobs.models import InferenceJob
from citadel.jobs.selectors import Delta, Finished, job_follow
from citadel.jobs.services import job_error


def job_event_stream(job: InferenceJob, *, include_usage: bool = False) -> Iterator[str]:
    if job.kind == InferenceJob.Kind.CHAT:
        yield sse(chunk_body(job, first=True))
    final, offsets = job, TextOffsets()
    for event in job_follow(job_id=job.id):
        if isinstance(event, Delta):
            yield sse(chunk_body(job, text=event.text, logprobs=choice_logprobs(job, event.logprobs, offsets)))
        elif isinstance(event, Finished):
            final = event.job
    if final.status == InferenceJob.Status.SUCCEEDED:
        yield sse(chunk_body(final, finish_reason=final.finish_reason))
        if include_usage:
            yield sse(chunk_body(final, with_usage=True))
        yield sse("[DONE]")
    else:
        error = job_error(final)
        yield sse(openai_error_body(error.message, error.error_type, error.param, error.code))
