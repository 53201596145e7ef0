"""A self-signed certificate for 127.0.0.1, made with openssl, for the TLS tests."""
from __future__ import annotations

import shutil
import subprocess
from typing import Any

from helpers import services


def self_signed(folder: Any) -> tuple[str, str]:
    """(cert, key) PEM paths in folder, valid for IP 127.0.0.1 for a day."""
    if not shutil.which("openssl"):
        services.unavailable("openssl is needed to make a test certificate")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key
