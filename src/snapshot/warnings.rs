//! Warnings: settings of a valid snapshot that can never admit a caller, or are very likely
//! mistakes. `validate` prints them (and fails on them with `--strict`); the gateway logs
//! them when it loads the snapshot. They never stop a snapshot from loading: the control
//! plane may mean it (a stage closed on purpose).

use std::collections::HashSet;

use super::model::{EndpointType, Snapshot};
use super::validate::split_list;
use super::Issue;

/// The warnings of a snapshot that passed validation.
pub fn warnings(s: &Snapshot) -> Vec<Issue> {
    let mut out = Vec::new();
    let mut warn = |path: String, message: String| out.push(Issue { path, message });
    let now = time::OffsetDateTime::now_utc();
    let private = s.api.endpoint_type == EndpointType::Private;
    for (i, st) in s.stages.iter().enumerate() {
        let p = format!("stages[{i}]");
        let connected = |list: &[String]| split_list(list).any(|n| n == st.name);
        // JWT with nothing to verify tokens with.
        if st.jwt_enabled || private {
            let auths: Vec<_> = s
                .auths
                .iter()
                .filter(|a| connected(&a.connected_stages))
                .collect();
            let why = if private {
                "the API is PRIVATE (JWT is always required)"
            } else {
                "jwt_enabled is on"
            };
            if auths.is_empty() {
                warn(
                    format!("{p}.jwt_enabled"),
                    format!(
                        "{why} but no auth is connected to stage `{}`: every request is refused (401)",
                        st.name
                    ),
                );
            } else if auths.iter().all(|a| {
                a.expired_at
                    .as_deref()
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .is_some_and(|t| t <= now)
            }) {
                warn(
                    format!("{p}.jwt_enabled"),
                    format!(
                        "every auth connected to stage `{}` is past its expired_at: every request is refused (401)",
                        st.name
                    ),
                );
            }
        }
        // API keys required with no plan, or a plan without keys.
        let requires_key = s
            .deployments
            .iter()
            .filter(|d| {
                d.deployment_id == st.deployment_id
                    || st
                        .canary
                        .as_ref()
                        .is_some_and(|c| c.deployment_id == d.deployment_id)
            })
            .flat_map(|d| d.resources.iter().flat_map(|r| r.methods.iter()))
            .any(|m| m.api_key_required);
        if requires_key {
            match st.usage_plan_id.as_deref().filter(|id| !id.is_empty()) {
                None => warn(
                    format!("{p}.usage_plan_id"),
                    format!(
                        "methods of stage `{}` require an API key but the stage has no usage plan: they refuse every request (403)",
                        st.name
                    ),
                ),
                Some(id) => {
                    let keys = s
                        .usage_plans
                        .iter()
                        .find(|u| u.id == id)
                        .map_or(0, |u| u.api_keys.len());
                    let listed = st.usage_plan_api_keys.as_ref().map(Vec::len);
                    if keys == 0 || listed == Some(0) {
                        warn(
                            format!("{p}.usage_plan_id"),
                            format!(
                                "methods of stage `{}` require an API key but no key is accepted on it: they refuse every request (403)",
                                st.name
                            ),
                        );
                    }
                }
            }
        }
        // IP restriction without an access control denies everyone.
        if st.ip_restriction_enabled
            && !private
            && !s
                .access_controls
                .iter()
                .any(|ac| connected(&ac.connected_stages))
        {
            warn(
                format!("{p}.ip_restriction_enabled"),
                format!(
                    "no access control is connected to stage `{}`: every client is refused (403, \"all deny\")",
                    st.name
                ),
            );
        }
        if st.cors_enabled && st.allow_origins.is_empty() {
            warn(
                format!("{p}.allow_origins"),
                "cors_enabled with no allowed origin: every preflight is refused".into(),
            );
        }
    }
    // Connections naming stages the snapshot does not have are ignored (account-level
    // objects may name other APIs' stages), but a name with different case is likely a typo.
    let stage_names: HashSet<&str> = s.stages.iter().map(|st| st.name.as_str()).collect();
    for (i, a) in s.auths.iter().enumerate() {
        for name in split_list(&a.connected_stages) {
            if !stage_names.contains(name)
                && stage_names.iter().any(|n| n.eq_ignore_ascii_case(name))
            {
                warn(
                    format!("auths[{i}].connected_stages"),
                    format!("`{name}` is not a stage of this API (stage names are case-sensitive)"),
                );
            }
        }
    }
    out
}
