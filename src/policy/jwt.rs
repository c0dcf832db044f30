//! JWT verification (`request-pipeline.md`, "JWT") with jsonwebtoken. The algorithm is
//! pinned by the auth, never taken from the token; `none` never verifies (jsonwebtoken has
//! no such algorithm). Keys live in the compiled snapshot only, so an auth removed by a
//! reload stops verifying at once.
//!
//! Tokens that verified are cached per stage (as Envoy's `jwt_cache` does): a client sends
//! the same token with every request, and checking its signature and decoding its claims
//! again costs more than the rest of the pipeline together (~25k instructions for HS256,
//! far more for RSA). A hit is accepted only until the token's `exp` plus the leeway, or
//! the auth's `expired_at`, whichever comes first: the only checks time can turn from
//! pass to fail (`nbf` and `iat` only become valid). The cache belongs to the compiled
//! stage, so a reload starts it empty. Only verified tokens enter it, at most
//! [`CACHE_TOKENS`] per stage; invalid tokens are checked in full every time.

use std::sync::Arc;

use http::HeaderValue;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::rejection::AuthFailure;
use crate::snapshot::model::{Auth, JwtAlg, Verification};

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    /// The auth's rules with this key's algorithm pinned, built once (no per-request clone).
    validation: Validation,
}

/// One auth, compiled: its keys and the validation rules.
pub struct CompiledAuth {
    pub id: Arc<str>,
    keys: Vec<Key>,
    /// Seconds since the epoch after which the auth accepts no token.
    expired_at: Option<i64>,
    leeway: u64,
}

impl std::fmt::Debug for CompiledAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledAuth")
            .field("id", &self.id)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// What a jsonwebtoken error says about the token.
fn failure(kind: &jsonwebtoken::errors::ErrorKind) -> AuthFailure {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => AuthFailure::Expired,
        K::ImmatureSignature => AuthFailure::NotYetValid,
        K::MissingRequiredClaim(_) => AuthFailure::MissingClaim,
        K::InvalidIssuer => AuthFailure::Issuer,
        K::InvalidAudience => AuthFailure::Audience,
        K::InvalidAlgorithm | K::MissingAlgorithm | K::InvalidAlgorithmName => {
            AuthFailure::Algorithm
        }
        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => AuthFailure::Malformed,
        // The signature, or a key that cannot check it; jsonwebtoken's kinds are not
        // exhaustive, and whatever it adds is a token that did not verify.
        _ => AuthFailure::Signature,
    }
}

/// Why a token's header could not be read: a well-formed header naming an algorithm
/// jsonwebtoken does not have (`none` above all) is refused for its algorithm; anything
/// else is malformed.
fn unreadable_header(token: &str) -> AuthFailure {
    let named_alg = token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<Map<String, Value>>(&json).ok())
        .is_some_and(|header| header.get("alg").is_some_and(Value::is_string));
    if named_alg && token.split('.').count() == 3 {
        AuthFailure::Algorithm
    } else {
        AuthFailure::Malformed
    }
}

/// How far a token got with one key: of several candidate keys, the refusal reported is the
/// one of the key that got furthest (a token signed by auth B but expired says `expired`,
/// not the `signature` failure of auth A tried first).
fn progress(f: AuthFailure) -> u8 {
    match f {
        AuthFailure::UnknownKid => 0,
        AuthFailure::Algorithm => 1,
        AuthFailure::Signature => 2,
        AuthFailure::Malformed => 3,
        AuthFailure::Expired
        | AuthFailure::NotYetValid
        | AuthFailure::MissingClaim
        | AuthFailure::Issuer
        | AuthFailure::Audience => 4,
        AuthFailure::AuthExpired => 5,
        AuthFailure::MissingToken
        | AuthFailure::NoAuth
        | AuthFailure::MissingKey
        | AuthFailure::UnknownKey
        | AuthFailure::KeyNotAllowed
        | AuthFailure::NoUsagePlan => 0,
    }
}

