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
use crate::contacts::model::Contact;

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

/// The fields of `contact` conditions can read (what the API serialises).
pub const CONTACT_FIELDS: [&str; 18] = [
    "id",
    "external_id",
    "email",
    "phone",
    "viber_id",
    "first_name",
    "last_name",
    "locale",
    "country",
    "timezone",
    "birthday",
    "owner_agent_id",
    "attributes",
    "consents",
    "stats",
    "last_event_at",
    "created_at",
    "updated_at",
];

/// The fields of `contact` a program reads (`contact.attributes`, `has(contact.email)`), or
/// None when it uses `contact` some other way (`contact['email']`, `contact` as a value),
/// so that binding only those fields ([`contact_of`]) gives the same answer as the whole
/// contact.
pub fn contact_fields(program: &cel::Program) -> Option<std::collections::BTreeSet<String>> {
    let mut fields = std::collections::BTreeSet::new();
    contact_fields_in(program.expression(), &mut fields).then_some(fields)
}

fn contact_fields_in(e: &cel::IdedExpr, fields: &mut std::collections::BTreeSet<String>) -> bool {
    use cel::common::ast::{EntryExpr, Expr};
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => true,
        Expr::Ident(name) => name != "contact",
        Expr::Select(select) => match &select.operand.expr {
            Expr::Ident(name) if name == "contact" => {
                fields.insert(select.field.clone());
                true
            }
            _ => contact_fields_in(&select.operand, fields),
        },
        Expr::List(list) => list.elements.iter().all(|e| contact_fields_in(e, fields)),
        Expr::Map(map) => map.entries.iter().all(|entry| match &entry.expr {
            EntryExpr::MapEntry(m) => {
                contact_fields_in(&m.key, fields) && contact_fields_in(&m.value, fields)
            }
            EntryExpr::StructField(f) => contact_fields_in(&f.value, fields),
        }),
        Expr::Struct(s) => s.entries.iter().all(|entry| match &entry.expr {
            EntryExpr::StructField(f) => contact_fields_in(&f.value, fields),
            EntryExpr::MapEntry(m) => {
                contact_fields_in(&m.key, fields) && contact_fields_in(&m.value, fields)
            }
        }),
        Expr::Comprehension(c) => [
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ]
        .into_iter()
        .all(|e| contact_fields_in(e, fields)),
        Expr::Call(call) => call
            .target
            .iter()
            .map(|t| &**t)
            .chain(call.args.iter())
            .all(|e| contact_fields_in(e, fields)),
    }
}

/// A contact for conditions that read only `fields` of it (see [`contact_fields`]; None is
/// every field): the same values [`contact`] gives those fields, without serialising the
/// rest. Binding the whole contact costs far more than evaluating a typical condition.
pub fn contact_of(c: &Contact, fields: Option<&std::collections::BTreeSet<String>>) -> Cel {
    let Some(fields) = fields else {
        return contact(&serde_json::to_value(c).unwrap_or_default());
    };
    let text = |v: &Option<String>| match v {
        Some(s) if s.len() <= MAX_STRING => Cel::String(Arc::new(s.clone())),
        _ => Cel::Null,
    };
    let entries = fields.iter().filter_map(|name| {
        let value = match name.as_str() {
            "id" => Cel::String(Arc::new(c.id.to_string())),
            "external_id" => text(&c.external_id),
            "email" => text(&c.email),
            "phone" => text(&c.phone),
            "viber_id" => text(&c.viber_id),
            "first_name" => text(&c.first_name),
            "last_name" => text(&c.last_name),
            "locale" => text(&c.locale),
            "country" => text(&c.country),
            "timezone" => text(&c.timezone),
            "attributes" => json(&c.attributes),
            "stats" => stats(&c.stats),
            "last_event_at" => last_event_at(&c.last_event_at),
            "birthday" => json(&serde_json::to_value(c.birthday).unwrap_or_default()),
            "owner_agent_id" => json(&serde_json::to_value(c.owner_agent_id).unwrap_or_default()),
            "consents" => json(&serde_json::to_value(&c.consents).unwrap_or_default()),
            "created_at" => json(&serde_json::to_value(c.created_at).unwrap_or_default()),
            "updated_at" => json(&serde_json::to_value(c.updated_at).unwrap_or_default()),
            // Not a field: absent, as from the whole contact.
            _ => return None,
        };
        Some((name.as_str(), value))
    });
    object(entries)
}

