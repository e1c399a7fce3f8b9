//! `meta.k8s.io/v1` Table output for kubectl: printer columns evaluated per object.

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use crate::registry::Res;

/// What each row carries besides its cells (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

/// Whether the `Accept` header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

/// The first column of every Table.
pub fn name_column() -> Value {
    json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0})
}

/// A column type of ours that kubectl sees as a string: an object reference shown as
/// `kind/name`, as Kubernetes shows an Event's object.
pub const OBJECT_REF: &str = "objectref";

/// A column type of ours that kubectl sees as an integer: how many keys an object has (a
/// Secret's Data column), 0 when it is absent.
pub const COUNT: &str = "count";

/// Every column, `priority` included: kubectl shows those above 0 only with `-o wide`.
pub fn column_definitions(res: Res) -> Value {
    let mut name = name_column();
    // Events are read by what happened, not by their generated names (as in Kubernetes).
    if res.kind == "Event" {
        name["priority"] = json!(1);
    }
    let mut cols = vec![name];
    cols.extend(res.columns.iter().map(|c| {
        let type_ = match c.type_.as_str() {
            OBJECT_REF => "string",
            COUNT => "integer",
            other => other,
        };
        json!({"name": c.name, "type": type_, "format": "", "description": c.description, "priority": c.priority})
    }));
    Value::Array(cols)
}

pub fn row(res: Res, obj: &Value, include: Include) -> Value {
    let mut cells = vec![obj["metadata"]["name"].clone()];
    cells.extend(
        res.columns
            .iter()
            .map(|c| cell(&c.type_, &eval(obj, &c.json_path))),
    );
    row_of(cells, obj, include)
}

/// A row of `cells`, carrying as much of `obj` as `include` asks for.
pub fn row_of(cells: Vec<Value>, obj: &Value, include: Include) -> Value {
    let mut row = json!({"cells": cells});
    match include {
        Include::None => {}
        Include::Metadata => {
            row["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            });
        }
        Include::Object => row["object"] = obj.clone(),
    }
    row
}

/// A Table of `objects`; `columns` false for the one-row tables of a watch after the first.
pub fn table(
    res: Res,
    objects: &[&Value],
    rv: &str,
    cont: Option<&str>,
    include: Include,
    columns: bool,
) -> Value {
    let rows = objects.iter().map(|o| row(res, o, include)).collect();
    assemble(columns.then(|| column_definitions(res)), rows, rv, cont)
}

/// A Table of rows already made; `columns` absent for the one-row tables of a watch.
pub fn assemble(columns: Option<Value>, rows: Vec<Value>, rv: &str, cont: Option<&str>) -> Value {
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "rows": rows,
    });
    if let Some(columns) = columns {
        t["columnDefinitions"] = columns;
    }
    if let Some(c) = cont {
        t["metadata"]["continue"] = json!(c);
    }
    t
}

fn cell(type_: &str, found: &[&Value]) -> Value {
    if type_ == COUNT {
        return json!(
            found
                .first()
                .and_then(|v| v.as_object())
                .map_or(0, |o| o.len())
        );
    }
    if found.is_empty() || found.iter().all(|v| v.is_null()) {
        return Value::Null;
    }
    if type_ == "date" {
        return found[0].as_str().map_or(Value::Null, |s| json!(age(s)));
    }
    if type_ == OBJECT_REF {
        let kind = found[0]["kind"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let name = found[0]["name"].as_str().unwrap_or_default();
        return json!(format!("{kind}/{name}"));
    }
    if found.len() == 1 && type_ != "string" {
        return found[0].clone();
    }
    let text: Vec<String> = found.iter().map(|v| text(v)).collect();
    json!(text.join(","))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Kubernetes' short human duration (`5m`, `3h12m`, `4d`).
pub fn age(timestamp: &str) -> String {
    let Ok(then) = timestamp.parse::<Timestamp>() else {
        return "<invalid>".into();
    };
    let secs = Timestamp::now().as_second() - then.as_second();
    human_duration(secs)
}

fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    let pair = |a: i64, ua: &str, b: i64, ub: &str| {
        if b == 0 {
            format!("{a}{ua}")
        } else {
            format!("{a}{ua}{b}{ub}")
        }
    };
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => pair(m, "m", s % 60, "s"),
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 => pair(h, "h", m % 60, "m"),
        _ if h < 48 => format!("{h}h"),
        _ if h < 24 * 8 => pair(d, "d", h % 24, "h"),
        _ if d < 365 * 2 => format!("{d}d"),
        _ if d < 365 * 8 => pair(d / 365, "y", d % 365, "d"),
        _ => format!("{}y", d / 365),
    }
}

#[derive(Debug, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    All,
    Filter(Vec<String>, String),
}

fn parse(path: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut rest = path.trim().trim_start_matches('{').trim_end_matches('}');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end > 0 {
                steps.push(Step::Field(r[..end].to_owned()));
            }
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else { break };
            let inner = &r[..end];
            rest = &r[end + 1..];
            if inner == "*" {
                steps.push(Step::All);
            } else if let Ok(i) = inner.parse() {
                steps.push(Step::Index(i));
            } else if let Some((field, value)) = inner
                .strip_prefix("?(@.")
                .and_then(|e| e.strip_suffix(')'))
                .and_then(|e| e.split_once("=="))
            {
                let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
                steps.push(Step::Filter(
                    field.trim().split('.').map(str::to_owned).collect(),
                    value.to_owned(),
                ));
            }
        } else {
            break;
        }
    }
    steps
}

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `[n]`, `[*]` and
/// `[?(@.field=="value")]`.
pub fn eval<'a>(obj: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![obj];
    for step in parse(path) {
        current = current
            .into_iter()
            .flat_map(|v| -> Vec<&Value> {
                match &step {
                    Step::Field(f) => v.get(f).into_iter().collect(),
                    Step::Index(i) => v.get(*i).into_iter().collect(),
                    Step::All => v.as_array().map(|a| a.iter().collect()).unwrap_or_default(),
                    Step::Filter(field, value) => v
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|item| {
                            field
                                .iter()
                                .try_fold(*item, |x, k| x.get(k))
                                .and_then(Value::as_str)
                                == Some(value.as_str())
                        })
                        .collect(),
                }
            })
            .collect();
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_subset() {
        let obj = json!({"status": {"conditions": [{"type": "Accepted", "status": "True"}, {"type": "Ready", "status": "False"}]}, "spec": {"ports": [{"port": 80}, {"port": 443}], "hostnames": ["a", "b"]}});
        assert_eq!(
            eval(&obj, ".status.conditions[?(@.type==\"Ready\")].status"),
            [&json!("False")]
        );
        assert_eq!(eval(&obj, ".spec.ports[*].port"), [&json!(80), &json!(443)]);
        assert_eq!(eval(&obj, ".spec.ports[1].port"), [&json!(443)]);
        assert!(eval(&obj, ".spec.missing").is_empty());
        assert_eq!(cell("string", &eval(&obj, ".spec.hostnames")), json!("a,b"));
        assert_eq!(
            cell("string", &eval(&obj, ".spec.ports[*].port")),
            json!("80,443")
        );
        assert_eq!(cell("string", &[]), Value::Null);
    }

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(185), "3m5s");
        assert_eq!(human_duration(60 * 42), "42m");
        assert_eq!(human_duration(3600 * 5 + 60 * 7), "5h7m");
        assert_eq!(human_duration(3600 * 30), "30h");
        assert_eq!(human_duration(86400 * 3), "3d");
        assert_eq!(human_duration(-5), "<invalid>");
    }
}
