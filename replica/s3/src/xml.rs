//! The few XML answers S3 gives that we read (errors, listings, multipart uploads), read by
//! element name. S3's answers are flat, without CDATA or nesting of a name in itself, so a
//! search for `<Name>...</Name>` is exact for them; anything else yields nothing, never a panic.

/// The raw inner text of every `<name>...</name>` in `xml`, in order.
pub fn all<'a>(xml: &'a str, name: &str) -> Vec<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else {
            break;
        };
        out.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    out
}

/// The unescaped text of the first `<name>` element.
pub fn first(xml: &str, name: &str) -> Option<String> {
    all(xml, name).first().map(|s| unescape(s))
}

/// Replaces the five predefined entities and numeric character references; an unknown or
/// malformed reference is kept as it is.
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let tail = &rest[amp..];
        let Some(semi) = tail.find(';').filter(|&i| i <= 10) else {
            out.push('&');
            rest = &tail[1..];
            continue;
        };
        let entity = &tail[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &tail[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Escapes text for an element's content.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_s3_error() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message><BucketName>x&amp;y</BucketName></Error>"#;
        assert_eq!(first(body, "Code").as_deref(), Some("NoSuchBucket"));
        assert_eq!(
            first(body, "Message").as_deref(),
            Some("The specified bucket does not exist")
        );
        assert_eq!(first(body, "BucketName").as_deref(), Some("x&y"));
        assert_eq!(first(body, "Missing"), None);
    }

    #[test]
    fn repeated_elements_come_in_order() {
        let body =
            "<R><Contents><Key>a</Key></Contents><Contents><Key>b&#x2F;c</Key></Contents></R>";
        let keys: Vec<String> = all(body, "Contents")
            .iter()
            .filter_map(|c| first(c, "Key"))
            .collect();
        assert_eq!(keys, ["a", "b/c"]);
    }

    #[test]
    fn malformed_input_gives_nothing_or_text_as_it_is() {
        assert!(all("<Key>unclosed", "Key").is_empty());
        assert_eq!(
            unescape("a & b &bogus; &#xZZ; &#1114112;"),
            "a & b &bogus; &#xZZ; &#1114112;"
        );
        assert_eq!(unescape("&lt;&gt;&quot;&apos;&#65;"), "<>\"'A");
        assert_eq!(escape("<a&\"b\">"), "&lt;a&amp;&quot;b&quot;&gt;");
    }
}
