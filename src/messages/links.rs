//! The links a message carries: an open pixel, click redirects and one-click unsubscribe, each
//! behind a signed token. A click redirects only to a link stored with the message (the token
//! carries its index, never a URL), so there is no open redirect. `crate::tracking` serves them.

use uuid::Uuid;

use crate::domain::TenantId;
use crate::signing::{Claims, Purpose, Signer};

/// The links of one message.
pub struct Links<'a> {
    signer: &'a Signer,
    public_url: &'a str,
    tenant: TenantId,
    message: Uuid,
}

impl<'a> Links<'a> {
    pub fn new(
        signer: &'a Signer,
        public_url: &'a str,
        tenant: TenantId,
        message: Uuid,
    ) -> Links<'a> {
        Links {
            signer,
            public_url,
            tenant,
            message,
        }
    }

    fn token(&self, purpose: Purpose, index: u32) -> String {
        self.signer
            .token(Claims::new(purpose, self.tenant.0, self.message, index))
    }

    pub fn open_pixel(&self) -> String {
        format!("{}/t/o/{}", self.public_url, self.token(Purpose::Open, 0))
    }

    pub fn click(&self, index: u32) -> String {
        format!(
            "{}/t/c/{}",
            self.public_url,
            self.token(Purpose::Click, index)
        )
    }

    pub fn unsubscribe(&self) -> String {
        format!(
            "{}/u/{}",
            self.public_url,
            self.token(Purpose::Unsubscribe, 0)
        )
    }

    /// Rewrites every http(s) `href` through the click redirect and adds the open pixel; the
    /// original targets, by index, are returned to be stored with the message.
    pub fn instrument_html(&self, html: &str) -> (String, Vec<String>) {
        let unsubscribe_prefix = format!("{}/u/", self.public_url);
        let mut out = String::with_capacity(html.len() + 256);
        let mut targets = Vec::new();
        let mut rest = html;
        while let Some(pos) = find_href(rest) {
            let (before, after) = rest.split_at(pos);
            out.push_str(before);
            // after = `href=` + quote + url + quote ...
            let quote_at = after.find(['"', '\'']).unwrap_or(after.len());
            let Some(quote) = after[quote_at..].chars().next() else {
                out.push_str(after);
                rest = "";
                break;
            };
            let url_start = quote_at + 1;
            let Some(len) = after[url_start..].find(quote) else {
                out.push_str(after);
                rest = "";
                break;
            };
            let raw = &after[url_start..url_start + len];
            // Template variables in attributes are HTML-escaped (`/` as `&#x2f;`).
            let target = decode_entities(raw);
            let lower = target.to_ascii_lowercase();
            out.push_str(&after[..url_start]);
            if target.starts_with(&unsubscribe_prefix) {
                // Our own link: written plainly, never tracked.
                out.push_str(if target.contains(quote) { raw } else { &target });
            } else if lower.starts_with("http://") || lower.starts_with("https://") {
                out.push_str(&self.click(u32::try_from(targets.len()).unwrap_or(u32::MAX)));
                targets.push(target);
            } else {
                out.push_str(raw);
            }
            rest = &after[url_start + len..];
        }
        out.push_str(rest);
        let pixel = format!(
            r#"<img src="{}" width="1" height="1" alt="" style="display:none">"#,
            self.open_pixel()
        );
        match out.to_ascii_lowercase().rfind("</body>") {
            Some(i) => out.insert_str(i, &pixel),
            None => out.push_str(&pixel),
        }
        (out, targets)
    }
}

/// How long a survey link works.
pub const SURVEY_DAYS: i64 = 30;

/// The survey link of a ticket.
pub fn survey_url(signer: &Signer, public_url: &str, tenant: TenantId, ticket: Uuid) -> String {
    let expires = (chrono::Utc::now() + chrono::Duration::days(SURVEY_DAYS)).timestamp();
    let claims = Claims {
        expires: u32::try_from(expires).unwrap_or(u32::MAX),
        ..Claims::new(Purpose::Survey, tenant.0, ticket, 0)
    };
    format!("{public_url}/s/{}", signer.token(claims))
}

/// Decodes the character references an HTML-escaping template engine writes in attributes.
fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    let mut out = s.to_owned();
    for (entity, c) in [
        ("&#x2f;", "/"),
        ("&#x2F;", "/"),
        ("&#47;", "/"),
        ("&#x27;", "'"),
        ("&#39;", "'"),
        ("&quot;", "\""),
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&#x3d;", "="),
        ("&#x3D;", "="),
    ] {
        out = out.replace(entity, c);
    }
    // Last, so that `&amp;#x2f;` stays the text `&#x2f;`.
    out.replace("&amp;", "&")
}

/// The position of the next `href=` attribute (any case, optional spaces before `=`).
fn find_href(s: &str) -> Option<usize> {
    let lower = s.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find("href") {
        let at = from + i;
        let tail = lower[at + 4..].trim_start();
        if tail.starts_with('=') {
            return Some(at);
        }
        from = at + 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_http_links_keeps_others_and_adds_the_pixel() {
        let signer = Signer::new(vec![3; 32]);
        let links = Links::new(
            &signer,
            "https://r.example",
            TenantId(Uuid::nil()),
            Uuid::nil(),
        );
        let html = r#"<html><body><a href="https://shop.example/offer?a=1&amp;b=2">Offer</a>
            <a HREF = 'mailto:x@y.z'>mail</a><a href="https://shop.example/interested">Yes</a></body></html>"#;
        let (out, targets) = links.instrument_html(html);
        assert_eq!(
            targets,
            [
                "https://shop.example/offer?a=1&b=2",
                "https://shop.example/interested"
            ]
        );
        assert!(out.contains("https://r.example/t/c/"));
        assert!(!out.contains("shop.example"));
        assert!(out.contains("mailto:x@y.z"));
        assert!(out.contains("/t/o/"));
        assert!(out.find("/t/o/").unwrap() < out.find("</body>").unwrap());
    }

    #[test]
    fn escaped_urls_are_decoded_and_the_unsubscribe_link_is_left_alone() {
        let signer = Signer::new(vec![3; 32]);
        let links = Links::new(
            &signer,
            "https://r.example",
            TenantId(Uuid::nil()),
            Uuid::nil(),
        );
        let html = r#"<a href="https:&#x2f;&#x2f;shop.example&#x2f;x">x</a><a href="https:&#x2f;&#x2f;r.example&#x2f;u&#x2f;tok">u</a>"#;
        let (out, targets) = links.instrument_html(html);
        assert_eq!(targets, ["https://shop.example/x"]);
        assert!(out.contains(r#"href="https://r.example/u/tok""#), "{out}");
    }
}
