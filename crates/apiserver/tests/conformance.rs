//! One conformance battery run against both stores, SQLite and etcd: conflicts,
//! server-side apply, finalizers, owner-reference cascades, namespace teardown,
//! deletecollection, paging and watch behave as on Kubernetes, through kube-rs against a
//! real server on loopback. Each case is a test in module `sqlite` and one in `etcd`.
//! Leases are the objects throughout: a plain built-in kind that Portway serves (it has
//! no ConfigMaps).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, ensure};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, WatchEvent,
    WatchParams,
};
use kube::core::Status;
use kube::{Resource, ResourceExt};
use portway_apiserver::{Config, Server, store};
use portway_testkit::{eventually, kube_client};
use serde_json::{Value, json};

/// Deadline for anything the server should do promptly (a watch event, a cascade).
const WAIT: Duration = Duration::from_secs(10);
/// Objects in the bulk cases: more than one etcd transaction holds by default (128
/// operations, two per object changed), so a store that writes them at once must chunk.
const BULK: usize = 100;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Etcd,
}

/// A running API server on one store, and an admin kube-rs client for it.
struct Env {
    client: kube::Client,
    _server: Server,
    _etcd: Option<portway_testkit::etcd::Cluster>,
    _dir: tempfile::TempDir,
}

impl Env {
    /// A server on `backend` keeping `history` revisions for watches to resume from.
    async fn start(backend: Backend, history: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let etcd = match backend {
            Backend::Sqlite => None,
            // One member, with etcd's default limits (128 operations a transaction).
            Backend::Etcd => Some(
                portway_testkit::etcd::Cluster::start(&dir.path().join("etcd"), 1)
                    .await
                    .unwrap(),
            ),
        };
        let mut config = Config::new(dir.path().join("data"));
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.history = history;
        config.etcd = etcd.as_ref().map(|e| store::etcd::Config {
            endpoints: e.endpoints(),
            prefix: "/conformance".into(),
            tls: None,
            // Matches the member: etcd's defaults.
            budget: store::Budget::ETCD,
        });
        let server = Server::bind(config).await.unwrap();
        let client = kube_client(server.kubeconfig().unwrap()).await.unwrap();
        Self {
            client,
            _server: server,
            _etcd: etcd,
            _dir: dir,
        }
    }

    fn leases(&self, ns: &str) -> Api<Lease> {
        Api::namespaced(self.client.clone(), ns)
    }

    fn namespaces(&self) -> Api<Namespace> {
        Api::all(self.client.clone())
    }
}

/// Each case once per store: `sqlite::<case>` and `etcd::<case>`.
macro_rules! battery {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Backend::Sqlite).await;
            })*
        }
        mod etcd {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Backend::Etcd).await;
            })*
        }
    };
}

battery!(
    stale_writes_and_taken_names_conflict,
    apply_records_managers_and_conflicts_unless_forced,
    finalizers_hold_deletion_until_removed,
    deleting_an_owner_cascades_or_orphans,
    namespace_teardown_removes_its_objects_then_itself,
    deletecollection_removes_exactly_the_selected,
    pages_return_every_object_once_at_one_revision,
    watch_resumes_in_order_without_gaps,
    watch_and_continue_older_than_history_are_gone,
);

/// A Lease whose holder (`spec.holderIdentity`) stands for the value the cases change.
fn lease(name: &str, holder: &str) -> Lease {
    let mut l = Lease::default();
    l.metadata.name = Some(name.into());
    l.spec = Some(LeaseSpec {
        holder_identity: Some(holder.into()),
        ..LeaseSpec::default()
    });
    l
}

fn holder(l: &Lease) -> String {
    l.spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default()
}

/// A merge patch setting the holder.
fn hold(holder: &str) -> Patch<Value> {
    Patch::Merge(json!({"spec": {"holderIdentity": holder}}))
}

fn labelled(mut c: Lease, labels: &[(&str, &str)]) -> Lease {
    c.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    c
}

