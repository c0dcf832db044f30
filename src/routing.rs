//! The route trie of one deployment: matchit behind our own route ids.
//!
//! Resource templates (`/orders/{order-id}`, `/files/{path+}`) are inserted with internal
//! parameter names (`{p0}`, `{*p1}`) so that no user-chosen name can collide with matchit's
//! syntax; the real names live in [`Route::param_names`]. matchit gives static segments
//! priority over parameters and parameters over catch-alls, and backtracks when a more
//! specific branch fails deeper down, which is exactly "static beats parameter beats greedy".

use std::sync::Arc;

use http::HeaderValue;
use smallvec::SmallVec;

use crate::snapshot::model::MethodType;
use crate::snapshot::validate::{parse_segment, path_segments, Segment};

/// Index of a route inside its [`RouteTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteId(u32);

impl RouteId {
    /// The route's position in its table (`0..len()`).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("`{path}`: {message}")]
    InvalidTemplate { path: String, message: String },
    #[error("`{path}` conflicts with `{with}`")]
    Conflict { path: String, with: String },
    #[error("`{path}`: {message}")]
    Rejected { path: String, message: String },
}

/// The methods of one resource. `ANY` serves every standard method not defined explicitly.
///
/// The methods a resource defines are stored once, densely, and found through a byte per
/// slot: a deployment holds one table per resource (300,000 in a fleet of 1,000 APIs ×
/// 300 resources), and a slot per method with the method inline (`[Option<M>; 8]`) cost
/// ~3 KB per resource, most of it empty slots.
#[derive(Debug)]
pub struct MethodTable<M> {
    /// Per slot of [`method_slot`] and then `ANY` (index 7): 1 + the index into `methods`,
    /// 0 when that slot has no method.
    slots: [u8; 8],
    methods: Box<[M]>,
    allow: HeaderValue,
}

/// The slot of `ANY` in [`MethodTable::slots`].
const ANY_SLOT: usize = 7;

const STANDARD: [MethodType; 7] = [
    MethodType::Get,
    MethodType::Post,
    MethodType::Put,
    MethodType::Delete,
    MethodType::Patch,
    MethodType::Head,
    MethodType::Options,
];

/// Slot of a request method in the table; `None` for methods no resource can define
/// (CONNECT, TRACE and extension methods are never forwarded).
pub fn method_slot(m: &http::Method) -> Option<usize> {
    Some(match *m {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::DELETE => 3,
        http::Method::PATCH => 4,
        http::Method::HEAD => 5,
        http::Method::OPTIONS => 6,
        _ => return None,
    })
}

impl<M> MethodTable<M> {
    /// Builds the table; a method type given twice keeps the first (validation rejects that).
    pub fn new(methods: impl IntoIterator<Item = (MethodType, M)>) -> Self {
        let mut slots = [0u8; 8];
        let mut kept = Vec::new();
        for (t, m) in methods {
            let i = match t {
                MethodType::Any => ANY_SLOT,
                other => STANDARD.iter().position(|s| *s == other).unwrap_or(0),
            };
            if slots[i] == 0 {
                kept.push(m);
                // At most 8 methods are kept: the index fits in a byte.
                slots[i] = kept.len() as u8;
            }
        }
        let any = slots[ANY_SLOT] != 0;
        let names: Vec<&str> = STANDARD
            .iter()
            .enumerate()
            .filter(|(i, _)| any || slots[*i] != 0)
            .map(|(_, t)| t.as_str())
            .collect();
        let allow =
            HeaderValue::from_str(&names.join(", ")).unwrap_or(HeaderValue::from_static(""));
        Self {
            slots,
            methods: kept.into_boxed_slice(),
            allow,
        }
    }

    /// The method of a slot, if one is defined there.
    #[inline]
    fn at(&self, slot: usize) -> Option<&M> {
        let i = usize::from(self.slots[slot]);
        i.checked_sub(1).and_then(|i| self.methods.get(i))
    }

    /// The method serving `m`: the explicit one, else `ANY`.
    pub fn get(&self, m: &http::Method) -> Option<&M> {
        let slot = method_slot(m)?;
        self.at(slot).or_else(|| self.at(ANY_SLOT))
    }

    /// The explicit method of a slot, not counting `ANY`.
    pub fn explicit(&self, m: &http::Method) -> Option<&M> {
        self.at(method_slot(m)?)
    }

    /// Value of the `Allow` header of a 405 (empty for a resource without methods).
    pub fn allow(&self) -> &HeaderValue {
        &self.allow
    }
}

#[derive(Debug)]
pub struct Route<M> {
    /// The resource template as in the snapshot (`/orders/{order-id}`).
    pub template: Arc<str>,
    /// The resource's last path part, `/` for the root.
    pub name: Arc<str>,
    pub param_names: Box<[Arc<str>]>,
    pub methods: MethodTable<M>,
}