/// What a contact must be for a condition to hold, read from the plain comparisons among its
/// top-level `&&` operands: each is implied by the condition (when the condition is true,
/// so is each requirement), so a database may rule out contacts with them before the
/// condition runs, and the condition still decides. Numbers come out as doubles, as
/// conditions see them.
#[derive(Debug, Clone, PartialEq)]
pub enum Requirement {
    /// `contact.<field> == 'x'`, `contact.<field> in ['x', 'y']` (a database keeps to the
    /// text fields it can test: `contacts::store::NARROWING_COLUMNS`).
    Field { field: String, any_of: Vec<String> },
    /// `contact.attributes.k == 'x'` / `== true` / `in [...]` (strings and booleans).
    Attribute { key: String, any_of: Vec<Value> },
    /// `contact.attributes.k` compared with a number: it is a number, at least `low` and at
    /// most `high` (either may be open).
    Number {
        key: String,
        low: Option<f64>,
        high: Option<f64>,
    },
    /// `has(contact.attributes.k)`.
    HasAttribute(String),
}

/// The most requirements read from one condition, and values in one `in` list.
const MAX_REQUIREMENTS: usize = 8;
const MAX_LIST: usize = 100;

/// The requirements a condition implies (see [`Requirement`]); empty when it has none this
/// reads.
pub fn requirements(program: &cel::Program) -> Vec<Requirement> {
    let mut out = Vec::new();
    conjuncts(program.expression(), &mut out, 0);
    out.truncate(MAX_REQUIREMENTS);
    out
}

fn conjuncts(e: &cel::IdedExpr, out: &mut Vec<Requirement>, depth: usize) {
    use cel::common::ast::{Expr, operators};
    if depth > 32 {
        return;
    }
    match &e.expr {
        Expr::Call(call) if call.func_name == operators::LOGICAL_AND && call.target.is_none() => {
            for arg in &call.args {
                conjuncts(arg, out, depth + 1);
            }
        }
        Expr::Select(s) if s.test => {
            if let Some(key) = attribute(&s.operand, &s.field) {
                out.push(Requirement::HasAttribute(key));
            }
        }
        Expr::Call(call) if call.target.is_none() && call.args.len() == 2 => {
            if let Some(r) = comparison(&call.func_name, &call.args[0], &call.args[1]) {
                out.push(r);
            }
        }
        _ => {}
    }
}

/// `contact.attributes.<field>`'s key, when `operand.field` is that.
fn attribute(operand: &cel::IdedExpr, field: &str) -> Option<String> {
    use cel::common::ast::Expr;
    match &operand.expr {
        Expr::Select(s) if !s.test && s.field == "attributes" => {
            matches!(&s.operand.expr, Expr::Ident(n) if n == "contact").then(|| field.to_owned())
        }
        _ => None,
    }
}

/// What a side of a comparison reads: an attribute or a text field of the contact.
enum Read {
    Attribute(String),
    Field(String),
}

fn read(e: &cel::IdedExpr) -> Option<Read> {
    use cel::common::ast::Expr;
    let Expr::Select(s) = &e.expr else {
        return None;
    };
    if s.test {
        return None;
    }
    if let Some(key) = attribute(&s.operand, &s.field) {
        return Some(Read::Attribute(key));
    }
    match &s.operand.expr {
        Expr::Ident(n) if n == "contact" => Some(Read::Field(s.field.clone())),
        _ => None,
    }
}

/// A literal as a JSON value: strings, booleans and finite numbers (not `null`: a value too
/// large for conditions is `null` to them, so `== null` does not imply what is stored).
fn literal(e: &cel::IdedExpr) -> Option<Value> {
    use cel::common::ast::{Expr, LiteralValue};
    let Expr::Literal(l) = &e.expr else {
        return None;
    };
    match l {
        LiteralValue::String(s) => Some(Value::String(s.inner().to_owned())),
        LiteralValue::Boolean(b) => Some(Value::Bool(*b.inner())),
        LiteralValue::Int(i) => serde_json::Number::from_f64(*i.inner() as f64).map(Value::Number),
        LiteralValue::UInt(u) => serde_json::Number::from_f64(*u.inner() as f64).map(Value::Number),
        LiteralValue::Double(d) => serde_json::Number::from_f64(*d.inner()).map(Value::Number),
        LiteralValue::Bytes(_) | LiteralValue::Null => None,
    }
}

