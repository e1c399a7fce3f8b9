//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! How far ownership goes: every write records which leaf fields its field manager set
//! (operation `Update`, or `Apply` for server-side apply), per subresource. Maps are
//! tracked per key; lists are atomic (owned whole), as for CRD lists without
//! `x-kubernetes-list-type: map`. An apply conflicts when it changes a field another
//! manager owns, unless `force=true`, which takes the field over. Fields a manager applied
//! before and leaves out now are removed, unless another manager also owns them.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

type Path = Vec<String>;

/// A set of field paths, as a tree; `leaf` marks a path owned as a whole.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSet {
    leaf: bool,
    children: BTreeMap<String, FieldSet>,
}

/// Which part of an object a write may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything but `status` (when the kind has a status subresource) and system metadata.
    Main { status_subresource: bool },
    /// Only `status`.
    Status,
}

impl Scope {
    pub fn subresource(self) -> &'static str {
        match self {
            Scope::Main { .. } => "",
            Scope::Status => "status",
        }
    }

    fn includes(self, top: &str) -> bool {
        match (self, top) {
            (_, "apiVersion" | "kind") => false,
            (Scope::Status, t) => t == "status",
            (Scope::Main { status_subresource }, "status") => !status_subresource,
            (Scope::Main { .. }, _) => true,
        }
    }
}

/// The metadata fields a client owns; the rest are the server's.
const USER_METADATA: &[&str] = &["labels", "annotations", "ownerReferences", "finalizers"];

impl FieldSet {
    /// The leaf fields set in `obj` within `scope`.
    pub fn of_object(obj: &Value, scope: Scope) -> Self {
        let mut set = Self::default();
        let Some(map) = obj.as_object() else {
            return set;
        };
        for (k, v) in map {
            if !scope.includes(k) {
                continue;
            }
            let child = if k == "metadata" {
                let mut meta = Self::default();
                for (mk, mv) in v.as_object().into_iter().flatten() {
                    if USER_METADATA.contains(&mk.as_str()) && !mv.is_null() {
                        meta.children.insert(mk.clone(), Self::of_value(mv));
                    }
                }
                if meta.children.is_empty() {
                    continue;
                }
                meta
            } else {
                Self::of_value(v)
            };
            set.children.insert(k.clone(), child);
        }
        set
    }

    fn of_value(v: &Value) -> Self {
        match v {
            Value::Object(m) if !m.is_empty() => Self {
                leaf: false,
                children: m
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), Self::of_value(v)))
                    .collect(),
            },
            _ => Self {
                leaf: true,
                children: BTreeMap::new(),
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.leaf && self.children.is_empty()
    }

    pub fn leaves(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Path, out: &mut Vec<Path>) {
        if self.leaf {
            out.push(prefix.clone());
        }
        for (k, c) in &self.children {
            prefix.push(k.clone());
            c.collect(prefix, out);
            prefix.pop();
        }
    }

    /// Whether `path`, one of its ancestors or one of its descendants is in the set.
    pub fn intersects(&self, path: &[String]) -> bool {
        let mut node = self;
        for k in path {
            if node.leaf {
                return true;
            }
            match node.children.get(k) {
                Some(n) => node = n,
                None => return false,
            }
        }
        true
    }

    pub fn insert(&mut self, path: &[String]) {
        let mut node = self;
        for k in path {
            node = node.children.entry(k.clone()).or_default();
        }
        node.leaf = true;
    }

    /// Removes `path` and everything below it, leaving no empty interior nodes.
    pub fn remove(&mut self, path: &[String]) {
        match path.split_first() {
            None => *self = Self::default(),
            Some((first, [])) => {
                self.children.remove(first);
            }
            Some((first, rest)) => {
                if let Some(child) = self.children.get_mut(first) {
                    child.remove(rest);
                    if child.is_empty() {
                        self.children.remove(first);
                    }
                }
            }
        }
    }

    /// Keeps only the paths that still exist in `set`.
    fn retain_within(&mut self, set: &FieldSet) {
        for path in self.leaves() {
            if !set.intersects(&path) {
                self.remove(&path);
            }
        }
    }

    /// The `fieldsV1` encoding (`{"f:spec":{"f:x":{}}}`).
    pub fn to_fields_v1(&self) -> Value {
        let mut map = Map::new();
        if self.leaf && !self.children.is_empty() {
            map.insert(".".into(), json!({}));
        }
        for (k, c) in &self.children {
            map.insert(format!("f:{k}"), c.to_fields_v1());
        }
        Value::Object(map)
    }

    /// Parses `fieldsV1`; list element keys (`k:`, `v:`, `i:`) written by other servers
    /// make their list atomic here.
    pub fn from_fields_v1(v: &Value) -> Self {
        let mut set = Self::default();
        let Some(map) = v.as_object() else { return set };
        if map.is_empty() {
            set.leaf = true;
        }
        for (k, c) in map {
            if k == "." {
                set.leaf = true;
            } else if let Some(name) = k.strip_prefix("f:") {
                set.children
                    .insert(name.to_owned(), Self::from_fields_v1(c));
            } else {
                set.leaf = true;
            }
        }
        set
    }
}