/// Path parameter values as byte ranges into the matched path, in template order.
#[derive(Debug, Default, Clone)]
pub struct Params(SmallVec<[(u32, u32); 4]>);

impl Params {
    pub fn get<'p>(&self, path: &'p str, i: usize) -> Option<&'p str> {
        let (s, e) = *self.0.get(i)?;
        path.get(s as usize..e as usize)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug)]
pub struct RouteTable<M> {
    router: matchit::Router<RouteId>,
    routes: Vec<Route<M>>,
}

impl<M> Default for RouteTable<M> {
    fn default() -> Self {
        Self {
            router: matchit::Router::new(),
            routes: Vec::new(),
        }
    }
}

impl<M> RouteTable<M> {
    /// An empty table with room for `n` routes (a deployment's resource count).
    pub fn with_capacity(n: usize) -> Self {
        Self {
            router: matchit::Router::new(),
            routes: Vec::with_capacity(n),
        }
    }

    /// Adds a resource. The template must be a validated resource path.
    pub fn insert(
        &mut self,
        template: &str,
        methods: MethodTable<M>,
    ) -> Result<RouteId, RouteError> {
        let invalid = |message: String| RouteError::InvalidTemplate {
            path: template.to_owned(),
            message,
        };
        if !template.starts_with('/') {
            return Err(invalid("must start with `/`".to_owned()));
        }
        let mut internal = String::with_capacity(template.len());
        let mut names = Vec::new();
        let segments: Vec<&str> = path_segments(template).collect();
        for (i, seg) in segments.iter().enumerate() {
            internal.push('/');
            match parse_segment(seg).map_err(invalid)? {
                Segment::Literal(l) => internal.push_str(l),
                Segment::Param(n) => {
                    internal.push_str(&format!("{{p{}}}", names.len()));
                    names.push(Arc::<str>::from(n));
                }
                Segment::Greedy(n) => {
                    if i + 1 != segments.len() {
                        return Err(invalid(format!(
                            "greedy segment `{{{n}+}}` must be the last one"
                        )));
                    }
                    internal.push_str(&format!("{{*p{}}}", names.len()));
                    names.push(Arc::<str>::from(n));
                }
            }
        }
        if internal.is_empty() {
            internal.push('/');
        }
        let id = RouteId(self.routes.len() as u32);
        if let Err(e) = self.router.insert(internal, id) {
            return Err(match e {
                matchit::InsertError::Conflict { with } => RouteError::Conflict {
                    path: template.to_owned(),
                    with: self.template_of_internal(&with),
                },
                // matchit's error enum is non_exhaustive: every other variant is a template
                // matchit cannot take, reported with matchit's own words.
                other => RouteError::Rejected {
                    path: template.to_owned(),
                    message: other.to_string(),
                },
            });
        }
        let name: Arc<str> = Arc::from(segments.last().copied().unwrap_or("/"));
        self.routes.push(Route {
            template: Arc::from(template),
            name,
            param_names: names.into_boxed_slice(),
            methods,
        });
        Ok(id)
    }

    /// Maps an internal matchit route back to the user's template for error messages.
    fn template_of_internal(&self, internal: &str) -> String {
        let found = self.routes.iter().find(|r| {
            let mut i = 0;
            let rebuilt: String = path_segments(&r.template)
                .map(|s| match parse_segment(s) {
                    Ok(Segment::Param(_)) => {
                        i += 1;
                        format!("/{{p{}}}", i - 1)
                    }
                    Ok(Segment::Greedy(_)) => {
                        i += 1;
                        format!("/{{*p{}}}", i - 1)
                    }
                    _ => format!("/{s}"),
                })
                .collect();
            rebuilt == internal || (rebuilt.is_empty() && internal == "/")
        });
        found
            .map(|r| r.template.to_string())
            .unwrap_or_else(|| internal.to_owned())
    }

    /// Finds the resource for a normalised resource path (`/` for the root).
    pub fn find(&self, path: &str) -> Option<(RouteId, Params)> {
        let m = self.router.at(path).ok()?;
        let base = path.as_ptr() as usize;
        let mut params = Params::default();
        for (key, value) in m.params.iter() {
            // Values are sub-slices of `path`, so their offsets are well defined.
            let start = value.as_ptr() as usize - base;
            let idx: usize = key
                .trim_start_matches(['p', '*'])
                .parse()
                .unwrap_or(params.0.len());
            if idx != params.0.len() {
                return None;
            }
            params.0.push((start as u32, (start + value.len()) as u32));
        }
        Some((*m.value, params))
    }

    pub fn route(&self, id: RouteId) -> &Route<M> {
        &self.routes[id.0 as usize]
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(paths: &[&str]) -> RouteTable<&'static str> {
        let mut t = RouteTable::default();
        for p in paths {
            t.insert(p, MethodTable::new([(MethodType::Get, "get")]))
                .unwrap();
        }
        t
    }

