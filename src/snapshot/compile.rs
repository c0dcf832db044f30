//! Compiled, immutable form of a validated snapshot: host → API → stage → deployment →
//! route trie → method. Built off the request path; shared by `Arc`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::model::{ApiKey, EndpointType, IntegrationType, MethodType, Snapshot, UsagePlan};
use super::validate::{normalize_host, parse_target, split_list};
use super::Issue;
use crate::integration::url::{split_origin, UrlTemplate};
use crate::observe::series::{self, Lazy, RouteSeries, StageSeries};
use crate::policy::acl::{IpAcl, StageAcl};
use crate::policy::apikey::{CompiledPlan, StageKeys, ThrottleSpec};
use crate::policy::cors::CorsPolicy;
use crate::policy::jwt::{CompiledAuth, StageJwt};
use crate::policy::resource_policy::{CompiledPolicy, SrnTemplate};
use crate::policy::throttle::BucketSlot;
use crate::routing::{MethodTable, RouteError, RouteTable};
use crate::upstream::Upstream;

pub const DEFAULT_INTEGRATION_TIMEOUT: Duration = Duration::from_millis(29_000);

#[derive(Debug)]
pub struct PrivateLinkTarget {
    pub id: Arc<str>,
    pub active: bool,
    pub host: String,
    pub port: u16,
}

#[derive(Debug)]
pub struct FunctionTarget {
    pub id: Arc<str>,
    pub name: String,
    /// Where the function's endpoint is.
    pub upstream: Arc<Upstream>,
    /// The invoke URL's path and query (origin-form).
    pub target: http::Uri,
}

#[derive(Debug)]
pub enum Integration {
    Http {
        url: UrlTemplate,
        upstream: Arc<Upstream>,
    },
    Function {
        function: Arc<FunctionTarget>,
    },
    PrivateLink {
        url: UrlTemplate,
        endpoint: Arc<PrivateLinkTarget>,
        /// The endpoint's target, with the URL's `Host` and TLS server name.
        upstream: Arc<Upstream>,
    },
}

impl Integration {
    pub fn kind(&self) -> IntegrationType {
        match self {
            Integration::Http { .. } => IntegrationType::Http,
            Integration::Function { .. } => IntegrationType::Scf,
            Integration::PrivateLink { .. } => IntegrationType::PrivateLink,
        }
    }

    /// The HTTP backend a request is forwarded to (`http` and PrivateLink integrations);
    /// `None` for a function, whose request the gateway builds itself.
    pub fn http_upstream(&self) -> Option<&Upstream> {
        match self {
            Integration::Http { upstream, .. } | Integration::PrivateLink { upstream, .. } => {
                Some(upstream)
            }
            Integration::Function { .. } => None,
        }
    }
}

#[derive(Debug)]
pub struct MethodRoute {
    pub method_type: MethodType,
    pub integration: Integration,
    pub api_key_required: bool,
    /// Query strings marked `true` (case-sensitive names).
    pub required_query: Box<[Box<str>]>,
    /// Headers marked `true`.
    pub required_headers: Box<[HeaderName]>,
    /// The method SRN of a request, for resource-policy conditions.
    pub srn: SrnTemplate,
}

#[derive(Debug)]
pub struct CompiledDeployment {
    pub id: Arc<str>,
    pub routes: RouteTable<MethodRoute>,
}

#[derive(Debug)]
pub struct Canary {
    pub deployment: Arc<CompiledDeployment>,
    /// 0–100.
    pub percent: f64,
}

#[derive(Debug)]
pub struct CompiledStage {
    pub name: Arc<str>,
    /// `name` as the `x-scp-stage` value forwarded to backends.
    pub name_header: Option<HeaderValue>,
    pub deployment: Arc<CompiledDeployment>,
    pub canary: Option<Canary>,
    pub integration_timeout: Duration,
    pub acl: StageAcl,
    pub jwt_enabled: bool,
    pub jwt: StageJwt,
    pub keys: StageKeys,
    pub throttle: Option<ThrottleSpec>,
    /// Where `throttle`'s bucket is (kept outside the snapshot: a reload does not refill it).
    pub throttle_bucket: BucketSlot,
    pub cors: Option<CorsPolicy>,
    /// This stage's latency histograms, rejections and retries (resolved with the snapshot:
    /// the same series as before a reload).
    pub series: Arc<StageSeries>,
    /// Request counts and report deltas per route of the active deployment (`[0]`) and of
    /// the canary (`[1]`), by route id, resolved at a route's first request.
    pub route_series: [Box<[Lazy<RouteSeries>]>; 2],
    /// Requests of this stage that matched no resource.
    pub no_route_series: Lazy<RouteSeries>,
}

