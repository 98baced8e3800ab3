"""TLS: a TLS-only redis-server (with client certificates required), and the worker,
get_books and the checker talking to it over rediss:// with --tls-* files."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lending.keys import Keys
from lending.redis.connection import make_client
from lending.redis.embedded import free_port, redis_server_path
from lending.settings import Settings, Tls
from lending.worker import Worker

from .support import ROOT, event_for, process_env, send


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".crt")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey, *, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lending test CA")])
    ca_cert = _certificate("lending test CA", ca_key, ca_name, ca_key, ca=True)
    _, ca_path = _write(folder / "ca", ca_key, ca_cert)
    files = {"ca": ca_path}
    for name in ("server", "client"):
        key = _key()
        key_path, cert_path = _write(folder / name, key, _certificate(name, key, ca_name, ca_key, ca=False))
        files[f"{name}_key"], files[f"{name}_cert"] = key_path, cert_path
    return files


def start_tls_server(binary: str, folder: Path, files: dict[str, Path], port: int) -> subprocess.Popen[bytes] | None:
    """Start ``binary`` TLS-only on ``port``; ``None`` if it was built without TLS."""
    with (folder / "redis.log").open("w") as log:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--tls-port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(folder),
                "--tls-cert-file",
                str(files["server_cert"]),
                "--tls-key-file",
                str(files["server_key"]),
                "--tls-ca-cert-file",
                str(files["ca"]),
                "--tls-auth-clients",
                "yes",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    tls = Tls(str(files["ca"]), str(files["client_cert"]), str(files["client_key"]))
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            output = (folder / "redis.log").read_text()
            if "tls" in output.lower():
                return None  # e.g. "TLS not supported" / "Bad directive": not a TLS build
            raise AssertionError(f"TLS redis-server exited: {output[-2000:]}")
        probe = redis.Redis.from_url(f"rediss://127.0.0.1:{port}", **tls.options())
        try:
            if probe.ping():
                return proc
        except redis.RedisError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
        finally:
            probe.close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Path]]]:
    folder = tmp_path_factory.mktemp("tls")
    files = make_certificates(folder)
    port = free_port()
    for binary in dict.fromkeys(b for b in (shutil.which("redis-server"), redis_server_path()) if b):
        proc = start_tls_server(binary, folder, files, port)
        if proc is not None:
            break
    else:
        pytest.skip("no redis-server built with TLS here (Debian's redis-server is; .ci/run installs it)")
    yield f"rediss://127.0.0.1:{port}", files
    proc.terminate()
    proc.wait(10)


async def test_worker_get_books_and_checker_over_tls(tls_server: tuple[str, dict[str, Path]]) -> None:
    url, files = tls_server
    tls = Tls(str(files["ca"]), str(files["client_cert"]), str(files["client_key"]))
    namespace = f"tls-{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    client = make_client(url, tls=tls)
    worker_client = make_client(url, tls=tls)
    worker = Worker(
        Settings(worker_id="w1", redis_url=url, namespace=namespace, tls=tls), worker_client, handle_signals=False
    )
    task = asyncio.create_task(worker.run())
    try:
        entry = await send(client, keys, "lend", "ada", ["b1"])
        assert (await event_for(client, keys, "lend", entry)).status == "accepted"

        env = process_env(
            url,
            namespace,
            LENDING_TLS_CA_CERT=str(files["ca"]),
            LENDING_TLS_CERT=str(files["client_cert"]),
            LENDING_TLS_KEY=str(files["client_key"]),
        )
        got = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(ROOT / "get_books.py"), "return", "ada", "b1"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert got.returncode == 0 and got.stdout.startswith("RETURNED"), got.stdout + got.stderr
        checked = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "lending", "check", "--wait-quiescent", "5"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert checked.returncode == 0 and checked.stdout.startswith("OK"), checked.stdout + checked.stderr

        # Without the client certificate, the server refuses the connection.
        no_cert = {k: v for k, v in env.items() if k not in ("LENDING_TLS_CERT", "LENDING_TLS_KEY")}
        refused = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(ROOT / "get_books.py"), "request", "ada", "b2"],
            cwd=ROOT,
            env=no_cert,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode == 5, refused.stdout + refused.stderr
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        await client.aclose()
        await worker_client.aclose()
