//! Request bodies to JSON values, bounded in nesting and size and decoded off the async
//! workers, so that no body of any shape can stall the server.
//!
//! - Nesting deeper than [`MAX_DEPTH`] is refused (serde_json and serde_yaml would stop at
//!   128 anyway, but libyaml's scanner is quadratic in flow nesting *before* that: 200 KB
//!   of `{a: {a: …` took 16 s). For YAML, [`flow_depth_exceeds`] finds such bodies in one
//!   linear pass before libyaml sees them.
//! - YAML aliases may repeat a subtree: the values built are capped at about one per byte
//!   of the body (what a body without aliases can hold at most), so "billion laughs"
//!   fails fast instead of filling memory.
//! - Decoding runs on a blocking thread: a 3 MiB body takes about a second to decode in a
//!   debug build and must not hold an async worker meanwhile.
//! - Kubernetes protobuf (built-in kinds) is read against fixed message tables (see
//!   [`protobuf`]), which bound its depth.

use std::cell::Cell;
use std::fmt;

use bytes::Bytes;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::error::{ApiError, Result};
use crate::protobuf;

/// The deepest nesting of arrays and objects accepted in a request body.
pub const MAX_DEPTH: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
    /// Kubernetes protobuf holding `message`; `strict` refuses unknown field numbers.
    Protobuf {
        message: &'static protobuf::Message,
        strict: bool,
    },
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Self::Json => "JSON",
            Self::Yaml => "YAML",
            Self::Protobuf { .. } => "protobuf",
        }
    }
}

/// Decodes a request body on a blocking thread.
///
/// # Errors
/// 400 when the body does not parse, is nested deeper than [`MAX_DEPTH`], or expands
/// (through YAML aliases) past its budget.
pub async fn decode(bytes: Bytes, format: Format) -> Result<Value> {
    tokio::task::spawn_blocking(move || decode_now(&bytes, format))
        .await
        .map_err(|e| ApiError::internal(format!("decoding the request body: {e}")))?
}

fn too_deep() -> ApiError {
    ApiError::bad_request(format!(
        "request body nested deeper than {MAX_DEPTH} levels"
    ))
}

/// Decodes on the calling thread.
///
/// # Errors
/// As [`decode`].
pub fn decode_now(bytes: &[u8], format: Format) -> Result<Value> {
    // Apply patches are YAML by content type, but clients (kube-rs, kubectl) send JSON,
    // which is YAML too: the JSON parser reads it several times faster, and only a body
    // it refuses goes on to the YAML one (which then gives the error).
    if matches!(format, Format::Yaml)
        && bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && let Ok(v) = decode_now(bytes, Format::Json)
    {
        return Ok(v);
    }
    let budget = Budget {
        depth: Cell::new(0),
        nodes: Cell::new(0),
        // A body without aliases has at most about one value per byte.
        max_nodes: bytes.len().saturating_add(1024),
        breach: Cell::new(None),
    };
    let seed = Node(&budget);
    let result = match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            seed.deserialize(&mut de)
                .and_then(|v| de.end().map(|()| v))
                .map_err(|e| e.to_string())
        }
        Format::Yaml => {
            if flow_depth_exceeds(bytes, MAX_DEPTH) {
                return Err(too_deep());
            }
            seed.deserialize(serde_yaml::Deserializer::from_slice(bytes))
                .map_err(|e| e.to_string())
        }
        // The message tables bound the depth, and each value takes at least a byte.
        Format::Protobuf { message, strict } => protobuf::decode(bytes, message, strict),
    };
    match (result, budget.breach.get()) {
        (Ok(v), _) => Ok(v),
        (Err(_), Some(Breach::Depth)) => Err(too_deep()),
        (Err(_), Some(Breach::Nodes)) => Err(ApiError::bad_request(format!(
            "request body expands to more than {} values (YAML aliases)",
            budget.max_nodes
        ))),
        (Err(e), None) => Err(ApiError::bad_request(format!(
            "error decoding the request body as {}: {e}",
            format.name()
        ))),
    }
}