impl CompiledStage {
    /// The series of route `id` of the active deployment or the canary.
    pub fn route_series(&self, canary: bool, id: usize, template: &Arc<str>) -> &Arc<RouteSeries> {
        let slot = &self.route_series[usize::from(canary)][id];
        slot.get_or_init(|| series::route(&self.series.api, &self.name, template))
    }

    /// The series of requests that matched no resource.
    pub fn no_route_series(&self) -> &Arc<RouteSeries> {
        self.no_route_series
            .get_or_init(|| series::route(&self.series.api, &self.name, &Arc::from("")))
    }

    /// The deployment serving one request: the canary for `percent`% of draws.
    /// `draw` is uniform in [0, 100).
    pub fn select(&self, draw: f64) -> &Arc<CompiledDeployment> {
        match &self.canary {
            Some(c) if draw < c.percent => &c.deployment,
            _ => &self.deployment,
        }
    }
}

#[derive(Debug)]
pub struct CompiledApi {
    pub id: Arc<str>,
    /// `id` as the `x-scp-api-id` value forwarded to backends.
    pub id_header: Option<HeaderValue>,
    pub name: String,
    pub revision: u64,
    pub endpoint_type: EndpointType,
    /// Normalised host names (lowercase, no trailing dot).
    pub hosts: Vec<String>,
    /// Sorted by name (names are unique: `validate`). A binary search over an API's few
    /// stages cost 64 instructions per request where the hash map's lookup (hashing the
    /// name, probing, comparing) cost 100 (callgrind); it stays logarithmic for an API
    /// with many stages.
    pub stages: Box<[CompiledStage]>,
    pub resource_policy: Option<CompiledPolicy>,
    /// PRIVATE APIs: the connected PrivateLink endpoints whose status is `Active`.
    pub active_endpoints: std::collections::HashSet<Box<str>>,
    /// The document it was built from as the admin API shows it: JSON, serialised once
    /// here (key values are never serialised). The parsed document is not kept: for a
    /// fleet of 1,000 APIs × 300 resources it took ~270 MB (a 700-byte struct per method,
    /// a heap block per string) against ~55 MB as JSON, and it held plain key values.
    pub document: Box<[u8]>,
    /// The usage plans of the document, for the usage report (their key values dropped).
    pub usage_plans: Box<[UsagePlan]>,
    pub loaded_at: time::OffsetDateTime,
    /// Requests of this API for a stage it does not have (`stage=""`).
    pub no_stage_series: std::sync::OnceLock<(Arc<StageSeries>, Arc<RouteSeries>)>,
}

impl CompiledApi {
    pub fn stage(&self, name: &str) -> Option<&CompiledStage> {
        self.stages
            .binary_search_by(|s| (*s.name).cmp(name))
            .ok()
            .map(|i| &self.stages[i])
    }

    /// The series of requests for a stage this API does not have.
    pub fn no_stage_series(&self) -> (&Arc<StageSeries>, &Arc<RouteSeries>) {
        let (s, r) = self.no_stage_series.get_or_init(|| {
            let empty: Arc<str> = Arc::from("");
            (
                series::stage(&self.id, &empty),
                series::route(&self.id, &empty, &empty),
            )
        });
        (s, r)
    }
}

fn issue(path: String, message: impl Into<String>) -> Issue {
    Issue {
        path,
        message: message.into(),
    }
}

