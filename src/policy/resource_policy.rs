//! The API's resource-based policy (`snapshot.md`, "resource_policy"): statements for the
//! invoke action, conditions on the method SRN and the source IP, principals `*` or JWT
//! `sub`. An explicit matching Deny wins; otherwise a matching Allow is needed.

use std::net::IpAddr;

use ipnet::IpNet;
use wildmatch::WildMatch;

use crate::snapshot::model::{Effect, Principal, ResourcePolicy};
use crate::snapshot::validate::{is_invoke_action, SOURCE_IP_KEY, SRN_KEY};

use super::acl::IpAcl;

#[derive(Debug)]
enum Who {
    Anyone,
    Subjects(Vec<String>),
}

#[derive(Debug)]
enum Condition {
    SrnLike(Vec<WildMatch>),
    SrnNotLike(Vec<WildMatch>),
    IpAddress(IpAcl),
    NotIpAddress(IpAcl),
}

#[derive(Debug)]
struct Statement {
    effect: Effect,
    who: Who,
    conditions: Vec<Condition>,
}

/// What a request looks like to the policy.
pub struct Caller<'a> {
    pub method_srn: &'a str,
    pub source_ip: IpAddr,
    /// `sub` of a token verified at step 9; `None` is the anonymous caller.
    pub sub: Option<&'a str>,
}

#[derive(Debug)]
pub struct CompiledPolicy {
    statements: Vec<Statement>,
}

impl CompiledPolicy {
    /// Compiles a validated policy; statements for other actions are left out.
    pub fn compile(p: &ResourcePolicy) -> Self {
        let statements = p
            .statement
            .iter()
            .filter(|s| is_invoke_action(&s.action))
            .map(|s| Statement {
                effect: s.effect,
                who: match &s.principal {
                    Principal::Wildcard(_) => Who::Anyone,
                    Principal::Scp { scp } => Who::Subjects(scp.as_slice().to_vec()),
                },
                conditions: s
                    .condition
                    .iter()
                    .flatten()
                    .flat_map(|(op, keys)| {
                        keys.iter().map(move |(key, values)| {
                            (op.as_str(), key.as_str(), values.as_slice())
                        })
                    })
                    .filter_map(|(op, key, values)| {
                        let globs = || values.iter().map(|v| WildMatch::new(v)).collect();
                        let nets = || {
                            IpAcl::new(
                                values
                                    .iter()
                                    .filter_map(|v| crate::config::parse_net(v).ok())
                                    .collect::<Vec<IpNet>>(),
                            )
                        };
                        match (op, key) {
                            ("SrnLike", SRN_KEY) => Some(Condition::SrnLike(globs())),
                            ("SrnNotLike", SRN_KEY) => Some(Condition::SrnNotLike(globs())),
                            ("IpAddress", SOURCE_IP_KEY) => Some(Condition::IpAddress(nets())),
                            ("NotIpAddress", SOURCE_IP_KEY) => {
                                Some(Condition::NotIpAddress(nets()))
                            }
                            // Validation rejects every other operator and key.
                            _ => None,
                        }
                    })
                    .collect(),
            })
            .collect();
        Self { statements }
    }

    /// True when the policy lets the caller in.
    pub fn allows(&self, c: &Caller<'_>) -> bool {
        let mut allowed = false;
        for s in &self.statements {
            if !s.matches(c) {
                continue;
            }
            match s.effect {
                Effect::Deny => return false,
                Effect::Allow => allowed = true,
            }
        }
        allowed
    }
}

impl Statement {
    fn matches(&self, c: &Caller<'_>) -> bool {
        let who = match &self.who {
            Who::Anyone => true,
            Who::Subjects(subs) => c.sub.is_some_and(|sub| subs.iter().any(|s| s == sub)),
        };
        who && self.conditions.iter().all(|cond| match cond {
            Condition::SrnLike(g) => g.iter().any(|p| p.matches(c.method_srn)),
            Condition::SrnNotLike(g) => !g.iter().any(|p| p.matches(c.method_srn)),
            Condition::IpAddress(a) => a.contains(c.source_ip),
            Condition::NotIpAddress(a) => !a.contains(c.source_ip),
        })
    }
}

/// The per-method part of the method SRN, fixed at compile time:
/// `srn:{offering}::{account}:{region}::apigateway:method/{api_id}/` and `/{resource path}`.
#[derive(Debug, Clone)]
pub struct SrnTemplate {
    prefix: String,
    suffix: String,
}

impl SrnTemplate {
    /// `method_srn` is the method's own `srn` (offering and region come from it).
    pub fn new(
        method_srn: Option<&str>,
        account_id: &str,
        api_id: &str,
        resource_path: &str,
    ) -> Self {
        let parts: Vec<&str> = method_srn.unwrap_or("").split(':').collect();
        let offering = parts.get(1).copied().unwrap_or("");
        let region = parts.get(4).copied().unwrap_or("");
        Self {
            prefix: format!("srn:{offering}::{account_id}:{region}::apigateway:method/{api_id}/"),
            suffix: format!("/{}", resource_path.trim_start_matches('/')),
        }
    }