/// The `Status` of a failed request.
fn status(r: kube::Result<impl std::fmt::Debug>) -> Box<Status> {
    match r {
        Err(kube::Error::Api(s)) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv(c: &impl Resource) -> String {
    c.meta().resource_version.clone().unwrap()
}

/// Creates `objects` a few at a time.
async fn create_all(api: &Api<Lease>, objects: Vec<Lease>) {
    futures::stream::iter(objects)
        .map(|c| async move { api.create(&PostParams::default(), &c).await })
        .buffer_unordered(8)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
}

async fn names(api: &Api<Lease>, lp: &ListParams) -> BTreeSet<String> {
    let list = api.list(lp).await.unwrap();
    list.items.iter().map(ResourceExt::name_any).collect()
}

/// Polls until `name` is gone (404).
async fn gone(api: &Api<Lease>, name: &str) {
    eventually(&format!("lease {name} is deleted"), WAIT, || async {
        match api.get_opt(name).await? {
            None => Ok(()),
            Some(c) => bail!("still there: {:?}", c.metadata),
        }
    })
    .await;
}

/// 1. An update carrying an old resourceVersion, or a delete whose precondition names
///    one, is refused with 409 Conflict and changes nothing; a create of a taken name is
///    refused with 409 AlreadyExists.
async fn stale_writes_and_taken_names_conflict(backend: Backend) {
    let env = Env::start(backend, 10_000).await;
    let api = env.leases("default");
    let pp = PostParams::default();
    let created = api.create(&pp, &lease("a", "1")).await.unwrap();
    let first = rv(&created);

    let mut next = created.clone();
    next.spec.as_mut().unwrap().holder_identity = Some("2".into());
    let updated = api.replace("a", &pp, &next).await.unwrap();
    assert_ne!(rv(&updated), first);

    let mut stale = created.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("stale".into());
    let s = status(api.replace("a", &pp, &stale).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"), "{s:?}");
    assert_eq!(
        s.message,
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"a\": the object has been modified; please apply your changes to the latest version and try again"
    );

    let dp = DeleteParams::default().preconditions(Preconditions {
        resource_version: Some(first.clone()),
        uid: None,
    });
    let s = status(api.delete("a", &dp).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"), "{s:?}");

    let kept = api.get("a").await.unwrap();
    assert_eq!((holder(&kept), rv(&kept)), ("2".into(), rv(&updated)));

    let s = status(api.create(&pp, &lease("a", "again")).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"), "{s:?}");
    assert_eq!(s.message, "leases.coordination.k8s.io \"a\" already exists");
    assert_eq!(s.details.unwrap().name, "a");
    assert_eq!(holder(&api.get("a").await.unwrap()), "2");
}

/// The field paths (`f:spec.f:holderIdentity`, …) a managedFields entry owns.
fn owned(entry: &Value) -> BTreeSet<String> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeSet<String>) {
        for (k, child) in v.as_object().into_iter().flatten() {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if child
                .as_object()
                .is_some_and(|m| m.keys().any(|k| k != "."))
            {
                walk(&path, child, out);
            } else {
                out.insert(path);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk("", &entry["fieldsV1"], &mut out);
    out
}

/// What each field manager of `l` owns, by (manager, operation).
fn managers(l: &Lease) -> BTreeMap<(String, String), BTreeSet<String>> {
    l.metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            let who = (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            );
            (who, owned(&serde_json::to_value(m).unwrap()))
        })
        .collect()
}

fn owns(manager: &str, operation: &str, fields: &[&str]) -> ((String, String), BTreeSet<String>) {
    (
        (manager.into(), operation.into()),
        fields.iter().map(|f| (*f).to_owned()).collect(),
    )
}

/// 2. Server-side apply records each field manager's fields; a second manager applying a
///    field the first owns gets 409 Conflict naming the owner and the field, unless it
///    forces, which takes the field over; a field its only applier drops is removed.
async fn apply_records_managers_and_conflicts_unless_forced(backend: Backend) {
    let env = Env::start(backend, 10_000).await;
    let api = env.leases("default");
    let manifest = |spec: Value| {
        Patch::Apply(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "ssa"}, "spec": spec,
        }))
    };
    let (holder_field, duration_field) =
        ("f:spec.f:holderIdentity", "f:spec.f:leaseDurationSeconds");

    let alice = PatchParams::apply("alice");
    let created = api
        .patch(
            "ssa",
            &alice,
            &manifest(json!({"holderIdentity": "a", "leaseDurationSeconds": 10})),
        )
        .await
        .unwrap();
    assert_eq!(
        managers(&created),
        BTreeMap::from([owns("alice", "Apply", &[holder_field, duration_field])])
    );

    let bob = manifest(json!({"holderIdentity": "b"}));
    let s = status(api.patch("ssa", &PatchParams::apply("bob"), &bob).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"), "{s:?}");
    assert!(
        s.message.contains("conflict with \"alice\"") && s.message.contains(".spec.holderIdentity"),
        "{}",
        s.message
    );
    let causes = s.details.unwrap().causes;
    assert_eq!(causes.len(), 1, "{causes:?}");
    assert_eq!(causes[0].reason, "FieldManagerConflict");
    assert_eq!(causes[0].field, ".spec.holderIdentity");
    assert_eq!(holder(&api.get("ssa").await.unwrap()), "a");

    let forced = api
        .patch("ssa", &PatchParams::apply("bob").force(), &bob)
        .await
        .unwrap();
    let spec = forced.spec.clone().unwrap();
    assert_eq!(
        (spec.holder_identity.as_deref(), spec.lease_duration_seconds),
        (Some("b"), Some(10))
    );
    assert_eq!(
        managers(&forced),
        BTreeMap::from([
            owns("alice", "Apply", &[duration_field]),
            owns("bob", "Apply", &[holder_field]),
        ])
    );

    // A plain update is recorded as an Update by its manager.
    let by_carol = PatchParams {
        field_manager: Some("carol".into()),
        ..PatchParams::default()
    };
    let patched = api
        .patch(
            "ssa",
            &by_carol,
            &Patch::Merge(json!({"spec": {"leaseTransitions": 3}})),
        )
        .await
        .unwrap();
    assert_eq!(
        managers(&patched).get(&("carol".into(), "Update".into())),
        Some(&BTreeSet::from(["f:spec.f:leaseTransitions".into()]))
    );

    // Alice stops applying the duration: only she owned it, so it goes.
    let nothing = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "ssa"}});
    let after = api
        .patch("ssa", &alice, &Patch::Apply(nothing))
        .await
        .unwrap();
    let spec = after.spec.unwrap();
    assert_eq!(
        (
            spec.holder_identity.as_deref(),
            spec.lease_duration_seconds,
            spec.lease_transitions
        ),
        (Some("b"), None, Some(3))
    );
}

