//! Rapport's public HTML pages (the survey `/s/{token}`, unsubscribe `/u/{token}`): one layout,
//! one stylesheet, in the reader's language, under the company's name. Every asset is inline
//! and the Content-Security-Policy forbids any other request (the tenant's logo, when set, is
//! the one exception, from its own origin), so a page opened from a message loads nothing from
//! anyone else and leaks its signed token to no one (`Referrer-Policy: no-referrer`).

pub mod words;

use std::sync::LazyLock;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};

pub use crate::domain::Brand;
use crate::domain::Channel;
pub use words::Words;

/// The words of `locale` (`hr-HR` is `hr`; `bs` and `sr` read Croatian best; anything else is
/// English).
pub fn for_locale(locale: &str) -> &'static Words {
    match locale
        .split(['-', '_'])
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
        .as_str()
    {
        "hr" | "bs" | "sr" => &words::HR,
        "sl" => &words::SL,
        "hu" => &words::HU,
        "pl" => &words::PL,
        _ => &words::EN,
    }
}

/// The words for a reader Rapport knows nothing about (a broken link): the best language of
/// the browser's `Accept-Language`, else English.
pub fn negotiate(headers: &HeaderMap) -> &'static Words {
    let Some(accept) = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
    else {
        return &words::EN;
    };
    let mut ranged: Vec<(f32, &str)> = accept
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';');
            let tag = parts.next()?.trim();
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .map_or(Some(1.0), |q| q.trim().parse::<f32>().ok())?;
            (q > 0.0 && !tag.is_empty() && tag != "*").then_some((q, tag))
        })
        .collect();
    // Stable: equal weights keep the browser's order.
    ranged.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranged
        .into_iter()
        .find_map(|(_, tag)| {
            let primary = tag.split(['-', '_']).next().unwrap_or_default();
            ["en", "hr", "bs", "sr", "sl", "hu", "pl"]
                .iter()
                .any(|l| primary.eq_ignore_ascii_case(l))
                .then(|| for_locale(tag))
        })
        .unwrap_or(&words::EN)
}

/// How a sentence names a channel ("by email", "SMS porukama"...).
pub fn via(w: &Words, channel: Channel) -> &'static str {
    match channel {
        Channel::Email => w.via_email,
        Channel::Sms => w.via_sms,
        Channel::Viber => w.via_viber,
    }
}

/// Escapes text for HTML content and quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A sentence of [`Words`] with its `{name}` placeholders filled, escaped for HTML.
pub fn fill(sentence: &str, values: &[(&str, &str)]) -> String {
    let mut out = sentence.to_owned();
    for (name, value) in values {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    escape(&out)
}

/// A page: its status, language, title and body (HTML, already escaped).
pub struct Page<'a> {
    pub status: StatusCode,
    pub words: &'static Words,
    pub brand: Option<&'a Brand>,
    pub title: &'a str,
    pub body: String,
}

const STYLE: &str = "\
:root{color-scheme:light;--ink:#1d2433;--muted:#5b6475;--accent:#2446a8;--line:#c9cfdb;--bg:#f5f6f8}\
*{box-sizing:border-box}\
body{margin:0;background:var(--bg);color:var(--ink);font:1rem/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}\
main{max-width:40rem;margin:0 auto;padding:1.5rem 1rem 3rem}\
.brand{display:flex;align-items:center;gap:.75rem;margin-bottom:1.5rem;font-weight:600;font-size:1.1rem}\
.brand img{max-height:2.5rem;max-width:10rem}\
.card{background:#fff;border:1px solid var(--line);border-radius:.75rem;padding:1.25rem}\
h1{font-size:1.4rem;line-height:1.3;margin:0 0 .75rem}\
.ticket{color:var(--muted);margin:0 0 1rem;overflow-wrap:anywhere}\
fieldset{border:0;margin:0 0 1rem;padding:0}\
legend{font-weight:600;margin-bottom:.75rem;padding:0}\
.scale{display:grid;grid-template-columns:repeat(5,1fr);gap:.5rem}\
.scale label{display:flex;flex-direction:column;align-items:center;gap:.25rem;padding:.6rem .3rem;border:2px solid var(--line);border-radius:.5rem;text-align:center;cursor:pointer;font-size:.85rem;line-height:1.25}\
.scale .n{font-size:1.4rem;font-weight:700}\
.scale input{width:1.1rem;height:1.1rem;margin:0;accent-color:var(--accent)}\
.scale label:has(input:checked){border-color:var(--accent);background:#eef2fc}\
.scale label:has(input:focus-visible){outline:3px solid var(--accent);outline-offset:2px}\
@media (max-width:34rem){.scale{grid-template-columns:1fr}.scale label{flex-direction:row;text-align:left;gap:.75rem}.scale .n{min-width:1.5rem;text-align:center}}\
label.comment{display:block;font-weight:600;margin:0 0 .4rem}\
textarea{display:block;width:100%;min-height:7rem;padding:.5rem;font:inherit;border:1px solid var(--line);border-radius:.5rem}\
button{margin-top:1rem;font:inherit;font-weight:600;padding:.7rem 1.4rem;border:0;border-radius:.5rem;background:var(--accent);color:#fff;cursor:pointer}\
button.secondary{background:#fff;color:var(--accent);border:2px solid var(--accent)}\
button:focus-visible,textarea:focus-visible{outline:3px solid var(--accent);outline-offset:2px}\
.error{color:#a4161a;font-weight:600}\
.rating{font-weight:600}\
p{margin:0 0 1rem}";

