//! Complete validation of a parsed snapshot. Every rule of `snapshot.md` is checked here and
//! every problem is reported (not only the first), each with the JSON path of the field.
//! Compilation (`compile.rs`) relies on these rules having held.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;

use super::model::*;
use super::Issue;

pub const FORMAT: &str = "scp-apigw.snapshot/v1";
pub const MAX_RESOURCES: usize = 300;
pub const MAX_DEPTH: usize = 30;
pub const MAX_ACL_ENTRIES: usize = 100;
pub const MAX_ENDPOINT_URL: usize = 500;
pub const TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 50..=300_000;
pub const LIMIT_RANGE: std::ops::RangeInclusive<u64> = 1..=2_000_000_000;

#[derive(Default)]
struct Issues(Vec<Issue>);

impl Issues {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Issue {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// One segment of a resource path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment<'a> {
    Literal(&'a str),
    Param(&'a str),
    Greedy(&'a str),
}

fn is_name(s: &str, max_middle: usize) -> bool {
    let b = s.as_bytes();
    b.len() >= 3
        && b.len() <= max_middle + 2
        && b[0].is_ascii_lowercase()
        && b[1..b.len() - 1]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
}

/// Parses one `path_part`: a literal `[a-z][a-z0-9-]{1,48}[a-z0-9]`, `{name}` or `{name+}`
/// with name `[a-z][a-z0-9-]{1,46}[a-z0-9]`.
pub fn parse_segment(part: &str) -> Result<Segment<'_>, String> {
    if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
        let (name, greedy) = match inner.strip_suffix('+') {
            Some(n) => (n, true),
            None => (inner, false),
        };
        if !is_name(name, 46) {
            return Err(format!(
                "parameter name `{name}` must match [a-z][a-z0-9-]{{1,46}}[a-z0-9]"
            ));
        }
        return Ok(if greedy {
            Segment::Greedy(name)
        } else {
            Segment::Param(name)
        });
    }
    if is_name(part, 48) {
        Ok(Segment::Literal(part))
    } else {
        Err(format!(
            "`{part}` is neither a literal matching [a-z][a-z0-9-]{{1,48}}[a-z0-9] nor a parameter {{name}} / {{name+}}"
        ))
    }
}

/// The segments of a full resource path (`/` → none).
pub fn path_segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// A `{name}` / `{name+}` placeholder: name, greedy, byte range in the URL.
pub type Placeholder<'a> = (&'a str, bool, std::ops::Range<usize>);

/// Placeholders in an endpoint URL, in order.
pub fn placeholders(url: &str) -> Result<Vec<Placeholder<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = 0;
    while let Some(open) = url[rest..].find('{').map(|i| i + rest) {
        let close = url[open..]
            .find('}')
            .map(|i| i + open)
            .ok_or_else(|| format!("unclosed `{{` at byte {open}"))?;
        let inner = &url[open + 1..close];
        if inner.contains('{') {
            return Err(format!("nested `{{` at byte {open}"));
        }
        let (name, greedy) = match inner.strip_suffix('+') {
            Some(n) => (n, true),
            None => (inner, false),
        };
        out.push((name, greedy, open..close + 1));
        rest = close + 1;
    }
    if url[rest..].contains('}') {
        return Err("unmatched `}`".to_owned());
    }
    Ok(out)
}

/// Checks an absolute `http(s)` URL; `{…}` placeholders are allowed in the path only.
fn check_url(url: &str, max_len: usize) -> Result<http::Uri, String> {
    if url.len() > max_len {
        return Err(format!("longer than {max_len} characters"));
    }
    let uri: http::Uri = url
        .replace(['{', '}', '+'], "x")
        .parse()
        .map_err(|e| format!("not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must be an absolute http:// or https:// URL".to_owned()),
    }
    let Some(authority) = uri.authority() else {
        return Err("has no host".to_owned());
    };
    if authority.as_str().contains('@') {
        return Err("must not carry user information".to_owned());
    }
    let path_start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let authority_end = url[path_start..]
        .find(['/', '?', '#'])
        .map(|i| i + path_start)
        .unwrap_or(url.len());
    if url[..authority_end].contains(['{', '}']) {
        return Err(
            "placeholders are allowed in the path only, not in the scheme or host".to_owned(),
        );
    }
    if let Some(q) = url.find('?') {
        if url[q..].contains(['{', '}']) {
            return Err("placeholders are allowed in the path only, not in the query".to_owned());
        }
    }
    if url.contains('#') {
        return Err("must not contain a fragment".to_owned());
    }
    Ok(uri)
}

