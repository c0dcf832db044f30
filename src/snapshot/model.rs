//! Raw serde types mirroring the `scp-apigw.snapshot/v1` JSON document field by field.
//!
//! These are what the control plane sends; nothing on the request path reads them. Unknown
//! fields are ignored (forward compatibility); a known field of the wrong type is an error
//! whose JSON path `serde_path_to_error` reports. Optional arrays accept `null` as empty.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Snapshot {
    pub format: String,
    pub revision: u64,
    #[serde(default)]
    pub generated_at: Option<String>,
    pub api: Api,
    pub deployments: Vec<Deployment>,
    pub stages: Vec<Stage>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub access_controls: Vec<AccessControl>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub auths: Vec<Auth>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub usage_plans: Vec<UsagePlan>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub functions: Vec<Function>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub privatelink_endpoints: Vec<PrivateLinkEndpoint>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub connected_endpoints: Vec<ConnectedEndpoint>,
    #[serde(default)]
    pub resource_policy: Option<ResourcePolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum EndpointType {
    #[default]
    #[serde(rename = "REGION")]
    Region,
    #[serde(rename = "PRIVATE")]
    Private,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Api {
    pub id: String,
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub account_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub endpoint_type: EndpointType,
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Deployment {
    pub deployment_id: String,
    #[serde(default)]
    pub deployment_date: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub resources: Vec<Resource>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Resource {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub parent_id: String,
    pub path: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub path_part: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub methods: Vec<Method>,
}

/// The method types of `MethodV1Dot2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MethodType {
    Get,
    Post,
    Put,
    Delete,
    Patch,
    Head,
    Options,
    Any,
}

impl MethodType {
    pub fn as_str(self) -> &'static str {
        match self {
            MethodType::Get => "GET",
            MethodType::Post => "POST",
            MethodType::Put => "PUT",
            MethodType::Delete => "DELETE",
            MethodType::Patch => "PATCH",
            MethodType::Head => "HEAD",
            MethodType::Options => "OPTIONS",
            MethodType::Any => "ANY",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum IntegrationType {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "SCF")]
    Scf,
    #[serde(rename = "PRIVATELINK")]
    PrivateLink,
}

impl IntegrationType {
    /// Index into `observe::series::INTEGRATIONS` (the `integration` label).
    pub fn index(self) -> usize {
        match self {
            IntegrationType::Http => 0,
            IntegrationType::Scf => 1,
            IntegrationType::PrivateLink => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IntegrationType::Http => "HTTP",
            IntegrationType::Scf => "SCF",
            IntegrationType::PrivateLink => "PRIVATELINK",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Method {
    pub method_type: MethodType,
    pub integration_type: IntegrationType,
    #[serde(default)]
    pub endpoint_url: Option<String>,
    #[serde(default)]
    pub function_id: Option<String>,
    #[serde(default)]
    pub function_name: Option<String>,
    #[serde(default)]
    pub privatelink_endpoint_id: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub api_key_required: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub query_strings: BTreeMap<String, bool>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub request_headers: BTreeMap<String, bool>,
    #[serde(default)]
    pub srn: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
pub struct Throttle {
    pub rate_per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Canary {
    pub deployment_id: String,
    pub percent: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct KeyRef {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Stage {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub deployment_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub cors_enabled: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub allow_origins: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub allow_methods: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub allow_headers: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub expose_headers: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub allow_credentials: bool,
    #[serde(default)]
    pub max_age: Option<u64>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub jwt_enabled: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub ip_restriction_enabled: bool,
    #[serde(default)]
    pub usage_plan_id: Option<String>,
    /// Absent or null: every key of the usage plan; present: only these.
    #[serde(default)]
    pub usage_plan_api_keys: Option<Vec<KeyRef>>,
    #[serde(default)]
    pub throttle: Option<Throttle>,
    #[serde(default)]
    pub canary: Option<Canary>,
    #[serde(default)]
    pub integration_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AccessControl {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub allowed_ip_addr: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub connected_stages: Vec<String>,
    #[serde(default)]
    pub created_at: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum JwtAlg {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl JwtAlg {
    pub fn is_hmac(self) -> bool {
        matches!(self, JwtAlg::HS256 | JwtAlg::HS384 | JwtAlg::HS512)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

/// Key material of an auth. Exactly one of `secret_base64`, `public_key_pem`, `jwks`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Verification {
    #[serde(default)]
    pub alg: Option<JwtAlg>,
    #[serde(default, skip_serializing)]
    pub secret_base64: Option<String>,
    #[serde(default)]
    pub public_key_pem: Option<String>,
    #[serde(default)]
    pub jwks: Option<jsonwebtoken::jwk::JwkSet>,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<OneOrMany>,
    #[serde(default)]
    pub leeway_seconds: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Auth {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub auth_method: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub connected_stages: Vec<String>,
    #[serde(default)]
    pub expired_at: Option<String>,
    pub verification: Verification,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaRate {
    Hour,
    Day,
    Month,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ApiKey {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    /// Plain key value; never serialised back out.
    #[serde(default, skip_serializing)]
    pub key: Option<String>,
    /// Lowercase hex SHA-256 of the key value; never serialised back out.
    #[serde(default, skip_serializing)]
    pub key_sha256: Option<String>,
    /// A second secret of the same key (rotation), as a plain value or a digest.
    #[serde(default, skip_serializing)]
    pub secondary_key: Option<String>,
    #[serde(default, skip_serializing)]
    pub secondary_key_sha256: Option<String>,
}

impl ApiKey {
    /// The key's id and name, without its values or digests.
    pub fn without_secrets(&self) -> Self {
        Self {
            id: self.id.clone(),
            name: self.name.clone(),
            key: None,
            key_sha256: None,
            secondary_key: None,
            secondary_key_sha256: None,
        }
    }
}

impl ApiKey {
    /// The key's secrets as SHA-256 digests: the primary, then the secondary if any.
    /// `None` for a secret that is not a valid digest (validation names it).
    pub fn digests(&self) -> impl Iterator<Item = Option<[u8; 32]>> + '_ {
        let one = |plain: &Option<String>, hex: &Option<String>| match (plain, hex) {
            (Some(v), _) => Some(Some(sha256(v.as_bytes()))),
            (None, Some(h)) => Some(hex32(h)),
            (None, None) => None,
        };
        one(&self.key, &self.key_sha256)
            .into_iter()
            .chain(one(&self.secondary_key, &self.secondary_key_sha256))
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// 64 lowercase hex digits as 32 bytes.
pub fn hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct UsagePlan {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    pub limit: u64,
    pub rate: QuotaRate,
    #[serde(default, deserialize_with = "null_as_default")]
    pub api_keys: Vec<ApiKey>,
    #[serde(default)]
    pub throttle: Option<Throttle>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Function {
    pub function_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub function_name: String,
    pub invoke_url: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PrivateLinkEndpoint {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub privatelink_service_id: Option<String>,
    pub status: String,
    pub target: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ConnectedEndpoint {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub created_at: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Principal {
    /// Only `"*"` is meaningful; other strings are rejected by validation.
    Wildcard(String),
    Scp {
        scp: OneOrMany,
    },
}

/// `Condition`: operator → (condition key → values).
pub type Conditions = BTreeMap<String, BTreeMap<String, OneOrMany>>;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Statement {
    #[serde(rename = "Sid", default)]
    pub sid: Option<String>,
    #[serde(rename = "Effect")]
    pub effect: Effect,
    #[serde(rename = "Principal")]
    pub principal: Principal,
    #[serde(rename = "Action")]
    pub action: OneOrMany,
    #[serde(rename = "Resource", default)]
    pub resource: Option<OneOrMany>,
    #[serde(rename = "Condition", default)]
    pub condition: Option<Conditions>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ResourcePolicy {
    #[serde(rename = "Version", default)]
    pub version: Option<String>,
    #[serde(rename = "Statement")]
    pub statement: Vec<Statement>,
}
