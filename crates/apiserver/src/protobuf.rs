//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`) for the
//! built-in kinds, read into the JSON the same client would have sent.
//!
//! kubectl 1.32 (like every client-go typed client) sends built-in kinds this way, e.g. for
//! `kubectl create namespace` and `kubectl auth can-i`. A body is the magic `k8s\0` and a
//! `runtime.Unknown` whose `raw` field holds the object. Each message below lists its
//! fields by number (from Kubernetes' `generated.proto`), JSON name, and how Go's JSON
//! encoder writes the field: value fields leave out zero values (`omitempty`), pointer
//! fields and fields without `omitempty` keep them, and structs are always written. So
//! the result is the JSON that client would send, and goes through the same admission.
//!
//! The messages do not nest recursively, so the tables bound the depth; the request limit
//! bounds the size.

use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value, json};

/// The media type of Kubernetes protobuf.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";

/// A protobuf message as Kubernetes declares it.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    name: &'static str,
    fields: &'static [Field],
}

#[derive(Debug, PartialEq, Eq)]
struct Field {
    number: u64,
    name: &'static str,
    ty: Ty,
    card: Card,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ty {
    String,
    Int32,
    Int64,
    Bool,
    Message(&'static Message),
    /// `map<string, string>`.
    StringMap,
    /// `map<string, bytes>`: the values base64 in JSON, as Go writes `[]byte`.
    BytesMap,
    /// `meta.v1.Time`: RFC 3339 in seconds; the zero time is JSON `null`, so left out.
    Time,
    /// `meta.v1.MicroTime`: RFC 3339 in microseconds, likewise.
    MicroTime,
    /// `intstr.IntOrString`: a number or a string.
    IntOrString,
    /// Known but not read: what the server sets itself (status of a review,
    /// `managedFields`) or does not use.
    Skip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Card {
    /// A Go value field with `omitempty`: zero values are left out.
    Omit,
    /// A Go pointer, or a field without `omitempty`: written whatever its value.
    Keep,
    Repeated,
}

const fn field(number: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        number,
        name,
        ty,
        card: Card::Omit,
    }
}
const fn string(number: u64, name: &'static str) -> Field {
    field(number, name, Ty::String)
}
const fn int32(number: u64, name: &'static str) -> Field {
    field(number, name, Ty::Int32)
}
const fn int64(number: u64, name: &'static str) -> Field {
    field(number, name, Ty::Int64)
}
const fn boolean(number: u64, name: &'static str) -> Field {
    field(number, name, Ty::Bool)
}
const fn message(number: u64, name: &'static str, m: &'static Message) -> Field {
    field(number, name, Ty::Message(m))
}
const fn map(number: u64, name: &'static str) -> Field {
    field(number, name, Ty::StringMap)
}
const fn time(number: u64, name: &'static str) -> Field {
    field(number, name, Ty::Time)
}
const fn skip(number: u64, name: &'static str) -> Field {
    field(number, name, Ty::Skip)
}
/// A pointer field, or one without `omitempty`.
const fn keep(f: Field) -> Field {
    Field {
        card: Card::Keep,
        ..f
    }
}
const fn list(f: Field) -> Field {
    Field {
        card: Card::Repeated,
        ..f
    }
}

// k8s.io/apimachinery/pkg/apis/meta/v1

static OBJECT_META: Message = Message {
    name: "ObjectMeta",
    fields: &[
        string(1, "name"),
        string(2, "generateName"),
        string(3, "namespace"),
        string(4, "selfLink"),
        string(5, "uid"),
        string(6, "resourceVersion"),
        int64(7, "generation"),
        time(8, "creationTimestamp"),
        time(9, "deletionTimestamp"),
        keep(int64(10, "deletionGracePeriodSeconds")),
        map(11, "labels"),
        map(12, "annotations"),
        list(message(13, "ownerReferences", &OWNER_REFERENCE)),
        list(string(14, "finalizers")),
        // The server keeps managedFields itself (see `write::admit`).
        skip(17, "managedFields"),
    ],
};

static OWNER_REFERENCE: Message = Message {
    name: "OwnerReference",
    fields: &[
        keep(string(5, "apiVersion")),
        keep(string(1, "kind")),
        keep(string(3, "name")),
        keep(string(4, "uid")),
        keep(boolean(6, "controller")),
        keep(boolean(7, "blockOwnerDeletion")),
    ],
};

static CONDITION: Message = Message {
    name: "Condition",
    fields: &[
        keep(string(1, "type")),
        keep(string(2, "status")),
        int64(3, "observedGeneration"),
        time(4, "lastTransitionTime"),
        keep(string(5, "reason")),
        keep(string(6, "message")),
    ],
};

/// `DeleteOptions`, the body of a delete.
pub static DELETE_OPTIONS: Message = Message {
    name: "DeleteOptions",
    fields: &[
        keep(int64(1, "gracePeriodSeconds")),
        message(2, "preconditions", &PRECONDITIONS),
        keep(boolean(3, "orphanDependents")),
        keep(string(4, "propagationPolicy")),
        list(string(5, "dryRun")),
        keep(boolean(
            6,
            "ignoreStoreReadErrorWithClusterBreakingPotential",
        )),
    ],
};

static PRECONDITIONS: Message = Message {
    name: "Preconditions",
    fields: &[keep(string(1, "uid")), keep(string(2, "resourceVersion"))],
};

// k8s.io/api/core/v1

pub static NAMESPACE: Message = Message {
    name: "Namespace",
    fields: &[
        message(1, "metadata", &OBJECT_META),
        message(2, "spec", &NAMESPACE_SPEC),
        message(3, "status", &NAMESPACE_STATUS),
    ],
};

static NAMESPACE_SPEC: Message = Message {
    name: "NamespaceSpec",
    fields: &[list(string(1, "finalizers"))],
};

static NAMESPACE_STATUS: Message = Message {
    name: "NamespaceStatus",
    fields: &[
        string(1, "phase"),
        list(message(2, "conditions", &NAMESPACE_CONDITION)),
    ],
};

static NAMESPACE_CONDITION: Message = Message {
    name: "NamespaceCondition",
    fields: &[
        keep(string(1, "type")),
        keep(string(2, "status")),
        time(4, "lastTransitionTime"),
        string(5, "reason"),
        string(6, "message"),
    ],
};

/// What `kubectl create secret` sends.
pub static SECRET: Message = Message {
    name: "Secret",
    fields: &[
        message(1, "metadata", &OBJECT_META),
        keep(boolean(5, "immutable")),
        field(2, "data", Ty::BytesMap),
        map(4, "stringData"),
        string(3, "type"),
    ],
};

pub static SERVICE: Message = Message {
    name: "Service",
    fields: &[
        message(1, "metadata", &OBJECT_META),
        message(2, "spec", &SERVICE_SPEC),
        message(3, "status", &SERVICE_STATUS),
    ],
};

static SERVICE_SPEC: Message = Message {
    name: "ServiceSpec",
    fields: &[
        list(message(1, "ports", &SERVICE_PORT)),
        map(2, "selector"),
        string(3, "clusterIP"),
        list(string(18, "clusterIPs")),
        string(4, "type"),
        list(string(5, "externalIPs")),
        string(7, "sessionAffinity"),
        string(8, "loadBalancerIP"),
        list(string(9, "loadBalancerSourceRanges")),
        string(10, "externalName"),
        string(11, "externalTrafficPolicy"),
        int32(12, "healthCheckNodePort"),
        boolean(13, "publishNotReadyAddresses"),
        message(14, "sessionAffinityConfig", &SESSION_AFFINITY_CONFIG),
        list(string(19, "ipFamilies")),
        keep(string(17, "ipFamilyPolicy")),
        keep(boolean(20, "allocateLoadBalancerNodePorts")),
        keep(string(21, "loadBalancerClass")),
        keep(string(22, "internalTrafficPolicy")),
        keep(string(23, "trafficDistribution")),
    ],
};

static SERVICE_PORT: Message = Message {
    name: "ServicePort",
    fields: &[
        string(1, "name"),
        string(2, "protocol"),
        keep(string(6, "appProtocol")),
        keep(int32(3, "port")),
        field(4, "targetPort", Ty::IntOrString),
        int32(5, "nodePort"),
    ],
};

static SESSION_AFFINITY_CONFIG: Message = Message {
    name: "SessionAffinityConfig",
    fields: &[message(1, "clientIP", &CLIENT_IP_CONFIG)],
};

static CLIENT_IP_CONFIG: Message = Message {
    name: "ClientIPConfig",
    fields: &[keep(int32(1, "timeoutSeconds"))],
};

static SERVICE_STATUS: Message = Message {
    name: "ServiceStatus",
    fields: &[
        message(1, "loadBalancer", &LOAD_BALANCER_STATUS),
        list(message(2, "conditions", &CONDITION)),
    ],
};

static LOAD_BALANCER_STATUS: Message = Message {
    name: "LoadBalancerStatus",
    fields: &[list(message(1, "ingress", &LOAD_BALANCER_INGRESS))],
};

static LOAD_BALANCER_INGRESS: Message = Message {
    name: "LoadBalancerIngress",
    fields: &[
        string(1, "ip"),
        string(2, "hostname"),
        keep(string(3, "ipMode")),
        list(message(4, "ports", &PORT_STATUS)),
    ],
};

static PORT_STATUS: Message = Message {
    name: "PortStatus",
    fields: &[
        keep(int32(1, "port")),
        keep(string(2, "protocol")),
        keep(string(3, "error")),
    ],
};

static OBJECT_REFERENCE: Message = Message {
    name: "ObjectReference",
    fields: &[
        string(1, "kind"),
        string(2, "namespace"),
        string(3, "name"),
        string(4, "uid"),
        string(5, "apiVersion"),
        string(6, "resourceVersion"),
        string(7, "fieldPath"),
    ],
};

// k8s.io/api/coordination/v1

pub static LEASE: Message = Message {
    name: "Lease",
    fields: &[
        message(1, "metadata", &OBJECT_META),
        message(2, "spec", &LEASE_SPEC),
    ],
};

static LEASE_SPEC: Message = Message {
    name: "LeaseSpec",
    fields: &[
        keep(string(1, "holderIdentity")),
        keep(int32(2, "leaseDurationSeconds")),
        field(3, "acquireTime", Ty::MicroTime),
        field(4, "renewTime", Ty::MicroTime),
        keep(int32(5, "leaseTransitions")),
        keep(string(6, "strategy")),
        keep(string(7, "preferredHolder")),
    ],
};

// k8s.io/api/discovery/v1

pub static ENDPOINT_SLICE: Message = Message {
    name: "EndpointSlice",
    fields: &[
        message(1, "metadata", &OBJECT_META),
        keep(string(4, "addressType")),
        list(message(2, "endpoints", &ENDPOINT)),
        list(message(3, "ports", &ENDPOINT_PORT)),
    ],
};

static ENDPOINT: Message = Message {
    name: "Endpoint",
    fields: &[
        list(string(1, "addresses")),
        message(2, "conditions", &ENDPOINT_CONDITIONS),
        keep(string(3, "hostname")),
        message(4, "targetRef", &OBJECT_REFERENCE),
        map(5, "deprecatedTopology"),
        keep(string(6, "nodeName")),
        keep(string(7, "zone")),
        message(8, "hints", &ENDPOINT_HINTS),
    ],
};

static ENDPOINT_CONDITIONS: Message = Message {
    name: "EndpointConditions",
    fields: &[
        keep(boolean(1, "ready")),
        keep(boolean(2, "serving")),
        keep(boolean(3, "terminating")),
    ],
};

static ENDPOINT_HINTS: Message = Message {
    name: "EndpointHints",
    fields: &[
        list(message(1, "forZones", &FOR_ZONE)),
        list(message(2, "forNodes", &FOR_NODE)),
    ],
};

static FOR_ZONE: Message = Message {
    name: "ForZone",
    fields: &[keep(string(1, "name"))],
};

static FOR_NODE: Message = Message {
    name: "ForNode",
    fields: &[keep(string(1, "name"))],
};

static ENDPOINT_PORT: Message = Message {
    name: "EndpointPort",
    fields: &[
        keep(string(1, "name")),
        keep(string(2, "protocol")),
        keep(int32(3, "port")),
        keep(string(4, "appProtocol")),
    ],
};

// k8s.io/api/authorization/v1 and authentication/v1: the server writes the status.

pub static SELF_SUBJECT_ACCESS_REVIEW: Message = Message {
    name: "SelfSubjectAccessReview",
    fields: &[
        message(1, "metadata", &OBJECT_META),
        message(2, "spec", &SELF_SUBJECT_ACCESS_REVIEW_SPEC),
        skip(3, "status"),
    ],
};

static SELF_SUBJECT_ACCESS_REVIEW_SPEC: Message = Message {
    name: "SelfSubjectAccessReviewSpec",
    fields: &[
        message(1, "resourceAttributes", &RESOURCE_ATTRIBUTES),
        message(2, "nonResourceAttributes", &NON_RESOURCE_ATTRIBUTES),
    ],
};

static RESOURCE_ATTRIBUTES: Message = Message {
    name: "ResourceAttributes",
    fields: &[
        string(1, "namespace"),
        string(2, "verb"),
        string(3, "group"),
        string(4, "version"),
        string(5, "resource"),
        string(6, "subresource"),
        string(7, "name"),
        // Roles here never depend on selectors: the answer without them holds.
        skip(8, "fieldSelector"),
        skip(9, "labelSelector"),
    ],
};

static NON_RESOURCE_ATTRIBUTES: Message = Message {
    name: "NonResourceAttributes",
    fields: &[string(1, "path"), string(2, "verb")],
};

pub static SELF_SUBJECT_REVIEW: Message = Message {
    name: "SelfSubjectReview",
    fields: &[message(1, "metadata", &OBJECT_META), skip(2, "status")],
};

/// Decodes a protobuf body holding `message` into JSON, with `apiVersion` and `kind`
/// from the envelope. `strict` refuses field numbers the message does not declare (as
/// `fieldValidation=Strict` refuses unknown JSON fields); otherwise they are dropped.
///
/// # Errors
/// What is wrong with the body, and where.
pub fn decode(bytes: &[u8], message: &'static Message, strict: bool) -> Result<Value, String> {
    let envelope = bytes
        .strip_prefix(MAGIC)
        .ok_or("the body does not start with the Kubernetes protobuf prefix k8s\\0")?;
    let (mut api_version, mut kind, mut raw, mut encoding) = ("", "", &[][..], "");
    let mut r = Reader(envelope);
    while let Some((number, wire)) = r.key()? {
        match (number, wire) {
            (1, LEN) => {
                let mut t = Reader(r.bytes()?);
                while let Some((n, w)) = t.key()? {
                    match (n, w) {
                        (1, LEN) => api_version = utf8(t.bytes()?, "apiVersion")?,
                        (2, LEN) => kind = utf8(t.bytes()?, "kind")?,
                        _ => t.skip(w)?,
                    }
                }
            }
            (2, LEN) => raw = r.bytes()?,
            (3, LEN) => encoding = utf8(r.bytes()?, "contentEncoding")?,
            _ => r.skip(wire)?,
        }
    }
    if !encoding.is_empty() {
        return Err(format!("content encoding {encoding:?} is not supported"));
    }
    let mut object = read_message(raw, message, strict, "")?;
    for (key, value) in [("apiVersion", api_version), ("kind", kind)] {
        if !value.is_empty() {
            object.insert(key.into(), json!(value));
        }
    }
    Ok(Value::Object(object))
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err("a varint is truncated or longer than 10 bytes".into())
    }

    /// The next field's number and wire type, or `None` at the end.
    fn key(&mut self) -> Result<Option<(u64, u8)>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        Ok(Some((key >> 3, (key & 7) as u8)))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let n = usize::try_from(n).ok().filter(|&n| n <= self.0.len());
        let n = n.ok_or("a length runs past the end of the body")?;
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()?;
        self.take(n)
    }