fn alg(a: JwtAlg) -> Algorithm {
    match a {
        JwtAlg::HS256 => Algorithm::HS256,
        JwtAlg::HS384 => Algorithm::HS384,
        JwtAlg::HS512 => Algorithm::HS512,
        JwtAlg::RS256 => Algorithm::RS256,
        JwtAlg::RS384 => Algorithm::RS384,
        JwtAlg::RS512 => Algorithm::RS512,
        JwtAlg::PS256 => Algorithm::PS256,
        JwtAlg::PS384 => Algorithm::PS384,
        JwtAlg::PS512 => Algorithm::PS512,
        JwtAlg::ES256 => Algorithm::ES256,
        JwtAlg::ES384 => Algorithm::ES384,
        JwtAlg::EdDSA => Algorithm::EdDSA,
    }
}

fn pem_key(a: Algorithm, pem: &[u8]) -> Result<DecodingKey, String> {
    let r = match a {
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => DecodingKey::from_rsa_pem(pem),
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            return Err("an HMAC algorithm takes a secret".into())
        }
    };
    r.map_err(|e| e.to_string())
}

impl CompiledAuth {
    /// Compiles a validated auth.
    pub fn compile(a: &Auth) -> Result<Self, String> {
        let v: &Verification = &a.verification;
        let mut keys = Vec::new();
        if let (Some(secret), Some(al)) = (&v.secret_base64, v.alg) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(secret.trim())
                .map_err(|e| e.to_string())?;
            keys.push((None, alg(al), DecodingKey::from_secret(&bytes)));
        }
        if let (Some(pem), Some(al)) = (&v.public_key_pem, v.alg) {
            keys.push((None, alg(al), pem_key(alg(al), pem.as_bytes())?));
        }
        if let Some(set) = &v.jwks {
            for k in &set.keys {
                let al = k
                    .common
                    .key_algorithm
                    .and_then(|ka| ka.to_string().parse::<Algorithm>().ok())
                    .ok_or("a JWKS key has no usable alg")?;
                keys.push((
                    k.common.key_id.clone(),
                    al,
                    DecodingKey::from_jwk(k).map_err(|e| e.to_string())?,
                ));
            }
        }
        let leeway = v.leeway_seconds.unwrap_or(60);
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(iss) = &v.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &v.audience {
            Some(aud) => {
                validation.set_audience(aud.as_slice());
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let keys = keys
            .into_iter()
            .map(|(kid, alg, key)| {
                let mut validation = validation.clone();
                validation.algorithms = vec![alg];
                Key {
                    kid,
                    alg,
                    key,
                    validation,
                }
            })
            .collect();
        let expired_at = match &a.expired_at {
            Some(t) => Some(
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| e.to_string())?
                    .unix_timestamp(),
            ),
            None => None,
        };
        Ok(Self {
            id: Arc::from(a.id.as_str()),
            keys,
            expired_at,
            leeway,
        })
    }

    /// The token's claims when `key` verifies it and they pass, else why not. An auth past
    /// its `expired_at` still checks the signature, so that `auth_expired` is said only of
    /// tokens that auth would otherwise have accepted.
    fn try_key(&self, token: &str, key: &Key, now: i64) -> Result<Map<String, Value>, AuthFailure> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &key.validation)
            .map_err(|e| failure(e.kind()))?;
        // `iat` in the future (beyond the leeway) is invalid too.
        if let Some(iat) = data.claims.get("iat") {
            let iat = iat.as_f64().ok_or(AuthFailure::Malformed)?;
            if iat > (now + self.leeway as i64) as f64 {
                return Err(AuthFailure::NotYetValid);
            }
        }
        if self.expired_at.is_some_and(|e| now > e) {
            return Err(AuthFailure::AuthExpired);
        }
        Ok(data.claims)
    }

    /// The last second at which a token with these (verified) claims is still accepted:
    /// `exp` plus the leeway, capped by the auth's own expiry.
    fn valid_until(&self, claims: &Map<String, Value>) -> Option<i64> {
        let exp = claims.get("exp")?.as_f64()?;
        if !exp.is_finite() {
            return None;
        }
        let until = (exp.floor() as i64).saturating_add(self.leeway as i64);
        Some(self.expired_at.map_or(until, |e| e.min(until)))
    }
}