/// 3. Deleting an object with a finalizer marks it (deletionTimestamp) and keeps it;
///    deleting it again changes nothing; no finalizer may be added meanwhile (422); once
///    its last finalizer is removed it is gone.
async fn finalizers_hold_deletion_until_removed(backend: Backend) {
    let env = Env::start(backend, 10_000).await;
    let api = env.leases("default");
    let mut held = lease("held", "v");
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    api.create(&PostParams::default(), &held).await.unwrap();

    let answer = api.delete("held", &DeleteParams::default()).await.unwrap();
    let marked = answer.left().expect("the object, still there");
    let when = marked.metadata.deletion_timestamp.clone();
    assert!(when.is_some(), "{:?}", marked.metadata);
    let stored = api.get("held").await.unwrap();
    assert_eq!(stored.metadata.deletion_timestamp, when);
    assert_eq!(
        stored.metadata.finalizers.as_deref(),
        Some(&["example.com/hold".to_owned()][..])
    );

    let again = api.delete("held", &DeleteParams::default()).await.unwrap();
    let again = again.left().expect("the object, still there");
    assert_eq!(again.metadata.deletion_timestamp, when);

    let add = json!({"metadata": {"finalizers": ["example.com/hold", "example.com/new"]}});
    let s = status(
        api.patch("held", &PatchParams::default(), &Patch::Merge(&add))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{s:?}");

    // Other changes are still allowed while it waits.
    api.patch("held", &PatchParams::default(), &hold("changed"))
        .await
        .unwrap();
    assert!(
        api.get("held")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );

    let clear = json!({"metadata": {"finalizers": null}});
    api.patch("held", &PatchParams::default(), &Patch::Merge(&clear))
        .await
        .unwrap();
    gone(&api, "held").await;
}

/// 4. Deleting an owner in the background removes its dependents, and theirs, but not a
///    dependent another live owner still holds; with propagationPolicy Orphan the
///    dependent stays and loses its reference to the deleted owner.
async fn deleting_an_owner_cascades_or_orphans(backend: Backend) {
    let env = Env::start(backend, 10_000).await;
    let api = env.leases("default");
    let pp = PostParams::default();
    let owner = api.create(&pp, &lease("owner", "")).await.unwrap();
    let keeper = api.create(&pp, &lease("keeper", "")).await.unwrap();
    let owned_by = |name: &str, owners: &[&Lease]| {
        let mut c = lease(name, "");
        c.metadata.owner_references =
            Some(owners.iter().map(|o| o.owner_ref(&()).unwrap()).collect());
        c
    };
    let child = api
        .create(&pp, &owned_by("child", &[&owner]))
        .await
        .unwrap();
    api.create(&pp, &owned_by("grandchild", &[&child]))
        .await
        .unwrap();
    api.create(&pp, &owned_by("shared", &[&owner, &keeper]))
        .await
        .unwrap();

    api.delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    for name in ["owner", "child", "grandchild"] {
        gone(&api, name).await;
    }
    assert!(
        api.get_opt("shared").await.unwrap().is_some(),
        "a dependent with a live owner stays"
    );
    assert!(api.get_opt("keeper").await.unwrap().is_some());

    let parent = api.create(&pp, &lease("parent", "")).await.unwrap();
    api.create(&pp, &owned_by("orphan", &[&parent, &keeper]))
        .await
        .unwrap();
    api.delete("parent", &DeleteParams::orphan()).await.unwrap();
    gone(&api, "parent").await;
    let orphan = api.get("orphan").await.unwrap();
    let uids: Vec<String> = orphan
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.uid)
        .collect();
    assert_eq!(uids, [keeper.uid().unwrap()]);
}