    fn skip(&mut self, wire: u8) -> Result<(), String> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            FIXED32 => self.take(4).map(drop),
            other => Err(format!("wire type {other} is not supported")),
        }
    }
}

fn utf8<'a>(b: &'a [u8], at: &str) -> Result<&'a str, String> {
    std::str::from_utf8(b).map_err(|_| format!("{at}: not valid UTF-8"))
}

fn read_message(
    buf: &[u8],
    message: &'static Message,
    strict: bool,
    path: &str,
) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut r = Reader(buf);
    while let Some((number, wire)) = r.key()? {
        let Some(f) = message.fields.iter().find(|f| f.number == number) else {
            if strict {
                return Err(format!(
                    "strict decoding error: unknown field number {number} in {}{}",
                    message.name,
                    if path.is_empty() {
                        String::new()
                    } else {
                        format!(" at {path}")
                    }
                ));
            }
            r.skip(wire)?;
            continue;
        };
        let at = if path.is_empty() {
            f.name.to_owned()
        } else {
            format!("{path}.{}", f.name)
        };
        let expected = match f.ty {
            Ty::Int32 | Ty::Int64 | Ty::Bool => VARINT,
            Ty::Skip => wire,
            _ => LEN,
        };
        if wire != expected {
            return Err(format!(
                "{at}: wire type {wire} where {} expects {expected}",
                message.name
            ));
        }
        let value = match f.ty {
            Ty::Skip => {
                r.skip(wire)?;
                continue;
            }
            Ty::StringMap | Ty::BytesMap => {
                let (k, v) = map_entry(r.bytes()?, &at)?;
                let v = if f.ty == Ty::BytesMap {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD.encode(v)
                } else {
                    utf8(v, &at)?.to_owned()
                };
                if let Some(m) = out
                    .entry(f.name)
                    .or_insert_with(|| Value::Object(Map::new()))
                    .as_object_mut()
                {
                    m.insert(utf8(k, &at)?.to_owned(), Value::String(v));
                }
                continue;
            }
            Ty::String => json!(utf8(r.bytes()?, &at)?),
            // int32 travels sign-extended to 64 bits; the cast takes the low half back.
            Ty::Int32 => json!(r.varint()? as i64 as i32),
            Ty::Int64 => json!(r.varint()? as i64),
            Ty::Bool => json!(r.varint()? != 0),
            Ty::Message(m) => {
                let at = match f.card {
                    Card::Repeated => {
                        let n = out
                            .get(f.name)
                            .and_then(Value::as_array)
                            .map_or(0, Vec::len);
                        format!("{at}[{n}]")
                    }
                    _ => at,
                };
                Value::Object(read_message(r.bytes()?, m, strict, &at)?)
            }
            Ty::Time => time_value(r.bytes()?, false, &at)?,
            Ty::MicroTime => time_value(r.bytes()?, true, &at)?,
            Ty::IntOrString => int_or_string(r.bytes()?, &at)?,
        };
        let zero = match &value {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Number(n) => n.as_i64() == Some(0),
            Value::Bool(b) => !b,
            _ => false,
        };
        let scalar = matches!(f.ty, Ty::String | Ty::Int32 | Ty::Int64 | Ty::Bool);
        match f.card {
            Card::Repeated => {
                if let Some(items) = out
                    .entry(f.name)
                    .or_insert_with(|| Value::Array(Vec::new()))
                    .as_array_mut()
                {
                    items.push(value);
                }
            }
            // A zero time is null in Go's JSON, which leaves it out as well.
            _ if value.is_null() || (zero && scalar && f.card == Card::Omit) => {
                out.remove(f.name);
            }
            _ => {
                out.insert(f.name.into(), value);
            }
        }
    }
    Ok(out)
}

