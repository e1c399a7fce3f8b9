//! `apiextensions.k8s.io/v1` CustomResourceDefinitions: a read-only view of those of
//! Portway's kinds, which are built in. get and list (Tables: NAME, CREATED AT); writes
//! answer 405.

use std::sync::LazyLock;

use axum::extract::Request;
use axum::response::Response;
use http::{Method, StatusCode, header};
use ring::digest;
use serde_json::{Value, json};

use super::{header_str, json_response};
use crate::app::{App, flag, parse_query};
use crate::error::{ApiError, Result};
use crate::selector::{FieldSelector, LabelSelector};
use crate::table::{self, Include};
use crate::write;

const GROUP: &str = "apiextensions.k8s.io";
const PLURAL: &str = "customresourcedefinitions";
const KEY: &str = "customresourcedefinitions.apiextensions.k8s.io";

/// The CRDs as JSON, before what depends on the running server is added.
static CRDS: LazyLock<Vec<Value>> = LazyLock::new(|| {
    portway_api::all_crds()
        .into_iter()
        .filter_map(|crd| serde_json::to_value(crd).ok())
        .collect()
});

/// Answers a request under `/apis/apiextensions.k8s.io/v1/customresourcedefinitions`;
/// `rest` is the path after that.
pub(super) fn serve(app: &App, req: &Request, rest: &[&str]) -> Result<Response> {
    let q = parse_query(req.uri().query());
    let accept = header_str(req.headers(), header::ACCEPT);
    let include = Include::parse(q.get("includeObject").map(String::as_str));
    let rv = app.store.revision().to_string();
    let as_table = |items: &[Value]| {
        let rows = items.iter().map(|crd| row(crd, include)).collect();
        let table = table::assemble(Some(columns()), rows, &rv, None);
        json_response(StatusCode::OK, &table)
    };
    match (req.method(), rest) {
        (&Method::GET, []) if flag(&q, "watch") => Err(ApiError::method_not_allowed(format!(
            "watch is not supported on {KEY}: Portway's CustomResourceDefinitions are built in and never change while it runs"
        ))),
        (&Method::GET, []) => {
            let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
            let label = LabelSelector::parse(get("labelSelector"))?;
            let field = FieldSelector::parse_for(get("fieldSelector"), KEY, &[])?;
            let items: Vec<Value> = served(&app.started)
                .filter(|crd| label.matches(crd) && field.matches(crd))
                .collect();
            if table::wants_table(accept) {
                return Ok(as_table(&items));
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "kind": "CustomResourceDefinitionList", "apiVersion": "apiextensions.k8s.io/v1",
                    "metadata": {"resourceVersion": rv}, "items": items,
                }),
            ))
        }
        (&Method::GET, [name]) => {
            let crd = served(&app.started)
                .find(|crd| crd["metadata"]["name"] == *name)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{KEY} \"{name}\" not found"),
                    )
                    .with_details_raw(GROUP, PLURAL, name)
                })?;
            if table::wants_table(accept) {
                return Ok(as_table(&[crd]));
            }
            Ok(json_response(StatusCode::OK, &crd))
        }
        (&Method::GET, _) => Err(ApiError::path_not_found()),
        (method, [] | [_] | [_, "status"]) => {
            let mut e = ApiError::method_not_allowed(format!(
                "{method} is not allowed on {KEY}: Portway's CustomResourceDefinitions are built in and cannot be created, changed or deleted"
            ));
            if let Some(name) = rest.first() {
                e = e.with_details_raw(GROUP, PLURAL, name);
            }
            Err(e)
        }
        _ => Err(ApiError::path_not_found()),
    }
}

/// The CRDs as kube-apiserver shows them once established, dated `created`.
fn served(created: &str) -> impl Iterator<Item = Value> {
    CRDS.iter().map(move |crd| {
        let mut crd = crd.clone();
        let name = crd["metadata"]["name"].as_str().unwrap_or_default();
        // The same uid on every start: it names the definition, which only the name
        // identifies.
        let hash = digest::digest(&digest::SHA256, name.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hash.as_ref()[..16]);
        crd["metadata"]["uid"] = json!(write::uuid(bytes, 8));
        crd["metadata"]["creationTimestamp"] = json!(created);
        crd["metadata"]["generation"] = json!(1);
        let stored: Vec<Value> = crd["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["storage"] == true)
            .map(|v| v["name"].clone())
            .collect();
        let condition = |type_: &str, reason: &str, message: &str| {
            json!({"type": type_, "status": "True", "lastTransitionTime": created, "reason": reason, "message": message})
        };
        crd["status"] = json!({
            "conditions": [
                condition("NamesAccepted", "NoConflicts", "no conflicts found"),
                condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
            ],
            "acceptedNames": crd["spec"]["names"],
            "storedVersions": stored,
        });
        crd
    })
}

/// kube-apiserver's columns for CRDs: the creation time itself, not an age.
fn columns() -> Value {
    json!([
        table::name_column(),
        {"name": "Created At", "type": "date", "format": "", "priority": 0,
         "description": "CreationTimestamp is a timestamp representing the server time when this object was created."},
    ])
}

fn row(crd: &Value, include: Include) -> Value {
    let cells = vec![
        crd["metadata"]["name"].clone(),
        crd["metadata"]["creationTimestamp"].clone(),
    ];
    table::row_of(cells, crd, include)
}