/// 5. Deleting a namespace removes every object in it, then the namespace; objects
///    elsewhere stay.
async fn namespace_teardown_removes_its_objects_then_itself(backend: Backend) {
    let env = Env::start(backend, 10_000).await;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "doomed"}})).unwrap();
    env.namespaces()
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let doomed = env.leases("doomed");
    create_all(
        &doomed,
        (0..BULK)
            .map(|i| lease(&format!("l-{i:03}"), &i.to_string()))
            .collect(),
    )
    .await;
    let bystander = env.leases("default");
    bystander
        .create(&PostParams::default(), &lease("bystander", ""))
        .await
        .unwrap();
    assert_eq!(names(&doomed, &ListParams::default()).await.len(), BULK);

    env.namespaces()
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "namespace doomed and its objects are gone",
        WAIT,
        || async {
            let left = doomed.list(&ListParams::default()).await?.items.len();
            ensure!(left == 0, "{left} leases left");
            if let Some(ns) = env.namespaces().get_opt("doomed").await? {
                bail!("the namespace is still there: {:?}", ns.status);
            }
            Ok(())
        },
    )
    .await;
    assert!(bystander.get_opt("bystander").await.unwrap().is_some());
}

/// 6. deletecollection with a label selector removes exactly the matching objects of its
///    namespace, and answers with them.
async fn deletecollection_removes_exactly_the_selected(backend: Backend) {
    let env = Env::start(backend, 10_000).await;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "batch"}})).unwrap();
    env.namespaces()
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let api = env.leases("batch");
    let kept: BTreeSet<String> = (0..20).map(|i| format!("kept-{i:02}")).collect();
    let doomed: BTreeSet<String> = (0..BULK).map(|i| format!("doomed-{i:03}")).collect();
    let objects = doomed
        .iter()
        .map(|n| labelled(lease(n, ""), &[("tier", "doomed")]))
        .chain(
            kept.iter()
                .map(|n| labelled(lease(n, ""), &[("tier", "kept")])),
        )
        .collect();
    create_all(&api, objects).await;
    let elsewhere = env.leases("default");
    elsewhere
        .create(
            &PostParams::default(),
            &labelled(lease("elsewhere", ""), &[("tier", "doomed")]),
        )
        .await
        .unwrap();

    let answer = api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("tier=doomed"),
        )
        .await
        .unwrap();
    let deleted: BTreeSet<String> = answer
        .left()
        .expect("the list of deleted objects")
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(deleted, doomed);
    assert_eq!(names(&api, &ListParams::default()).await, kept);
    assert!(elsewhere.get_opt("elsewhere").await.unwrap().is_some());
}