/// Compiles a snapshot that passed [`super::validate::validate`].
pub fn compile(s: Snapshot) -> Result<CompiledApi, Vec<Issue>> {
    let mut errors = Vec::new();
    let endpoints: HashMap<&str, Arc<PrivateLinkTarget>> = s
        .privatelink_endpoints
        .iter()
        .filter_map(|e| {
            let (host, port) = parse_target(&e.target)?;
            Some((
                e.id.as_str(),
                Arc::new(PrivateLinkTarget {
                    id: Arc::from(e.id.as_str()),
                    active: e.status == "Active",
                    host,
                    port,
                }),
            ))
        })
        .collect();
    let mut functions: HashMap<&str, Arc<FunctionTarget>> = HashMap::new();
    for (i, f) in s.functions.iter().enumerate() {
        let target = f
            .invoke_url
            .parse::<http::Uri>()
            .map_err(|e| e.to_string())
            .and_then(|url| {
                let upstream = Upstream::for_url(&url)?;
                let path = url.path_and_query().map_or("/", |p| p.as_str());
                let target = if path.starts_with('/') {
                    path.parse::<http::Uri>()
                } else {
                    format!("/{path}").parse::<http::Uri>()
                }
                .map_err(|e| e.to_string())?;
                Ok((upstream, target))
            });
        match target {
            Ok((upstream, target)) => {
                functions.insert(
                    f.function_id.as_str(),
                    Arc::new(FunctionTarget {
                        id: Arc::from(f.function_id.as_str()),
                        name: f.function_name.clone(),
                        upstream,
                        target,
                    }),
                );
            }
            Err(e) => errors.push(issue(format!("functions[{i}].invoke_url"), e)),
        }
    }

    let mut deployments: HashMap<&str, Arc<CompiledDeployment>> = HashMap::new();
    for (d, dep) in s.deployments.iter().enumerate() {
        let mut routes = RouteTable::with_capacity(dep.resources.len());
        // Insert parents before children so conflicts are reported on the later path.
        let mut order: Vec<usize> = (0..dep.resources.len()).collect();
        order.sort_by_key(|&i| (dep.resources[i].path.matches('/').count(), i));
        for i in order {
            let r = &dep.resources[i];
            let rp = format!("deployments[{d}].resources[{i}]");
            let param_names: Vec<&str> = super::validate::path_segments(&r.path)
                .filter_map(|seg| match super::validate::parse_segment(seg) {
                    Ok(
                        super::validate::Segment::Param(n) | super::validate::Segment::Greedy(n),
                    ) => Some(n),
                    _ => None,
                })
                .collect();
            let mut methods = Vec::with_capacity(r.methods.len());
            for (j, m) in r.methods.iter().enumerate() {
                let mp = format!("{rp}.methods[{j}]");
                let raw_url = m.endpoint_url.as_deref().unwrap_or("");
                let url = |errors: &mut Vec<Issue>| -> Option<UrlTemplate> {
                    UrlTemplate::compile(raw_url, &param_names)
                        .map_err(|e| errors.push(issue(format!("{mp}.endpoint_url"), e)))
                        .ok()
                };
                // The backend: the URL's origin, or for PrivateLink the endpoint's target
                // with the URL's Host and TLS name.
                let origin = |errors: &mut Vec<Issue>,
                              target: Option<&PrivateLinkTarget>|
                 -> Option<Arc<Upstream>> {
                    let url = split_origin(raw_url)
                        .0
                        .parse::<http::Uri>()
                        .map_err(|e| e.to_string())
                        .and_then(|u| match target {
                            None => Upstream::for_url(&u),
                            Some(t) => Upstream::for_target(&u, &t.host, t.port),
                        });
                    url.map_err(|e| errors.push(issue(format!("{mp}.endpoint_url"), e)))
                        .ok()
                };
                let integration = match m.integration_type {
                    IntegrationType::Http => match (url(&mut errors), origin(&mut errors, None)) {
                        (Some(url), Some(upstream)) => Some(Integration::Http { url, upstream }),
                        _ => None,
                    },
                    IntegrationType::Scf => m
                        .function_id
                        .as_deref()
                        .and_then(|f| functions.get(f))
                        .map(|f| Integration::Function {
                            function: f.clone(),
                        }),
                    IntegrationType::PrivateLink => {
                        let endpoint = m
                            .privatelink_endpoint_id
                            .as_deref()
                            .and_then(|e| endpoints.get(e));
                        let upstream = endpoint.and_then(|e| origin(&mut errors, Some(e)));
                        match (url(&mut errors), endpoint, upstream) {
                            (Some(url), Some(endpoint), Some(upstream)) => {
                                Some(Integration::PrivateLink {
                                    url,
                                    endpoint: endpoint.clone(),
                                    upstream,
                                })
                            }
                            _ => None,
                        }
                    }
                };
                let Some(integration) = integration else {
                    errors.push(issue(mp, "integration target could not be resolved"));
                    continue;
                };
                methods.push((
                    m.method_type,
                    MethodRoute {
                        method_type: m.method_type,
                        integration,
                        api_key_required: m.api_key_required,
                        required_query: m
                            .query_strings
                            .iter()
                            .filter(|(_, req)| **req)
                            .map(|(n, _)| n.as_str().into())
                            .collect(),
                        required_headers: m
                            .request_headers
                            .iter()
                            .filter(|(_, req)| **req)
                            .filter_map(|(n, _)| HeaderName::from_bytes(n.as_bytes()).ok())
                            .collect(),
                        srn: SrnTemplate::new(
                            m.srn.as_deref(),
                            &s.api.account_id,
                            &s.api.id,
                            &r.path,
                        ),
                    },
                ));
            }
            if let Err(e) = routes.insert(&r.path, MethodTable::new(methods)) {
                let message = match &e {
                    RouteError::Conflict { path, with } => {
                        format!("`{path}` conflicts with `{with}`")
                    }
                    RouteError::InvalidTemplate { .. } | RouteError::Rejected { .. } => {
                        e.to_string()
                    }
                };
                errors.push(issue(format!("{rp}.path"), message));
            }
        }
        deployments.insert(
            dep.deployment_id.as_str(),
            Arc::new(CompiledDeployment {
                id: Arc::from(dep.deployment_id.as_str()),
                routes,
            }),
        );
    }

    let mut auths = Vec::new();
    for (i, a) in s.auths.iter().enumerate() {
        match CompiledAuth::compile(a) {
            Ok(c) => auths.push((a, Arc::new(c))),
            Err(e) => errors.push(issue(format!("auths[{i}].verification"), e)),
        }
    }
    let plans: HashMap<&str, Arc<CompiledPlan>> = s
        .usage_plans
        .iter()
        .map(|p| (p.id.as_str(), Arc::new(CompiledPlan::compile(p))))
        .collect();

    let api_id: Arc<str> = Arc::from(s.api.id.as_str());
    let mut stages = Vec::with_capacity(s.stages.len());
    for (i, st) in s.stages.iter().enumerate() {
        let connected = |list: &[String]| split_list(list).any(|n| n == st.name);
        let acl = if st.ip_restriction_enabled {
            // No connected access control: the control plane's "Default: all deny".
            let entries = s
                .access_controls
                .iter()
                .filter(|ac| connected(&ac.connected_stages))
                .flat_map(|ac| split_list(&ac.allowed_ip_addr))
                .filter_map(|e| crate::config::parse_net(e).ok())
                .collect::<Vec<_>>();
            StageAcl::Allow(IpAcl::new(entries))
        } else {
            StageAcl::Off
        };
        let jwt = StageJwt::new(
            auths
                .iter()
                .filter(|(a, _)| connected(&a.connected_stages))
                .map(|(_, c)| c.clone())
                .collect(),
        );
        let keys = StageKeys::new(
            st.usage_plan_id
                .as_deref()
                .and_then(|id| plans.get(id))
                .cloned(),
            st.usage_plan_api_keys
                .as_ref()
                .map(|ks| ks.iter().map(|k| k.id.as_str())),
        );
        let Some(deployment) = deployments.get(st.deployment_id.as_str()).cloned() else {
            errors.push(issue(
                format!("stages[{i}].deployment_id"),
                "no such deployment",
            ));
            continue;
        };
        let canary = st.canary.as_ref().and_then(|c| {
            deployments.get(c.deployment_id.as_str()).map(|d| Canary {
                deployment: d.clone(),
                percent: c.percent,
            })
        });
        let name: Arc<str> = Arc::from(st.name.as_str());
        let lazy_routes = |d: Option<&Arc<CompiledDeployment>>| -> Box<[Lazy<RouteSeries>]> {
            (0..d.map_or(0, |d| d.routes.len()))
                .map(|_| Lazy::default())
                .collect()
        };
        let route_series = [
            lazy_routes(Some(&deployment)),
            lazy_routes(canary.as_ref().map(|c| &c.deployment)),
        ];
        stages.push(CompiledStage {
            series: series::stage(&api_id, &name),
            route_series,
            no_route_series: Lazy::default(),
            name,
            name_header: crate::interned::header_value(&st.name),
            deployment,
            canary,
            integration_timeout: st
                .integration_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_INTEGRATION_TIMEOUT),
            acl,
            jwt_enabled: st.jwt_enabled,
            jwt,
            keys,
            throttle: st.throttle.as_ref().map(ThrottleSpec::from_model),
            throttle_bucket: BucketSlot::default(),
            cors: CorsPolicy::compile(st),
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    stages.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    Ok(CompiledApi {
        id: api_id,
        id_header: crate::interned::header_value(&s.api.id),
        name: s.api.name.clone(),
        revision: s.revision,
        endpoint_type: s.api.endpoint_type,
        hosts: s.api.hosts.iter().map(|h| normalize_host(h)).collect(),
        stages: stages.into_boxed_slice(),
        resource_policy: s.resource_policy.as_ref().map(CompiledPolicy::compile),
        active_endpoints: s
            .connected_endpoints
            .iter()
            .filter(|e| e.status == "Active")
            .map(|e| e.id.as_str().into())
            .collect(),
        usage_plans: s
            .usage_plans
            .iter()
            .map(|p| UsagePlan {
                id: p.id.clone(),
                name: p.name.clone(),
                limit: p.limit,
                rate: p.rate,
                api_keys: p.api_keys.iter().map(ApiKey::without_secrets).collect(),
                throttle: p.throttle,
            })
            .collect(),
        document: serde_json::to_vec(&s)
            .unwrap_or_default()
            .into_boxed_slice(),
        loaded_at: time::OffsetDateTime::now_utc(),
        no_stage_series: std::sync::OnceLock::new(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// What a compiled API keeps of its document: the JSON the admin API shows, and the
    /// usage plans' key ids; never a key value or digest.
    #[test]
    fn a_compiled_api_keeps_its_document_without_key_values() {
        let doc = json!({"format": "scp-apigw.snapshot/v1", "revision": 7,
            "api": {"id": "a1", "name": "orders", "account_id": "acc", "hosts": ["o.test"]},
            "deployments": [{"deployment_id": "d1", "resources": [
                {"id": "root", "parent_id": "", "path": "/", "path_part": "", "methods": []},
                {"id": "r1", "parent_id": "root", "path": "/orders", "path_part": "orders", "methods": [
                    {"method_type": "GET", "integration_type": "HTTP",
                     "endpoint_url": "http://127.0.0.1:9/orders", "api_key_required": true}]}]}],
            "stages": [{"name": "prod", "deployment_id": "d1", "usage_plan_id": "up1"}],
            "usage_plans": [{"id": "up1", "name": "p", "limit": 10, "rate": "day",
                "api_keys": [{"id": "k1", "name": "k", "key": "plain-key-value",
                              "secondary_key_sha256": "ab".repeat(32)}]}]});
        let bytes = serde_json::to_vec(&doc).unwrap();
        let (api, _) = crate::snapshot::check(&bytes).unwrap();
        let shown: serde_json::Value = serde_json::from_slice(&api.document).unwrap();
        assert_eq!(shown["revision"], 7);
        assert_eq!(shown["deployments"][0]["resources"][1]["path"], "/orders");
        assert_eq!(shown["usage_plans"][0]["api_keys"][0]["id"], "k1");
        let text = String::from_utf8_lossy(&api.document);
        assert!(!text.contains("plain-key-value"), "{text}");
        assert!(!text.contains(&"ab".repeat(32)), "{text}");
        let key = &api.usage_plans[0].api_keys[0];
        assert_eq!((key.id.as_str(), key.name.as_str()), ("k1", "k"));
        assert!(key.key.is_none() && key.secondary_key_sha256.is_none());
    }

    /// Every stage is found by its exact name, whatever the order the document lists them
    /// in (the compiled list is sorted for a binary search); no other name finds one.
    #[test]
    fn each_stage_is_found_by_its_name() {
        let names = [
            "prod", "dev", "v2", "alpha", "prod-eu", "Beta", "z", "a.b~c_d",
        ];
        let stages: Vec<_> = names
            .iter()
            .map(|n| json!({"name": n, "deployment_id": "d1"}))
            .collect();
        let doc = json!({"format": "scp-apigw.snapshot/v1", "revision": 1,
            "api": {"id": "a1", "name": "orders", "account_id": "acc", "hosts": ["o.test"]},
            "deployments": [{"deployment_id": "d1", "resources": [
                {"id": "root", "parent_id": "", "path": "/", "path_part": "", "methods": []}]}],
            "stages": stages});
        let (api, _) = crate::snapshot::check(&serde_json::to_vec(&doc).unwrap()).unwrap();
        for n in names {
            assert_eq!(api.stage(n).map(|s| &*s.name), Some(n), "{n}");
        }
        for n in ["", "pro", "prodx", "PROD", "beta", "v", "zz", "a"] {
            assert!(api.stage(n).is_none(), "{n}");
        }
    }
}