fn value_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn set_at(v: &mut Value, path: &[String], value: Value) {
    let mut node = v;
    for k in &path[..path.len() - 1] {
        if !node.get(k).is_some_and(Value::is_object) {
            node[k] = json!({});
        }
        node = &mut node[k];
    }
    node[&path[path.len() - 1]] = value;
}

fn remove_at(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    if let Some(Value::Object(m)) = parents.iter().try_fold(&mut *v, |v, k| v.get_mut(k)) {
        m.remove(last);
    }
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Managed {
    pub manager: String,
    pub operation: &'static str,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub fields: FieldSet,
}

impl Managed {
    pub fn parse_all(obj: &Value) -> Vec<Self> {
        obj["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                Some(Self {
                    manager: e["manager"].as_str()?.to_owned(),
                    operation: if e["operation"] == "Apply" {
                        "Apply"
                    } else {
                        "Update"
                    },
                    api_version: e["apiVersion"].as_str().unwrap_or_default().to_owned(),
                    time: e["time"].as_str().unwrap_or_default().to_owned(),
                    subresource: e["subresource"].as_str().unwrap_or_default().to_owned(),
                    fields: FieldSet::from_fields_v1(&e["fieldsV1"]),
                })
            })
            .collect()
    }

    pub fn render_all(entries: &[Self]) -> Value {
        Value::Array(
            entries
                .iter()
                .map(|e| {
                    let mut v = json!({
                        "manager": e.manager, "operation": e.operation, "apiVersion": e.api_version,
                        "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": e.fields.to_fields_v1(),
                    });
                    if !e.subresource.is_empty() {
                        v["subresource"] = json!(e.subresource);
                    }
                    v
                })
                .collect(),
        )
    }

    fn is(&self, manager: &str, operation: &str, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }
}

/// Who is writing, and how.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub time: &'a str,
    pub scope: Scope,
}

impl Writer<'_> {
    fn entry<'e>(&self, entries: &'e mut Vec<Managed>, operation: &'static str) -> &'e mut Managed {
        let sub = self.scope.subresource();
        let pos = match entries
            .iter()
            .position(|e| e.is(self.manager, operation, sub))
        {
            Some(p) => p,
            None => {
                entries.push(Managed {
                    manager: self.manager.to_owned(),
                    operation,
                    api_version: self.api_version.to_owned(),
                    time: String::new(),
                    subresource: sub.to_owned(),
                    fields: FieldSet::default(),
                });
                entries.len() - 1
            }
        };
        let e = &mut entries[pos];
        e.time = self.time.to_owned();
        e.api_version = self.api_version.to_owned();
        e
    }
}

/// Records an ordinary write (create, update, patch): the writer owns every leaf it
/// changed, other owners lose those leaves, and fields gone from the object are dropped.
pub fn record_update(entries: &mut Vec<Managed>, old: Option<&Value>, new: &Value, w: &Writer<'_>) {
    let new_set = FieldSet::of_object(new, w.scope);
    let changed: Vec<Path> = new_set
        .leaves()
        .into_iter()
        .filter(|p| old.and_then(|o| value_at(o, p)) != value_at(new, p))
        .collect();
    prune(entries, new);
    if changed.is_empty() {
        return;
    }
    for e in entries
        .iter_mut()
        .filter(|e| !e.is(w.manager, "Update", w.scope.subresource()))
    {
        for p in &changed {
            e.fields.remove(p);
        }
    }
    let entry = w.entry(entries, "Update");
    for p in &changed {
        entry.fields.insert(p);
    }
    entries.retain(|e| !e.fields.is_empty());
}

