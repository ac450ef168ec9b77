//! How client commands show keys, values, records and events: for people by default, as one
//! JSON object per line with `-o json` for scripts.
//!
//! Keys and values are bytes. Shown to people they are text, with anything a terminal would
//! act on or that is not UTF-8 escaped, so a binary value cannot garble the screen or hide
//! what follows it. In JSON a UTF-8 key or value is a string (JSON escapes what it must);
//! any other becomes `key_hex` / `value_hex`, so a script always gets the exact bytes back.

use clap::ValueEnum;
use serde_json::{Map, Value};

use kmmr_protocol::service::kv::{Event, EventKind, KeyValue};

/// What command output looks like.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON object per line (per key, per event, per result), for scripts.
    Json,
}

/// `bytes` as text for people: UTF-8 printed as is except control characters and backslashes,
/// which are escaped as in Rust string literals, as is every byte of anything not UTF-8.
pub fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(|c| c.is_control() || c == '\\') => s.to_owned(),
        Ok(s) => s
            .chars()
            .flat_map(|c| {
                let escape = c.is_control() || c == '\\';
                let escaped = escape.then(|| c.escape_default()).into_iter().flatten();
                escaped.chain((!escape).then_some(c))
            })
            .collect(),
        Err(_) => bytes.escape_ascii().to_string(),
    }
}

/// Sets `field` (or `field_hex` when the bytes are not UTF-8) on a JSON object.
fn put_bytes(obj: &mut Map<String, Value>, field: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => obj.insert(field.to_owned(), Value::from(s)),
        Err(_) => obj.insert(format!("{field}_hex"), Value::from(hex::encode(bytes))),
    };
}

/// A record as JSON: key, value, revisions, version, lease.
pub fn kv_json(kv: &KeyValue) -> Value {
    let mut obj = Map::new();
    put_bytes(&mut obj, "key", &kv.key);
    put_bytes(&mut obj, "value", &kv.value);
    obj.insert("create_revision".into(), kv.create_revision.into());
    obj.insert("mod_revision".into(), kv.mod_revision.into());
    obj.insert("version".into(), kv.version.into());
    obj.insert("lease".into(), kv.lease.into());
    Value::Object(obj)
}

/// A record for people: `key = value`, then what a reader checks before a compare-and-swap.
pub fn kv_text(kv: &KeyValue) -> String {
    format!(
        "{} = {}  (version {}, modified at revision {})",
        text(&kv.key),
        text(&kv.value),
        kv.version,
        kv.mod_revision
    )
}

fn kind_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Put => "PUT",
        EventKind::Delete => "DELETE",
    }
}

/// A watch event as JSON.
pub fn event_json(e: &Event) -> Value {
    let mut obj = Map::new();
    obj.insert("type".into(), kind_name(e.kind).into());
    obj.insert("revision".into(), e.revision().into());
    put_bytes(&mut obj, "key", &e.kv.key);
    if e.kind == EventKind::Put {
        put_bytes(&mut obj, "value", &e.kv.value);
        obj.insert("version".into(), e.kv.version.into());
    }
    if let Some(prev) = &e.prev_kv {
        obj.insert("prev".into(), kv_json(prev));
    }
    Value::Object(obj)
}

/// A watch event for people: `PUT key = value (revision N)` or `DELETE key (revision N)`.
pub fn event_text(e: &Event) -> String {
    match e.kind {
        EventKind::Put => format!(
            "PUT {} = {}  (revision {})",
            text(&e.kv.key),
            text(&e.kv.value),
            e.revision()
        ),
        EventKind::Delete => format!("DELETE {}  (revision {})", text(&e.kv.key), e.revision()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_is_shown_as_is_and_the_rest_escaped() {
        assert_eq!(text(b"hello world/k\xc3\xa9"), "hello world/ké");
        assert_eq!(text(b"a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
        assert_eq!(text("ké\t".as_bytes()), "ké\\t");
        assert_eq!(text(b"back\\slash"), "back\\\\slash");
        assert_eq!(text(&[0xff, b'a', 0]), "\\xffa\\x00");
    }

    #[test]
    fn json_carries_the_exact_bytes() {
        let kv = KeyValue {
            key: b"k".to_vec(),
            value: vec![0xff, 0],
            ..Default::default()
        };
        let j = kv_json(&kv);
        assert_eq!(j["key"], "k");
        assert_eq!(j["value_hex"], "ff00");
        assert!(j.get("value").is_none());
    }
}
