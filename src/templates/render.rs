//! Rendering with minijinja, sandboxed: no loader (so no file or network access), a fuel limit
//! that bounds the work of any template, and strict undefined variables, so that a missing
//! variable is an error rather than a blank in a customer's message.

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::{Value, json};

use super::model::{Rendered, Variants};
use crate::domain::Channel;

/// Instructions one render may execute; a loop over a huge range runs out.
const FUEL: u64 = 100_000;
/// Longest rendered text.
const MAX_OUTPUT: usize = 256 * 1024;

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env
}

/// Whether a template text compiles; the message names the line.
pub fn check_syntax(source: &str) -> Result<(), String> {
    let env = environment();
    env.template_from_str(source)
        .map(|_| ())
        .map_err(|e| describe(&e))
}

/// Whether any text of these variants may read the contact's `stats` or `last_event_at`
/// (found statically: `contact.stats...`, or `contact` used whole, which may reach them; a text
/// that does not compile counts as reading them). A sender that knows none does may read its
/// contacts without them.
pub fn reads_contact_stats(variants: &Variants) -> bool {
    let env = environment();
    let reads = |name: &str| {
        name == "contact"
            || ["contact.stats", "contact.last_event_at"]
                .iter()
                .any(|p| name == *p || name.strip_prefix(p).is_some_and(|r| r.starts_with('.')))
    };
    variants
        .texts()
        .into_iter()
        .any(|text| match env.template_from_str(text) {
            Ok(t) => t.undeclared_variables(true).iter().any(|v| reads(v)),
            Err(_) => true,
        })
}

fn describe(e: &minijinja::Error) -> String {
    let mut message = e.to_string();
    if let Some(line) = e.line() {
        if !message.contains("line") {
            message.push_str(&format!(" (line {line})"));
        }
    }
    message
}

/// A render failure: which part of which variant, and why.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{field}: {message}")]
pub struct RenderError {
    pub field: String,
    pub message: String,
}

/// Renders one text (`name` decides HTML escaping: `.html` escapes); errors name `field`.
pub fn render_text(
    name: &str,
    source: &str,
    ctx: &Value,
    field: String,
) -> Result<String, RenderError> {
    render_one(name, source, ctx, field)
}

fn render_one(name: &str, source: &str, ctx: &Value, field: String) -> Result<String, RenderError> {
    let env = environment();
    let fail = |e: minijinja::Error| RenderError {
        field: field.clone(),
        message: describe(&e),
    };
    let template = env.template_from_named_str(name, source).map_err(fail)?;
    let mut out = Capped(Vec::new());
    match template.render_captured_to(ctx, &mut out) {
        Ok(_) => {}
        Err(e) if out.0.len() > MAX_OUTPUT => {
            tracing::debug!(error = %e, "render stopped at the output cap");
            return Err(RenderError {
                field,
                message: format!("renders to more than {MAX_OUTPUT} bytes"),
            });
        }
        Err(e) => return Err(fail(e)),
    }
    let text = String::from_utf8(out.0).map_err(|_| RenderError {
        field: field.clone(),
        message: "renders to text that is not UTF-8".to_owned(),
    })?;
    // PostgreSQL's text cannot hold NUL: refused here with a reason, not a database error
    // that would stop a campaign's journey without one.
    if text.contains('\0') {
        return Err(RenderError {
            field,
            message: "renders a NUL character, which a message cannot contain".to_owned(),
        });
    }
    Ok(text)
}