/// A verified token and the last second (Unix) it may be accepted without a check.
type CachedToken = (Verified, i64);

/// Verified tokens kept per stage at most.
pub const CACHE_TOKENS: usize = 4096;

/// Keyed by the token's bytes: a token verified before is found without the check that it
/// is text (only tokens that verified, all text, are ever put in).
type TokenCache = quick_cache::sync::Cache<
    Box<[u8]>,
    CachedToken,
    quick_cache::UnitWeighter,
    TokenTail,
    quick_cache::sync::DefaultLifecycle<Box<[u8]>, CachedToken>,
>;

/// Hashes a token by its length and its last [`TokenTail::BYTES`] bytes only. A token
/// ends with its signature, and only tokens that verified are cached: their ends are
/// signatures, as good as random, so that they spread over the cache as well as whole
/// tokens do, and a lookup still compares whole tokens. A client choosing tokens with the
/// end of a cached one makes a lookup compare one more token, never more: it cannot put
/// any in. Hashing a whole token (~200 bytes) cost ~110 instructions a request.
#[derive(Clone)]
struct TokenTail(usize);

impl TokenTail {
    const BYTES: usize = 16;

    fn new() -> Self {
        Self(rand::random())
    }
}

impl std::hash::BuildHasher for TokenTail {
    type Hasher = TailHasher;
    fn build_hasher(&self) -> TailHasher {
        TailHasher(rustc_hash::FxHasher::with_seed(self.0))
    }
}

/// See [`TokenTail`]: a byte string's length and its last bytes go into an Fx hash.
struct TailHasher(rustc_hash::FxHasher);

impl std::hash::Hasher for TailHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0
            .write(&bytes[bytes.len().saturating_sub(TokenTail::BYTES)..]);
    }
    fn write_usize(&mut self, n: usize) {
        self.0.write_usize(n);
    }
    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

/// The auths connected to one stage.
pub struct StageJwt {
    auths: Vec<Arc<CompiledAuth>>,
    /// Verified tokens → their claims and the last second they may be accepted, one cache
    /// per worker (a lookup writes the cache's lock and hit marks: shared between workers,
    /// that would be a contended line per request). A token is verified once per worker.
    caches: Box<[TokenCache]>,
}

impl Default for StageJwt {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl std::fmt::Debug for StageJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageJwt")
            .field("auths", &self.auths)
            .field(
                "cached_tokens",
                &self.caches.iter().map(TokenCache::len).sum::<usize>(),
            )
            .finish()
    }
}

/// A verified token's claims, shared by the requests that present it: a request taking
/// it from the cache clones one reference (its parts cloned one by one cost ~35
/// instructions more, the `sub` value's buffer being reference-counted too).
#[derive(Debug, Clone)]
pub struct Verified(Arc<VerifiedToken>);

#[derive(Debug)]
pub struct VerifiedToken {
    pub claims: Arc<Map<String, Value>>,
    /// `sub` as the `x-scp-jwt-sub` header value (built once per verified token).
    pub sub_header: Option<HeaderValue>,
}

impl std::ops::Deref for Verified {
    type Target = VerifiedToken;
    fn deref(&self) -> &VerifiedToken {
        &self.0
    }
}

impl Verified {
    fn new(claims: Arc<Map<String, Value>>) -> Self {
        let sub_header = claims
            .get("sub")
            .and_then(Value::as_str)
            .and_then(|s| HeaderValue::from_str(s).ok());
        Self(Arc::new(VerifiedToken { claims, sub_header }))
    }

