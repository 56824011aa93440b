//! The agent crate's layering rule, checked over its sources: a module
//! imports (`crate::` paths) only modules of its own layer or lower, and a
//! feature (layer 2) never imports another feature. ARCHITECTURE.md states
//! the rule; `.ci/run` runs this test first.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Module path prefix → layer (0 bottom, 3 top). The longest prefix wins.
const LAYERS: &[(&str, u8)] = &[
    ("api", 0),
    ("client", 0),
    ("clock", 0),
    ("container", 0),
    ("datadir", 0),
    ("driver", 0),
    ("facts", 0),
    ("hooks", 0),
    ("image", 0),
    ("metrics", 0),
    ("token", 0),
    ("transfer", 0),
    ("vm", 0),
    ("kinds", 0),
    ("gossip::codec", 0),
    ("gossip::handle", 0),
    ("gossip::identity", 0),
    ("gossip::news", 0),
    ("gossip::suspicion", 0),
    ("identity::duty", 0),
    ("instances::reconcile", 0),
    ("membership::plan", 0),
    ("migration::compat", 0),
    ("migration::plan", 0),
    ("placement", 0),
    ("hosts::plan", 0),
    ("hosts::rolling", 0),
    ("netdev", 0),
    ("network::routes", 0),
    ("node", 1),
    ("gossip", 2),
    ("identity", 2),
    ("instances", 2),
    ("membership", 2),
    ("migration", 2),
    ("hosts", 2),
    ("network", 2),
    ("exporter", 2),
    ("monitor", 2),
    ("run", 3),
    ("service", 3),
    ("", 3),
];

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .filter(|(prefix, _)| {
            prefix.is_empty() || module == *prefix || module.starts_with(&format!("{prefix}::"))
        })
        .max_by_key(|(prefix, _)| prefix.len())
        .map_or(3, |(_, layer)| *layer)
}

fn feature(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

/// Every source file as (module path, text).
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read agent/src") {
            let path: PathBuf = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            out.insert(parts.join("::"), text);
        }
    }
    out
}

/// The text before the first `#[cfg(test)]`: tests may import anything.
fn non_test(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap_or(text)
}

/// Every `crate::a::b` path in `text`, groups `crate::{a, b::c}` expanded.
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            out.extend(inner.split(',').map(|p| p.trim().to_string()));
        } else {
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(path.trim_end_matches(':').to_string());
        }
    }
    out
}

/// The longest known module that `path` names.
fn resolve<'a>(path: &str, known: &'a BTreeMap<String, String>) -> Option<&'a str> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find_map(|candidate| known.get_key_value(&candidate).map(|(k, _)| k.as_str()))
}

fn violations(known: &BTreeMap<String, String>) -> Vec<String> {
    let mut found = Vec::new();
    for (module, text) in known {
        for path in crate_paths(non_test(text)) {
            let Some(target) = resolve(&path, known) else {
                continue;
            };
            // A module may use its own parent's items and its children.
            if target == module
                || target.starts_with(&format!("{module}::"))
                || module.starts_with(&format!("{target}::"))
            {
                continue;
            }
            let (from, to) = (layer(module), layer(target));
            let other_feature = from == 2 && to == 2 && feature(module) != feature(target);
            if to > from || other_feature {
                found.push(format!(
                    "{module} (layer {from}) imports crate::{path} ({target}, layer {to})"
                ));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn every_module_imports_only_its_layer_or_lower_and_features_not_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    assert!(known.contains_key("node"), "agent/src/node not found");
    let found = violations(&known);
    assert!(
        found.is_empty(),
        "forbidden imports (see ARCHITECTURE.md, Layers):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_a_forbidden_import() {
    let mut known = BTreeMap::new();
    known.insert(
        "node".to_string(),
        "use crate::migration::engine;".to_string(),
    );
    known.insert("migration::engine".to_string(), String::new());
    known.insert(
        "instances::ops".to_string(),
        "use crate::{migration::engine, api};".to_string(),
    );
    known.insert("api".to_string(), String::new());
    known.insert(
        "migration::plan".to_string(),
        "use crate::node::Agent;".to_string(),
    );
    let found = violations(&known);
    assert_eq!(found.len(), 3, "{found:#?}");
}