/// Drops owned fields that no longer exist in `obj`, and entries left empty.
/// Whether the applied configuration still sets `path` (of this manager's previous
/// apply): itself, something below it, or an atomic value above it. An empty map above
/// it (`spec: {}`) does not: it only says the map exists, and what the manager set in it
/// before goes, as in Kubernetes.
fn still_applied(set: &FieldSet, applied: &Value, path: &[String]) -> bool {
    let mut node = set;
    for (depth, k) in path.iter().enumerate() {
        if node.leaf && node.children.is_empty() {
            return !is_empty_map(value_at(applied, &path[..depth]));
        }
        match node.children.get(k) {
            Some(n) => node = n,
            None => return false,
        }
    }
    true
}

pub fn prune(entries: &mut Vec<Managed>, obj: &Value) {
    let all_main = FieldSet::of_object(
        obj,
        Scope::Main {
            status_subresource: false,
        },
    );
    for e in entries.iter_mut() {
        e.fields.retain_within(&all_main);
    }
    entries.retain(|e| !e.fields.is_empty());
}

/// A field another manager owns with a different value.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub manager: String,
    pub field: String,
}

/// Server-side apply of `applied` onto `live`: returns the merged object, with
/// `entries` updated. Does not touch fields outside `w.scope`. `canonical` applies the
/// kind's defaults, so a field is only in conflict if the apply really changes it.
///
/// # Errors
/// The conflicts, when `force` is false and some exist.
pub fn apply(
    live: &Value,
    applied: &Value,
    entries: &mut Vec<Managed>,
    w: &Writer<'_>,
    force: bool,
    canonical: &dyn Fn(&Value) -> Value,
) -> Result<Value, Vec<Conflict>> {
    let applied_set = FieldSet::of_object(applied, w.scope);
    let sub = w.scope.subresource();
    let mut merged = live.clone();
    for p in applied_set.leaves() {
        let v = value_at(applied, &p).cloned().unwrap_or(Value::Null);
        if is_empty_map(Some(&v)) && value_at(&merged, &p).is_some() {
            continue;
        }
        set_at(&mut merged, &p, v);
    }
    let previous = entries
        .iter()
        .find(|e| e.is(w.manager, "Apply", sub))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    for p in previous.leaves() {
        let shared = entries
            .iter()
            .any(|e| !e.is(w.manager, "Apply", sub) && e.fields.intersects(&p));
        if !still_applied(&applied_set, applied, &p) && !shared {
            remove_at(&mut merged, &p);
        }
    }

    let result = canonical(&merged);
    let mut conflicts = Vec::new();
    for p in applied_set.leaves() {
        let live_v = value_at(live, &p);
        if live_v.is_none() || live_v == value_at(&result, &p) {
            continue;
        }
        for e in entries
            .iter_mut()
            .filter(|e| e.manager != w.manager && e.subresource == sub)
        {
            if e.fields.intersects(&p) {
                if force {
                    e.fields.remove(&p);
                } else {
                    conflicts.push(Conflict {
                        manager: e.manager.clone(),
                        field: format!(".{}", p.join(".")),
                    });
                }
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    if let Some(own_update) = entries.iter_mut().find(|e| e.is(w.manager, "Update", sub)) {
        for p in applied_set.leaves() {
            own_update.fields.remove(&p);
        }
    }
    w.entry(entries, "Apply").fields = applied_set;
    prune(entries, &merged);
    Ok(merged)
}

fn is_empty_map(v: Option<&Value>) -> bool {
    v.is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
}

/// The fields a set names, for messages.
pub fn describe(conflicts: &[Conflict]) -> String {
    conflicts
        .iter()
        .map(|c| format!("conflict with \"{}\": {}", c.manager, c.field))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: Scope = Scope::Main {
        status_subresource: true,
    };

    fn writer(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            api_version: "v1",
            time: "t",
            scope: MAIN,
        }
    }

    #[test]
    fn fields_v1_round_trip() {
        let obj = json!({"apiVersion": "v1", "metadata": {"name": "x", "labels": {"a": "1"}}, "spec": {"x": 1, "list": [1], "m": {}}, "status": {"s": 1}});
        let set = FieldSet::of_object(&obj, MAIN);
        let v1 = set.to_fields_v1();
        assert_eq!(
            v1,
            json!({"f:metadata": {"f:labels": {"f:a": {}}}, "f:spec": {"f:x": {}, "f:list": {}, "f:m": {}}})
        );
        assert_eq!(FieldSet::from_fields_v1(&v1), set);
        assert_eq!(
            FieldSet::of_object(&obj, Scope::Status).to_fields_v1(),
            json!({"f:status": {"f:s": {}}})
        );
    }

    #[test]
    fn apply_conflicts_unless_forced_and_removes_dropped_fields() {
        let mut entries = Vec::new();
        let live = json!({"spec": {"a": 1, "b": 2}});
        record_update(&mut entries, None, &live, &writer("editor"));
        let applied = json!({"spec": {"a": 5, "c": 3}});
        let err = apply(
            &live,
            &applied,
            &mut entries,
            &writer("ssa"),
            false,
            &Value::clone,
        )
        .unwrap_err();
        assert_eq!(
            err,
            [Conflict {
                manager: "editor".into(),
                field: ".spec.a".into()
            }]
        );

        let merged = apply(
            &live,
            &applied,
            &mut entries,
            &writer("ssa"),
            true,
            &Value::clone,
        )
        .unwrap();
        assert_eq!(merged, json!({"spec": {"a": 5, "b": 2, "c": 3}}));
        // Dropping `c` from the next apply removes it; `a` stays owned by ssa.
        let merged = apply(
            &merged,
            &json!({"spec": {"a": 5}}),
            &mut entries,
            &writer("ssa"),
            false,
            &Value::clone,
        )
        .unwrap();
        assert_eq!(merged, json!({"spec": {"a": 5, "b": 2}}));
        let ssa = entries.iter().find(|e| e.manager == "ssa").unwrap();
        assert_eq!(ssa.fields.to_fields_v1(), json!({"f:spec": {"f:a": {}}}));
        let editor = entries.iter().find(|e| e.manager == "editor").unwrap();
        assert_eq!(editor.fields.to_fields_v1(), json!({"f:spec": {"f:b": {}}}));
    }

    /// Applying an empty map where the manager set fields before removes them (it only
    /// says the map exists), while an atomic value there keeps its place.
    #[test]
    fn an_empty_map_applied_drops_what_the_manager_set_in_it() {
        let mut entries = Vec::new();
        let ssa = writer("ssa");
        let live = apply(
            &json!({}),
            &json!({"spec": {"a": 1, "b": {"c": 2}}}),
            &mut entries,
            &ssa,
            false,
            &Value::clone,
        )
        .unwrap();
        let merged = apply(
            &live,
            &json!({"spec": {}}),
            &mut entries,
            &ssa,
            false,
            &Value::clone,
        )
        .unwrap();
        assert!(merged.pointer("/spec/a").is_none(), "{merged}");
        assert!(merged.pointer("/spec/b/c").is_none(), "{merged}");
        // A list in place of a map it set before is an atomic value: kept as applied.
        let merged = apply(
            &merged,
            &json!({"spec": {"a": [1]}}),
            &mut entries,
            &ssa,
            false,
            &Value::clone,
        )
        .unwrap();
        assert_eq!(merged["spec"]["a"], json!([1]));
    }

    #[test]
    fn shared_fields_survive_one_owner_leaving() {
        let mut entries = Vec::new();
        let live = apply(
            &json!({}),
            &json!({"spec": {"a": 1}}),
            &mut entries,
            &writer("one"),
            false,
            &Value::clone,
        )
        .unwrap();
        let live = apply(
            &live,
            &json!({"spec": {"a": 1}}),
            &mut entries,
            &writer("two"),
            false,
            &Value::clone,
        )
        .unwrap();
        let live = apply(
            &live,
            &json!({"spec": {}}),
            &mut entries,
            &writer("one"),
            false,
            &Value::clone,
        )
        .unwrap();
        assert_eq!(live, json!({"spec": {"a": 1}}));
    }

    #[test]
    fn updates_take_over_changed_fields() {
        let mut entries = Vec::new();
        let v1 = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"x": 1}});
        record_update(&mut entries, None, &v1, &writer("first"));
        let v2 = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": 2}});
        record_update(&mut entries, Some(&v1), &v2, &writer("second"));
        let first = &entries[0];
        assert_eq!(
            first.fields.to_fields_v1(),
            json!({"f:metadata": {"f:labels": {"f:a": {}}}})
        );
        assert_eq!(
            entries[1].fields.to_fields_v1(),
            json!({"f:metadata": {"f:labels": {"f:b": {}}}, "f:spec": {"f:x": {}}})
        );
        let v3 = json!({"spec": {"x": 2}});
        record_update(&mut entries, Some(&v2), &v3, &writer("second"));
        assert_eq!(entries.len(), 1);
    }
}
