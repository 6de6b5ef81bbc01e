//! Rapport's built-in templates: every message Rapport sends on its own (ticket
//! acknowledgement, solved ticket, satisfaction survey, low-rating alert, agent reply,
//! call-back notice, unsubscribe and STOP confirmations), in `en`, `hr`, `sl`, `hu` and `pl`,
//! so that a new tenant works out of the box. A tenant's template with the same key overrides
//! a default channel by channel and locale by locale.
//!
//! The texts live in `defaults/<key>.json`, in the body format of `PUT /v1/templates/{key}`;
//! an email's HTML is made here from its text, in one layout, so each wording is written
//! once per language.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use super::model::{TemplateInput, Variants};
use crate::domain::Purpose;

/// A built-in template.
#[derive(Debug)]
pub struct Builtin {
    pub purpose: Purpose,
    pub variants: Variants,
}

const SOURCES: &[(&str, &str)] = &[
    (
        "callback_notice",
        include_str!("defaults/callback_notice.json"),
    ),
    (
        "csat_late_comment",
        include_str!("defaults/csat_late_comment.json"),
    ),
    (
        "csat_low_rating_alert",
        include_str!("defaults/csat_low_rating_alert.json"),
    ),
    ("csat_survey", include_str!("defaults/csat_survey.json")),
    (
        "sms_stop_confirmation",
        include_str!("defaults/sms_stop_confirmation.json"),
    ),
    (
        "ticket_acknowledgement",
        include_str!("defaults/ticket_acknowledgement.json"),
    ),
    ("ticket_reply", include_str!("defaults/ticket_reply.json")),
    ("ticket_solved", include_str!("defaults/ticket_solved.json")),
    (
        "unsubscribe_confirmation",
        include_str!("defaults/unsubscribe_confirmation.json"),
    ),
];

static BUILTINS: LazyLock<BTreeMap<&'static str, Builtin>> = LazyLock::new(|| {
    SOURCES
        .iter()
        .filter_map(|(key, source)| match load(source) {
            Ok(builtin) => Some((*key, builtin)),
            // The unit tests load every one; this is a guard, not a path.
            Err(e) => {
                tracing::error!(key, error = %e, "a built-in template does not load");
                None
            }
        })
        .collect()
});

fn load(source: &str) -> Result<Builtin, String> {
    let input: TemplateInput = serde_json::from_str(source).map_err(|e| e.to_string())?;
    let (purpose, mut variants) = input
        .validate()
        .map_err(|e| format!("{:?}", e.into_vec()))?;
    for (locale, email) in variants.email.iter_mut() {
        if email.html.is_none() {
            email.html = email.text.as_deref().map(|t| html_from_text(t, locale));
        }
    }
    Ok(Builtin { purpose, variants })
}

/// The built-in template with this key.
pub fn get(key: &str) -> Option<&'static Builtin> {
    BUILTINS.get(key)
}

/// Every built-in key, in order.
pub fn keys() -> impl Iterator<Item = &'static str> {
    BUILTINS.keys().copied()
}

/// An email's HTML from its text: paragraphs at blank lines, line breaks kept, every
/// `{{ vars.*_url }}` a link, in one plain, readable layout (no images, no external
/// resources). The text is a template whose own markup (`{{ }}`, `{% %}`) holds no `&`, `<`
/// or `>`, so escaping those is safe; what the expressions print is escaped by the HTML
/// renderer.
fn html_from_text(text: &str, locale: &str) -> String {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let paragraphs: Vec<String> = escaped
        .split("\n\n")
        .map(|p| {
            format!(
                "<p style=\"margin:0 0 16px\">{}</p>",
                link_urls(p).replace('\n', "<br>\n")
            )
        })
        .collect();
    format!(
        "<!DOCTYPE html>\n<html lang=\"{locale}\">\n<head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"></head>\n\
         <body style=\"margin:0;padding:24px 16px;background:#ffffff;color:#1f2933;\
         font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;\
         font-size:16px;line-height:1.5\">\n<div style=\"max-width:560px;margin:0 auto\">\n{}\n\
         </div>\n</body>\n</html>\n",
        paragraphs.join("\n")
    )
}

