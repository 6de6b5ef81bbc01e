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

/// The longest string conditions see; a longer one is `null` to them.
pub const MAX_STRING: usize = 4_096;
/// The most items of a list, or entries of an object, conditions see; a larger one is `null`.
pub const MAX_ITEMS: usize = 1_000;
/// The most work [`check_cost`] lets a condition do, in units of about one value visited or
/// one byte copied: a few milliseconds at worst.
const MAX_COST: f64 = 10_000_000.0;
/// What one turn of a macro's loop costs besides its body: a value made, a scope entered.
const ITERATION: f64 = 16.0;

/// Free JSON as CEL sees it: numbers are doubles. Strings over [`MAX_STRING`] bytes and
/// lists or objects over [`MAX_ITEMS`] are `null`, so that [`check_cost`]'s bound holds for
/// every contact and event.
pub fn json(value: &Value) -> Cel {
    match value {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => Cel::Float(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) if s.len() > MAX_STRING => Cel::Null,
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(items) if items.len() > MAX_ITEMS => Cel::Null,
        Value::Array(items) => Cel::List(Arc::new(items.iter().map(json).collect())),
        Value::Object(map) if map.len() > MAX_ITEMS => Cel::Null,
        Value::Object(map) => object(map.iter().map(|(k, v)| (k.as_str(), json(v)))),
    }
}

/// What one sub-expression costs at most, and how long its value can be: `len` bytes of a
/// string, `items` of a list or map.
#[derive(Clone, Copy)]
struct Estimate {
    cost: f64,
    len: f64,
    items: f64,
}

impl Estimate {
    fn scalar(cost: f64) -> Estimate {
        Estimate {
            cost,
            len: 1.0,
            items: 1.0,
        }
    }
}

/// Refuses, when it is saved, a condition that could do more than [`MAX_COST`] work on any
/// contact and event: CEL has no loops but its macros (`all`, `exists`, `map`, `filter`), and
/// nested over long lists they multiply (`L.map(a, L.map(b, L.map(c, 1)))` over a 100-item
/// list builds a million values). Values from the contact and the event are assumed as long
/// as [`json`] lets them be.
pub fn check_cost(program: &cel::Program) -> Result<(), String> {
    let e = estimate(program.expression(), 0)?;
    if e.cost > MAX_COST {
        return Err(format!(
            "the condition could do too much work (about {:.0} steps on the largest contact; the limit is {MAX_COST:.0}): loop over fewer or shorter lists",
            e.cost
        ));
    }
    Ok(())
}

fn estimate(e: &cel::IdedExpr, depth: usize) -> Result<Estimate, String> {
    use cel::common::ast::{EntryExpr, Expr, LiteralValue, operators};
    if depth > 64 {
        return Err("the condition is nested too deeply".to_owned());
    }
    // A value read from the contact or the event: as large as `json` lets it be.
    let data = Estimate {
        cost: 1.0,
        len: MAX_STRING as f64,
        items: MAX_ITEMS as f64,
    };
    let collection = |items: &mut dyn Iterator<Item = &cel::IdedExpr>| -> Result<Estimate, String> {
        let mut total = Estimate::scalar(1.0);
        total.items = 0.0;
        for item in items {
            let one = estimate(item, depth + 1)?;
            total.cost += one.cost;
            total.len += one.len;
            total.items += 1.0;
        }
        Ok(total)
    };
    Ok(match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => {
            let mut literal = Estimate::scalar(1.0);
            if let Expr::Literal(LiteralValue::String(s)) = &e.expr {
                literal.len = s.inner().len() as f64;
            }
            literal
        }
        // A macro's accumulator (`@result`, which source cannot name): a boolean for `all`
        // and `exists`, a list that `map` and `filter` append to in place.
        Expr::Ident(name) if name.starts_with('@') => Estimate::scalar(1.0),
        Expr::Ident(_) => data,
        Expr::Select(select) => Estimate {
            cost: estimate(&select.operand, depth + 1)?.cost + 1.0,
            ..data
        },
        Expr::List(list) => collection(&mut list.elements.iter())?,
        Expr::Map(map) => {
            let mut parts = map.entries.iter().flat_map(|entry| match &entry.expr {
                EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
                EntryExpr::StructField(f) => vec![&f.value],
            });
            collection(&mut parts)?
        }
        Expr::Struct(s) => {
            let mut parts = s.entries.iter().map(|entry| match &entry.expr {
                EntryExpr::StructField(f) => &f.value,
                EntryExpr::MapEntry(m) => &m.value,
            });
            collection(&mut parts)?
        }
        Expr::Comprehension(c) => {
            let range = estimate(&c.iter_range, depth + 1)?;
            let init = estimate(&c.accu_init, depth + 1)?;
            let cond = estimate(&c.loop_cond, depth + 1)?;
            let step = estimate(&c.loop_step, depth + 1)?;
            let result = estimate(&c.result, depth + 1)?;
            Estimate {
                cost: range.cost
                    + init.cost
                    + range.items * (ITERATION + cond.cost + step.cost)
                    + result.cost,
                len: range.items * step.len,
                items: range.items,
            }
        }
        Expr::Call(call) => {
            let mut cost = 1.0;
            let (mut len, mut items, mut longest, mut most) = (0.0, 0.0, 0.0_f64, 0.0_f64);
            for arg in call.target.iter().map(|t| &**t).chain(call.args.iter()) {
                let one = estimate(arg, depth + 1)?;
                cost += one.cost;
                len += one.len;
                items += one.items;
                longest = longest.max(one.len);
                most = most.max(one.items);
            }
            match call.func_name.as_str() {
                // Concatenation copies both sides.
                operators::ADD => Estimate {
                    cost: cost + len + items,
                    len,
                    items,
                },
                // Comparisons and searches read their operands.
                operators::EQUALS
                | operators::NOT_EQUALS
                | operators::LESS
                | operators::LESS_EQUALS
                | operators::GREATER
                | operators::GREATER_EQUALS
                | operators::IN
                | "contains"
                | "startsWith"
                | "endsWith"
                | "matches"
                | "size" => Estimate::scalar(cost + len + items),
                // A part of a value, or one of two: as large as the largest.
                operators::CONDITIONAL | operators::INDEX | operators::OPT_INDEX => Estimate {
                    cost,
                    len: longest.max(data.len),
                    items: most.max(data.items),
                },
                "string" | "bytes" | "dyn" => Estimate {
                    cost: cost + len,
                    len: longest,
                    items: most,
                },
                _ => Estimate::scalar(cost),
            }
        }
    })
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
        let value = match k.as_str() {
            "stats" => stats(v),
            "last_event_at" => last_event_at(v),
            _ => json(v),
        };
        (k.as_str(), value)
    });
    object(entries)
}