    fn hit<'a>(t: &'a RouteTable<&'static str>, path: &str) -> Option<&'a str> {
        t.find(path).map(|(id, _)| &*t.route(id).template)
    }

    #[test]
    fn static_beats_param_beats_greedy() {
        let t = table(&[
            "/",
            "/orders",
            "/orders/{order-id}",
            "/orders/latest",
            "/files/{path+}",
            "/files/readme",
        ]);
        assert_eq!(hit(&t, "/"), Some("/"));
        assert_eq!(hit(&t, "/orders/latest"), Some("/orders/latest"));
        assert_eq!(hit(&t, "/orders/42"), Some("/orders/{order-id}"));
        assert_eq!(hit(&t, "/files/readme"), Some("/files/readme"));
        assert_eq!(hit(&t, "/files/a/b/c"), Some("/files/{path+}"));
        assert_eq!(hit(&t, "/nope"), None);
        assert_eq!(hit(&t, "/orders/42/x"), None);
    }

    #[test]
    fn backtracks_from_static_to_param() {
        let t = table(&["/aaa/bbb/ccc", "/aaa/{xid}/ddd"]);
        assert_eq!(hit(&t, "/aaa/bbb/ddd"), Some("/aaa/{xid}/ddd"));
        assert_eq!(hit(&t, "/aaa/bbb/ccc"), Some("/aaa/bbb/ccc"));
    }

    #[test]
    fn params_are_ranges_into_the_path() {
        let t = table(&["/orders/{order-id}/items/{rest+}"]);
        let path = "/orders/42/items/a/b";
        let (id, params) = t.find(path).unwrap();
        let r = t.route(id);
        assert_eq!(&*r.param_names[0], "order-id");
        assert_eq!(params.get(path, 0), Some("42"));
        assert_eq!(&*r.param_names[1], "rest");
        assert_eq!(params.get(path, 1), Some("a/b"));
    }

    #[test]
    fn greedy_needs_one_segment() {
        let t = table(&["/files/{path+}"]);
        assert_eq!(hit(&t, "/files"), None);
        assert_eq!(hit(&t, "/files/x"), Some("/files/{path+}"));
    }

    #[test]
    fn conflicts_name_both_templates() {
        let mut t = table(&["/aaa/{xx1}"]);
        let e = t.insert("/aaa/{yy1}", MethodTable::new([])).unwrap_err();
        assert_eq!(
            e,
            RouteError::Conflict {
                path: "/aaa/{yy1}".into(),
                with: "/aaa/{xx1}".into()
            }
        );
        assert!(matches!(
            t.insert("/bbb/{xxx+}/ccc", MethodTable::new([])),
            Err(RouteError::InvalidTemplate { .. })
        ));
    }

    #[test]
    fn method_table_any_and_allow() {
        let m = MethodTable::new([(MethodType::Get, 1), (MethodType::Any, 2)]);
        assert_eq!(m.get(&http::Method::GET), Some(&1));
        assert_eq!(m.get(&http::Method::DELETE), Some(&2));
        assert_eq!(m.get(&http::Method::TRACE), None);
        assert_eq!(m.explicit(&http::Method::OPTIONS), None);
        assert_eq!(m.allow(), "GET, POST, PUT, DELETE, PATCH, HEAD, OPTIONS");
        let m = MethodTable::new([(MethodType::Post, 1), (MethodType::Get, 2)]);
        assert_eq!(m.allow(), "GET, POST");
        assert_eq!(m.get(&http::Method::PUT), None);
        let m: MethodTable<u8> = MethodTable::new([]);
        assert_eq!(m.allow(), "");
    }

    #[test]
    fn every_method_finds_its_own_entry_in_any_order() {
        use http::Method;
        let defined = [
            (MethodType::Options, "options"),
            (MethodType::Any, "any"),
            (MethodType::Head, "head"),
            (MethodType::Patch, "patch"),
            (MethodType::Delete, "delete"),
            (MethodType::Put, "put"),
            (MethodType::Post, "post"),
            (MethodType::Get, "get"),
            // Given twice: the first one is kept.
            (MethodType::Get, "second get"),
        ];
        let m = MethodTable::new(defined);
        for (method, want) in [
            (Method::GET, "get"),
            (Method::POST, "post"),
            (Method::PUT, "put"),
            (Method::DELETE, "delete"),
            (Method::PATCH, "patch"),
            (Method::HEAD, "head"),
            (Method::OPTIONS, "options"),
        ] {
            assert_eq!(m.get(&method), Some(&want), "{method}");
            assert_eq!(m.explicit(&method), Some(&want), "{method}");
        }
        assert_eq!(m.get(&Method::CONNECT), None);
        // Only ANY: every standard method gets it, none has an explicit entry.
        let m = MethodTable::new([(MethodType::Any, "any")]);
        assert_eq!(m.get(&Method::PATCH), Some(&"any"));
        assert_eq!(m.explicit(&Method::PATCH), None);
    }
}
