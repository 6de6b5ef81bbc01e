//! What conditions see, as CEL values: `contact` (its fields, `attributes` and `stats`),
//! `event` (`type`, `properties`, `occurred_at`, `ordinal`) and `now`.
//!
//! Free JSON (attributes, event properties) follows CEL's JSON mapping: every number is a
//! double, so `available_credit / credit_limit` divides as a merchant expects. Counts in
//! `contact.stats` are integers, under the event type with dots as underscores
//! (`contact.stats.purchase_completed`) as well as under the type itself.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cel::objects::{Key, Map as CelMap};
use cel::{Context, ExecutionError, Value as Cel};
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::model::Condition;

fn env() -> Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(cel::Env::stdlib())).clone()
}

/// Free JSON as CEL sees it: numbers are doubles.
pub fn json(value: &Value) -> Cel {
    match value {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => Cel::Float(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(items) => Cel::List(Arc::new(items.iter().map(json).collect())),
        Value::Object(map) => object(map.iter().map(|(k, v)| (k.as_str(), json(v)))),
    }
}

fn object<'a>(entries: impl Iterator<Item = (&'a str, Cel)>) -> Cel {
    let map: HashMap<Key, Cel> = entries
        .map(|(k, v)| (Key::String(Arc::new(k.to_owned())), v))
        .collect();
    Cel::Map(CelMap { map: Arc::new(map) })
}

/// A contact (as the API serialises it) for conditions.
pub fn contact(serialized: &Value) -> Cel {
    let Value::Object(fields) = serialized else {
        return Cel::Null;
    };
    let entries = fields.iter().map(|(k, v)| {
        let value = if k == "stats" { stats(v) } else { json(v) };
        (k.as_str(), value)
    });
    object(entries)
}

fn stats(counts: &Value) -> Cel {
    let mut map: HashMap<Key, Cel> = HashMap::new();
    if let Value::Object(counts) = counts {
        for (kind, n) in counts {
            let n = Cel::Int(n.as_i64().unwrap_or(0));
            map.insert(Key::String(Arc::new(kind.replace('.', "_"))), n.clone());
            map.insert(Key::String(Arc::new(kind.clone())), n);
        }
    }
    Cel::Map(CelMap { map: Arc::new(map) })
}

/// An event for conditions.
pub fn event(
    kind: &str,
    properties: &Value,
    occurred_at: DateTime<Utc>,
    ordinal: i64,
    source: &str,
) -> Cel {
    object(
        [
            ("type", Cel::String(Arc::new(kind.to_owned()))),
            ("properties", json(properties)),
            ("occurred_at", Cel::Timestamp(occurred_at.fixed_offset())),
            ("ordinal", Cel::Int(ordinal)),
            ("source", Cel::String(Arc::new(source.to_owned()))),
        ]
        .into_iter(),
    )
}

/// Evaluates a condition. A condition that cannot be evaluated (an attribute the contact does
/// not have, a type mismatch) or is not a boolean is false: use `has()` for optional fields.
pub fn holds(condition: &Condition, contact: &Cel, event: &Cel, now: DateTime<Utc>) -> bool {
    Facts::new(contact, event, now).holds(condition)
}

/// A contact, an event and the time bound once, for the several conditions one event is
/// checked against: binding converts every value to CEL's own representation, which costs
/// more than evaluating a typical condition.
pub struct Facts {
    ctx: Context<'static, 'static>,
}

impl Facts {
    pub fn new(contact: &Cel, event: &Cel, now: DateTime<Utc>) -> Facts {
        let mut ctx = Context::with_env(env());
        ctx.add_variable_from_value("contact", contact.clone());
        ctx.add_variable_from_value("event", event.clone());
        ctx.add_variable_from_value("now", Cel::Timestamp(now.fixed_offset()));
        Facts { ctx }
    }

    /// Whether `condition` holds for these facts (see [`holds`]).
    pub fn holds(&self, condition: &Condition) -> bool {
        match condition.program().execute(&self.ctx) {
            Ok(Cel::Bool(b)) => b,
            Ok(other) => {
                tracing::debug!(condition = condition.source(), result = ?other, "condition is not a boolean");
                false
            }
            Err(e) => {
                tracing::debug!(condition = condition.source(), error = %e, "condition cannot be evaluated");
                false
            }
        }
    }
}