fn check_throttle(issues: &mut Issues, path: &str, t: &Throttle) {
    if !(t.rate_per_second.is_finite() && t.rate_per_second > 0.0) {
        issues.push(
            format!("{path}.rate_per_second"),
            "must be a positive number",
        );
    }
    if t.burst == 0 {
        issues.push(format!("{path}.burst"), "must be at least 1");
    }
}

/// Splits comma-joined list entries (`"dev,stg"`) and trims them.
pub fn split_list(entries: &[String]) -> impl Iterator<Item = &str> {
    entries
        .iter()
        .flat_map(|e| e.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Normalises a host name for matching: lowercase, no trailing dot, no port.
pub fn normalize_host(host: &str) -> String {
    let h = host.trim();
    let h = if let Some(rest) = h.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else if h.matches(':').count() == 1 {
        h.split(':').next().unwrap_or(h)
    } else {
        h
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("empty host name".to_owned());
    }
    if host.len() > 253 {
        return Err("host name longer than 253 characters".to_owned());
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{host}` is not a valid host name (no port, no scheme)"
        ))
    }
}

fn is_stage_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

/// Validates a whole snapshot. `Ok` means every rule of `snapshot.md` holds.
pub fn validate(s: &Snapshot) -> Result<(), Vec<Issue>> {
    let mut issues = Issues::default();
    if s.format != FORMAT {
        issues.push(
            "format",
            format!("unknown format `{}`, expected `{FORMAT}`", s.format),
        );
    }
    if s.revision < 1 {
        issues.push("revision", "must be at least 1");
    }
    check_api(&mut issues, &s.api);

    let functions: HashSet<&str> = s.functions.iter().map(|f| f.function_id.as_str()).collect();
    let endpoints: HashSet<&str> = s
        .privatelink_endpoints
        .iter()
        .map(|e| e.id.as_str())
        .collect();
    let mut deployment_ids = HashSet::new();
    for (d, dep) in s.deployments.iter().enumerate() {
        let p = format!("deployments[{d}]");
        if dep.deployment_id.is_empty() {
            issues.push(format!("{p}.deployment_id"), "must not be empty");
        } else if !deployment_ids.insert(dep.deployment_id.as_str()) {
            issues.push(
                format!("{p}.deployment_id"),
                format!("duplicate deployment id `{}`", dep.deployment_id),
            );
        }
        check_resources(&mut issues, &p, &dep.resources, &functions, &endpoints);
    }

    let plans: HashMap<&str, &UsagePlan> =
        s.usage_plans.iter().map(|u| (u.id.as_str(), u)).collect();
    let mut stage_names = HashSet::new();
    for (i, st) in s.stages.iter().enumerate() {
        let p = format!("stages[{i}]");
        if !is_stage_name(&st.name) {
            issues.push(
                format!("{p}.name"),
                "must be a non-empty path segment of letters, digits, `-`, `_`, `.` or `~`",
            );
        } else if !stage_names.insert(st.name.as_str()) {
            issues.push(
                format!("{p}.name"),
                format!("duplicate stage name `{}`", st.name),
            );
        }
        if !deployment_ids.contains(st.deployment_id.as_str()) {
            issues.push(
                format!("{p}.deployment_id"),
                format!("no deployment with id `{}`", st.deployment_id),
            );
        }
        if let Some(c) = &st.canary {
            if !deployment_ids.contains(c.deployment_id.as_str()) {
                issues.push(
                    format!("{p}.canary.deployment_id"),
                    format!("no deployment with id `{}`", c.deployment_id),
                );
            }
            if !(c.percent.is_finite() && (0.0..=100.0).contains(&c.percent)) {
                issues.push(format!("{p}.canary.percent"), "must be between 0 and 100");
            }
        }
        if let Some(t) = st.integration_timeout_ms {
            if !TIMEOUT_MS_RANGE.contains(&t) {
                issues.push(
                    format!("{p}.integration_timeout_ms"),
                    format!("{t} is outside 50–300000"),
                );
            }
        }
        if let Some(t) = &st.throttle {
            check_throttle(&mut issues, &format!("{p}.throttle"), t);
        }
        if st.allow_credentials && st.allow_origins.iter().any(|o| o.trim() == "*") {
            issues.push(
                format!("{p}.allow_origins"),
                "`*` cannot be combined with allow_credentials: true",
            );
        }
        for (j, o) in st.allow_origins.iter().enumerate() {
            if o.trim() != "*" && !is_origin(o) {
                issues.push(
                    format!("{p}.allow_origins[{j}]"),
                    format!("`{o}` is not an origin (scheme://host[:port])"),
                );
            }
        }
        for (j, m) in st.allow_methods.iter().enumerate() {
            if http::Method::from_bytes(m.trim().as_bytes()).is_err() {
                issues.push(
                    format!("{p}.allow_methods[{j}]"),
                    format!("`{m}` is not an HTTP method"),
                );
            }
        }
        for (field, list) in [
            ("allow_headers", &st.allow_headers),
            ("expose_headers", &st.expose_headers),
        ] {
            for (j, h) in list.iter().enumerate() {
                if h.trim() != "*" && http::HeaderName::from_bytes(h.trim().as_bytes()).is_err() {
                    issues.push(
                        format!("{p}.{field}[{j}]"),
                        format!("`{h}` is not a header name"),
                    );
                }
            }
        }
        let plan = match st.usage_plan_id.as_deref() {
            None | Some("") => None,
            Some(id) => match plans.get(id) {
                Some(plan) => Some(*plan),
                None => {
                    issues.push(
                        format!("{p}.usage_plan_id"),
                        format!("no usage plan with id `{id}`"),
                    );
                    None
                }
            },
        };
        if let Some(keys) = &st.usage_plan_api_keys {
            for (j, k) in keys.iter().enumerate() {
                let known = plan.is_some_and(|pl| pl.api_keys.iter().any(|pk| pk.id == k.id));
                if !known {
                    issues.push(
                        format!("{p}.usage_plan_api_keys[{j}].id"),
                        format!("key `{}` is not a key of the stage's usage plan", k.id),
                    );
                }
            }
        }
    }

    let mut ac_of_stage: HashMap<&str, usize> = HashMap::new();
    for (i, ac) in s.access_controls.iter().enumerate() {
        let p = format!("access_controls[{i}]");
        let entries: Vec<&str> = split_list(&ac.allowed_ip_addr).collect();
        if entries.len() > MAX_ACL_ENTRIES {
            issues.push(
                format!("{p}.allowed_ip_addr"),
                format!(
                    "{} entries, at most {MAX_ACL_ENTRIES} allowed",
                    entries.len()
                ),
            );
        }
        for (j, raw) in ac.allowed_ip_addr.iter().enumerate() {
            for e in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                if let Err(m) = crate::config::parse_net(e) {
                    issues.push(format!("{p}.allowed_ip_addr[{j}]"), m);
                }
            }
        }
        for stage in split_list(&ac.connected_stages) {
            if let Some(prev) = ac_of_stage.insert(stage, i) {
                if prev != i && stage_names.contains(stage) {
                    issues.push(
                        format!("{p}.connected_stages"),
                        format!("stage `{stage}` is already connected to access_controls[{prev}]; a stage has at most one access control"),
                    );
                }
            }
        }
    }

    let mut auth_ids = HashSet::new();
    for (i, a) in s.auths.iter().enumerate() {
        let p = format!("auths[{i}]");
        if !auth_ids.insert(a.id.as_str()) {
            issues.push(format!("{p}.id"), format!("duplicate auth id `{}`", a.id));
        }
        if let Some(t) = &a.expired_at {
            if time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .is_err()
            {
                issues.push(format!("{p}.expired_at"), "not an RFC 3339 date-time");
            }
        }
        check_verification(&mut issues, &format!("{p}.verification"), &a.verification);
    }

    let mut plan_ids = HashSet::new();
    for (i, u) in s.usage_plans.iter().enumerate() {
        let p = format!("usage_plans[{i}]");
        if !plan_ids.insert(u.id.as_str()) {
            issues.push(
                format!("{p}.id"),
                format!("duplicate usage plan id `{}`", u.id),
            );
        }
        if !LIMIT_RANGE.contains(&u.limit) {
            issues.push(format!("{p}.limit"), "must be between 1 and 2000000000");
        }
        if let Some(t) = &u.throttle {
            check_throttle(&mut issues, &format!("{p}.throttle"), t);
        }
        let mut key_ids = HashSet::new();
        // Every secret of the plan, to refuse one used twice (within a key or across keys:
        // a request could not say which key it is).
        let mut secrets: HashMap<[u8; 32], String> = HashMap::new();
        for (j, k) in u.api_keys.iter().enumerate() {
            let kp = format!("{p}.api_keys[{j}]");
            if !key_ids.insert(k.id.as_str()) {
                issues.push(format!("{kp}.id"), format!("duplicate key id `{}`", k.id));
            }
            for (plain, hex, plain_name, hex_name, required) in [
                (&k.key, &k.key_sha256, "key", "key_sha256", true),
                (
                    &k.secondary_key,
                    &k.secondary_key_sha256,
                    "secondary_key",
                    "secondary_key_sha256",
                    false,
                ),
            ] {
                let digest = match (plain, hex) {
                    (Some(_), Some(_)) => {
                        issues.push(
                            kp.clone(),
                            format!("give either `{plain_name}` or `{hex_name}`, not both"),
                        );
                        None
                    }
                    (None, None) => {
                        if required {
                            issues.push(kp.clone(), "needs `key` or `key_sha256`");
                        }
                        None
                    }
                    (Some(v), None) if v.is_empty() => {
                        issues.push(format!("{kp}.{plain_name}"), "must not be empty");
                        None
                    }
                    (Some(v), None) => Some(crate::snapshot::model::sha256(v.as_bytes())),
                    (None, Some(h)) => {
                        let d = crate::snapshot::model::hex32(h);
                        if d.is_none() {
                            issues.push(
                                format!("{kp}.{hex_name}"),
                                "must be 64 lowercase hex digits (make one with `scp-gateway key-hash`)",
                            );
                        }
                        d
                    }
                };
                let Some(d) = digest else { continue };
                let field = format!(
                    "{kp}.{}",
                    if plain.is_some() {
                        plain_name
                    } else {
                        hex_name
                    }
                );
                if let Some(first) = secrets.insert(d, field.clone()) {
                    issues.push(
                        field,
                        format!(
                            "the same secret as {first}: every secret of a usage plan must differ"
                        ),
                    );
                }
            }
        }
    }

    let mut fn_ids = HashSet::new();
    for (i, f) in s.functions.iter().enumerate() {
        let p = format!("functions[{i}]");
        if !fn_ids.insert(f.function_id.as_str()) {
            issues.push(
                format!("{p}.function_id"),
                format!("duplicate function id `{}`", f.function_id),
            );
        }
        if let Err(m) = check_url(&f.invoke_url, 2048) {
            issues.push(format!("{p}.invoke_url"), m);
        } else if f.invoke_url.contains(['{', '}']) {
            issues.push(format!("{p}.invoke_url"), "must not contain placeholders");
        }
    }
    let mut pl_ids = HashSet::new();
    for (i, e) in s.privatelink_endpoints.iter().enumerate() {
        let p = format!("privatelink_endpoints[{i}]");
        if !pl_ids.insert(e.id.as_str()) {
            issues.push(
                format!("{p}.id"),
                format!("duplicate endpoint id `{}`", e.id),
            );
        }
        if parse_target(&e.target).is_none() {
            issues.push(
                format!("{p}.target"),
                format!("`{}` is not host:port", e.target),
            );
        }
    }
    if let Some(policy) = &s.resource_policy {
        check_policy(&mut issues, policy);
    }

    if issues.0.is_empty() {
        Ok(())
    } else {
        Err(issues.0)
    }
}

/// `host:port` of a PrivateLink target.
pub fn parse_target(t: &str) -> Option<(String, u16)> {
    let (host, port) = t.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host.to_owned(), port))
}

/// An origin is `scheme://host[:port]` with nothing after it.
pub fn is_origin(o: &str) -> bool {
    let Ok(uri) = o.parse::<http::Uri>() else {
        return false;
    };
    uri.scheme().is_some()
        && uri.authority().is_some()
        && (uri.path() == "/" || uri.path().is_empty())
        && !o.ends_with('/')
        && uri.query().is_none()
}

fn check_api(issues: &mut Issues, api: &Api) {
    if api.id.is_empty() {
        issues.push("api.id", "must not be empty");
    } else if !api
        .id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        issues.push("api.id", "may contain only letters, digits, `-` and `_`");
    }
    if api.hosts.is_empty() {
        issues.push("api.hosts", "at least one host is needed");
    }
    let mut seen = HashSet::new();
    for (i, h) in api.hosts.iter().enumerate() {
        let n = normalize_host(h);
        if n != h.trim().trim_end_matches('.').to_ascii_lowercase() {
            issues.push(format!("api.hosts[{i}]"), "a host carries no port");
        } else if let Err(m) = check_host(&n) {
            issues.push(format!("api.hosts[{i}]"), m);
        } else if !seen.insert(n) {
            issues.push(format!("api.hosts[{i}]"), format!("duplicate host `{h}`"));
        }
    }
}

fn check_resources(
    issues: &mut Issues,
    p: &str,
    resources: &[Resource],
    functions: &HashSet<&str>,
    endpoints: &HashSet<&str>,
) {
    if resources.len() > MAX_RESOURCES {
        issues.push(
            format!("{p}.resources"),
            format!(
                "{} resources, at most {MAX_RESOURCES} allowed",
                resources.len()
            ),
        );
    }
    let by_id: HashMap<&str, usize> = resources
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut ids = HashSet::new();
    let mut paths: HashMap<&str, usize> = HashMap::new();
    let mut param_child: HashMap<&str, usize> = HashMap::new();
    let mut roots = 0;
    for (i, r) in resources.iter().enumerate() {
        let rp = format!("{p}.resources[{i}]");
        if r.id.is_empty() || !ids.insert(r.id.as_str()) {
            issues.push(
                format!("{rp}.id"),
                format!("empty or duplicate resource id `{}`", r.id),
            );
        }
        if let Some(prev) = paths.insert(r.path.as_str(), i) {
            issues.push(
                format!("{rp}.path"),
                format!("path `{}` is also {p}.resources[{prev}]", r.path),
            );
        }
        if r.parent_id.is_empty() {
            roots += 1;
            if r.path != "/" {
                issues.push(
                    format!("{rp}.path"),
                    "the root resource (empty parent_id) must have path `/`",
                );
            }
            if !r.path_part.is_empty() {
                issues.push(
                    format!("{rp}.path_part"),
                    "the root resource has an empty path_part",
                );
            }
        } else {
            match by_id.get(r.parent_id.as_str()) {
                None => issues.push(
                    format!("{rp}.parent_id"),
                    format!("no resource with id `{}`", r.parent_id),
                ),
                Some(&pi) => {
                    let parent = &resources[pi];
                    let expected = if parent.path == "/" {
                        format!("/{}", r.path_part)
                    } else {
                        format!("{}/{}", parent.path, r.path_part)
                    };
                    if r.path != expected {
                        issues.push(
                            format!("{rp}.path"),
                            format!("`{}` must equal the parent's path and path_part joined by `/` (`{expected}`)", r.path),
                        );
                    }
                    if path_segments(&parent.path)
                        .last()
                        .is_some_and(|s| s.ends_with("+}"))
                    {
                        issues.push(
                            format!("{rp}.parent_id"),
                            format!(
                                "parent `{}` ends in a greedy segment, which must be the last one",
                                parent.path
                            ),
                        );
                    }
                    match parse_segment(&r.path_part) {
                        Err(m) => issues.push(format!("{rp}.path_part"), m),
                        Ok(Segment::Literal(_)) => {}
                        Ok(Segment::Param(_) | Segment::Greedy(_)) => {
                            if let Some(other) = param_child.insert(r.parent_id.as_str(), i) {
                                issues.push(
                                    format!("{rp}.path_part"),
                                    format!(
                                        "conflicting parameter siblings `{}` and `{}`: a resource has at most one parameter child",
                                        resources[other].path, r.path
                                    ),
                                );
                            }
                        }
                    }
                }
            }
        }
        let depth = path_segments(&r.path).count() + 1;
        if depth > MAX_DEPTH {
            issues.push(
                format!("{rp}.path"),
                format!("depth {depth} exceeds {MAX_DEPTH}"),
            );
        }
        // Parameters of this resource, from its own path.
        let mut params: HashMap<&str, bool> = HashMap::new();
        for seg in path_segments(&r.path) {
            match parse_segment(seg) {
                Ok(Segment::Param(n)) => {
                    if params.insert(n, false).is_some() {
                        issues.push(
                            format!("{rp}.path"),
                            format!("parameter `{n}` appears twice"),
                        );
                    }
                }
                Ok(Segment::Greedy(n)) => {
                    if params.insert(n, true).is_some() {
                        issues.push(
                            format!("{rp}.path"),
                            format!("parameter `{n}` appears twice"),
                        );
                    }
                }
                Ok(Segment::Literal(_)) | Err(_) => {}
            }
        }
        check_methods(issues, &rp, r, &params, functions, endpoints);
    }
    if roots != 1 {
        issues.push(
            format!("{p}.resources"),
            format!(
                "exactly one root resource (parent_id \"\", path \"/\") is needed, found {roots}"
            ),
        );
    }
}

fn check_methods(
    issues: &mut Issues,
    rp: &str,
    r: &Resource,
    params: &HashMap<&str, bool>,
    functions: &HashSet<&str>,
    endpoints: &HashSet<&str>,
) {
    let mut seen = HashSet::new();
    for (j, m) in r.methods.iter().enumerate() {
        let mp = format!("{rp}.methods[{j}]");
        if !seen.insert(m.method_type) {
            issues.push(
                format!("{mp}.method_type"),
                format!(
                    "{} is defined twice on `{}`",
                    m.method_type.as_str(),
                    r.path
                ),
            );
        }
        let needs_url = match m.integration_type {
            IntegrationType::Http => true,
            IntegrationType::Scf => {
                match m.function_id.as_deref() {
                    None | Some("") => issues.push(
                        format!("{mp}.function_id"),
                        "an SCF integration needs function_id",
                    ),
                    Some(f) if !functions.contains(f) => issues.push(
                        format!("{mp}.function_id"),
                        format!("no function with id `{f}` in functions"),
                    ),
                    Some(_) => {}
                }
                false
            }
            IntegrationType::PrivateLink => {
                match m.privatelink_endpoint_id.as_deref() {
                    None | Some("") => issues.push(
                        format!("{mp}.privatelink_endpoint_id"),
                        "a PRIVATELINK integration needs privatelink_endpoint_id",
                    ),
                    Some(e) if !endpoints.contains(e) => issues.push(
                        format!("{mp}.privatelink_endpoint_id"),
                        format!("no endpoint with id `{e}` in privatelink_endpoints"),
                    ),
                    Some(_) => {}
                }
                true
            }
        };
        if needs_url {
            match m.endpoint_url.as_deref() {
                None | Some("") => issues.push(
                    format!("{mp}.endpoint_url"),
                    format!(
                        "a {} integration needs endpoint_url",
                        m.integration_type.as_str()
                    ),
                ),
                Some(url) => check_endpoint_url(issues, &format!("{mp}.endpoint_url"), url, params),
            }
        }
        for name in m.request_headers.keys() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                issues.push(
                    format!("{mp}.request_headers"),
                    format!("`{name}` is not a header name"),
                );
            }
        }
        for name in m.query_strings.keys() {
            if name.is_empty() {
                issues.push(format!("{mp}.query_strings"), "empty query string name");
            }
        }
    }
}

fn check_endpoint_url(issues: &mut Issues, path: &str, url: &str, params: &HashMap<&str, bool>) {
    if let Err(m) = check_url(url, MAX_ENDPOINT_URL) {
        issues.push(path, m);
        return;
    }
    match placeholders(url) {
        Err(m) => issues.push(path, m),
        Ok(list) => {
            for (name, greedy, _) in list {
                let shown = if greedy {
                    format!("{{{name}+}}")
                } else {
                    format!("{{{name}}}")
                };
                match params.get(name) {
                    None => {
                        issues.push(path, format!("placeholder {shown} names no path parameter"))
                    }
                    Some(false) if greedy => issues.push(
                        path,
                        format!("placeholder {shown} is greedy but path parameter `{name}` is not"),
                    ),
                    Some(_) => {}
                }
            }
        }
    }
}

fn check_verification(issues: &mut Issues, p: &str, v: &Verification) {
    use jsonwebtoken::DecodingKey;
    let shapes = [
        v.secret_base64.is_some(),
        v.public_key_pem.is_some(),
        v.jwks.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if shapes != 1 {
        issues.push(
            p,
            "needs exactly one of secret_base64, public_key_pem or jwks",
        );
        return;
    }
    if let Some(secret) = &v.secret_base64 {
        match v.alg {
            Some(a) if a.is_hmac() => {}
            _ => issues.push(
                format!("{p}.alg"),
                "secret_base64 needs alg HS256, HS384 or HS512",
            ),
        }
        match base64::engine::general_purpose::STANDARD.decode(secret.trim()) {
            Ok(b) if !b.is_empty() => {}
            _ => issues.push(format!("{p}.secret_base64"), "not non-empty base64"),
        }
    }
    if let Some(pem) = &v.public_key_pem {
        let key = match v.alg {
            None => {
                issues.push(format!("{p}.alg"), "public_key_pem needs alg");
                return;
            }
            Some(a) if a.is_hmac() => {
                issues.push(
                    format!("{p}.alg"),
                    "an HMAC algorithm needs secret_base64, not a public key",
                );
                return;
            }
            Some(JwtAlg::ES256 | JwtAlg::ES384) => DecodingKey::from_ec_pem(pem.as_bytes()),
            Some(JwtAlg::EdDSA) => DecodingKey::from_ed_pem(pem.as_bytes()),
            Some(_) => DecodingKey::from_rsa_pem(pem.as_bytes()),
        };
        if let Err(e) = key {
            issues.push(
                format!("{p}.public_key_pem"),
                format!("not a usable public key for the algorithm: {e}"),
            );
        }
    }
    if let Some(jwks) = &v.jwks {
        if jwks.keys.is_empty() {
            issues.push(format!("{p}.jwks.keys"), "at least one key is needed");
        }
        for (i, k) in jwks.keys.iter().enumerate() {
            if k.common.key_id.as_deref().unwrap_or("").is_empty() {
                issues.push(
                    format!("{p}.jwks.keys[{i}].kid"),
                    "every JWKS key needs a kid",
                );
            }
            if k.common.key_algorithm.is_none() {
                issues.push(
                    format!("{p}.jwks.keys[{i}].alg"),
                    "every JWKS key needs an alg",
                );
            }
            if let Err(e) = DecodingKey::from_jwk(k) {
                issues.push(
                    format!("{p}.jwks.keys[{i}]"),
                    format!("not a usable key: {e}"),
                );
            }
        }
    }
}

const POLICY_ACTIONS: [&str; 3] = ["apigateway:InvokeApigatewayRegion", "apigateway:*", "*"];
pub const SRN_KEY: &str = "scp:RequestAttribute/body['method-srn']";
pub const SOURCE_IP_KEY: &str = "scp:SourceIp";

/// True when a statement's `Action` list names the invoke action the data plane evaluates.
pub fn is_invoke_action(actions: &OneOrMany) -> bool {
    actions
        .as_slice()
        .iter()
        .any(|a| POLICY_ACTIONS.contains(&a.as_str()))
}

fn check_policy(issues: &mut Issues, policy: &ResourcePolicy) {
    for (i, st) in policy.statement.iter().enumerate() {
        let p = format!("resource_policy.Statement[{i}]");
        if let Principal::Wildcard(w) = &st.principal {
            if w != "*" {
                issues.push(
                    format!("{p}.Principal"),
                    "must be \"*\" or {\"scp\": [...]}",
                );
            }
        }
        if st.action.as_slice().is_empty() {
            issues.push(format!("{p}.Action"), "must name at least one action");
        }
        for (op, keys) in st.condition.iter().flatten() {
            let cp = format!("{p}.Condition.{op}");
            let expected_key = match op.as_str() {
                "SrnLike" | "SrnNotLike" => SRN_KEY,
                "IpAddress" | "NotIpAddress" => SOURCE_IP_KEY,
                _ => {
                    issues.push(
                        cp,
                        "unknown condition operator (SrnLike, SrnNotLike, IpAddress, NotIpAddress)",
                    );
                    continue;
                }
            };
            for (key, values) in keys {
                if key != expected_key {
                    issues.push(
                        cp.clone(),
                        format!("condition key `{key}` is not `{expected_key}`"),
                    );
                    continue;
                }
                if expected_key == SOURCE_IP_KEY {
                    for v in values.as_slice() {
                        if let Err(m) = crate::config::parse_net(v) {
                            issues.push(format!("{cp}.{key}"), m);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments() {
        assert_eq!(parse_segment("orders"), Ok(Segment::Literal("orders")));
        assert_eq!(parse_segment("{order-id}"), Ok(Segment::Param("order-id")));
        assert_eq!(parse_segment("{path+}"), Ok(Segment::Greedy("path")));
        assert!(parse_segment("Orders").is_err());
        assert!(parse_segment("a").is_err());
        assert!(parse_segment("{x}").is_err());
        assert!(parse_segment("ab-").is_err());
        assert!(parse_segment("{a/b}").is_err());
    }

    #[test]
    fn hosts_normalise() {
        assert_eq!(normalize_host("API.Example.com."), "api.example.com");
        assert_eq!(normalize_host("api.example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("::1"), "::1");
    }

    #[test]
    fn urls() {
        assert!(check_url("http://127.0.0.1:9000/a/{id}", 500).is_ok());
        assert!(check_url("ftp://x/a", 500).is_err());
        assert!(check_url("/relative", 500).is_err());
        assert!(check_url("http://{host}/a", 500).is_err());
        assert!(check_url("http://h/a?x={id}", 500).is_err());
        assert!(check_url("http://user@h/a", 500).is_err());
        let long = format!("http://h/{}", "a".repeat(500));
        assert!(check_url(&long, 500).is_err());
    }

    #[test]
    fn placeholder_scan() {
        let p = placeholders("http://h/a/{x}/b/{rest+}").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].0, p[0].1), ("x", false));
        assert_eq!((p[1].0, p[1].1), ("rest", true));
        assert!(placeholders("http://h/{x").is_err());
        assert!(placeholders("http://h/x}").is_err());
    }

    #[test]
    fn origins() {
        assert!(is_origin("https://app.example.com"));
        assert!(is_origin("http://localhost:3000"));
        assert!(!is_origin("https://app.example.com/"));
        assert!(!is_origin("app.example.com"));
        assert!(!is_origin("null"));
    }
}
