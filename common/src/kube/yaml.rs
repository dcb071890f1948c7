//! Renders the objects we build (JSON values) as block-style YAML for people and
//! `kubectl apply -f -`.
//!
//! Why not a YAML crate: serde_yaml is archived and its forks are young, and we only ever
//! write (never parse) values we built ourselves. Every string that is not an obviously
//! plain word is written as a JSON string, which is also a valid YAML double-quoted
//! scalar, so nothing can be read back as another type (`"on"`, `"1:20"`, `"0755"`).
//! The output is deterministic (maps are sorted), which the stale-`deploy/` check needs.

use serde_json::Value;

/// Several objects as one YAML stream (`---` between documents).
pub fn documents(objects: &[Value]) -> String {
    let mut out = String::new();
    for (i, object) in objects.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&document(object));
    }
    out
}

/// One value as a YAML document.
pub fn document(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_map(&mut out, map, 0),
        Value::Array(items) if !items.is_empty() => write_seq(&mut out, items, 0),
        scalar => {
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
    out
}

fn write_map(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
    for (key, value) in map {
        push_indent(out, indent);
        out.push_str(&key_text(key));
        out.push(':');
        write_value_after_key(out, value, indent);
    }
}

fn write_seq(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        push_indent(out, indent);
        out.push_str("- ");
        match item {
            Value::Object(map) if !map.is_empty() => {
                // The first key shares the dash's line; the rest align under it.
                let mut first = true;
                for (key, value) in map {
                    if !first {
                        push_indent(out, indent + 2);
                    }
                    first = false;
                    out.push_str(&key_text(key));
                    out.push(':');
                    write_value_after_key(out, value, indent + 2);
                }
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                write_seq(out, inner, indent + 2);
            }
            scalar => {
                out.push_str(&scalar_text(scalar));
                out.push('\n');
            }
        }
    }
}

fn write_value_after_key(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            write_map(out, map, indent + 2);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_seq(out, items, indent);
        }
        scalar => {
            out.push(' ');
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
}

fn push_indent(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// Words YAML 1.1 or 1.2 readers take for something other than a string.
fn is_special_word(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "~"
    )
}

/// A plain scalar only when it cannot be misread: a letter (or `/`, `_`) first, then
/// letters, digits and `_ . / -`, and not a special word.
fn is_plain(s: &str) -> bool {
    let mut bytes = s.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'/' || b == b'_');
    first_ok
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-'))
        && !is_special_word(s)
}

fn quoted(s: &str) -> String {
    // A JSON string is a valid YAML double-quoted scalar (serde_json never writes `\/`).
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

fn key_text(key: &str) -> String {
    if is_plain(key) {
        key.to_owned()
    } else {
        quoted(key)
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if is_plain(s) => s.clone(),
        Value::String(s) => quoted(s),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_maps_and_sequences_render_in_block_style() {
        let v = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "x", "labels": {"app.kubernetes.io/name": "aether"}},
            "data": {"a": "1", "empty": "", "list": []},
            "items": [{"name": "a", "ports": [{"port": 80}]}, "plain", ["nested"]],
        });
        let want = "\
apiVersion: v1
data:
  a: \"1\"
  empty: \"\"
  list: []
items:
- name: a
  ports:
  - port: 80
- plain
- 
  - nested
kind: ConfigMap
metadata:
  labels:
    app.kubernetes.io/name: aether
  name: x
";
        assert_eq!(document(&v), want);
    }

    #[test]
    fn strings_that_yaml_would_read_as_other_types_are_quoted() {
        for s in [
            "true", "on", "No", "y", "null", "~", "0755", "1:20", "3000", "1e3", "-x", "a: b",
            "#c", "*ref", "&a", "!tag", "a b", "x\ny", "",
        ] {
            let text = scalar_text(&json!(s));
            assert!(text.starts_with('"'), "{s:?} rendered as {text}");
            let back: String = serde_json::from_str(&text).unwrap();
            assert_eq!(back, s);
        }
        for s in ["aether", "aether-fetcher", "/readyz", "apps/v1", "a.b_c"] {
            assert_eq!(scalar_text(&json!(s)), s);
        }
        assert_eq!(key_text("fsGroup"), "fsGroup");
        assert_eq!(key_text("on"), "\"on\"");
    }

    #[test]
    fn documents_are_separated() {
        let out = documents(&[json!({"a": 1}), json!({"b": true})]);
        assert_eq!(out, "a: 1\n---\nb: true\n");
    }
}
