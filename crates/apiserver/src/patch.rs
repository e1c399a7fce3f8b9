//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and Kubernetes'
//! strategic merge patch for the built-in kinds.

use serde_json::{Map, Value};

use crate::registry::{ListStrategy, Res};

/// The patch types this server accepts, by `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or_default().trim() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/json-patch+json" => Some(Self::Json),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Applies a JSON patch. Kubernetes treats `test` against `null` on a missing path as a
/// pass (kube-rs' finalizer helper relies on it), so those tests are dropped first.
///
/// # Errors
/// A message naming the failing operation.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    let ops: Vec<Value> = ops
        .iter()
        .filter(|op| {
            let null_test = op["op"] == "test" && op.get("value").is_some_and(Value::is_null);
            !(null_test
                && op["path"]
                    .as_str()
                    .is_some_and(|p| doc.pointer(p).is_none()))
        })
        .cloned()
        .collect();
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))
        .map_err(|e| format!("invalid JSON patch: {e}"))?;
    json_patch::patch(doc, &patch).map_err(|e| e.to_string())
}

/// Applies a strategic merge patch: maps merge, `null` deletes, lists replace unless the
/// kind declares a merge key for them, and the `$patch`, `$setElementOrder`,
/// `$deleteFromPrimitiveList` and `$retainKeys` directives are honoured.
///
/// # Errors
/// A message when the patch is not an object or a directive is malformed.
pub fn strategic_merge(original: &Value, patch: &Value, res: Res) -> Result<Value, String> {
    let patch = patch
        .as_object()
        .ok_or("a strategic merge patch must be a JSON object")?;
    let original = original.as_object().cloned().unwrap_or_default();
    Ok(merge_map(original, patch, "", res)?.map_or(Value::Null, Value::Object))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn merge_map(
    mut orig: Map<String, Value>,
    patch: &Map<String, Value>,
    path: &str,
    res: Res,
) -> Result<Option<Map<String, Value>>, String> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("delete") => return Ok(None),
        Some("replace") => {
            let mut replaced = patch.clone();
            replaced.remove("$patch");
            return Ok(Some(replaced));
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(format!(
                "unknown patch directive $patch: {other:?} at {path}"
            ));
        }
    }
    if let Some(keep) = patch.get("$retainKeys") {
        let keep: Vec<&str> = keep
            .as_array()
            .ok_or("$retainKeys must be a list")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        orig.retain(|k, _| keep.contains(&k.as_str()));
    }
    let mut orders = Vec::new();
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            orders.push((field.to_owned(), value.clone()));
        } else if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = value
                .as_array()
                .ok_or("$deleteFromPrimitiveList must be a list")?;
            if let Some(Value::Array(list)) = orig.get_mut(field) {
                list.retain(|v| !remove.contains(v));
            }
        } else if key.starts_with('$') {
            continue;
        } else if value.is_null() {
            orig.remove(key);
        } else {
            let child = join(path, key);
            let merged = match (orig.remove(key), value) {
                (Some(Value::Object(o)), Value::Object(p)) => {
                    merge_map(o, p, &child, res)?.map(Value::Object)
                }
                (Some(Value::Array(o)), Value::Array(p)) => Some(merge_list(o, p, &child, res)?),
                (None, Value::Object(p)) => {
                    merge_map(Map::new(), p, &child, res)?.map(Value::Object)
                }
                (None, Value::Array(p)) => Some(merge_list(Vec::new(), p, &child, res)?),
                (_, v) => Some(v.clone()),
            };
            if let Some(m) = merged {
                orig.insert(key.clone(), m);
            }
        }
    }
    for (field, order) in orders {
        if let (Some(Value::Array(list)), Some(order)) = (orig.get_mut(&field), order.as_array()) {
            let strategy = res.list_strategy(&join(path, &field));
            let rank = |v: &Value| {
                order.iter().position(|o| match strategy {
                    ListStrategy::MergeByKey(k) => o.get(k) == v.get(k),
                    _ => o == v,
                })
            };
            list.sort_by_key(|v| rank(v).unwrap_or(usize::MAX));
        }
    }
    Ok(Some(orig))
}

