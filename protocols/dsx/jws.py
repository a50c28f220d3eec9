"""JWS compact serialization of DSX Flex ``data`` (RFC 7515): ES256 signing, ES256/RS256 verification by kid.

The only module that imports the JOSE library (joserfc). A key is bound to the publisher it
belongs to, so an infra agent's key cannot vouch for an agent's status.
"""

from __future__ import annotations

from dataclasses import dataclass

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from protocols.dsx import contract as c
from protocols.dsx.errors import MessageRefused, Reason


def load_public_key(pem: bytes) -> ECKey | RSAKey:
    """Return the public key in a PEM (EC P-256 or RSA); raise ValueError if it is neither."""
    for cls in (ECKey, RSAKey):
        try:
            key = cls.import_key(pem)
        except (JoseError, ValueError, TypeError):
            continue
        if isinstance(key, ECKey) and key.curve_name != "P-256":
            raise ValueError(f"EC key on curve {key.curve_name}; ES256 needs P-256")
        return key.__class__.import_key(key.as_pem(private=False))
    raise ValueError("not a PEM EC (P-256) or RSA key")


class Signer:
    """Signs payloads with one EC P-256 private key (ES256) under a key id."""

    def __init__(self, key: ECKey, kid: str) -> None:
        if not kid:
            raise ValueError("a signing key needs a kid")
        if key.curve_name != "P-256" or not key.is_private:
            raise ValueError("ES256 needs a private EC P-256 key")
        self.kid = kid
        self._key = key
        self._header = {"alg": "ES256", "kid": kid}

    @classmethod
    def from_pem(cls, pem: bytes, kid: str) -> Signer:
        """Return a signer from a private key PEM; raise ValueError if it is not an EC P-256 private key."""
        try:
            key = ECKey.import_key(pem)
        except (JoseError, ValueError, TypeError) as err:
            raise ValueError(f"not a PEM EC private key: {err}") from err
        return cls(key, kid)

    @classmethod
    def generate(cls, kid: str) -> Signer:
        """Return a signer with a fresh key (simulators, tests, ``keygen``)."""
        return cls(ECKey.generate_key("P-256", private=True), kid)

    def private_pem(self) -> bytes:
        """Return the private key as PEM (PKCS#8)."""
        return self._key.as_pem(private=True)

    def public_pem(self) -> bytes:
        """Return the public key as PEM, to configure on the verifying side."""
        return self._key.as_pem(private=False)

    def sign(self, payload: bytes) -> str:
        """Return the JWS compact serialization of ``payload``."""
        return jws.serialize_compact(self._header, payload, self._key)


@dataclass(frozen=True)
class _Entry:
    key: ECKey | RSAKey
    role: c.Role


class KeyRing:
    """Public keys by kid, each bound to the publisher role it may sign for."""

    def __init__(self) -> None:
        self._keys: dict[str, _Entry] = {}

    def add(self, kid: str, public_pem: bytes, role: c.Role) -> None:
        """Trust a public key under ``kid`` for messages of ``role``; raise ValueError if it is no key."""
        if kid in self._keys:
            raise ValueError(f"kid {kid!r} configured twice")
        self._keys[kid] = _Entry(load_public_key(public_pem), role)

    def kids(self, role: c.Role) -> list[str]:
        """Return the kids trusted for a role."""
        return [kid for kid, e in self._keys.items() if e.role is role]

    def verify(self, token: str, role: c.Role) -> tuple[str, bytes]:
        """Return (kid, payload) of a JWS signed by a key of ``role``; raise MessageRefused."""
        if not c.JWS_COMPACT_RE.match(token):
            raise MessageRefused(Reason.UNSIGNED, "data is not a JWS compact serialization")
        try:
            header = jws.extract_compact(token.encode("ascii")).protected
        except (JoseError, ValueError, UnicodeError) as err:
            raise MessageRefused(Reason.UNSIGNED, f"JWS header unreadable: {err}") from err
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise MessageRefused(Reason.UNKNOWN_KEY, "JWS header has no kid")
        entry = self._keys.get(kid)
        if entry is None:
            raise MessageRefused(Reason.UNKNOWN_KEY, f"kid {kid!r} is not configured")
        if entry.role is not role:
            raise MessageRefused(Reason.WRONG_KEY, f"kid {kid!r} is a {entry.role} key, not {role}")
        alg = header.get("alg")
        if alg not in c.SIGNING_ALGS:
            raise MessageRefused(Reason.BAD_SIGNATURE, f"algorithm {alg!r} is not ES256 or RS256")
        try:
            obj = jws.deserialize_compact(token, entry.key, algorithms=[str(alg)])
        except (JoseError, ValueError) as err:
            raise MessageRefused(Reason.BAD_SIGNATURE, f"kid {kid!r}: {err}") from err
        return kid, obj.payload
