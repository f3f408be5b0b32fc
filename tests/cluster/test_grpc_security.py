"""API-key auth, TLS and mTLS on the gRPC front end (certificates made in the test with ``cryptography``)."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from accordion.client import Client, ClientError, TLSConfig
from accordion.protos import llm_service_pb2 as pb
from accordion.protos import llm_service_pb2_grpc as pb_grpc
from tests.cluster.grpc_harness import ServerThread, text_request

SC = grpc.StatusCode
KEY = "s3cret-key"


def _pem_key(k) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return b.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, ca=True)
    out = {}

    def write(name, cert, key):
        (d / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(_pem_key(key))
        out[name] = (str(d / f"{name}.crt"), str(d / f"{name}.key"))

    write("ca", ca, ca_key)
    sk = ec.generate_private_key(ec.SECP256R1())
    write("server", _cert("localhost", sk, ca, ca_key, server=True), sk)
    ck = ec.generate_private_key(ec.SECP256R1())
    write("client", _cert("client", ck, ca, ca_key), ck)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    write("rogue", _cert("rogue", rogue_key), rogue_key)  # self-signed, not from our CA
    return out


def _health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_api_key_auth():
    with ServerThread(api_key=KEY) as s:
        ch = grpc.insecure_channel(s.target)
        stub = pb_grpc.LLMServiceStub(ch)
        for md in [(), (("authorization", "Bearer wrong"),), (("authorization", KEY),),
                   (("authorization", f"bearer {KEY}"),), (("authorization", f"Bearer {KEY}x"),)]:
            with pytest.raises(grpc.RpcError) as ei:
                stub.Generate(text_request("hi", max_tokens=1), metadata=md, timeout=5)
            assert ei.value.code() == SC.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as ei:
                list(stub.GenerateStream(text_request("hi", max_tokens=1), metadata=md, timeout=5))
            assert ei.value.code() == SC.UNAUTHENTICATED
        assert not s.engine.started  # nothing reached the engine
        ok = (("authorization", f"Bearer {KEY}"),)
        assert stub.Generate(text_request("hi", max_tokens=2), metadata=ok, timeout=5).completions[0].token_ids
        assert len(list(stub.GenerateStream(text_request("hi", max_tokens=2), metadata=ok, timeout=5))) == 2
        # health and reflection need no key
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resps = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=5))
        names = {sv.name for sv in resps[0].list_services_response.service}
        assert "accordion.v1.LLMService" in names and "grpc.health.v1.Health" in names
        ch.close()
        with Client(s.target, api_key=KEY) as c:
            assert c.model_info().model_name == "fake-model"
        with Client(s.target, api_key="nope", max_retries=0) as c, pytest.raises(ClientError) as ei:
            c.tokenize("x")
        assert ei.value.code() == SC.UNAUTHENTICATED


def test_tls(pki):
    cert, key = pki["server"]
    with ServerThread(tls_cert=cert, tls_key=key) as s:
        target = f"localhost:{s.server.port}"
        with Client(target, tls=TLSConfig(ca_cert=pki["ca"][0]), timeout=5) as c:
            assert c.generate("hi", max_tokens=2).completions[0].finish_reason
            assert c.health() == "SERVING"
        # a plaintext client cannot talk to a TLS server
        with Client(target, timeout=2, max_retries=0) as c, pytest.raises(ClientError) as ei:
            c.model_info()
        assert ei.value.code() == SC.UNAVAILABLE
        # a client that does not trust the CA refuses the server
        with Client(target, tls=TLSConfig(ca_cert=pki["rogue"][0]), timeout=2, max_retries=0) as c, \
                pytest.raises(ClientError):
            c.model_info()


def test_mtls(pki):
    cert, key = pki["server"]
    with ServerThread(tls_cert=cert, tls_key=key, tls_client_ca=pki["ca"][0], api_key=KEY) as s:
        target = f"localhost:{s.server.port}"
        ccert, ckey = pki["client"]
        good = TLSConfig(ca_cert=pki["ca"][0], client_cert=ccert, client_key=ckey)
        with Client(target, api_key=KEY, tls=good, timeout=5) as c:
            assert c.generate("hi", max_tokens=2).text
        # no client certificate, or one our CA did not sign: the handshake fails
        for tls in (TLSConfig(ca_cert=pki["ca"][0]),
                    TLSConfig(ca_cert=pki["ca"][0], client_cert=pki["rogue"][0], client_key=pki["rogue"][1])):
            with Client(target, api_key=KEY, tls=tls, timeout=2, max_retries=0) as c, pytest.raises(ClientError) as ei:
                c.model_info()
            assert ei.value.code() == SC.UNAVAILABLE


def test_tls_config_validation():
    from accordion.cluster.grpc_server import GrpcServeConfig

    with pytest.raises(ValueError):
        GrpcServeConfig(tls_cert="x")
    with pytest.raises(ValueError):
        GrpcServeConfig(tls_client_ca="ca")


def test_pb_has_one_service():
    assert list(pb.DESCRIPTOR.services_by_name) == ["LLMService"]
    assert pb.DESCRIPTOR.package == "accordion.v1"