/// A map entry's key and value, as bytes (the caller knows which are text).
fn map_entry<'a>(buf: &'a [u8], _at: &str) -> Result<(&'a [u8], &'a [u8]), String> {
    let (mut k, mut v): (&[u8], &[u8]) = (&[], &[]);
    let mut r = Reader(buf);
    while let Some((n, w)) = r.key()? {
        match (n, w) {
            (1, LEN) => k = r.bytes()?,
            (2, LEN) => v = r.bytes()?,
            _ => r.skip(w)?,
        }
    }
    Ok((k, v))
}

/// `Time` and `MicroTime`: seconds and nanoseconds since the epoch.
fn time_value(buf: &[u8], micro: bool, at: &str) -> Result<Value, String> {
    let (mut seconds, mut nanos) = (0i64, 0i32);
    let mut r = Reader(buf);
    while let Some((n, w)) = r.key()? {
        match (n, w) {
            (1, VARINT) => seconds = r.varint()? as i64,
            (2, VARINT) => nanos = r.varint()? as i64 as i32,
            _ => r.skip(w)?,
        }
    }
    if seconds == 0 && nanos == 0 {
        return Ok(Value::Null);
    }
    let t = Timestamp::new(seconds, nanos).map_err(|e| format!("{at}: {e}"))?;
    let base = t.strftime("%Y-%m-%dT%H:%M:%S");
    Ok(json!(if micro {
        format!("{base}.{:06}Z", t.subsec_microsecond())
    } else {
        format!("{base}Z")
    }))
}