/// The stylesheet's hash, for the Content-Security-Policy (no inline style but this one runs).
static STYLE_HASH: LazyLock<String> = LazyLock::new(|| {
    let digest = Sha256::digest(STYLE.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
});

/// The origin of an https logo URL (`https://cdn.example:8443`), for `img-src`.
fn origin(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    (u.scheme() == "https").then(|| u.origin().ascii_serialization())
}

/// The page as a response, with its Content-Security-Policy.
pub fn render(p: Page<'_>) -> Response {
    let (header_html, img_src) = match p.brand {
        Some(b) => {
            let logo = b.logo_url.as_deref().and_then(|u| Some((u, origin(u)?)));
            let img = logo.as_ref().map_or_else(String::new, |(u, _)| {
                format!(r#"<img src="{}" alt="">"#, escape(u))
            });
            (
                format!(
                    r#"<header class="brand">{img}<span>{}</span></header>"#,
                    escape(&b.name)
                ),
                logo.map_or_else(|| "'none'".to_owned(), |(_, o)| o),
            )
        }
        None => (String::new(), "'none'".to_owned()),
    };
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"{lang}\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex\">\n<title>{title}</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<main>\n{header_html}\n\
         <div class=\"card\">\n<h1>{title}</h1>\n{body}\n</div>\n</main>\n</body>\n</html>\n",
        lang = p.words.lang,
        title = escape(p.title),
        body = p.body,
    );
    let csp = format!(
        "default-src 'none'; style-src {}; img-src {img_src}; form-action 'self'; \
         base-uri 'none'; frame-ancestors 'none'",
        *STYLE_HASH
    );
    let mut response = (p.status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // No framing, no sniffing, no referrer: `crate::api`'s security headers, on every page.
    response
}

/// A link that leads nowhere (unsigned, tampered, or naming what no longer exists), in the
/// browser's language: 404.
pub fn invalid_link(headers: &HeaderMap) -> Response {
    let w = negotiate(headers);
    render(Page {
        status: StatusCode::NOT_FOUND,
        words: w,
        brand: None,
        title: w.invalid_title,
        body: format!("<p>{}</p>", escape(w.invalid)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn the_browsers_language_is_negotiated() {
        assert_eq!(negotiate(&HeaderMap::new()).lang, "en");
        assert_eq!(negotiate(&accept("hr-HR,hr;q=0.9,en;q=0.8")).lang, "hr");
        assert_eq!(negotiate(&accept("de-DE,de;q=0.9,pl;q=0.5")).lang, "pl");
        assert_eq!(negotiate(&accept("de-DE,en;q=0.7,hu;q=0.6")).lang, "en");
        assert_eq!(negotiate(&accept("en;q=0.2, sl")).lang, "sl");
        assert_eq!(negotiate(&accept("fr, *;q=0.1")).lang, "en");
        assert_eq!(negotiate(&accept("hu;q=0, pl;q=x")).lang, "en");
    }

    #[test]
    fn words_are_escaped_and_filled() {
        assert_eq!(
            fill("{a} & <{b}>", &[("a", "1"), ("b", "\"x\"")]),
            "1 &amp; &lt;&quot;x&quot;&gt;"
        );
        assert_eq!(for_locale("hr-HR").lang, "hr");
        assert_eq!(for_locale("PL_pl").lang, "pl");
        assert_eq!(for_locale("de").lang, "en");
    }

    #[test]
    fn no_language_leaves_a_sentence_in_english_or_a_placeholder_unknown() {
        let en = &words::EN;
        for w in words::ALL.iter().skip(1) {
            let pairs = [
                (w.invalid, en.invalid),
                (w.question, en.question),
                (w.thanks_score, en.thanks_score),
                (w.unsubscribed, en.unsubscribed),
                (w.resubscribe_button, en.resubscribe_button),
            ];
            for (theirs, english) in pairs {
                assert_ne!(theirs, english, "{}: untranslated", w.lang);
            }
            assert!(w.your_rating.contains("{score}"), "{}", w.lang);
            for s in [
                w.unsubscribe_question,
                w.unsubscribed,
                w.already_unsubscribed,
                w.resubscribed,
            ] {
                assert!(s.contains("{channel}"), "{}: {s}", w.lang);
            }
        }
    }
}
