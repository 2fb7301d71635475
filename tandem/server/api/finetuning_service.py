"""tandem.v1.FineTuningService: proto in, job manager call, proto out."""

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from tandem.server.api import finetuning_convert as convert
from tandem.server.api.abandonable import run_abandonable
from tandem.server.api.serving_state import ServingState
from tandem.server.errors import FailedPrecondition
from tandem.server.finetune.job import Job
from tandem.v1 import finetuning_pb2, finetuning_pb2_grpc

if TYPE_CHECKING:
    from tandem.server.engine.async_engine import AsyncEngine
    from tandem.server.finetune.jobs import JobManager


def _jobs(engine: "AsyncEngine") -> "JobManager":
    if engine.jobs is None:
        raise FailedPrecondition("fine-tuning is off: start the server with --data-dir and --adapters-dir")
    return engine.jobs


class FineTuningServicer(finetuning_pb2_grpc.FineTuningServiceServicer):
    def __init__(self, state: ServingState):
        self._state = state

    async def CreateJob(self, request: finetuning_pb2.CreateJobRequest, context: grpc.aio.ServicerContext) -> finetuning_pb2.CreateJobResponse:
        with self._state.admit() as engine:
            jobs = _jobs(engine)
            # Reading and tokenizing the whole dataset takes a while: off the event loop, and
            # nothing is queued once the caller has gone.
            job_request = convert.job_request(request)
            job = await run_abandonable(lambda abandoned: jobs.create(job_request, abandoned))
            return finetuning_pb2.CreateJobResponse(job=convert.job(job))

    async def GetJob(self, request: finetuning_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> finetuning_pb2.GetJobResponse:
        with self._state.admit() as engine:
            return finetuning_pb2.GetJobResponse(job=convert.job(_jobs(engine).get(request.id)))

    async def ListJobs(self, request: finetuning_pb2.ListJobsRequest, context: grpc.aio.ServicerContext) -> finetuning_pb2.ListJobsResponse:
        with self._state.admit() as engine:
            jobs, next_token = _jobs(engine).list_page(request.page_size, request.page_token)
            return finetuning_pb2.ListJobsResponse(jobs=[convert.job(j) for j in jobs], next_page_token=next_token)

    async def CancelJob(self, request: finetuning_pb2.CancelJobRequest, context: grpc.aio.ServicerContext) -> finetuning_pb2.CancelJobResponse:
        with self._state.admit() as engine:
            # Saving the job commits to SQLite with a sync: off the event loop.
            return finetuning_pb2.CancelJobResponse(job=convert.job(await asyncio.to_thread(_jobs(engine).cancel, request.id)))

    async def WatchJob(
        self, request: finetuning_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[finetuning_pb2.WatchJobResponse]:
        # Admitted to start, not counted while it lasts: a watch is no work a drain should
        # wait for (it ran out every drain's grace); the server's stop ends it, and clients
        # reconnect to a replica that serves.
        # Only the newest state waits to be sent: a client reading slower than the job steps
        # skips states, and held a queue of every step's until the job ended. The last state
        # is the terminal one (an ended job never changes), so it is always sent.
        with self._state.admit() as engine:
            loop = asyncio.get_running_loop()
            newest: list[Job] = []
            changed = asyncio.Event()

            def keep(job: Job) -> None:
                newest[:] = [job]
                changed.set()

            stop = _jobs(engine).watch(request.id, lambda job: loop.call_soon_threadsafe(keep, job))
        try:
            while True:
                await changed.wait()
                changed.clear()
                job = newest[0]
                yield finetuning_pb2.WatchJobResponse(job=convert.job(job))
                if job.status.terminal:
                    return
        finally:
            stop()