#[derive(Clone, Copy, Debug)]
enum Breach {
    Depth,
    Nodes,
}

/// What one body may still build.
struct Budget {
    depth: Cell<usize>,
    nodes: Cell<usize>,
    max_nodes: usize,
    breach: Cell<Option<Breach>>,
}

impl Budget {
    fn node<E: serde::de::Error>(&self) -> std::result::Result<(), E> {
        let n = self.nodes.get() + 1;
        self.nodes.set(n);
        if n > self.max_nodes {
            self.breach.set(Some(Breach::Nodes));
            return Err(E::custom("too many values"));
        }
        Ok(())
    }

    fn enter<E: serde::de::Error>(&self) -> std::result::Result<(), E> {
        let d = self.depth.get() + 1;
        self.depth.set(d);
        if d > MAX_DEPTH {
            self.breach.set(Some(Breach::Depth));
            return Err(E::custom("nested too deeply"));
        }
        Ok(())
    }

    fn leave(&self) {
        self.depth.set(self.depth.get().saturating_sub(1));
    }
}

/// Builds a `serde_json::Value` as its own `Deserialize` does, within the budget.
#[derive(Clone, Copy)]
struct Node<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<Value, E> {
        self.0.node()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Value, E> {
        self.0.node()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Value, E> {
        self.0.node()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: serde::de::Error>(self, v: i128) -> std::result::Result<Value, E> {
        self.0.node()?;
        serde::Deserialize::deserialize(serde::de::value::I128Deserializer::<E>::new(v))
            .map(Value::Number)
    }

    fn visit_u128<E: serde::de::Error>(self, v: u128) -> std::result::Result<Value, E> {
        self.0.node()?;
        serde::Deserialize::deserialize(serde::de::value::U128Deserializer::<E>::new(v))
            .map(Value::Number)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Value, E> {
        self.0.node()?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Value, E> {
        self.0.node()?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> std::result::Result<Value, E> {
        self.0.node()?;
        Ok(Value::String(v))
    }

    fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Value, E> {
        self.0.node()?;
        Ok(Value::Null)
    }

    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Value, E> {
        self.0.node()?;
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        self.0.node()?;
        self.0.enter()?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            items.push(v);
        }
        self.0.leave();
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        self.0.node()?;
        self.0.enter()?;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.0.node()?;
            let value = map.next_value_seed(self)?;
            object.insert(key, value);
        }
        self.0.leave();
        Ok(Value::Object(object))
    }
}

/// Whether a YAML text may nest flow collections (`[`, `{`) deeper than `limit`, as
/// libyaml's scanner would count them.
///
/// Where a character could be read more than one way (is this `"` the start of a quoted
/// scalar or part of a plain one? is this `#` a comment?), every reading is followed at
/// once and the deepest is kept, so the answer is an upper bound of libyaml's and no
/// trick of quoting hides brackets from it. One pass, a handful of states per byte.
/// Brackets inside strings count on some readings, so a body whose strings hold more
/// than `limit` unclosed brackets is refused too; real manifests do not.
pub fn flow_depth_exceeds(bytes: &[u8], limit: usize) -> bool {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // The deepest nesting reachable in each scanner state; -1 when not reachable.
    let mut now = [UNREACHED; STATES];
    now[AT_BOUNDARY] = 0;
    for &c in bytes {
        if let Some(next) = step_common(&now, c) {
            now = next;
            continue;
        }
        now = step(&now, c);
        // Only an opener deepens a state.
        if (c == b'[' || c == b'{') && now.iter().any(|&d| d > limit) {
            return true;
        }
    }
    false
}

/// The scanner's states after byte `c`.
fn step(now: &[i64; STATES], c: u8) -> [i64; STATES] {
    let mut next = [UNREACHED; STATES];
    for (state, &d) in now.iter().enumerate() {
        if d < 0 {
            continue;
        }
        match state {
            AT_BOUNDARY => normal(c, d, true, &mut next),
            IN_PLAIN => normal(c, d, false, &mut next),
            IN_DOUBLE => match c {
                b'\\' => reach(&mut next, DOUBLE_ESCAPE, d),
                b'"' => reach(&mut next, AT_BOUNDARY, d),
                _ => reach(&mut next, IN_DOUBLE, d),
            },
            DOUBLE_ESCAPE => reach(&mut next, IN_DOUBLE, d),
            IN_SINGLE => match c {
                b'\'' => reach(&mut next, SINGLE_QUOTE_SEEN, d),
                _ => reach(&mut next, IN_SINGLE, d),
            },
            // `''` is an escaped quote; anything else means the scalar ended before `c`.
            SINGLE_QUOTE_SEEN => match c {
                b'\'' => reach(&mut next, IN_SINGLE, d),
                _ => normal(c, d, true, &mut next),
            },
            IN_COMMENT => match c {
                b'\n' | b'\r' => reach(&mut next, AT_BOUNDARY, d),
                _ => reach(&mut next, IN_COMMENT, d),
            },
            IN_ANCHOR => match c {
                c if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' => {
                    reach(&mut next, IN_ANCHOR, d);
                }
                _ => normal(c, d, true, &mut next),
            },
            // Tag characters vary by libyaml version: keep both readings.
            _ => {
                if c.is_ascii_graphic() && c != b'"' && c != b'{' && c != b'}' {
                    reach(&mut next, IN_TAG, d);
                }
                normal(c, d, true, &mut next);
            }
        }
    }
    next
}

/// [`step`] for the most common bytes (letters, digits, spaces) without its loop: the
/// scan of a large body takes a third of the time in a debug build.
fn step_common(now: &[i64; STATES], c: u8) -> Option<[i64; STATES]> {
    let mut next = [UNREACHED; STATES];
    next[IN_DOUBLE] = now[IN_DOUBLE].max(now[DOUBLE_ESCAPE]);
    next[IN_SINGLE] = now[IN_SINGLE];
    next[IN_COMMENT] = now[IN_COMMENT];
    if c.is_ascii_alphanumeric() {
        next[IN_PLAIN] = now[AT_BOUNDARY]
            .max(now[IN_PLAIN])
            .max(now[SINGLE_QUOTE_SEEN])
            .max(now[IN_TAG]);
        next[IN_ANCHOR] = now[IN_ANCHOR];
        next[IN_TAG] = now[IN_TAG];
    } else if c == b' ' {
        next[AT_BOUNDARY] = now[AT_BOUNDARY]
            .max(now[IN_PLAIN])
            .max(now[SINGLE_QUOTE_SEEN])
            .max(now[IN_ANCHOR])
            .max(now[IN_TAG]);
    } else {
        return None;
    }
    Some(next)
}

const STATES: usize = 9;
const UNREACHED: i64 = -1;
/// Outside any scalar, where a token may start (after a blank, a line break, an indicator
/// or the end of a quoted scalar, anchor or tag).
const AT_BOUNDARY: usize = 0;
/// Inside a plain scalar (or anywhere a token cannot start).
const IN_PLAIN: usize = 1;
const IN_DOUBLE: usize = 2;
const DOUBLE_ESCAPE: usize = 3;
const IN_SINGLE: usize = 4;
const SINGLE_QUOTE_SEEN: usize = 5;
const IN_COMMENT: usize = 6;
const IN_ANCHOR: usize = 7;
const IN_TAG: usize = 8;

fn reach(next: &mut [i64; STATES], state: usize, depth: i64) {
    if next[state] < depth {
        next[state] = depth;
    }
}

/// One byte outside quoted scalars and comments; `boundary` when a token may start here.
fn normal(c: u8, d: i64, boundary: bool, next: &mut [i64; STATES]) {
    // A character that begins a token only at a boundary, and is plain text otherwise.
    let mut either = |begins: usize| {
        if boundary {
            reach(next, begins, d);
        }
        reach(next, IN_PLAIN, d);
    };
    match c {
        b'"' => either(IN_DOUBLE),
        b'\'' => either(IN_SINGLE),
        b'#' => either(IN_COMMENT),
        b'&' | b'*' => either(IN_ANCHOR),
        b'!' => either(IN_TAG),
        // Counted wherever they stand: an opener in plain text only overestimates.
        b'[' | b'{' => reach(next, AT_BOUNDARY, d + 1),
        // In plain text a closer is literal only outside flow context, where libyaml's
        // depth is 0, which the saturating count never goes below.
        b']' | b'}' => reach(next, AT_BOUNDARY, (d - 1).max(0)),
        b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' | b'?' => reach(next, AT_BOUNDARY, d),
        // Non-ASCII: possibly a Unicode line break or space.
        c if c >= 0x80 => reach(next, AT_BOUNDARY, d),
        _ => reach(next, IN_PLAIN, d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB3: usize = 3 * 1024 * 1024;

    fn exceeds(text: &str) -> bool {
        flow_depth_exceeds(text.as_bytes(), 5)
    }

    #[test]
    fn yaml_bodies_that_are_json_read_the_same_and_flow_yaml_still_reads() {
        let json = br#" {"a": [1, "x"], "b": {"c": null}}"#;
        assert_eq!(
            decode_now(json, Format::Yaml).unwrap(),
            serde_json::json!({"a": [1, "x"], "b": {"c": null}})
        );
        assert_eq!(
            decode_now(b"{a: 1, b: [x]}", Format::Yaml).unwrap(),
            serde_json::json!({"a": 1, "b": ["x"]})
        );
        let deep = format!(
            "{}1{}",
            "{\"a\": ".repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert!(decode_now(deep.as_bytes(), Format::Yaml).is_err());
    }

    #[test]
    fn flow_depth_counts_brackets_outside_quotes_and_comments() {
        assert!(!exceeds("[[[[[1]]]]]"));
        assert!(exceeds("[[[[[[1]]]]]]"));
        assert!(exceeds("{a: {b: {c: {d: {e: {f: 1}}}}}}"));
        assert!(!exceeds("a: [[[[1]]]]\nb: [[[[2]]]]\n"));
        assert!(!exceeds("{\"a\": \"]]]]]]]]\", \"b\": [[[[1]]]]}"));
        assert!(!exceeds("a: 1 # ]]]]]]]\nb: [[[[1]]]]\n"));
        assert!(!exceeds("a: 'it''s ]]]]]]'\nb: [[[[1]]]]\n"));
        assert!(!exceeds("a: |\n  text\nb: [[[1]]]\n"));
    }

    #[test]
    fn the_shortcut_for_common_bytes_agrees_with_the_general_step() {
        let samples: Vec<[i64; STATES]> = (0u64..300)
            .map(|seed| {
                let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                std::array::from_fn(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    i64::try_from(x % 5).unwrap() - 1
                })
            })
            .collect();
        for c in (b'0'..=b'9')
            .chain(b'a'..=b'z')
            .chain(b'A'..=b'Z')
            .chain([b' '])
        {
            for now in &samples {
                assert_eq!(
                    step_common(now, c),
                    Some(step(now, c)),
                    "{:?} {now:?}",
                    c as char
                );
            }
        }
        assert_eq!(step_common(&samples[0], b'"'), None);
    }

    #[test]
    fn flow_depth_is_not_fooled_by_closers_in_strings() {
        // Each quoted run of closers is a string to libyaml: the depth really grows.
        let sneaky = "[[[ \"]]]\" [[[ \"]]]\" [[[ \"]]]\"";
        assert!(exceeds(sneaky));
        // A plain scalar with a quote in it, then a closer inside a real string.
        assert!(exceeds("a: x\"y\nb: [[[ ']]]' [[[ 1"));
        // A `"` that libyaml reads as plain text must not hide what follows.
        assert!(exceeds("k: |\n  [\nx: a, \"q\ny: [[[[[[1]]]]]]\nz: \"\n"));
        assert!(exceeds(
            "a: plain\n  \"continued\nb: [[[[[[1]]]]]]\nc: x\"\n"
        ));
    }

    #[test]
    fn decode_keeps_values_as_serde_json_does() {
        let json = br#"{"a": [1, -2, 3.5, true, null, "s"], "b": {"c": 18446744073709551615}}"#;
        assert_eq!(
            decode_now(json, Format::Json).unwrap(),
            serde_json::from_slice::<Value>(json).unwrap()
        );
        let yaml = b"a: [1, -2, 3.5, true, ~, s]\nb:\n  c: 18446744073709551615\n  1: x\n";
        assert_eq!(
            decode_now(yaml, Format::Yaml).unwrap(),
            serde_yaml::from_slice::<Value>(yaml).unwrap()
        );
        let e = decode_now(b"{\"a\": ", Format::Json).unwrap_err();
        assert!(
            e.message
                .starts_with("error decoding the request body as JSON:"),
            "{e}"
        );
        let e = decode_now(b"a: [1,", Format::Yaml).unwrap_err();
        assert!(
            e.message
                .starts_with("error decoding the request body as YAML:"),
            "{e}"
        );
    }

    fn nested(open: &str, close: &str, levels: usize) -> String {
        format!("{}1{}", open.repeat(levels), close.repeat(levels))
    }

    #[test]
    fn depth_is_limited_in_both_formats() {
        for format in [Format::Json, Format::Yaml] {
            assert!(decode_now(nested("[", "]", MAX_DEPTH).as_bytes(), format).is_ok());
            let e = decode_now(nested("[", "]", MAX_DEPTH + 1).as_bytes(), format).unwrap_err();
            assert_eq!(e.code, http::StatusCode::BAD_REQUEST);
            assert_eq!(
                e.message, "request body nested deeper than 100 levels",
                "{format:?}"
            );
            let obj = nested("{\"a\": ", "}", MAX_DEPTH + 1);
            let e = decode_now(obj.as_bytes(), format).unwrap_err();
            assert_eq!(e.message, "request body nested deeper than 100 levels");
        }
        // Block nesting, which the flow scan does not see, stops in the decoder.
        let mut block = String::new();
        for i in 0..MAX_DEPTH + 1 {
            block.push_str(&" ".repeat(i));
            block.push_str("a:\n");
        }
        let e = decode_now(block.as_bytes(), Format::Yaml).unwrap_err();
        assert_eq!(e.message, "request body nested deeper than 100 levels");
    }

    #[test]
    fn three_mib_of_nesting_is_refused_quickly() {
        for (format, body) in [
            (Format::Json, "[".repeat(MIB3)),
            (Format::Yaml, "[".repeat(MIB3)),
            (Format::Yaml, "{a: ".repeat(MIB3 / 4)),
            (Format::Yaml, "- ".repeat(MIB3 / 2)),
        ] {
            let start = std::time::Instant::now();
            let e = decode_now(body.as_bytes(), format).unwrap_err();
            let took = start.elapsed();
            println!("{format:?} {:?}…: {took:?}: {}", &body[..4], e.message);
            assert_eq!(e.code, http::StatusCode::BAD_REQUEST);
            assert!(took < std::time::Duration::from_secs(5), "{took:?}");
        }
    }

    #[test]
    fn alias_bombs_are_cut_short() {
        let mut lol = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (prev, name) in "abcdefgh".chars().zip("bcdefghi".chars()) {
            let refs = vec![format!("*{prev}"); 10].join(", ");
            lol.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        // Padding raises serde_yaml's own repetition limit (100 jumps per event).
        let mut padded = format!("pad: [{}1]\n", "1, ".repeat(MIB3 / 4));
        padded.push_str(&lol);
        for body in [lol, padded] {
            let start = std::time::Instant::now();
            let e = decode_now(body.as_bytes(), Format::Yaml).unwrap_err();
            let took = start.elapsed();
            println!(
                "alias bomb of {} bytes: {took:?}: {}",
                body.len(),
                e.message
            );
            assert!(e.message.contains("YAML aliases"), "{}", e.message);
            assert!(took < std::time::Duration::from_secs(5), "{took:?}");
        }
        // A few aliases are fine.
        let v = decode_now(b"a: &x {k: v}\nb: *x\n", Format::Yaml).unwrap();
        assert_eq!(v["b"]["k"], "v");
    }
}