/// Wraps each `{{ vars.<name>_url }}` in a link to itself.
fn link_urls(paragraph: &str) -> String {
    let mut out = String::with_capacity(paragraph.len());
    let mut rest = paragraph;
    while let Some(start) = rest.find("{{ vars.") {
        let Some(len) = rest[start..].find("}}") else {
            break;
        };
        let expr = &rest[start..start + len + 2];
        out.push_str(&rest[..start]);
        if expr.trim_end_matches(" }}").ends_with("_url") {
            out.push_str(&format!(
                "<a href=\"{expr}\" style=\"color:#0b63c5;font-weight:600\">{expr}</a>"
            ));
        } else {
            out.push_str(expr);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Channel;
    use crate::templates::render;
    use serde_json::json;

    const LOCALES: [&str; 5] = ["en", "hr", "sl", "hu", "pl"];

    #[test]
    fn every_builtin_loads_in_every_language() {
        assert_eq!(keys().count(), SOURCES.len());
        for key in keys() {
            let b = get(key).unwrap();
            for channel in [Channel::Email, Channel::Sms, Channel::Viber] {
                let locales = b.variants.locales(channel);
                let mut all = LOCALES.to_vec();
                all.sort_unstable();
                assert!(
                    locales.is_empty() || locales == all,
                    "{key} {channel:?}: {locales:?}"
                );
            }
        }
    }

    #[test]
    fn every_builtin_renders_with_and_without_optional_values() {
        let tenant = json!({"id": "t", "name": "Acme d.o.o.", "slug": "acme",
            "default_country": "HR", "default_locale": "hr", "timezone": "Europe/Zagreb"});
        let full = json!({
            "contact": {"first_name": "Ana"}, "tenant": tenant,
            "vars": {"ticket": {"number": 42, "subject": "Kartica <b>"},
                     "survey_url": "https://x.example/s/abc", "resubscribe_url": "https://x.example/u/abc",
                     "rating": {"score": 1, "comment": "Sporo & loše"}, "customer": "Ana Horvat",
                     "reply": "Poštovana, riješeno.", "agent": {"name": "Marija"},
                     "history": [{"author": "Ana Horvat", "at": "2026-12-02 10:15",
                                  "body": "Kartica <b> ne radi.", "quoted": "> Kartica <b> ne radi."}]}});
        let bare = json!({
            "contact": {"first_name": null}, "tenant": tenant,
            "vars": {"ticket": {"number": 42, "subject": "Kartica"},
                     "survey_url": "https://x.example/s/abc", "resubscribe_url": null,
                     "rating": {"score": 2, "comment": null}, "customer": "+385911234567",
                     "reply": "Riješeno.", "agent": {"name": "Marija"}, "history": []}});
        for key in keys() {
            let b = get(key).unwrap();
            for channel in [Channel::Email, Channel::Sms, Channel::Viber] {
                for locale in b.variants.locales(channel) {
                    for ctx in [&full, &bare] {
                        let r = render::render(&b.variants, channel, locale, ctx)
                            .unwrap_or_else(|e| panic!("{key} {channel:?} {locale}: {e:?}"));
                        let text = r.text.clone().unwrap_or_default();
                        assert!(
                            !text.contains("{{") && !text.contains("{%"),
                            "{key}: {text}"
                        );
                        assert!(!text.trim().is_empty(), "{key} {channel:?} {locale}");
                        if let Some(html) = &r.html {
                            assert!(html.contains(&format!("lang=\"{locale}\"")));
                            assert!(!html.contains("<b>"), "{key}: the subject is escaped");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn urls_become_links_in_the_html() {
        let b = get("csat_survey").unwrap();
        let html = b.variants.email["hr"].html.as_deref().unwrap();
        assert!(html.contains("<a href=\"{{ vars.survey_url }}\""), "{html}");
    }
}
