//! Template types and their validation.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::ContactRef;
use crate::domain::{Channel, Purpose};
use crate::validate;
use crate::validate::Errors;

/// An email variant: a subject and an HTML and/or a text body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailVariant {
    #[schema(example = "Your order {{ event.order }} is on its way")]
    pub subject: String,
    /// HTML body; variables are HTML-escaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// Plain-text body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// An SMS variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SmsVariant {
    #[schema(example = "Hi {{ contact.first_name }}, your code is {{ vars.code }}")]
    pub text: String,
}

/// A Viber button: a label and the link it opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ViberButton {
    pub text: String,
    pub url: String,
}

/// A Viber variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ViberVariant {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub button: Option<ViberButton>,
}

/// A template's variants: channel, then locale (`hr`, `en-GB`). No `deny_unknown_fields`: a
/// `Template` flattens these next to its own fields, and the OpenAPI schema of a type that
/// denies unknown fields would forbid them (clients' input is `TemplateInput`, which denies).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Variants {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub email: BTreeMap<String, EmailVariant>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sms: BTreeMap<String, SmsVariant>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub viber: BTreeMap<String, ViberVariant>,
}

impl Variants {
    /// Every template text of every variant (subjects, bodies, button labels and links).
    pub fn texts(&self) -> Vec<&str> {
        let mut texts: Vec<&str> = Vec::new();
        for v in self.email.values() {
            texts.push(&v.subject);
            texts.extend(v.html.as_deref());
            texts.extend(v.text.as_deref());
        }
        texts.extend(self.sms.values().map(|v| v.text.as_str()));
        for v in self.viber.values() {
            texts.push(&v.text);
            if let Some(b) = &v.button {
                texts.extend([b.text.as_str(), b.url.as_str()]);
            }
        }
        texts
    }

    /// The locales a channel has a variant in.
    pub fn locales(&self, channel: Channel) -> Vec<&str> {
        match channel {
            Channel::Email => self.email.keys().map(String::as_str).collect(),
            Channel::Sms => self.sms.keys().map(String::as_str).collect(),
            Channel::Viber => self.viber.keys().map(String::as_str).collect(),
        }
    }

    pub fn has(&self, channel: Channel) -> bool {
        !self.locales(channel).is_empty()
    }

    /// These variants with `over`'s put on top, channel by channel and locale by locale.
    pub fn overlaid(&self, over: &Variants) -> Variants {
        let mut out = self.clone();
        out.email
            .extend(over.email.iter().map(|(l, v)| (l.clone(), v.clone())));
        out.sms
            .extend(over.sms.iter().map(|(l, v)| (l.clone(), v.clone())));
        out.viber
            .extend(over.viber.iter().map(|(l, v)| (l.clone(), v.clone())));
        out
    }

    /// Only `channel`'s variant in `locale` (what one render needs).
    pub fn only(&self, channel: Channel, locale: &str) -> Variants {
        let mut out = Variants::default();
        match channel {
            Channel::Email => {
                if let Some(v) = self.email.get(locale) {
                    out.email.insert(locale.to_owned(), v.clone());
                }
            }
            Channel::Sms => {
                if let Some(v) = self.sms.get(locale) {
                    out.sms.insert(locale.to_owned(), v.clone());
                }
            }
            Channel::Viber => {
                if let Some(v) = self.viber.get(locale) {
                    out.viber.insert(locale.to_owned(), v.clone());
                }
            }
        }
        out
    }
}

/// `PUT /v1/templates/{key}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateInput {
    /// `transactional` (the default) or `marketing`; marketing needs an opt-in.
    pub purpose: Option<Purpose>,
    /// Email variants by locale.
    #[serde(default)]
    pub email: BTreeMap<String, EmailVariant>,
    /// SMS variants by locale.
    #[serde(default)]
    pub sms: BTreeMap<String, SmsVariant>,
    /// Viber variants by locale.
    #[serde(default)]
    pub viber: BTreeMap<String, ViberVariant>,
}