    /// The SRN of one request: the actual stage and the request's own verb.
    pub fn render(&self, stage: &str, verb: &str) -> String {
        let mut s = String::with_capacity(
            self.prefix.len() + stage.len() + verb.len() + self.suffix.len() + 1,
        );
        s.push_str(&self.prefix);
        s.push_str(stage);
        s.push('/');
        s.push_str(verb);
        s.push_str(&self.suffix);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: serde_json::Value) -> CompiledPolicy {
        CompiledPolicy::compile(&serde_json::from_value(json).unwrap())
    }

    const SRN: &str = "srn:e::acc:kr-west1::apigateway:method/api1/prod/GET/orders/{order-id}";

    fn caller<'a>(ip: &str, sub: Option<&'a str>) -> Caller<'a> {
        Caller {
            method_srn: SRN,
            source_ip: ip.parse().unwrap(),
            sub,
        }
    }

    #[test]
    fn srn_template() {
        let t = SrnTemplate::new(
            Some("srn:e::acc:kr-west1::apigateway:method/api1/*/ANY/orders/{order-id}"),
            "acc",
            "api1",
            "/orders/{order-id}",
        );
        assert_eq!(t.render("prod", "GET"), SRN);
        let root = SrnTemplate::new(None, "acc", "api1", "/");
        assert_eq!(
            root.render("prod", "GET"),
            "srn:::acc:::apigateway:method/api1/prod/GET/"
        );
    }

    #[test]
    fn deny_beats_allow() {
        let p = policy(serde_json::json!({"Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": ["apigateway:InvokeApigatewayRegion"]},
            {"Effect": "Deny", "Principal": "*", "Action": "apigateway:*",
             "Condition": {"IpAddress": {"scp:SourceIp": ["203.0.113.0/24"]}}}
        ]}));
        assert!(p.allows(&caller("198.51.100.1", None)));
        assert!(!p.allows(&caller("203.0.113.5", None)));
    }

    #[test]
    fn user_guide_ip_range_deny_list_example() {
        // The user guide's "IP Range Deny List Policy Template Example", verbatim: an Allow
        // whose NotIpAddress condition admits every caller outside the listed ranges, for
        // GET resource1 on stage1. `1.2.3.4/24` has host bits set and means 1.2.3.0/24.
        let p = policy(serde_json::json!({"Version": "", "Statement": [{
            "Action": ["apigateway:InvokeApigatewayRegion"],
            "Condition": {
                "SrnLike": {"scp:RequestAttribute/body['method-srn']": [
                    "srn:e::accountId1:kr-west1::apigateway:method/apiId1/stage1/GET/resource1"]},
                "NotIpAddress": {"scp:SourceIp": ["1.2.3.4/24", "5.6.7.8/32"]}
            },
            "Effect": "Allow", "Principal": "*",
            "Resource": ["srn:e::accountId1:kr-west1::apigateway:api/apiId1"], "Sid": "Statement1"
        }]}));
        let srn = "srn:e::accountId1:kr-west1::apigateway:method/apiId1/stage1/GET/resource1";
        let at = |ip: &str, srn| Caller {
            method_srn: srn,
            source_ip: ip.parse().unwrap(),
            sub: None,
        };
        assert!(p.allows(&at("192.0.2.1", srn)));
        assert!(!p.allows(&at("1.2.3.200", srn)), "inside 1.2.3.0/24");
        assert!(!p.allows(&at("5.6.7.8", srn)));
        assert!(p.allows(&at("5.6.7.9", srn)));
        let post = "srn:e::accountId1:kr-west1::apigateway:method/apiId1/stage1/POST/resource1";
        assert!(
            !p.allows(&at("192.0.2.1", post)),
            "no Allow matches another method: denied"
        );
    }

    #[test]
    fn principals_and_no_matching_allow() {
        let p = policy(serde_json::json!({"Statement": [
            {"Effect": "Allow", "Principal": {"scp": ["srn:user/alice"]}, "Action": "*",
             "Condition": {"SrnLike": {"scp:RequestAttribute/body['method-srn']": ["*/prod/GET/orders/*"]}}}
        ]}));
        assert!(p.allows(&caller("1.1.1.1", Some("srn:user/alice"))));
        assert!(!p.allows(&caller("1.1.1.1", Some("srn:user/bob"))));
        assert!(!p.allows(&caller("1.1.1.1", None)));
        let other_action = policy(serde_json::json!({"Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": "apigateway:GetApi"}
        ]}));
        assert!(
            !other_action.allows(&caller("1.1.1.1", None)),
            "a policy with no matching Allow denies"
        );
        let srn_not_like = policy(serde_json::json!({"Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": "*",
             "Condition": {"SrnNotLike": {"scp:RequestAttribute/body['method-srn']": ["*/DELETE/*"]}}}
        ]}));
        assert!(srn_not_like.allows(&caller("1.1.1.1", None)));
    }
}