/// Runs a freshly compiled condition against an empty contact and event, to refuse names
/// conditions cannot see (`customer.plan`) when the campaign is written.
pub fn dry_run(condition: &Condition) -> Result<(), String> {
    let contact = contact(&serde_json::json!({
        "id": "00000000-0000-0000-0000-000000000000", "external_id": null, "email": null,
        "phone": null, "viber_id": null, "first_name": null, "last_name": null, "locale": null,
        "country": null, "timezone": null, "birthday": null, "owner_agent_id": null,
        "attributes": {}, "consents": {}, "stats": {}, "created_at": null, "updated_at": null
    }));
    let event = event("sample", &serde_json::json!({}), Utc::now(), 1, "api");
    match condition
        .program()
        .execute(&Facts::new(&contact, &event, Utc::now()).ctx)
    {
        Err(ExecutionError::UndeclaredReference(name)) => Err(format!(
            "unknown name `{name}`: conditions see `contact`, `event` and `now`"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn facts(attributes: Value, stats_: Value) -> Cel {
        contact(&json!({"attributes": attributes, "stats": stats_, "timezone": "Europe/Zagreb"}))
    }

    #[test]
    fn ratios_of_whole_numbers_divide_as_merchants_expect() {
        let c = Condition::compile(
            "contact.attributes.available_credit / contact.attributes.credit_limit > 0.9",
        )
        .unwrap();
        let e = event("contact.updated", &json!({}), Utc::now(), 1, "rapport");
        let yes = facts(
            json!({"available_credit": 9500, "credit_limit": 10000}),
            json!({}),
        );
        let no = facts(
            json!({"available_credit": 8000, "credit_limit": 10000}),
            json!({}),
        );
        assert!(holds(&c, &yes, &e, Utc::now()));
        assert!(!holds(&c, &no, &e, Utc::now()));
    }

    #[test]
    fn stats_answer_under_underscored_and_dotted_names() {
        let c = Condition::compile(
            "contact.stats.purchase_completed == 1 && contact.stats['purchase.completed'] == 1",
        )
        .unwrap();
        let e = event("purchase.completed", &json!({}), Utc::now(), 1, "api");
        assert!(holds(
            &c,
            &facts(json!({}), json!({"purchase.completed": 1})),
            &e,
            Utc::now()
        ));
        assert!(!holds(
            &c,
            &facts(json!({}), json!({"purchase.completed": 2})),
            &e,
            Utc::now()
        ));
    }

    #[test]
    fn a_missing_attribute_makes_the_condition_false_not_an_error() {
        let c = Condition::compile("contact.attributes.plan == 'gold'").unwrap();
        let e = event("x", &json!({}), Utc::now(), 1, "api");
        assert!(!holds(&c, &facts(json!({}), json!({})), &e, Utc::now()));
        let c =
            Condition::compile("has(contact.attributes.plan) && contact.attributes.plan == 'gold'")
                .unwrap();
        assert!(holds(
            &c,
            &facts(json!({"plan": "gold"}), json!({})),
            &e,
            Utc::now()
        ));
    }

    proptest! {
        /// Whatever a merchant types, compiling and evaluating never panics.
        #[test]
        fn arbitrary_conditions_never_panic(source in "\\PC{0,60}") {
            if let Ok(c) = Condition::compile(&source) {
                let e = event("x", &json!({"score": 2}), Utc::now(), 1, "api");
                let _ = holds(&c, &facts(json!({"a": 1}), json!({})), &e, Utc::now());
            }
        }

        #[test]
        fn score_thresholds_evaluate_like_rust(score in 1i64..=5, limit in 1i64..=5) {
            let c = Condition::compile(&format!("event.properties.score <= {limit}")).unwrap();
            let e = event("csat.rated", &json!({"score": score}), Utc::now(), 1, "api");
            prop_assert_eq!(holds(&c, &facts(json!({}), json!({})), &e, Utc::now()), score <= limit);
        }
    }
}