/// A template as it is used: the tenant's own, a built-in default, or the tenant's variants
/// over a default's.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Template {
    pub key: String,
    pub purpose: Purpose,
    /// Where the variants come from.
    pub source: TemplateSource,
    #[serde(flatten)]
    pub variants: Variants,
    /// When the tenant saved it; null for a built-in default.
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// Where a template's variants come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TemplateSource {
    /// Rapport's built-in text, in en, hr, sl, hu and pl.
    Default,
    /// The tenant's own; no default has this key.
    Tenant,
    /// The tenant's variants, with the default's for the channels and locales it did not
    /// write.
    Customised,
}

/// Template keys: lower-case letters, digits, `_`, `-` and `.`.
pub fn validate_key(key: &str) -> Result<(), String> {
    let ok = (1..=100).contains(&key.len())
        && key.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{key}` is not a template key: 1-100 lower-case letters, digits, `_`, `-` and `.`"
        ))
    }
}

impl TemplateInput {
    /// Normalises locales and checks that every text compiles; all errors at once.
    pub fn validate(self) -> Result<(Purpose, Variants), Errors> {
        let mut errors = Errors::new();
        let TemplateInput {
            purpose,
            email,
            sms,
            viber,
        } = self;
        let mut out = Variants::default();
        for (locale, v) in email {
            let Some(l) = errors.check(&format!("email.{locale}"), validate::locale(&locale))
            else {
                continue;
            };
            let at = |part: &str| format!("email.{locale}.{part}");
            check_source(&mut errors, &at("subject"), &v.subject);
            if v.html.is_none() && v.text.is_none() {
                errors.add(
                    format!("email.{locale}"),
                    "give an html or a text body (or both)",
                );
            }
            if let Some(html) = &v.html {
                check_source(&mut errors, &at("html"), html);
            }
            if let Some(text) = &v.text {
                check_source(&mut errors, &at("text"), text);
            }
            out.email.insert(l, v);
        }
        for (locale, v) in sms {
            let Some(l) = errors.check(&format!("sms.{locale}"), validate::locale(&locale)) else {
                continue;
            };
            check_source(&mut errors, &format!("sms.{locale}.text"), &v.text);
            out.sms.insert(l, v);
        }
        for (locale, v) in viber {
            let Some(l) = errors.check(&format!("viber.{locale}"), validate::locale(&locale))
            else {
                continue;
            };
            check_source(&mut errors, &format!("viber.{locale}.text"), &v.text);
            if let Some(b) = &v.button {
                check_source(&mut errors, &format!("viber.{locale}.button.text"), &b.text);
                check_source(&mut errors, &format!("viber.{locale}.button.url"), &b.url);
            }
            out.viber.insert(l, v);
        }
        if !out.has(Channel::Email)
            && !out.has(Channel::Sms)
            && !out.has(Channel::Viber)
            && errors.is_empty()
        {
            errors.add(
                "body",
                "a template needs at least one email, sms or viber variant",
            );
        }
        if errors.is_empty() {
            Ok((purpose.unwrap_or(Purpose::Transactional), out))
        } else {
            Err(errors)
        }
    }
}

fn check_source(errors: &mut Errors, field: &str, source: &str) {
    if let Err(message) = super::render::check_syntax(source) {
        errors.add(field, message);
    }
}

/// `POST /v1/templates/{key}/preview`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    pub channel: Channel,
    /// Render for this contact (by id, or by reference).
    pub contact_id: Option<Uuid>,
    pub contact: Option<ContactRef>,
    /// The locale to render; the contact's, then the tenant's, when absent.
    pub locale: Option<String>,
    /// An event, available as `event`.
    #[schema(value_type = Option<Object>)]
    pub event: Option<Map<String, Value>>,
    /// Caller variables, available as `vars`.
    #[schema(value_type = Option<Object>)]
    pub vars: Option<Map<String, Value>>,
}

/// A rendered message.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Rendered {
    pub channel: Option<Channel>,
    pub locale: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// Channel extras, such as a Viber button.
    #[schema(value_type = Object)]
    pub extras: Value,
}