/// 7. A list paged with limit=10 and continue tokens returns every object exactly once,
///    each page at the first page's resourceVersion, even when objects change between
///    pages; the last page has no continue token.
async fn pages_return_every_object_once_at_one_revision(backend: Backend) {
    let env = Env::start(backend, 10_000).await;
    let api = env.leases("default");
    let all: Vec<String> = (0..95).map(|i| format!("l-{i:03}")).collect();
    create_all(&api, all.iter().map(|n| lease(n, "0")).collect()).await;

    let mut seen = Vec::new();
    let mut revision = None;
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut lp = ListParams::default().limit(10);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.unwrap();
        pages += 1;
        assert!(page.items.len() <= 10, "{} items", page.items.len());
        let page_rv = page.metadata.resource_version.clone().unwrap();
        assert_eq!(revision.get_or_insert(page_rv.clone()), &page_rv);
        seen.extend(page.items.iter().map(|l| (l.name_any(), holder(l))));
        token = page.metadata.continue_.filter(|c| !c.is_empty());
        if token.is_none() {
            break;
        }
        if pages == 3 {
            // Meanwhile, objects already returned and not yet returned change, one not
            // yet returned goes and a new one comes: the pages still show the list as
            // it was at the first page's revision, as kube-apiserver's do.
            for name in ["l-005", "l-090"] {
                api.patch(name, &PatchParams::default(), &hold("1"))
                    .await
                    .unwrap();
            }
            api.delete("l-080", &Default::default()).await.unwrap();
            api.create(&PostParams::default(), &lease("l-085x", "0"))
                .await
                .unwrap();
        }
    }
    assert_eq!(pages, 10);
    let then: Vec<(String, String)> = all.iter().map(|n| (n.clone(), "0".into())).collect();
    assert_eq!(seen, then, "every object once, in order, as it was");
}

/// A watch event as (type, name, holder, resourceVersion).
fn describe(e: &WatchEvent<Lease>) -> (&'static str, String, String, String) {
    let (t, c) = match e {
        WatchEvent::Added(c) => ("ADDED", c),
        WatchEvent::Modified(c) => ("MODIFIED", c),
        WatchEvent::Deleted(c) => ("DELETED", c),
        other => panic!("unexpected {other:?}"),
    };
    (t, c.name_any(), holder(c), rv(c))
}

type Events = BoxStream<'static, kube::Result<WatchEvent<Lease>>>;

async fn watch_from(api: &Api<Lease>, rv: &str) -> Events {
    api.watch(&WatchParams::default().timeout(30), rv)
        .await
        .unwrap()
        .boxed()
}

/// The next event other than a bookmark.
async fn next(events: &mut Events) -> WatchEvent<Lease> {
    loop {
        let e = tokio::time::timeout(WAIT, events.try_next())
            .await
            .expect("a watch event within the deadline")
            .unwrap()
            .expect("the watch is still open");
        if !matches!(e, WatchEvent::Bookmark(_)) {
            return e;
        }
    }
}