/// When the contact's last event of each type happened, as timestamps (under the type and
/// with underscores, like `stats`): `now - contact.last_event_at.purchase_completed >
/// duration('720h')` is "no purchase in 30 days".
fn last_event_at(times: &Value) -> Cel {
    let mut map: HashMap<Key, Cel> = HashMap::new();
    if let Value::Object(times) = times {
        for (kind, at) in times {
            let Some(at) = at
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            else {
                continue;
            };
            let at = Cel::Timestamp(at);
            map.insert(Key::String(Arc::new(kind.replace('.', "_"))), at.clone());
            map.insert(Key::String(Arc::new(kind.clone())), at);
        }
    }
    Cel::Map(CelMap { map: Arc::new(map) })
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

    /// A contact alone, for segment conditions (which see `contact` and `now`).
    pub fn of_contact(contact: &Cel, now: DateTime<Utc>) -> Facts {
        let mut ctx = Context::with_env(env());
        ctx.add_variable_from_value("contact", contact.clone());
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
    check_cost(condition.program())?;
    let contact = contact(&serde_json::json!({
        "id": "00000000-0000-0000-0000-000000000000", "external_id": null, "email": null,
        "phone": null, "viber_id": null, "first_name": null, "last_name": null, "locale": null,
        "country": null, "timezone": null, "birthday": null, "owner_agent_id": null,
        "attributes": {}, "consents": {}, "stats": {}, "last_event_at": {}, "created_at": null,
        "updated_at": null
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

/// Refuses a compiled condition that names anything but `contact` and `now` (a segment's:
/// there is no event).
pub fn check_contact_only(condition: &Condition) -> Result<(), String> {
    let contact = contact(
        &serde_json::json!({"attributes": {}, "consents": {}, "stats": {},
        "last_event_at": {}}),
    );
    match condition
        .program()
        .execute(&Facts::of_contact(&contact, Utc::now()).ctx)
    {
        Err(ExecutionError::UndeclaredReference(name)) => Err(format!(
            "unknown name `{name}`: segment conditions see `contact` and `now`"
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

    #[test]
    fn nested_loops_over_long_lists_are_refused_before_they_run() {
        let list = format!("[{}]", vec!["1"; 100].join(","));
        let bomb =
            format!("size({list}.map(a, {list}.map(b, {list}.map(c, {list}.map(d, 1))))) > 0");
        let started = std::time::Instant::now();
        let e = Condition::compile(&bomb).unwrap_err();
        assert!(e.contains("too much work"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // Nested loops over contact data are refused too; one loop is fine.
        let e = Condition::compile(
            "contact.attributes.tags.exists(a, contact.attributes.tags.exists(b, a == b))",
        )
        .unwrap_err();
        assert!(e.contains("too much work"), "{e}");
        assert!(Condition::compile("contact.attributes.tags.exists(t, t == 'vip')").is_ok());
        assert!(
            Condition::compile(
                "contact.first_name + ' ' + contact.last_name == 'Ana Horvat' && event.properties.items.map(i, i.price * i.qty).exists(p, p > 100.0)"
            )
            .is_ok()
        );
    }

    #[test]
    fn values_too_large_for_the_bound_are_null_to_conditions() {
        let big = "x".repeat(MAX_STRING + 1);
        let c = Condition::compile("contact.attributes.bio == null").unwrap();
        let e = event("x", &json!({}), Utc::now(), 1, "api");
        assert!(holds(
            &c,
            &facts(json!({"bio": big}), json!({})),
            &e,
            Utc::now()
        ));
        let many: Vec<u32> = (0..=MAX_ITEMS as u32).collect();
        let c = Condition::compile("contact.attributes.tags == null").unwrap();
        assert!(holds(
            &c,
            &facts(json!({"tags": many}), json!({})),
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
