"""Helpers of the fault suite (test_faults_*.py): streams consumed in the background with a clock
on every chunk, the tokens a stream lost or got twice, the time a fault cost, and self-signed
certificates for TLS."""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from services.common.proto import pb


class Stream:
    """A Generate call consumed in a thread; chunks and their arrival times fill as they come."""

    def __init__(self, stub, request, *, timeout: float = 60.0, metadata=None):
        self.chunks: list = []
        self.times: list[float] = []
        self.error: grpc.RpcError | None = None
        self.started = time.monotonic()
        self._call = stub.Generate(request, timeout=timeout, metadata=metadata)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @classmethod
    def text(cls, stub, text: str, max_tokens: int, **kwargs) -> Stream:
        request_id = kwargs.pop("request_id", "")
        return cls(stub, pb.GenerateRequest(text=text, request_id=request_id,
                                            sampling=pb.SamplingParams(max_tokens=max_tokens)),
                   **kwargs)

    def _run(self) -> None:
        try:
            for chunk in self._call:
                self.chunks.append(chunk)
                self.times.append(time.monotonic())
        except grpc.RpcError as exc:
            self.error = exc

    def cancel(self) -> None:
        self._call.cancel()

    def wait(self, timeout: float = 60.0) -> Stream:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end in time"
        return self

    def result(self, timeout: float = 60.0) -> list:
        self.wait(timeout)
        assert self.error is None, self.error
        return self.chunks

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def output(self) -> str:
        return "".join(c.text for c in self.chunks)

    def first_token_s(self) -> float:
        """Seconds from the call to its first chunk with tokens."""
        return next(t for c, t in zip(self.chunks, self.times) if c.token_ids) - self.started


def lost_and_duplicated(expected: Sequence, got: Sequence) -> tuple[int, int]:
    """(items of `expected` missing from `got`, items of `got` beyond those that match), by the
    longest matching blocks: a stream equal to the reference scores (0, 0)."""
    matcher = difflib.SequenceMatcher(a=list(expected), b=list(got), autojunk=False)
    matched = sum(block.size for block in matcher.get_matching_blocks())
    return len(expected) - matched, len(got) - matched


def recovery_s(streams: Sequence[Stream], fault_at: float) -> float:
    """The longest stall a client saw from the fault on: the widest gap between two chunks of a
    stream (the fault counting as the first), over the streams."""
    stalls = []
    for s in streams:
        times = [fault_at, *(t for t in s.times if t > fault_at)]
        stalls += [b - a for a, b in zip(times, times[1:])]
    return round(max(stalls, default=0.0), 2)


def self_signed(folder: Path, host: str = "127.0.0.1") -> tuple[str, str]:
    """A self-signed certificate for `host` (an IP address, in its subjectAltName) and its key,
    as PEM files in `folder`; returns their paths (certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)
