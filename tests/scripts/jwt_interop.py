"""Keys and tokens made by another JWT library (PyJWT + cryptography), for
tests/policies.rs. Prints one JSON object: name -> {"verification": ..., "token": ...}."""
import base64
import hashlib
import hmac
import json
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

now = int(time.time())


def claims(name):
    return {"sub": "sub-" + name, "exp": now + 600, "iat": now}


def public_pem(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


out = {}
secret = b"interop-secret-" + b"0123456789abcdefghijklmnopqrstuvwxyz" + b"ABCDEFGHIJKLMN"
for alg in ["HS256", "HS384", "HS512"]:
    out[alg] = {
        "verification": {"alg": alg, "secret_base64": base64.b64encode(secret).decode()},
        "token": jwt.encode(claims(alg), secret, algorithm=alg),
    }
rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]:
    out[alg] = {
        "verification": {"alg": alg, "public_key_pem": public_pem(rsa_key)},
        "token": jwt.encode(claims(alg), rsa_key, algorithm=alg),
    }
for alg, curve in [("ES256", ec.SECP256R1()), ("ES384", ec.SECP384R1())]:
    key = ec.generate_private_key(curve)
    out[alg] = {
        "verification": {"alg": alg, "public_key_pem": public_pem(key)},
        "token": jwt.encode(claims(alg), key, algorithm=alg),
    }
ed_key = ed25519.Ed25519PrivateKey.generate()
out["EdDSA"] = {
    "verification": {"alg": "EdDSA", "public_key_pem": public_pem(ed_key)},
    "token": jwt.encode(claims("EdDSA"), ed_key, algorithm="EdDSA"),
}
jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
jwk.update({"kid": "rsa-key-1", "alg": "RS256", "use": "sig"})
out["JWKS"] = {
    "verification": {"jwks": {"keys": [jwk]}},
    "token": jwt.encode(claims("JWKS"), rsa_key, algorithm="RS256", headers={"kid": "rsa-key-1"}),
}


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


# Key confusion: HS256 "signed" with the RS256 public key as the HMAC secret.
signing_input = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64url(
    json.dumps(claims("confused")).encode()
)
sig = hmac.new(public_pem(rsa_key).encode(), signing_input.encode(), hashlib.sha256).digest()
out["HS256_WITH_RS256_PUBLIC_KEY"] = {"token": signing_input + "." + b64url(sig)}
print(json.dumps(out))
