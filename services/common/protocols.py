"""The standard services every Tandem server answers beside its own: gRPC health (Check, Watch and List), server
reflection in both versions current tools speak (`grpc.reflection.v1`, tried first by grpcurl and buf, and the older
`v1alpha`), and a last handler that answers every method the server does not have with UNIMPLEMENTED and the
UNSUPPORTED ErrorInfo, the Open Inference Protocol's optional methods by name.

grpcio-health-checking serves Check and Watch but not List, and grpcio-reflection serves only v1alpha; both are
extended here rather than rewritten. Reflection v1 is the same protocol as v1alpha under another package name (same
messages, same field numbers), so the library's servicer answers it, and its descriptor is v1alpha's renamed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from services.common import errors

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_V1ALPHA = reflection.SERVICE_NAME
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"

# Methods of the Open Inference Protocol (Triton's grpc_service.proto) that Tandem does not serve, and why.
OIP_SERVICE = "inference.GRPCInferenceService"
_OIP_UNSUPPORTED = {
    "ModelConfig": "Triton model configuration (config.pbtxt) does not apply: Tandem describes models through"
    " ModelMetadata and tandem.gateway.v1.GatewayService/GetModel",
    "SystemSharedMemoryStatus": "shared-memory tensors are not supported: send tensors in the request",
    "SystemSharedMemoryRegister": "shared-memory tensors are not supported: send tensors in the request",
    "SystemSharedMemoryUnregister": "shared-memory tensors are not supported: send tensors in the request",
    "CudaSharedMemoryStatus": "CUDA shared-memory tensors are not supported: send tensors in the request",
    "CudaSharedMemoryRegister": "CUDA shared-memory tensors are not supported: send tensors in the request",
    "CudaSharedMemoryUnregister": "CUDA shared-memory tensors are not supported: send tensors in the request",
    "TraceSetting": "Triton trace settings are not supported: Tandem traces with OpenTelemetry (docs/observability.md)",
    "LogSettings": "Triton log settings are not supported: set the log level with --log-level",
}


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # the library is untyped
    """grpc.health.v1.Health with List: every service's status, as Check would answer it one by one."""

    async def List(  # noqa: N802
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()  # the base class keeps no public map
            }
        )


def _reflection_v1_file() -> None:
    """Adds grpc/reflection/v1/reflection.proto to the default pool: v1alpha's file with the package renamed."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name, proto.package = name, "grpc.reflection.v1"
    proto.options.ClearField("deprecated")
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Server reflection v1 and v1alpha, each listing the given services and both reflection services."""
    _reflection_v1_file()
    names = (*service_names, REFLECTION_V1, REFLECTION_V1ALPHA)
    reflection.enable_server_reflection(names, server)  # v1alpha, as the library registers it
    servicer = ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def _method_name(full: str) -> tuple[str, str]:
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


class UnsupportedMethods(grpc.GenericRpcHandler):
    """Registered last: any method no other handler took is answered with UNIMPLEMENTED and the UNSUPPORTED ErrorInfo
    (gRPC's own answer, a bare "Method not found!", carries no details), whatever its kind of call."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        service, method = _method_name(handler_call_details.method)
        if service == OIP_SERVICE and method in _OIP_UNSUPPORTED:
            message = f"{service}/{method} is not supported by Tandem: {_OIP_UNSUPPORTED[method]}"
        else:
            message = f"method {handler_call_details.method!r} is not served here"

        async def refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            raise errors.unimplemented(message, method=handler_call_details.method[:200])
            yield  # pragma: no cover - makes this an async generator, the shape a stream handler has

        return grpc.stream_stream_rpc_method_handler(refuse)
