"""A private CA and a broker certificate for ``secure.conf`` (``fleetpipe broker gen-certs``).

Uses the ``openssl`` command line (present on Raspberry Pi OS, Jetson L4T and Debian), so fleetpipe
needs no extra Python dependency. Writes into ``out``::

    <out>/ca.crt                  the CA certificate: BrokerConfig.ca_certs on every host
    <out>/ca.key                  0600, the CA key: keep it off the broker, offline if you can
    <out>/mosquitto/ca.crt        copy for mosquitto (cafile)
    <out>/mosquitto/server.crt    broker certificate, subjectAltName = the given hosts
    <out>/mosquitto/server.key    0600, broker key

Keys are ECDSA P-256. ``secure.conf`` rendered with ``dir=<out>/mosquitto`` finds them.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetpipe.errors import ConfigError

__all__ = ["CertFiles", "generate"]


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Paths written by :func:`generate`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def generate(out: str | Path, hosts: Sequence[str], *, days: int = 825, ca_days: int = 3650,
             openssl: str | None = None, broker_user: str | None = None) -> CertFiles:
    """Create a CA (unless ``<out>/ca.crt`` and ``ca.key`` exist: then reuse it) and a server certificate
    for ``hosts`` (IP addresses and/or DNS names; the first is the subject CN)."""
    if not hosts:
        raise ConfigError("give at least one --host (the name or address nodes use to reach the broker)")
    binary = openssl or shutil.which("openssl")
    if binary is None:
        raise ConfigError("the openssl command is not installed (Debian: apt-get install openssl)")
    out = Path(out)
    broker_dir = out / "mosquitto"
    broker_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(broker_dir, 0o700)
    files = CertFiles(out / "ca.crt", out / "ca.key", broker_dir / "server.crt", broker_dir / "server.key")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    with tempfile.TemporaryDirectory(prefix="fleetpipe-certs-") as tmp:
        if not (files.ca_cert.exists() and files.ca_key.exists()):
            _run(binary, "req", "-x509", *ec, "-keyout", str(files.ca_key), "-out", str(files.ca_cert),
                 "-days", str(ca_days), "-subj", "/CN=fleetpipe CA",
                 "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-addext", "subjectKeyIdentifier=hash")
        csr = Path(tmp) / "server.csr"
        ext = Path(tmp) / "server.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
            f"subjectAltName={_san(hosts)}\n"
        )
        _run(binary, "req", "-new", *ec, "-keyout", str(files.server_key), "-out", str(csr),
             "-subj", f"/CN={hosts[0]}")
        _run(binary, "x509", "-req", "-in", str(csr), "-CA", str(files.ca_cert), "-CAkey", str(files.ca_key),
             "-set_serial", str(int.from_bytes(os.urandom(16), "big") >> 1), "-days", str(days),
             "-extfile", str(ext), "-out", str(files.server_cert))
    shutil.copyfile(files.ca_cert, broker_dir / "ca.crt")
    for path, mode in ((files.ca_key, 0o600), (files.server_key, 0o600), (files.ca_cert, 0o644),
                       (files.server_cert, 0o644), (broker_dir / "ca.crt", 0o644)):
        os.chmod(path, mode)
    if broker_user and os.geteuid() == 0 and _user_exists(broker_user):
        for path in (broker_dir, broker_dir / "ca.crt", files.server_cert, files.server_key):
            shutil.chown(path, broker_user, None)
    return files


# --- private helpers --------------------------------------------------------------------------------


def _san(hosts: Sequence[str]) -> str:
    names = []
    for host in hosts:
        try:
            names.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            if not host or any(c in host for c in ",/ \n"):
                raise ConfigError(f"invalid host name {host!r}") from None
            names.append(f"DNS:{host}")
    return ",".join(names)


def _run(binary: str, *args: str) -> None:
    old = os.umask(0o077)  # keys are created 0600 from the start
    try:
        proc = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
    finally:
        os.umask(old)
    if proc.returncode != 0:
        raise ConfigError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True
