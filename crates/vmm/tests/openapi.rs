//! The OpenAPI document (`docs/api/openapi.json`) and the server agree on the routes: every
//! (method, path) the document has is in [`ROUTES`], the table the server dispatches on, and
//! every route is in the document. And the document holds together: each `$ref` resolves,
//! each path parameter is declared, each error answer is an `Error`, each request body refuses
//! unknown fields as the server does, and each operation that takes a body documents 400 and
//! 413.
//!
//! What the server *answers* on each route is checked live, against a running VMM, by
//! schemathesis (`.ci/api-fuzz.sh`) and by `crates/memvisor/tests/api_live.rs`.
#![cfg(target_arch = "x86_64")]

use std::collections::BTreeSet;
use std::path::PathBuf;

use memvisor_vmm::api::ROUTES;
use serde_json::Value;

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "patch", "head", "options", "trace"];

fn document() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/openapi.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every operation: (METHOD, path template, the operation object).
fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    let mut out = Vec::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is an object");
        for (key, op) in item {
            if METHODS.contains(&key.as_str()) {
                out.push((key.to_ascii_uppercase(), path.clone(), op));
            } else {
                assert_eq!(key, "parameters", "{path}: `{key}` is not an HTTP method");
            }
        }
    }
    out
}

/// The schema a local `$ref` (`#/components/schemas/X`) names.
fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("{reference}: only local references"));
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("{reference} names nothing"))
}

fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get("$ref") {
                out.push(r);
            }
            o.values().for_each(|v| refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn the_document_and_the_server_have_the_same_routes() {
    let doc = document();
    let documented: BTreeSet<(String, String)> = operations(&doc).into_iter().map(|(m, p, _)| (m, p)).collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_ascii_uppercase(), p.to_string()))
        .collect();
    assert_eq!(served.len(), ROUTES.len(), "ROUTES has a route twice");
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not in docs/api/openapi.json: {undocumented:?}; documented but not in ROUTES: {unserved:?}"
    );
    assert_eq!(documented.len(), 12, "the v1 API has twelve operations");
}

#[test]
fn every_reference_resolves_and_every_path_parameter_is_declared() {
    let doc = document();
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "an OpenAPI 3 document"
    );
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 20, "the schemas are shared through references");
    for r in all {
        resolve(&doc, r);
    }
    let mut ids = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let id = op["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no operationId"));
        assert!(ids.insert(id.to_string()), "operationId {id} twice");
        let templated: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        let declared: BTreeSet<&str> = op["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["in"] == "path")
                    .map(|p| {
                        assert_eq!(p["required"], true, "{method} {path}: a path parameter is required");
                        p["name"].as_str().unwrap()
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(templated, declared, "{method} {path}: path parameters");
    }
}

#[test]
fn errors_are_error_objects_and_bodies_refuse_unknown_fields() {
    let doc = document();
    let error = "#/components/schemas/Error";
    assert_eq!(resolve(&doc, error)["required"], serde_json::json!(["error"]));
    for (method, path, op) in operations(&doc) {
        let responses = op["responses"].as_object().unwrap();
        assert!(!responses.is_empty(), "{method} {path}: no responses");
        for (status, response) in responses {
            let code: u16 = status
                .parse()
                .unwrap_or_else(|_| panic!("{method} {path}: status {status} is not a number"));
            assert!(
                response["description"].is_string(),
                "{method} {path} {status}: no description"
            );
            let schema = &response["content"]["application/json"]["schema"]["$ref"];
            if (400..500).contains(&code) {
                assert_eq!(schema, error, "{method} {path} {status}: an error answer is an Error");
            }
            if code == 204 {
                assert!(response.get("content").is_none(), "{method} {path}: 204 has no body");
            }
        }
        if let Some(body) = op.get("requestBody") {
            let reference = body["content"]["application/json"]["schema"]["$ref"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}: the body's schema is a named schema"));
            let schema = resolve(&doc, reference);
            assert_eq!(schema["type"], "object", "{method} {path}: the body is an object");
            assert_eq!(
                schema["additionalProperties"], false,
                "{method} {path}: the server refuses unknown fields"
            );
            for status in ["400", "413"] {
                assert!(
                    responses.contains_key(status),
                    "{method} {path}: a body can get {status}"
                );
            }
        }
    }
}
