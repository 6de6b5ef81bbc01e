//! Field validators shared by every resource: each returns the normalised value or a message.

use std::str::FromStr;

use serde::Serialize;
use utoipa::ToSchema;

/// One invalid field of a request, with the JSON path of the field (`contacts[3].phone`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Input that failed validation: every invalid field with its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub Vec<FieldError>);

impl Invalid {
    /// One invalid field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid(vec![FieldError::new(field, message)])
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.first() {
            Some(e) => write!(f, "{}: {}", e.field, e.message),
            None => f.write_str("invalid input"),
        }
    }
}

impl std::error::Error for Invalid {}

/// Collects every invalid field of a request, so a client learns all of them at once.
#[derive(Default)]
pub struct Errors(Vec<FieldError>);

impl Errors {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    /// Runs a validator, keeping the value or recording the error under `field`.
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        self.check_with(|| field.to_owned(), result)
    }

    /// [`Errors::check`] for a field name that has to be written out (`events[3].type`):
    /// `field` runs only when there is an error, so valid input costs no formatting.
    pub fn check_with<T>(
        &mut self,
        field: impl FnOnce() -> String,
        result: Result<T, String>,
    ) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(message) => {
                self.add(field(), message);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Err with every collected error, or Ok when there are none.
    pub fn finish(self) -> Result<(), Invalid> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Invalid(self.0))
        }
    }

    pub fn into_vec(self) -> Vec<FieldError> {
        self.0
    }
}

/// An ISO 3166-1 alpha-2 country code known to the phone-numbering plan, upper-cased.
pub fn country(raw: &str) -> Result<String, String> {
    let code = raw.trim().to_ascii_uppercase();
    if code.len() == 2 && phonenumber::country::Id::from_str(&code).is_ok() {
        Ok(code)
    } else {
        Err(format!("`{raw}` is not an ISO 3166-1 alpha-2 country code"))
    }
}

/// A BCP 47 language tag of the common `ll` or `ll-CC` shape (`hr`, `en-GB`).
pub fn locale(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    let mut parts = raw.split(['-', '_']);
    let lang = parts.next().unwrap_or_default();
    let region = parts.next();
    let lang_ok = (2..=3).contains(&lang.len()) && lang.chars().all(|c| c.is_ascii_alphabetic());
    let region_ok = region.is_none_or(|r| {
        (r.len() == 2 && r.chars().all(|c| c.is_ascii_alphabetic()))
            || (r.len() == 3 && r.chars().all(|c| c.is_ascii_digit()))
    });
    if lang_ok && region_ok && parts.next().is_none() {
        Ok(match region {
            Some(r) => format!("{}-{}", lang.to_ascii_lowercase(), r.to_ascii_uppercase()),
            None => lang.to_ascii_lowercase(),
        })
    } else {
        Err(format!(
            "`{raw}` is not a language tag such as `hr` or `en-GB`"
        ))
    }
}

/// An IANA time-zone name (`Europe/Zagreb`).
pub fn timezone(raw: &str) -> Result<String, String> {
    chrono_tz::Tz::from_str(raw.trim())
        .map(|tz| tz.name().to_owned())
        .map_err(|_| format!("`{raw}` is not an IANA time zone such as `Europe/Zagreb`"))
}

/// An email address, trimmed and lower-cased so lookups are case-insensitive.
pub fn email(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim();
    match email_address::EmailAddress::from_str(trimmed) {
        Ok(_) if trimmed.len() <= 254 && trimmed.contains('.') => Ok(trimmed.to_lowercase()),
        _ => Err(format!("`{raw}` is not a valid email address")),
    }
}