/// `IntOrString`: `type` 0 is `intVal`, 1 is `strVal`. Go writes it even when zero.
fn int_or_string(buf: &[u8], at: &str) -> Result<Value, String> {
    let (mut ty, mut int, mut string) = (0i64, 0i32, String::new());
    let mut r = Reader(buf);
    while let Some((n, w)) = r.key()? {
        match (n, w) {
            (1, VARINT) => ty = r.varint()? as i64,
            (2, VARINT) => int = r.varint()? as i64 as i32,
            (3, LEN) => string = utf8(r.bytes()?, at)?.to_owned(),
            _ => r.skip(w)?,
        }
    }
    match ty {
        0 => Ok(json!(int)),
        1 => Ok(json!(string)),
        other => Err(format!("{at}: IntOrString type {other} is neither 0 nor 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Bodies kubectl 1.32.4 sent for the commands named.

    /// `kubectl create namespace x`
    const CREATE_NAMESPACE: &str = "6b3873000a0f0a02763112094e616d65737061636512190a110a017812001a0022002a0032003800420012001a020a001a002200";
    /// `kubectl create service clusterip web --tcp=80:8080 --tcp=443:https`
    const CREATE_SERVICE: &str = "6b3873000a0d0a027631120753657276696365128d010a1f0a0377656212001a0022002a003200380042005a0a0a03617070120377656212660a1b0a0738302d38303830120354435018502207080010903f1a0028000a220a093434332d6874747073120354435018bb03220b080110001a0568747470732800120a0a0361707012037765621a002209436c757374657249503a00420052005a00600068001a020a001a002200";
    /// `kubectl auth can-i create connectors -n p1` (before discovery knew the group)
    const CAN_I: &str = "6b3873000a320a17617574686f72697a6174696f6e2e6b38732e696f2f7631121753656c665375626a65637441636365737352657669657712400a100a0012001a0022002a0032003800420012220a200a02703112066372656174651a0022002a0a636f6e6e6563746f727332003a001a08080012001a0020001a002200";
    /// `kubectl auth whoami`
    const WHOAMI: &str = "6b3873000a2d0a1861757468656e7469636174696f6e2e6b38732e696f2f7631121153656c665375626a656374526576696577121a0a100a0012001a0022002a0032003800420012060a040a0012001a002200";

    #[test]
    fn kubectl_bodies_read_as_the_json_kubectl_would_send() {
        let ns = decode(&hex(CREATE_NAMESPACE), &NAMESPACE, true).unwrap();
        assert_eq!(
            ns,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}, "spec": {}, "status": {}})
        );
        let svc = decode(&hex(CREATE_SERVICE), &SERVICE, true).unwrap();
        assert_eq!(
            svc,
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "labels": {"app": "web"}},
                "spec": {
                    "ports": [
                        {"name": "80-8080", "protocol": "TCP", "port": 80, "targetPort": 8080},
                        {"name": "443-https", "protocol": "TCP", "port": 443, "targetPort": "https"},
                    ],
                    "selector": {"app": "web"},
                    "type": "ClusterIP",
                },
                "status": {"loadBalancer": {}},
            })
        );
        let review = decode(&hex(CAN_I), &SELF_SUBJECT_ACCESS_REVIEW, true).unwrap();
        assert_eq!(
            review,
            json!({
                "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                "metadata": {},
                "spec": {"resourceAttributes": {"namespace": "p1", "verb": "create", "resource": "connectors"}},
            })
        );
        let whoami = decode(&hex(WHOAMI), &SELF_SUBJECT_REVIEW, true).unwrap();
        assert_eq!(
            whoami,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview", "metadata": {}})
        );
    }

    /// `kubectl create secret generic` sends protobuf: its data values are bytes (here
    /// not UTF-8), which JSON carries as base64.
    #[test]
    fn a_secrets_data_is_base64_and_its_string_data_text() {
        let data = enc(&[(1, P::B(b"key")), (2, P::B(&[0, 0xff, b'a']))]);
        let strings = enc(&[(1, P::B(b"note")), (2, P::B(b"hi"))]);
        let meta = enc(&[(1, P::B(b"s"))]);
        let body = envelope(
            "v1",
            "Secret",
            &enc(&[
                (1, P::B(&meta)),
                (2, P::B(&data)),
                (4, P::B(&strings)),
                (3, P::B(b"portway.dev/htpasswd")),
            ]),
        );
        assert_eq!(
            decode(&body, &SECRET, true).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                "data": {"key": "AP9h"}, "stringData": {"note": "hi"},
                "type": "portway.dev/htpasswd",
            })
        );
    }

    /// Encodes `(field, wire type, payload)` triples; varint payloads are given as numbers.
    enum P<'a> {
        V(u64),
        B(&'a [u8]),
    }
    fn enc(fields: &[(u64, P<'_>)]) -> Vec<u8> {
        fn varint(mut v: u64, out: &mut Vec<u8>) {
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        let mut out = Vec::new();
        for (n, p) in fields {
            match p {
                P::V(v) => {
                    varint(n << 3, &mut out);
                    varint(*v, &mut out);
                }
                P::B(b) => {
                    varint((n << 3) | 2, &mut out);
                    varint(b.len() as u64, &mut out);
                    out.extend_from_slice(b);
                }
            }
        }
        out
    }
    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let tm = enc(&[
            (1, P::B(api_version.as_bytes())),
            (2, P::B(kind.as_bytes())),
        ]);
        let mut out = MAGIC.to_vec();
        out.extend(enc(&[(1, P::B(&tm)), (2, P::B(raw))]));
        out
    }

    #[test]
    fn pointers_keep_zero_values_and_times_are_rfc3339() {
        let meta = enc(&[(1, P::B(b"l")), (10, P::V(0))]);
        let spec = enc(&[
            (1, P::B(b"me")),
            (2, P::V(0)),
            (
                4,
                P::B(&enc(&[(1, P::V(1_700_000_000)), (2, P::V(123_456_789))])),
            ),
        ]);
        let body = envelope(
            "coordination.k8s.io/v1",
            "Lease",
            &enc(&[(1, P::B(&meta)), (2, P::B(&spec))]),
        );
        assert_eq!(
            decode(&body, &LEASE, true).unwrap(),
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "l", "deletionGracePeriodSeconds": 0},
                "spec": {"holderIdentity": "me", "leaseDurationSeconds": 0, "renewTime": "2023-11-14T22:13:20.123456Z"},
            })
        );
        let endpoint = enc(&[(1, P::B(b"10.0.0.1")), (2, P::B(&enc(&[(1, P::V(0))])))]);
        let slice = enc(&[
            (4, P::B(b"IPv4")),
            (2, P::B(&endpoint)),
            (3, P::B(&enc(&[(3, P::V(u64::MAX))]))),
        ]);
        let body = envelope("discovery.k8s.io/v1", "EndpointSlice", &slice);
        assert_eq!(
            decode(&body, &ENDPOINT_SLICE, true).unwrap(),
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": false}}],
                "ports": [{"port": -1}],
            })
        );
    }

    #[test]
    fn unknown_fields_are_refused_when_strict_and_dropped_otherwise() {
        let spec = enc(&[(4, P::B(b"ClusterIP")), (99, P::V(1))]);
        let body = envelope("v1", "Service", &enc(&[(2, P::B(&spec))]));
        let err = decode(&body, &SERVICE, true).unwrap_err();
        assert_eq!(
            err,
            "strict decoding error: unknown field number 99 in ServiceSpec at spec"
        );
        assert_eq!(
            decode(&body, &SERVICE, false).unwrap(),
            json!({"apiVersion": "v1", "kind": "Service", "spec": {"type": "ClusterIP"}})
        );
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        let err = |b: &[u8]| decode(b, &NAMESPACE, true).unwrap_err();
        assert!(err(b"{\"kind\": 1}").contains("k8s\\0"));
        let mut truncated = envelope("v1", "Namespace", &enc(&[(1, P::B(b"abc"))]));
        truncated.pop();
        assert_eq!(err(&truncated), "a length runs past the end of the body");
        let wrong_wire = envelope("v1", "Namespace", &enc(&[(1, P::V(3))]));
        assert_eq!(
            err(&wrong_wire),
            "metadata: wire type 0 where Namespace expects 2"
        );
        let bad_utf8 = envelope(
            "v1",
            "Namespace",
            &enc(&[(1, P::B(&enc(&[(1, P::B(&[0xff]))])))]),
        );
        assert_eq!(err(&bad_utf8), "metadata.name: not valid UTF-8");
        let mut gzipped = MAGIC.to_vec();
        gzipped.extend(enc(&[(3, P::B(b"gzip"))]));
        assert_eq!(err(&gzipped), "content encoding \"gzip\" is not supported");
        let mut endless = MAGIC.to_vec();
        endless.extend([
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ]);
        assert_eq!(
            err(&endless),
            "a varint is truncated or longer than 10 bytes"
        );
    }
}
