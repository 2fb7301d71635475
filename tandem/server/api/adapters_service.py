"""tandem.v1.AdaptersService: proto in, adapter catalog call, proto out."""

import grpc

from tandem.server.api import convert
from tandem.server.api.abandonable import run_abandonable
from tandem.server.api.auth import Role
from tandem.server.api.call_record import current_call
from tandem.server.api.serving_state import ServingState
from tandem.server.metrics import Metrics
from tandem.v1 import adapters_pb2, adapters_pb2_grpc


class AdaptersServicer(adapters_pb2_grpc.AdaptersServiceServicer):
    def __init__(self, state: ServingState, metrics: Metrics):
        self._state = state
        self._metrics = metrics

    async def LoadAdapter(self, request: adapters_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> adapters_pb2.LoadAdapterResponse:
        with self._state.admit():
            # Reading adapter weights takes disk time: off the event loop, and not published
            # once the caller has gone.
            info = await run_abandonable(lambda abandoned: self._state.catalog.load(request.name, request.path, abandoned))
            self._metrics.lora_adapter_loads.inc()
            return adapters_pb2.LoadAdapterResponse(adapter=convert.adapter_info(info))

    async def UnloadAdapter(self, request: adapters_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext) -> adapters_pb2.UnloadAdapterResponse:
        with self._state.admit():
            # It looks for the name's folder on disk (a slow or hung shared volume): off the
            # event loop, where it held every other call, health checks included, and not
            # committed once the caller has gone.
            await run_abandonable(lambda abandoned: self._state.catalog.unload(request.name, abandoned))
            return adapters_pb2.UnloadAdapterResponse()

    async def MergeAdapters(self, request: adapters_pb2.MergeAdaptersRequest, context: grpc.aio.ServicerContext) -> adapters_pb2.MergeAdaptersResponse:
        with self._state.admit():
            # Reading, merging and factorising every projection takes seconds: off the event loop.
            spec = convert.merge_spec_of(request)
            info, errors = await run_abandonable(lambda abandoned: self._state.catalog.merge(request.name, spec, abandoned))
            return convert.merge_response(info, errors)

    async def CompressAdapter(
        self, request: adapters_pb2.CompressAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.CompressAdapterResponse:
        with self._state.admit():
            density = request.density if request.HasField("density") else convert.DEFAULT_COMPRESS_DENSITY
            info = await run_abandonable(lambda abandoned: self._state.catalog.compress(request.name, request.source, density, abandoned))
            return adapters_pb2.CompressAdapterResponse(adapter=convert.adapter_info(info))

    async def ListAdapters(self, request: adapters_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext) -> adapters_pb2.ListAdaptersResponse:
        with self._state.admit():
            show_path = current_call().role == Role.ADMIN
            adapters = [convert.adapter_info(a, show_path) for a in self._state.catalog.list()]
            return adapters_pb2.ListAdaptersResponse(adapters=adapters)