/// A phone number in any common format, as E.164; national formats use `country`.
///
/// ```
/// use rapport::validate::phone;
/// assert_eq!(phone("091 234 5678", Some("HR")).unwrap(), "+385912345678");
/// assert_eq!(phone("0044 20 7946 0018", None).unwrap(), "+442079460018");
/// assert!(phone("091 234 5678", None).is_err()); // national, and no country to read it in
/// ```
pub fn phone(raw: &str, country: Option<&str>) -> Result<String, String> {
    let region = country.and_then(|c| phonenumber::country::Id::from_str(c).ok());
    let invalid = || format!("`{raw}` is not a valid phone number");
    let trimmed = raw.trim();
    if trimmed.is_empty() || trimmed.len() > 40 {
        return Err(invalid());
    }
    // "00" international prefix, common in Europe, is not understood without a region.
    let normalised;
    let input = match trimmed.strip_prefix("00") {
        Some(rest) if region.is_none() => {
            normalised = format!("+{rest}");
            normalised.as_str()
        }
        _ => trimmed,
    };
    let number = phonenumber::parse(region, input).map_err(|_| invalid())?;
    if !phonenumber::is_valid(&number) {
        return Err(invalid());
    }
    Ok(number.format().mode(phonenumber::Mode::E164).to_string())
}

/// An event type: lower-case words of `[a-z0-9_]` joined by dots (`purchase.completed`).
pub fn event_type(raw: &str) -> Result<(), String> {
    let ok = !raw.is_empty()
        && raw.len() <= 100
        && raw.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{raw}` is not an event type: use lower-case words of [a-z0-9_] joined by dots, \
             such as `purchase.completed`"
        ))
    }
}

/// A URL-safe identifier of lower-case letters, digits and dashes.
pub fn slug(raw: &str) -> Result<String, String> {
    let ok = (1..=63).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !raw.starts_with('-')
        && !raw.ends_with('-');
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "`{raw}` is not a slug: 1-63 lower-case letters, digits and inner dashes"
        ))
    }
}

/// The slug derived from a name: `Acme Credit d.o.o.` -> `acme-credit-d-o-o`.
pub fn slugify(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let trimmed = out.trim_end_matches('-');
    trimmed
        .chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_owned()
}

/// A required, trimmed, non-empty text of at most `max` characters.
pub fn text(raw: &str, max: usize) -> Result<String, String> {
    let t = raw.trim();
    if t.is_empty() {
        Err("must not be empty".to_owned())
    } else if t.chars().count() > max {
        Err(format!("must be at most {max} characters"))
    } else {
        Ok(t.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_normalise_to_e164() {
        assert_eq!(phone("091 234 5678", Some("HR")).unwrap(), "+385912345678");
        assert_eq!(phone("+385 91 234 5678", None).unwrap(), "+385912345678");
        assert_eq!(phone("00385912345678", None).unwrap(), "+385912345678");
        assert_eq!(
            phone("(020) 7946 0018", Some("GB")).unwrap(),
            "+442079460018"
        );
        assert!(phone("12", Some("HR")).is_err());
        assert!(phone("not a number", None).is_err());
        assert!(phone("091 234 5678", None).is_err());
    }

    #[test]
    fn countries_locales_timezones() {
        assert_eq!(country("hr").unwrap(), "HR");
        assert!(country("XX").is_err());
        assert!(country("HRV").is_err());
        assert_eq!(locale("en_gb").unwrap(), "en-GB");
        assert!(locale("english").is_err());
        assert_eq!(timezone("Europe/Zagreb").unwrap(), "Europe/Zagreb");
        assert!(timezone("Mars/Olympus").is_err());
    }

    #[test]
    fn event_types() {
        assert!(event_type("purchase.completed").is_ok());
        assert!(event_type("credit_check.approved").is_ok());
        for bad in ["", "Purchase", "a..b", ".a", "a.", "a-b", "a b"] {
            assert!(event_type(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn slugs() {
        assert_eq!(slugify("Acme Credit d.o.o."), "acme-credit-d-o-o");
        assert_eq!(slugify("  Šuma  "), "uma");
        assert!(slug("acme").is_ok());
        assert!(slug("-acme").is_err());
    }

    proptest::proptest! {
        #[test]
        fn phone_never_panics_and_output_is_e164(s in "\\PC{0,30}") {
            if let Ok(e164) = phone(&s, Some("HR")) {
                proptest::prop_assert!(e164.starts_with('+'));
                proptest::prop_assert!(e164[1..].bytes().all(|b| b.is_ascii_digit()));
                // Normalising is idempotent.
                proptest::prop_assert_eq!(phone(&e164, None).unwrap(), e164);
            }
        }

        #[test]
        fn event_type_never_panics(s in "\\PC{0,40}") {
            let _ = event_type(&s);
        }
    }
}