/// Output that refuses to grow past [`MAX_OUTPUT`], so a loop that only prints stops at the
/// cap instead of after it has filled memory.
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            // Keep the length over the cap, so the caller can tell this error from others.
            self.0.resize(MAX_OUTPUT + 1, 0);
            return Err(std::io::Error::other("output cap"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The best locale of `available` for `wanted`, then `fallback`: an exact match, then the same
/// language (`en-GB` -> `en`, `en` -> `en-US`).
pub fn pick_locale<'a>(available: &[&'a str], wanted: &[&str]) -> Option<&'a str> {
    for w in wanted {
        if let Some(exact) = available.iter().find(|a| a.eq_ignore_ascii_case(w)) {
            return Some(exact);
        }
        let lang = w.split('-').next().unwrap_or(w);
        if let Some(same) = available
            .iter()
            .find(|a| a.split('-').next().unwrap_or(a).eq_ignore_ascii_case(lang))
        {
            return Some(same);
        }
    }
    None
}

/// Renders `channel`'s variant in `locale` with the context
/// `{contact, tenant, event, vars}`.
pub fn render(
    variants: &Variants,
    channel: Channel,
    locale: &str,
    ctx: &Value,
) -> Result<Rendered, RenderError> {
    let missing = || RenderError {
        field: format!("{}.{locale}", channel.as_str()),
        message: "the template has no such variant".to_owned(),
    };
    let at = |part: &str| format!("{}.{locale}.{part}", channel.as_str());
    let mut out = Rendered {
        channel: Some(channel),
        locale: locale.to_owned(),
        extras: json!({}),
        ..Rendered::default()
    };
    match channel {
        Channel::Email => {
            let v = variants.email.get(locale).ok_or_else(missing)?;
            out.subject = Some(render_one("subject.txt", &v.subject, ctx, at("subject"))?);
            if let Some(html) = &v.html {
                out.html = Some(render_one("body.html", html, ctx, at("html"))?);
            }
            if let Some(text) = &v.text {
                out.text = Some(render_one("body.txt", text, ctx, at("text"))?);
            }
        }
        Channel::Sms => {
            let v = variants.sms.get(locale).ok_or_else(missing)?;
            out.text = Some(render_one("sms.txt", &v.text, ctx, at("text"))?);
        }
        Channel::Viber => {
            let v = variants.viber.get(locale).ok_or_else(missing)?;
            out.text = Some(render_one("viber.txt", &v.text, ctx, at("text"))?);
            if let Some(b) = &v.button {
                out.extras = json!({"button": {
                    "text": render_one("button.txt", &b.text, ctx, at("button.text"))?,
                    "url": render_one("button.txt", &b.url, ctx, at("button.url"))?,
                }});
            }
        }
    }
    Ok(out)
}

