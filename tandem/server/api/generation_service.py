"""tandem.v1.GenerationService: proto in, engine call, proto out. No policy lives here."""

from contextlib import aclosing
from typing import AsyncIterator

import grpc

from tandem.server.api import convert, generation
from tandem.server.api.serving_state import ServingState
from tandem.server.engine.outputs import RequestOutput
from tandem.v1 import generation_pb2, generation_pb2_grpc


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, state: ServingState):
        self._state = state

    def _outputs(self, request: convert.GenerationRequest) -> AsyncIterator[RequestOutput]:
        prompt = convert.prompt_of(request)
        params = convert.sampling_params_of(request)
        return generation.generate(self._state, prompt, params, request.adapter, convert.mixture_of(request), request.return_top_experts)

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> generation_pb2.GenerateResponse:
        outputs = [out async for out in self._outputs(request)]
        return convert.generate_response(outputs, request)

    async def GenerateStream(
        self, request: generation_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async with aclosing(self._outputs(request)) as outputs:
            async for out in outputs:
                yield convert.stream_response(out, request)

    async def Tokenize(self, request: generation_pb2.TokenizeRequest, context: grpc.aio.ServicerContext) -> generation_pb2.TokenizeResponse:
        with self._state.admit() as engine:
            token_ids = await engine.encode(convert.text_of(request))
            return generation_pb2.TokenizeResponse(token_ids=token_ids, tokens=await engine.token_texts(token_ids))

    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> generation_pb2.GetModelInfoResponse:
        with self._state.admit() as engine:
            return convert.model_info(engine.info, self._state.catalog.max_rank)