    pub fn sub(&self) -> Option<&str> {
        self.claims.get("sub").and_then(Value::as_str)
    }
}

/// The bearer token of a request's (first) `Authorization` value, if any.
pub fn bearer(authorization: Option<&http::HeaderValue>) -> Option<&str> {
    bearer_bytes(authorization).and_then(token_text)
}

/// The bytes after `Bearer ` (the scheme in any case, one space) and any further blanks,
/// if there are some: the token as [`bearer`] reads it, not yet checked to be text.
fn bearer_bytes(authorization: Option<&http::HeaderValue>) -> Option<&[u8]> {
    let v = authorization?.as_bytes();
    let (scheme, token) = v.split_first_chunk::<7>()?;
    // The scheme compared as one word: each letter's case bit set (an upper-case letter
    // becomes its lower-case; no other byte becomes `b`, `e`, `a` or `r` by it), the
    // space compared as it is. A byte-by-byte case-insensitive comparison cost ~50
    // instructions on every request with a token.
    const LETTERS: u64 = 0x0000_2020_2020_2020;
    let mut word = [0u8; 8];
    word[..7].copy_from_slice(scheme);
    if u64::from_le_bytes(word) | LETTERS != u64::from_le_bytes(*b"bearer \0") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// `token` as text, if it is what `HeaderValue::to_str` accepts (a header value holds no
/// control byte but tab, so visible ASCII is ASCII), checked many bytes at a time: a token
/// is a few hundred bytes and `to_str` looks at them one by one.
fn token_text(token: &[u8]) -> Option<&str> {
    // ASCII: no byte has its high bit set. An OR over all of them has no early exit, so the
    // compiler folds many bytes per instruction (`is_ascii` looked at them one by one).
    if token.iter().fold(0, |high, b| high | b) >= 0x80 {
        return None;
    }
    // SAFETY: every byte is below 0x80 (checked just above): ASCII, which is UTF-8
    // (`from_utf8` would look at a few hundred bytes again, on every request with a token).
    Some(unsafe { std::str::from_utf8_unchecked(token) })
}

impl StageJwt {
    pub fn new(auths: Vec<Arc<CompiledAuth>>) -> Self {
        // Allocated lazily by quick_cache: a worker that never sees a token costs nothing.
        let caches = (0..crate::worker::shards())
            .map(|_| {
                TokenCache::with(
                    CACHE_TOKENS,
                    CACHE_TOKENS as u64,
                    quick_cache::UnitWeighter,
                    TokenTail::new(),
                    Default::default(),
                )
            })
            .collect();
        Self { auths, caches }
    }

    /// The current worker's cache.
    fn cache(&self) -> &TokenCache {
        &self.caches[crate::worker::index().min(self.caches.len() - 1)]
    }

    /// Verifies the bearer token of `authorization` (the request's first `Authorization`) at
    /// `now` (Unix seconds) against the stage's auths: a token verified before comes from
    /// the worker's cache; otherwise, with a `kid`, only the auth with that id (or the JWKS
    /// key with that kid) is tried, else every candidate.
    pub fn verify(
        &self,
        authorization: Option<&http::HeaderValue>,
        now: i64,
    ) -> Result<Verified, AuthFailure> {
        let no_token = || {
            if self.auths.is_empty() {
                AuthFailure::NoAuth
            } else {
                AuthFailure::MissingToken
            }
        };
        let Some(raw) = bearer_bytes(authorization) else {
            return Err(no_token());
        };
        // Looked up by its bytes, before the check that it is text: an entry is a token
        // that verified, which was text.
        if let Some((verified, valid_until)) = self.cache().get(raw) {
            if now <= valid_until {
                return Ok(verified);
            }
            self.cache().remove(raw);
        }
        let Some(token) = token_text(raw) else {
            return Err(no_token());
        };
        self.verify_token(token, now)
    }

    /// Verifies `token` in full (signature, claims) and caches it when it verifies.
    pub fn verify_token(&self, token: &str, now: i64) -> Result<Verified, AuthFailure> {
        if self.auths.is_empty() {
            return Err(AuthFailure::NoAuth);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| unreadable_header(token))?;
        let mut refused = if header.kid.is_some() {
            AuthFailure::UnknownKid
        } else {
            AuthFailure::Algorithm
        };
        for auth in &self.auths {
            for key in &auth.keys {
                let eligible = match (&header.kid, &key.kid) {
                    (None, _) => true,
                    (Some(kid), Some(k)) => kid == k,
                    (Some(kid), None) => **kid == *auth.id,
                };
                if !eligible {
                    continue;
                }
                // The auth decides the algorithm; a token claiming another is not tried.
                let outcome = if key.alg == header.alg {
                    auth.try_key(token, key, now)
                } else {
                    Err(AuthFailure::Algorithm)
                };
                match outcome {
                    Ok(claims) => {
                        let verified = Verified::new(Arc::new(claims));
                        if let Some(until) = auth.valid_until(&verified.claims) {
                            self.cache()
                                .insert(token.as_bytes().into(), (verified.clone(), until));
                        }
                        return Ok(verified);
                    }
                    Err(f) if progress(f) > progress(refused) => refused = f,
                    Err(_) => {}
                }
            }
        }
        Err(refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"secret-secret-secret-secret!";

    fn auth(v: Value) -> Arc<CompiledAuth> {
        let a: Auth = serde_json::from_value(
            json!({"id": "au01", "name": "t", "connected_stages": ["prod"], "verification": v}),
        )
        .unwrap();
        Arc::new(CompiledAuth::compile(&a).unwrap())
    }

    fn hs_auth() -> StageJwt {
        let b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
        StageJwt::new(vec![auth(
            json!({"alg": "HS256", "secret_base64": b64, "audience": "orders", "issuer": "idp"}),
        )])
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn bearer_reads_what_to_str_reads() {
        let with = |raw: &[u8]| http::HeaderValue::from_bytes(raw).unwrap();
        assert_eq!(
            bearer(Some(&with(b"Bearer abc.def.ghi"))),
            Some("abc.def.ghi")
        );
        assert_eq!(bearer(Some(&with(b"bearer \tabc "))), Some("abc"));
        assert_eq!(bearer(Some(&with(b"Basic abc"))), None);
        assert_eq!(bearer(Some(&with(b"Bearer "))), None);
        assert_eq!(bearer(Some(&with(b"Bearer"))), None);
        assert_eq!(
            bearer(Some(&with(b"Bearer  two-spaces"))),
            Some("two-spaces")
        );
        assert_eq!(bearer(Some(&with(b"Bearerx abc"))), None);
        // The scheme in any case, each letter exactly (the word comparison's case bit).
        assert_eq!(bearer(Some(&with(b"BEARER abc"))), Some("abc"));
        assert_eq!(bearer(Some(&with(b"bEaReR abc"))), Some("abc"));
        for other in [
            &b"Bearez abc"[..],
            b"Dearer abc",
            b"Bearer@abc",
            b"Bearer-abc",
            b"Rearer abc",
        ] {
            assert_eq!(bearer(Some(&with(other))), None, "{other:?}");
        }
        assert_eq!(bearer(Some(&with(b"Bearer\tabc"))), None);
        // Bytes beyond ASCII, valid UTF-8 or not, make no token (as `to_str` refuses them).
        assert_eq!(bearer(Some(&with("Bearer t\u{e9}st".as_bytes()))), None);
        assert_eq!(bearer(Some(&with(b"Bearer t\xffst"))), None);
        assert!(with(b"Bearer t\xffst").to_str().is_err());
    }

    /// An `Authorization` value carrying `token`.
    fn authorization(token: &str) -> http::HeaderValue {
        format!("Bearer {token}").parse().unwrap()
    }

    fn hs(claims: Value, header: Header) -> String {
        encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    #[test]
    fn valid_and_invalid_claims() {
        let v = hs_auth();
        let good = json!({"sub": "alice", "exp": now() + 300, "aud": "orders", "iss": "idp"});
        let ok = v
            .verify(
                Some(&authorization(&hs(good.clone(), Header::default()))),
                now(),
            )
            .unwrap();
        assert_eq!(ok.sub(), Some("alice"));
        let cases = [
            (
                json!({"exp": now() - 120, "aud": "orders", "iss": "idp"}),
                AuthFailure::Expired,
            ),
            (
                json!({"aud": "orders", "iss": "idp"}),
                AuthFailure::MissingClaim,
            ),
            (
                json!({"exp": now() + 300, "nbf": now() + 600, "aud": "orders", "iss": "idp"}),
                AuthFailure::NotYetValid,
            ),
            (
                json!({"exp": now() + 300, "iat": now() + 600, "aud": "orders", "iss": "idp"}),
                AuthFailure::NotYetValid,
            ),
            (
                json!({"exp": now() + 300, "aud": "billing", "iss": "idp"}),
                AuthFailure::Audience,
            ),
            (
                json!({"exp": now() + 300, "iss": "idp"}),
                AuthFailure::MissingClaim,
            ),
            (
                json!({"exp": now() + 300, "aud": "orders", "iss": "evil"}),
                AuthFailure::Issuer,
            ),
            // An `exp` that is not a number is no `exp` (jsonwebtoken reads it so).
            (
                json!({"exp": "soon", "aud": "orders", "iss": "idp"}),
                AuthFailure::MissingClaim,
            ),
        ];
        for (claims, reason) in cases {
            assert_eq!(
                v.verify(
                    Some(&authorization(&hs(claims.clone(), Header::default()))),
                    now()
                )
                .unwrap_err(),
                reason,
                "{claims}"
            );
        }
        // A wrong secret says `signature`, even for an expired token: the claims of a
        // token that does not verify are not looked at.
        let forged = encode(
            &Header::default(),
            &json!({"exp": now() - 120, "aud": "orders", "iss": "idp"}),
            &EncodingKey::from_secret(b"another-secret"),
        )
        .unwrap();
        assert_eq!(
            v.verify(Some(&authorization(&forged)), now()).unwrap_err(),
            AuthFailure::Signature
        );
        assert_eq!(
            v.verify(Some(&authorization("not.a-jwt")), now())
                .unwrap_err(),
            AuthFailure::Malformed
        );
        // Within the leeway is fine.
        let recent = json!({"exp": now() - 30, "aud": "orders", "iss": "idp"});
        assert!(v
            .verify(Some(&authorization(&hs(recent, Header::default()))), now())
            .is_ok());
        assert_eq!(
            v.verify(None, now()).unwrap_err(),
            AuthFailure::MissingToken
        );
        let none = StageJwt::default();
        assert_eq!(none.verify(None, now()).unwrap_err(), AuthFailure::NoAuth);
        assert_eq!(
            none.verify(Some(&authorization(&hs(good, Header::default()))), now())
                .unwrap_err(),
            AuthFailure::NoAuth
        );
    }

    #[test]
    fn alg_none_wrong_alg_and_kid() {
        let v = hs_auth();
        let claims = json!({"exp": now() + 300, "aud": "orders", "iss": "idp"});
        // alg: none, unsigned.
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&claims.to_string())
        );
        assert_eq!(
            v.verify(Some(&authorization(&none)), now()).unwrap_err(),
            AuthFailure::Algorithm
        );
        // HS512 with the same secret: the auth pins HS256.
        let t = hs(claims.clone(), Header::new(Algorithm::HS512));
        assert_eq!(
            v.verify(Some(&authorization(&t)), now()).unwrap_err(),
            AuthFailure::Algorithm
        );
        // A kid naming another auth.
        let h = Header {
            kid: Some("other".into()),
            ..Default::default()
        };
        assert_eq!(
            v.verify(Some(&authorization(&hs(claims.clone(), h))), now())
                .unwrap_err(),
            AuthFailure::UnknownKid
        );
        let h = Header {
            kid: Some("au01".into()),
            ..Default::default()
        };
        assert!(v
            .verify(Some(&authorization(&hs(claims, h))), now())
            .is_ok());
    }

    #[test]
    fn expired_auth_accepts_nothing() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
        let a: Auth =
            serde_json::from_value(json!({"id": "au01", "expired_at": "2020-01-01T00:00:00Z",
            "verification": {"alg": "HS256", "secret_base64": b64}}))
            .unwrap();
        let v = StageJwt::new(vec![Arc::new(CompiledAuth::compile(&a).unwrap())]);
        let t = hs(json!({"exp": now() + 300}), Header::default());
        assert_eq!(
            v.verify(Some(&authorization(&t)), now()).unwrap_err(),
            AuthFailure::AuthExpired
        );
        let other = encode(
            &Header::default(),
            &json!({"exp": now() + 300}),
            &EncodingKey::from_secret(b"another-secret"),
        )
        .unwrap();
        assert_eq!(
            v.verify(Some(&authorization(&other)), now()).unwrap_err(),
            AuthFailure::Signature
        );
    }

    #[test]
    fn verified_tokens_are_cached_until_exp_plus_leeway() {
        let v = hs_auth();
        let exp = now() + 300;
        let token = hs(
            json!({"sub": "alice", "exp": exp, "aud": "orders", "iss": "idp"}),
            Header::default(),
        );
        let first = v.verify(Some(&authorization(&token)), now()).unwrap();
        let second = v.verify(Some(&authorization(&token)), now()).unwrap();
        assert!(
            Arc::ptr_eq(&first.claims, &second.claims),
            "second check is a hit"
        );
        assert_eq!(v.cache().get(token.as_bytes()).unwrap().1, exp + 60);
        // The cache hashes a token's end only (its signature): a token ending like a cached
        // one is still compared whole, and this one does not verify.
        let twin = format!(
            "{}{}",
            if token.starts_with('x') { "y" } else { "x" },
            &token[1..]
        );
        assert!(v.verify(Some(&authorization(&twin)), now()).is_err());

        // A hit is only as good as its deadline: an entry past it is not used (this token
        // does not verify, so only a cache hit could accept it).
        let forged = format!("{token}x");
        v.cache()
            .insert(forged.as_bytes().into(), (first.clone(), now() + 100));
        assert!(v.verify(Some(&authorization(&forged)), now()).is_ok());
        v.cache()
            .insert(forged.as_bytes().into(), (first.clone(), now() - 1));
        assert_eq!(
            v.verify(Some(&authorization(&forged)), now()).unwrap_err(),
            AuthFailure::Signature
        );
        assert!(
            v.cache().get(forged.as_bytes()).is_none(),
            "stale entry dropped"
        );
    }

    #[test]
    fn cache_deadline_is_capped_by_the_auth_expiry() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
        let a: Auth = serde_json::from_value(json!({"id": "au01", "name": "t",
            "connected_stages": ["prod"], "expired_at": "2030-01-01T00:00:00Z",
            "verification": {"alg": "HS256", "secret_base64": b64}}))
        .unwrap();
        let auth = CompiledAuth::compile(&a).unwrap();
        let far = json!({"exp": 4_000_000_000i64})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(auth.valid_until(&far), Some(1_893_456_000));
        let near = json!({"exp": 1_800_000_000i64})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(auth.valid_until(&near), Some(1_800_000_060));
        let none = json!({"sub": "x"}).as_object().unwrap().clone();
        assert_eq!(auth.valid_until(&none), None);
    }
}
