//! Deployment snapshots: parse raw → validate → compile. The compiled [`CompiledApi`] is
//! what the request path reads; the raw model never is.

pub mod compile;
pub mod model;
pub mod validate;
pub mod warnings;

use std::path::Path;

pub use compile::{CompiledApi, CompiledDeployment, CompiledStage, Integration, MethodRoute};
pub use model::Snapshot;

/// One problem in a snapshot: the JSON path of the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Parses a snapshot document; a type error carries the JSON path of the field.
pub fn parse(bytes: &[u8]) -> Result<Snapshot, Issue> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            // Not JSON: there is no field path, only a place in the text.
            let text = inner.to_string();
            let what = text.split(" at line ").next().unwrap_or(&text);
            return Issue {
                path: format!("line {}, column {}", inner.line(), inner.column()),
                message: format!("invalid JSON: {what}"),
            };
        }
        Issue {
            path: if path == "." || path == "?" {
                String::new()
            } else {
                path
            },
            message: inner.to_string(),
        }
    })
}

/// Parses, validates and compiles one document.
pub fn build(bytes: &[u8]) -> Result<CompiledApi, Vec<Issue>> {
    let snapshot = parse(bytes).map_err(|e| vec![e])?;
    validate::validate(&snapshot)?;
    compile::compile(snapshot)
}

/// Reads and builds one snapshot file.
pub fn build_file(path: &Path) -> Result<CompiledApi, Vec<Issue>> {
    build(&read(path)?)
}

fn read(path: &Path) -> Result<Vec<u8>, Vec<Issue>> {
    std::fs::read(path).map_err(|e| {
        vec![Issue {
            path: String::new(),
            message: format!("cannot read: {e}"),
        }]
    })
}

/// Parses, validates and compiles one document, with the warnings of its settings (never
/// an error by themselves).
pub fn check(bytes: &[u8]) -> Result<(CompiledApi, Vec<Issue>), Vec<Issue>> {
    let snapshot = parse(bytes).map_err(|e| vec![e])?;
    validate::validate(&snapshot)?;
    let warnings = warnings::warnings(&snapshot);
    Ok((compile::compile(snapshot)?, warnings))
}

/// Checks one snapshot file as `validate` does.
pub fn check_file(path: &Path) -> Result<(CompiledApi, Vec<Issue>), Vec<Issue>> {
    check(&read(path)?)
}

/// Logs the warnings of a snapshot being loaded (one line each, naming the file or API).
pub fn log_warnings(source: &str, warnings: &[Issue]) {
    for w in warnings {
        tracing::warn!(source, path = %w.path, "snapshot warning: {}", w.message);
    }
}

/// The snapshot files of a directory (`*.json`, sorted by name so load order is stable).
pub fn snapshot_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}