/// A number's bounds widened by a hair, so that a stored number that reads as the literal
/// after rounding to a double (the database keeps every digit) is never ruled out.
fn widen(v: f64) -> f64 {
    v.abs() * 1e-12 + 1e-300
}

fn comparison(op: &str, left: &cel::IdedExpr, right: &cel::IdedExpr) -> Option<Requirement> {
    use cel::common::ast::{Expr, operators};
    if op == operators::IN {
        let Expr::List(list) = &right.expr else {
            return None;
        };
        if list.elements.is_empty() || list.elements.len() > MAX_LIST {
            return None;
        }
        let values: Vec<Value> = list.elements.iter().map(literal).collect::<Option<_>>()?;
        if values.iter().any(Value::is_number) {
            return None;
        }
        return requirement_of(read(left)?, values);
    }
    // The contact's side on the left, the literal on the right.
    let (side, value, op) = match (read(left), read(right)) {
        (Some(side), None) => (side, literal(right)?, op),
        (None, Some(side)) => {
            let flipped = match op {
                operators::LESS => operators::GREATER,
                operators::LESS_EQUALS => operators::GREATER_EQUALS,
                operators::GREATER => operators::LESS,
                operators::GREATER_EQUALS => operators::LESS_EQUALS,
                other => other,
            };
            (side, literal(left)?, flipped)
        }
        _ => return None,
    };
    if let Some(v) = value.as_f64() {
        let Read::Attribute(key) = side else {
            return None;
        };
        let (low, high) = match op {
            operators::EQUALS => (Some(v - widen(v)), Some(v + widen(v))),
            operators::GREATER | operators::GREATER_EQUALS => (Some(v - widen(v)), None),
            operators::LESS | operators::LESS_EQUALS => (None, Some(v + widen(v))),
            _ => return None,
        };
        return Some(Requirement::Number { key, low, high });
    }
    if op != operators::EQUALS {
        return None;
    }
    requirement_of(side, vec![value])
}