/// 8a. A watch resumed from a resourceVersion yields every later change, in order, each
///     once (exactly the writes' own resourceVersions), then follows live changes.
async fn watch_resumes_in_order_without_gaps(backend: Backend) {
    let env = Env::start(backend, 10_000).await;
    let api = env.leases("default");
    let pp = PostParams::default();
    let start = rv(&api.create(&pp, &lease("w", "0")).await.unwrap());

    let mut writes = Vec::new();
    let x = api.create(&pp, &lease("x", "0")).await.unwrap();
    writes.push(("ADDED", "x".to_owned(), "0".to_owned(), rv(&x)));
    for i in 1..=10 {
        let name = if i % 3 == 0 { "x" } else { "w" };
        let c = api
            .patch(name, &PatchParams::default(), &hold(&i.to_string()))
            .await
            .unwrap();
        writes.push(("MODIFIED", name.to_owned(), i.to_string(), rv(&c)));
    }

    let mut events = watch_from(&api, &start).await;
    for expected in &writes {
        assert_eq!(&describe(&next(&mut events).await), expected);
    }
    let middle = &writes[5].3;
    let mut resumed = watch_from(&api, middle).await;
    for expected in &writes[6..] {
        assert_eq!(&describe(&next(&mut resumed).await), expected);
    }

    // Live changes follow on both watches, after everything replayed.
    let live = api
        .patch("w", &PatchParams::default(), &hold("11"))
        .await
        .unwrap();
    api.delete("x", &DeleteParams::default()).await.unwrap();
    for stream in [&mut events, &mut resumed] {
        let modified = describe(&next(stream).await);
        assert_eq!(modified, ("MODIFIED", "w".into(), "11".into(), rv(&live)));
        let (t, name, _, deleted_rv) = describe(&next(stream).await);
        assert_eq!((t, name.as_str()), ("DELETED", "x"));
        let n = |s: &str| s.parse::<u64>().unwrap();
        assert!(
            n(&deleted_rv) > n(&rv(&live)),
            "{deleted_rv} after {}",
            rv(&live)
        );
    }
}

/// 8b. With history for 50 revisions, a watch from a resourceVersion older than that gets
///     an ERROR event with code 410 (Expired), and so does (as a 410 answer) a list
///     continued from a token that old; a recent resourceVersion still resumes.
async fn watch_and_continue_older_than_history_are_gone(backend: Backend) {
    let env = Env::start(backend, 50).await;
    let api = env.leases("default");
    let pp = PostParams::default();
    let old = rv(&api.create(&pp, &lease("old", "0")).await.unwrap());
    api.create(&pp, &lease("other", "")).await.unwrap();
    let first_page = api.list(&ListParams::default().limit(1)).await.unwrap();
    let token = first_page.metadata.continue_.clone().unwrap();
    let mut last = String::new();
    for i in 1..=60 {
        let c = api
            .patch("old", &PatchParams::default(), &hold(&i.to_string()))
            .await
            .unwrap();
        if i == 59 {
            last = rv(&c);
        }
    }

    let mut events = watch_from(&api, &old).await;
    match next_raw(&mut events).await {
        WatchEvent::Error(s) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"), "{s:?}");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }

    let s = status(
        api.list(&ListParams::default().limit(1).continue_token(&token))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (410, "Expired"), "{s:?}");

    let mut recent = watch_from(&api, &last).await;
    let (t, name, v, _) = describe(&next(&mut recent).await);
    assert_eq!((t, name.as_str(), v.as_str()), ("MODIFIED", "old", "60"));
}

/// The next event, bookmarks and errors included.
async fn next_raw(events: &mut Events) -> WatchEvent<Lease> {
    tokio::time::timeout(WAIT, events.try_next())
        .await
        .expect("a watch event within the deadline")
        .unwrap()
        .expect("the watch is still open")
}