/// The variables a template sees: `contact`, `tenant`, `event` (when there is one) and `vars`.
pub fn context(
    contact: Option<&crate::contacts::model::Contact>,
    tenant: &crate::tenants::model::Tenant,
    event: Option<&Value>,
    vars: &Value,
) -> Value {
    let mut ctx = serde_json::Map::new();
    if let Some(c) = contact {
        ctx.insert(
            "contact".into(),
            serde_json::to_value(c).unwrap_or(Value::Null),
        );
    }
    ctx.insert(
        "tenant".into(),
        json!({"id": tenant.id, "name": tenant.name, "slug": tenant.slug,
               "default_country": tenant.default_country, "default_locale": tenant.default_locale,
               "timezone": tenant.timezone}),
    );
    if let Some(e) = event {
        ctx.insert("event".into(), e.clone());
    }
    ctx.insert("vars".into(), vars.clone());
    Value::Object(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::model::{EmailVariant, SmsVariant};

    fn variants() -> Variants {
        let mut v = Variants::default();
        v.email.insert(
            "hr".into(),
            EmailVariant {
                subject: "Bok {{ contact.first_name }}".into(),
                html: Some("<p>{{ vars.note }}</p>".into()),
                text: Some("{{ vars.note }}".into()),
            },
        );
        v.sms.insert(
            "en".into(),
            SmsVariant {
                text: "{% for i in range(100000) %}x{% endfor %}".into(),
            },
        );
        v
    }

    #[test]
    fn a_template_reads_the_contacts_stats_when_a_text_names_them_or_the_contact_whole() {
        let sms = |text: &str| {
            let mut v = Variants::default();
            v.sms.insert("hr".into(), SmsVariant { text: text.into() });
            v
        };
        // The fixture's texts name `contact.first_name` and `vars` only.
        assert!(!reads_contact_stats(&variants()));
        for text in [
            "Bok {{ contact.first_name }}, {{ contact.attributes.plan }}",
            "{{ contact.statsx }} {{ stats }} {{ vars.contact }}",
            "Bez varijabli",
        ] {
            assert!(!reads_contact_stats(&sms(text)), "{text}");
        }
        for text in [
            "{{ contact.stats['purchase.completed'] }} kupnji",
            "{{ contact.last_event_at.x }}",
            "{% for k, v in contact|items %}{{ k }}{% endfor %}",
            "{{ contact['stats'] }}",
            "{% set c = contact %}{{ c.stats }}",
            "{{ contact.first_name",
        ] {
            assert!(reads_contact_stats(&sms(text)), "{text}");
        }
        // Every text of every channel counts: an email's HTML body, a Viber button's link.
        let mut email = variants();
        email.sms.clear();
        for v in email.email.values_mut() {
            v.html = Some("<p>{{ contact.stats }}</p>".into());
        }
        assert!(reads_contact_stats(&email));
        let mut viber = Variants::default();
        viber.viber.insert(
            "hr".into(),
            crate::templates::model::ViberVariant {
                text: "Bok".into(),
                button: Some(crate::templates::model::ViberButton {
                    text: "Kupi".into(),
                    url: "https://x.example/?n={{ contact.last_event_at.purchase }}".into(),
                }),
            },
        );
        assert!(reads_contact_stats(&viber));
    }

    #[test]
    fn renders_with_html_escaping_only_in_html() {
        let ctx = json!({"contact": {"first_name": "Ana"}, "vars": {"note": "<b>5 > 3</b>"}});
        let r = render(&variants(), Channel::Email, "hr", &ctx).unwrap();
        assert_eq!(r.subject.as_deref(), Some("Bok Ana"));
        assert_eq!(
            r.html.as_deref(),
            Some("<p>&lt;b&gt;5 &gt; 3&lt;&#x2f;b&gt;</p>")
        );
        assert_eq!(r.text.as_deref(), Some("<b>5 > 3</b>"));
    }

    #[test]
    fn a_missing_variable_is_an_error_naming_the_part() {
        let ctx = json!({"contact": {}, "vars": {"note": "x"}});
        let e = render(&variants(), Channel::Email, "hr", &ctx).unwrap_err();
        assert_eq!(e.field, "email.hr.subject");
    }

    #[test]
    fn runaway_templates_run_out_of_fuel() {
        let e = render(&variants(), Channel::Sms, "en", &json!({})).unwrap_err();
        assert!(e.message.contains("fuel"), "{}", e.message);
    }

    #[test]
    fn output_is_capped_while_it_is_written() {
        let source = "{% for i in range(10) %}{{ 'x' * 100000 }}{% endfor %}";
        let e = render_text("t.txt", source, &json!({}), "text".into()).unwrap_err();
        assert!(e.message.contains("more than"), "{}", e.message);
    }

    #[test]
    fn a_nul_in_the_output_is_a_render_error() {
        let e = render_text("t.txt", "a{{ '\\u0000' }}b", &json!({}), "text".into()).unwrap_err();
        assert!(e.message.contains("NUL"), "{}", e.message);
    }

    #[test]
    fn locale_fallback() {
        assert_eq!(pick_locale(&["en", "hr"], &["hr-HR", "en"]), Some("hr"));
        assert_eq!(pick_locale(&["en-GB"], &["en"]), Some("en-GB"));
        assert_eq!(pick_locale(&["de"], &["hr", "en"]), None);
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(check_syntax("{{ unclosed").is_err());
        assert!(check_syntax("Hello {{ contact.first_name }}").is_ok());
    }
}