fn requirement_of(side: Read, values: Vec<Value>) -> Option<Requirement> {
    match side {
        Read::Attribute(key) => Some(Requirement::Attribute {
            key,
            any_of: values,
        }),
        Read::Field(field) => {
            let any_of = values
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect::<Option<Vec<String>>>()?;
            Some(Requirement::Field { field, any_of })
        }
    }
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
    // Every field of a contact, empty: the maps `{}`, the rest `null`.
    let empty = CONTACT_FIELDS.iter().map(|f| {
        let value = match *f {
            "attributes" | "consents" | "stats" | "last_event_at" => serde_json::json!({}),
            _ => Value::Null,
        };
        ((*f).to_owned(), value)
    });
    let contact = contact(&Value::Object(empty.collect()));
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

    fn full_contact() -> Contact {
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        let text = |t: &str| Some(t.to_owned());
        Contact {
            id: "0190f5c4-0000-7000-8000-000000000001".parse().unwrap(),
            external_id: text("c-1"),
            email: text("ana@example.com"),
            phone: text("+385911234567"),
            viber_id: text("v1"),
            first_name: text("Ana"),
            last_name: Some("H".repeat(MAX_STRING + 1)),
            locale: text("hr"),
            country: text("HR"),
            timezone: text("Europe/Zagreb"),
            birthday: "1990-04-02".parse().ok(),
            owner_agent_id: "0190f5c4-0000-7000-8000-000000000002".parse().ok(),
            attributes: json!({"plan": "gold", "score": 4, "vip": true,
                               "bio": "x".repeat(MAX_STRING + 1)}),
            consents: serde_json::from_value(json!({"sms": {"marketing": {
                "status": "opted_in", "at": "2026-11-01T10:00:00Z", "source": "web"}}}))
            .unwrap(),
            stats: json!({"purchase.completed": 2}),
            last_event_at: json!({"purchase.completed": "2026-11-30T09:12:00Z"}),
            created_at: at("2026-01-01T00:00:00Z"),
            updated_at: at("2026-02-01T00:00:00Z"),
        }
    }

    #[test]
    fn binding_only_the_fields_read_gives_each_the_whole_contacts_value() {
        let c = full_contact();
        let whole = contact(&serde_json::to_value(&c).unwrap());
        let Cel::Map(whole) = whole else {
            panic!("a contact is a map")
        };
        let names = CONTACT_FIELDS.iter().chain(&["no_such_field"]);
        for name in names {
            let only: std::collections::BTreeSet<String> = [name.to_string()].into();
            let Cel::Map(part) = contact_of(&c, Some(&only)) else {
                panic!("a contact is a map")
            };
            let key = Key::String(Arc::new(name.to_string()));
            assert_eq!(part.map.get(&key), whole.map.get(&key), "{name}");
            assert!(part.map.len() <= 1, "{name}");
        }
        // Every field at once, and None, are the whole contact.
        let all: std::collections::BTreeSet<String> =
            CONTACT_FIELDS.iter().map(|f| f.to_string()).collect();
        assert_eq!(contact_of(&c, Some(&all)), Cel::Map(whole.clone()));
        assert_eq!(contact_of(&c, None), Cel::Map(whole));
    }

    #[test]
    fn the_fields_a_condition_reads_are_found_or_it_takes_the_whole_contact() {
        let fields = |source: &str| {
            contact_fields(Condition::compile(source).unwrap().program())
                .map(|f| f.into_iter().collect::<Vec<_>>())
        };
        assert_eq!(
            fields("contact.attributes.half == true && has(contact.email)"),
            Some(vec!["attributes".to_owned(), "email".to_owned()])
        );
        assert_eq!(
            fields("now - contact.last_event_at.purchase_completed > duration('720h')"),
            Some(vec!["last_event_at".to_owned()])
        );
        assert_eq!(
            fields("[1, 2].exists(x, x == contact.stats.purchase_completed)"),
            Some(vec!["stats".to_owned()])
        );
        assert_eq!(fields("contact['email'] == 'a@b.c'"), None);
        assert_eq!(fields("size(contact) > 0"), None);
    }

    fn requirements_of(source: &str) -> Vec<Requirement> {
        requirements(Condition::compile(source).unwrap().program())
    }

    #[test]
    fn plain_comparisons_among_the_top_level_conjuncts_become_requirements() {
        let r = requirements_of(
            "contact.attributes.half == true && contact.country in ['HR', 'SI'] \
             && 3 < contact.attributes.score && has(contact.attributes.plan) \
             && (contact.attributes.a == 'x' || contact.attributes.b == 'y') \
             && contact.locale == 'hr' && contact.attributes.tier == 2",
        );
        assert_eq!(r.len(), 6, "{r:?}");
        assert_eq!(
            r[0],
            Requirement::Attribute {
                key: "half".into(),
                any_of: vec![json!(true)]
            }
        );
        assert_eq!(
            r[1],
            Requirement::Field {
                field: "country".into(),
                any_of: vec!["HR".into(), "SI".into()]
            }
        );
        let Requirement::Number { key, low, high } = &r[2] else {
            panic!("{:?}", r[2])
        };
        assert_eq!(key, "score");
        assert!(low.unwrap() < 3.0 && low.unwrap() > 2.999_999);
        assert_eq!(*high, None);
        assert_eq!(r[3], Requirement::HasAttribute("plan".into()));
        assert_eq!(
            r[4],
            Requirement::Field {
                field: "locale".into(),
                any_of: vec!["hr".into()]
            }
        );
        let Requirement::Number { low, high, .. } = &r[5] else {
            panic!("{:?}", r[5])
        };
        assert!(low.unwrap() < 2.0 && high.unwrap() > 2.0);
        // What is not a plain comparison implies nothing the database can test.
        for source in [
            "contact.attributes.half == true || contact.country == 'HR'",
            "!(contact.attributes.half == true)",
            "contact.attributes.bio == null",
            "contact.attributes.plan != 'gold'",
            "contact.attributes.n in [1, 2]",
            "contact.country > 'HR'",
            "contact.email == contact.attributes.email",
        ] {
            assert_eq!(requirements_of(source), vec![], "{source}");
        }
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
