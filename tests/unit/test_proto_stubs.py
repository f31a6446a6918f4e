"""The committed gRPC stubs match gpuattach.proto (run `make proto` after editing it)."""

from __future__ import annotations

import importlib.resources
import inspect
from collections.abc import Iterable
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

from gpuattach_broker.protos import gpuattach_pb2, gpuattach_pb2_grpc

FileDescriptor = descriptor_pb2.FileDescriptorProto

ROOT = Path(__file__).resolve().parents[2]
PROTO = "gpuattach_broker/protos/gpuattach.proto"


def _strip_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    # protoc's Python generator leaves json_name out of the embedded descriptor
    for message in messages:
        for f in message.field:
            f.ClearField("json_name")
        for f in message.extension:
            f.ClearField("json_name")
        _strip_json_names(message.nested_type)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("proto") / "gpuattach.pb"
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'broker'}",
            f"-I{well_known}",
            f"--descriptor_set_out={out}",
            str(ROOT / "broker" / PROTO),
        ]
    )
    assert rc == 0, "protoc failed on gpuattach.proto"
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (fresh,) = descriptor_set.file
    _strip_json_names(fresh.message_type)
    for f in fresh.extension:
        f.ClearField("json_name")
    return fresh


@pytest.fixture(scope="module")
def committed() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(gpuattach_pb2.DESCRIPTOR.serialized_pb)


def test_pb2_matches_proto(fresh: FileDescriptor, committed: FileDescriptor) -> None:
    assert fresh.name == committed.name == PROTO
    if fresh != committed:
        import difflib

        diff = "\n".join(
            difflib.unified_diff(
                text_format.MessageToString(committed).splitlines(),
                text_format.MessageToString(fresh).splitlines(),
                "committed gpuattach_pb2",
                "gpuattach.proto",
                lineterm="",
            )
        )
        pytest.fail(f"gpuattach_pb2.py is stale: run `make proto`\n{diff}")


def test_grpc_module_declares_every_method(fresh: FileDescriptor) -> None:
    source = inspect.getsource(gpuattach_pb2_grpc)
    assert fresh.service, "the proto declares no service"
    for service in fresh.service:
        stub = getattr(gpuattach_pb2_grpc, f"{service.name}Stub")
        servicer = getattr(gpuattach_pb2_grpc, f"{service.name}Servicer")
        assert hasattr(gpuattach_pb2_grpc, f"add_{service.name}Servicer_to_server")
        declared = {
            name
            for name, _ in inspect.getmembers(servicer, inspect.isfunction)
            if not name.startswith("_")
        }
        wanted = {m.name for m in service.method}
        assert declared == wanted, f"{service.name}: stubs {declared} vs proto {wanted}"
        stub_source = inspect.getsource(stub)
        for method in service.method:
            path = f"/{fresh.package}.{service.name}/{method.name}"
            assert f"'{path}'" in stub_source, f"{path} missing from {service.name}Stub"
            kind = {
                (False, False): "unary_unary",
                (False, True): "unary_stream",
                (True, False): "stream_unary",
                (True, True): "stream_stream",
            }[(method.client_streaming, method.server_streaming)]
            assert f"self.{method.name} = channel.{kind}(" in stub_source, (
                f"{service.name}.{method.name} is not {kind} in the stub"
            )
    # no service in the module that the proto lost
    services = {s.name for s in fresh.service}
    stubs = {n.removesuffix("Stub") for n in dir(gpuattach_pb2_grpc) if n.endswith("Stub")}
    assert stubs == services
    assert source.count("_registered_method=True") >= sum(len(s.method) for s in fresh.service)


def test_committed_descriptor_has_the_services(committed: FileDescriptor) -> None:
    names = {s.name for s in committed.service}
    assert {"Broker", "Worker"} <= names
