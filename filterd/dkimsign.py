"""DKIM signing for outgoing mail (RFC 6376), and making signing keys.

    signed = sign_message(raw, "example.com", "mail2025", key_pem)

signs with rsa-sha256, relaxed/relaxed canonicalisation, the header fields in `SIGNED_HEADERS`
that the message has, and once more each of `OVERSIGNED` so that nobody can add another
From, Subject, ... without breaking the signature. `generate_key` makes an RSA key with the
``openssl`` program and returns it with the TXT record to publish at
``<selector>._domainkey.<domain>``.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dkim

__all__ = [
    "OVERSIGNED",
    "SIGNED_HEADERS",
    "DkimKey",
    "dns_record",
    "generate_key",
    "public_key_der",
    "sign_message",
    "txt_strings",
    "write_key",
]

# Fields that say who wrote the message, what it is and how to read it (RFC 6376 §5.4.1).
SIGNED_HEADERS = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
    "resent-from", "resent-sender", "resent-to", "resent-cc", "resent-date", "resent-message-id",
    "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post",
    "list-owner", "list-archive",
)  # fmt: skip
# Fields a message has at most once: signed one extra time, so adding one breaks the signature.
OVERSIGNED = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id", "mime-version",
    "content-type", "content-transfer-encoding",
)  # fmt: skip
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


def sign_message(raw: bytes, domain: str, selector: str, key_pem: bytes) -> bytes:
    """``raw`` with a DKIM-Signature field added on top. Raises ValueError for a bad key or a
    message dkimpy cannot read."""
    first_line = raw[: raw.find(b"\n") + 1]
    linesep = b"\r\n" if first_line.endswith(b"\r\n") else b"\n"
    try:
        signer = dkim.DKIM(raw, linesep=linesep)
        present = [name.lower().decode("ascii", "replace") for name, _ in signer.headers]
        include = [name for name in SIGNED_HEADERS for _ in range(present.count(name))]
        include += list(OVERSIGNED)
        field = signer.sign(
            selector.encode("ascii"),
            domain.encode("ascii"),
            key_pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[name.encode("ascii") for name in include],
        )
    except (dkim.DKIMException, UnicodeEncodeError) as exc:
        raise ValueError(f"cannot DKIM-sign for {domain}: {exc}") from exc
    return bytes(field) + raw


@dataclass(frozen=True, slots=True)
class DkimKey:
    """A new signing key and what to publish for it."""

    domain: str
    selector: str
    private_pem: bytes
    record: str  # the TXT data: "v=DKIM1; k=rsa; p=..."

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}."

    def zone_line(self) -> str:
        """The record as a zone-file line, its data split into strings of at most 255 bytes."""
        return f"{self.dns_name} IN TXT " + " ".join(f'"{s}"' for s in txt_strings(self.record))


def txt_strings(data: str, size: int = 255) -> list[str]:
    """``data`` cut into TXT character-strings of at most ``size`` bytes (a DKIM key is several)."""
    return [data[i : i + size] for i in range(0, len(data), size)] or [""]


def _openssl(*args: str, stdin: bytes = b"") -> bytes:
    program = shutil.which("openssl")
    if program is None:
        raise RuntimeError("the openssl program is needed to make keys (apt-get install openssl)")
    done = subprocess.run([program, *args], input=stdin, capture_output=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def public_key_der(private_pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo (DER) of an RSA private key: what DKIM's p= carries, base64ed."""
    return _openssl("pkey", "-pubout", "-outform", "DER", stdin=private_pem)


def dns_record(private_pem: bytes) -> str:
    """The DKIM key record for a private key: ``v=DKIM1; k=rsa; p=<base64>``."""
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(public_key_der(private_pem)).decode("ascii")


def generate_key(domain: str, selector: str, bits: int = 2048) -> DkimKey:
    """A new RSA key (PKCS#8 PEM). Raises ValueError for bad names or sizes, RuntimeError when
    openssl is missing or fails."""
    domain = domain.strip().rstrip(".").lower()
    for what, name in (("domain", domain), ("selector", selector)):
        if not _NAME.match(name):
            raise ValueError(f"not a valid DKIM {what}: {name!r}")
    if not 1024 <= bits <= 8192:  # RFC 8301: at least 1024 bits; 2048 recommended
        raise ValueError(f"key size must be 1024..8192 bits, got {bits}")
    pem = _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}")
    return DkimKey(domain, selector, pem, dns_record(pem))


def write_key(key: DkimKey, directory: Path) -> Path:
    """Write the private key as ``<directory>/<domain>.<selector>.pem``, mode 0600, never over an
    existing file (FileExistsError)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key.domain}.{key.selector}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_pem)
        f.flush()
        os.fsync(f.fileno())
    return path