fn merge_list(orig: Vec<Value>, patch: &[Value], path: &str, res: Res) -> Result<Value, String> {
    if patch
        .iter()
        .any(|v| v.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(Value::Array(
            patch
                .iter()
                .filter(|v| v.get("$patch").is_none())
                .cloned()
                .collect(),
        ));
    }
    match res.list_strategy(path) {
        ListStrategy::Replace => Ok(Value::Array(patch.to_vec())),
        ListStrategy::Union => {
            let mut out = orig;
            for v in patch {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(Value::Array(out))
        }
        ListStrategy::MergeByKey(key) => {
            let mut out = orig;
            for item in patch {
                let Some(p) = item.as_object() else {
                    return Err(format!(
                        "{path}: list items must be objects with the merge key {key:?}"
                    ));
                };
                let id = p
                    .get(key)
                    .ok_or_else(|| format!("{path}: item is missing the merge key {key:?}"))?;
                let pos = out.iter().position(|o| o.get(key) == Some(id));
                if p.get("$patch").and_then(Value::as_str) == Some("delete") {
                    if let Some(pos) = pos {
                        out.remove(pos);
                    }
                    continue;
                }
                match pos {
                    Some(pos) => {
                        let o = out[pos].as_object().cloned().unwrap_or_default();
                        match merge_map(o, p, path, res)? {
                            Some(m) => out[pos] = Value::Object(m),
                            None => {
                                out.remove(pos);
                            }
                        }
                    }
                    None => {
                        let mut fresh = p.clone();
                        fresh.retain(|k, _| !k.starts_with('$'));
                        out.push(Value::Object(fresh));
                    }
                }
            }
            Ok(Value::Array(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::registry;
    use serde_json::json;

    #[test]
    fn strategic_merge_keeps_other_service_ports() {
        let svc = registry().by_key("services").unwrap();
        let orig = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 443, "targetPort": 8443}], "type": "ClusterIP"}});
        let patch = json!({"spec": {"$setElementOrder/ports": [{"port": 80}, {"port": 443}], "ports": [{"port": 443, "targetPort": 9443}]}});
        let out = strategic_merge(&orig, &patch, svc).unwrap();
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 80, "targetPort": 8080}, {"port": 443, "targetPort": 9443}])
        );
        assert_eq!(out["spec"]["type"], "ClusterIP");

        let delete = json!({"spec": {"ports": [{"port": 80, "$patch": "delete"}]}});
        let out = strategic_merge(&orig, &delete, svc).unwrap();
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 443, "targetPort": 8443}])
        );
    }

    #[test]
    fn strategic_merge_directives() {
        let lease = registry().by_key("leases.coordination.k8s.io").unwrap();
        let orig = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1", "y": "2"}}, "spec": {"holderIdentity": "h", "leaseDurationSeconds": 30}});
        let patch = json!({
            "metadata": {"finalizers": ["b"], "labels": {"x": null}, "$deleteFromPrimitiveList/finalizers": ["a"]},
            "spec": {"$retainKeys": ["holderIdentity"], "holderIdentity": "g"},
        });
        let out = strategic_merge(&orig, &patch, lease).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(out["metadata"]["labels"], json!({"y": "2"}));
        assert_eq!(out["spec"], json!({"holderIdentity": "g"}));
        let replace = json!({"spec": {"$patch": "replace", "renewTime": "t"}});
        assert_eq!(
            strategic_merge(&orig, &replace, lease).unwrap()["spec"],
            json!({"renewTime": "t"})
        );
    }

    #[test]
    fn json_patch_null_test_on_missing_path_passes() {
        let mut doc = json!({"metadata": {}});
        let patch = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["f"]},
        ]);
        json_patch(&mut doc, &patch).unwrap();
        assert_eq!(doc["metadata"]["finalizers"], json!(["f"]));
        let failing = json!([{"op": "test", "path": "/metadata/finalizers", "value": null}]);
        assert!(json_patch(&mut doc, &failing).is_err());
        assert!(json_patch(&mut doc, &json!({"op": "add"})).is_err());
    }
}
