//! Campaign definitions as merchants write them, checked when they are written: a campaign
//! that cannot run is a 422 pointing at the problem, never a journey that fails later.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, NaiveTime, Utc};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::Channel;
use crate::support::model::Priority;
use crate::validate::FieldError;

/// The longest wait, timeout or hold a campaign may ask for.
const MAX_SPAN_SECS: i64 = 400 * 86_400;
/// How deep `on_timeout` branches may nest.
const MAX_DEPTH: usize = 4;
/// How many steps a campaign may have, all branches together.
const MAX_STEPS: usize = 100;

/// A CEL condition, compiled once when the definition is read (a campaign version's
/// definition is read once per process and cached).
#[derive(Clone)]
pub struct Condition {
    source: String,
    program: Arc<cel::Program>,
    /// Whether the condition may read the contact's `stats` or `last_event_at` (it names
    /// them, or uses `contact` other than by field): readers that evaluate no such condition
    /// skip gathering them.
    reads_stats: bool,
}

impl Condition {
    /// Compiles `source`; the error names the line and column of the first problem.
    pub fn compile(source: &str) -> Result<Condition, String> {
        if source.trim().is_empty() {
            return Err("the condition is empty".to_owned());
        }
        if source.len() > 4_000 {
            return Err("the condition is longer than 4000 characters".to_owned());
        }
        let program = std::panic::catch_unwind(|| cel::Program::compile(source))
            .map_err(|_| "the condition cannot be parsed".to_owned())?
            .map_err(|e| match e.errors.first() {
                Some(first) => format!(
                    "does not compile at line {}, column {}: {}",
                    first.pos.0,
                    first.pos.1,
                    first.msg.trim_start_matches("Syntax error: ")
                ),
                None => format!("does not compile: {e}"),
            })?;
        let reads_stats = super::cel::contact_fields(&program)
            .is_none_or(|f| f.contains("stats") || f.contains("last_event_at"));
        let condition = Condition {
            source: source.to_owned(),
            program: Arc::new(program),
            reads_stats,
        };
        super::cel::dry_run(&condition)?;
        Ok(condition)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn program(&self) -> &cel::Program {
        &self.program
    }

    /// Whether evaluating it may read the contact's `stats` or `last_event_at`.
    pub fn reads_stats(&self) -> bool {
        self.reads_stats
    }
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Condition({:?})", self.source)
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let source = String::deserialize(d)?;
        Condition::compile(&source).map_err(de::Error::custom)
    }
}

/// Who may enrol in a campaign.
#[derive(Debug, Clone)]
pub enum Audience {
    /// A condition written in the campaign.
    Condition(Condition),
    /// A segment's condition, read when a contact is evaluated: editing the segment changes
    /// who enrols from then on.
    Segment(Uuid),
}

impl Audience {
    pub fn segment(&self) -> Option<Uuid> {
        match self {
            Audience::Segment(id) => Some(*id),
            Audience::Condition(_) => None,
        }
    }
}

impl Serialize for Audience {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Audience::Condition(c) => c.serialize(s),
            Audience::Segment(id) => {
                use serde::ser::SerializeMap;
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("segment", id)?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Audience {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match AudienceSpec::deserialize(d)? {
            AudienceSpec::Condition(source) => Condition::compile(&source)
                .map(Audience::Condition)
                .map_err(de::Error::custom),
            AudienceSpec::Segment(id) => Ok(Audience::Segment(id)),
        }
    }
}

/// An audience as written, before its condition is compiled: a CEL source or
/// `{"segment": "<id>"}`. Campaigns compile it as [`Audience`]; broadcasts check it as a
/// condition over the contact alone.
#[derive(Debug, Clone)]
pub enum AudienceSpec {
    Condition(String),
    Segment(Uuid),
}

impl<'de> Deserialize<'de> for AudienceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const SHAPE: &str = r#"write a CEL condition or {"segment": "<segment id>"}"#;
        match Value::deserialize(d)? {
            Value::String(source) => Ok(AudienceSpec::Condition(source)),
            Value::Object(map) if map.len() == 1 => match map.get("segment") {
                Some(Value::String(id)) => Uuid::parse_str(id)
                    .map(AudienceSpec::Segment)
                    .map_err(|_| de::Error::custom(format!("`{id}` is not a segment id"))),
                _ => Err(de::Error::custom(SHAPE)),
            },
            _ => Err(de::Error::custom(SHAPE)),
        }
    }
}

/// How `audience` is written (for the API document; [`Audience`] reads and writes it).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum AudienceDoc {
    /// A CEL condition over `contact` and the trigger `event`.
    #[schema(example = "contact.attributes.credit_limit > 1000")]
    Condition(String),
    /// A segment by id.
    Segment { segment: Uuid },
}

/// A length of time written `30s`, `15m`, `2h`, `3d`, `1w` or combined (`1d12h`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Span {
    secs: i64,
}

impl Span {
    pub fn parse(raw: &str) -> Result<Span, String> {
        let bad = || format!("`{raw}` is not a duration: write it like 30m, 2h, 3d or 1d12h");
        let mut secs: i64 = 0;
        let mut digits = String::new();
        for ch in raw.trim().chars() {
            if ch.is_ascii_digit() {
                digits.push(ch);
                continue;
            }
            let unit = match ch {
                's' => 1,
                'm' => 60,
                'h' => 3_600,
                'd' => 86_400,
                'w' => 7 * 86_400,
                _ => return Err(bad()),
            };
            let n: i64 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            secs = n
                .checked_mul(unit)
                .and_then(|v| secs.checked_add(v))
                .ok_or_else(bad)?;
        }
        if !digits.is_empty() || secs == 0 && raw.trim().is_empty() {
            return Err(bad());
        }
        if secs <= 0 {
            return Err(format!("`{raw}` must be longer than nothing"));
        }
        if secs > MAX_SPAN_SECS {
            return Err(format!("`{raw}` is longer than 400 days"));
        }
        Ok(Span { secs })
    }

    pub fn from_secs(secs: i64) -> Span {
        Span { secs }
    }

    pub fn as_chrono(self) -> chrono::Duration {
        chrono::Duration::seconds(self.secs)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.secs;
        for (unit, secs) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
            if rest >= secs {
                write!(f, "{}{unit}", rest / secs)?;
                rest %= secs;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Span({self})")
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Span::parse(&raw).map_err(de::Error::custom)
    }
}

/// A time of day, `HH:MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime(pub NaiveTime);

impl Serialize for LocalTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0.format("%H:%M"))
    }
}

impl<'de> Deserialize<'de> for LocalTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        NaiveTime::parse_from_str(&raw, "%H:%M")
            .map(LocalTime)
            .map_err(|_| de::Error::custom(format!("`{raw}` is not a time of day like 09:00")))
    }
}

/// An event type (`purchase.completed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventType(pub String);

impl Serialize for EventType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        crate::validate::event_type(&raw).map_err(de::Error::custom)?;
        Ok(EventType(raw))
    }
}

/// What enrols a contact: an event (optionally filtered), a date of the contact's (at a time
/// of day in the contact's time zone), or a condition on the contact becoming true.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Enrol on this event type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "credit_check.approved")]
    pub event: Option<EventType>,
    /// With `event`: a CEL condition over `event` and `contact`.
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "event.properties.amount > 100.0")]
    pub filter: Option<Condition>,
    /// Enrol once a year on the contact's date: `birthday`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// With `schedule`: the time of day in the contact's time zone (default 09:00).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "09:00")]
    pub at: Option<LocalTime>,
    /// Enrol when this CEL condition over `contact` becomes true (it was false before the
    /// change): `contact.attributes.available_credit / contact.attributes.credit_limit > 0.9`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub condition: Option<Condition>,
}

/// The contact dates a schedule can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Birthday,
}

/// Which agent `notify_agent` hands the contact to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentChoice {
    /// The contact's personal advisor; round robin when the contact has none.
    Owner,
    /// The support desk's automatic assignment.
    RoundRobin,
}

/// One step of a journey.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Wait this long.
    Wait {
        #[schema(value_type = String, example = "3d")]
        duration: Span,
    },
    /// Send a template over the first channel the contact has an address and consent for.
    Send {
        template: String,
        /// Ordered preference; empty means every channel the template has.
        #[serde(default)]
        channels: Vec<Channel>,
        /// Extra template variables.
        #[serde(default, skip_serializing_if = "Map::is_empty")]
        #[schema(value_type = Object)]
        variables: Map<String, Value>,
    },
    /// Wait for an event (`message.*` events count only for messages this journey sent);
    /// after `timeout`, run `on_timeout` and go on.
    WaitFor {
        #[schema(value_type = String, example = "message.opened")]
        event: EventType,
        #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>)]
        filter: Option<Condition>,
        #[schema(value_type = Option<String>, example = "24h")]
        timeout: Option<Span>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schema(no_recursion)]
        on_timeout: Vec<Step>,
    },
    /// Hand the contact to a person: a ticket for the agent to call, and an email to the agent.
    NotifyAgent {
        agent: AgentChoice,
        #[serde(default = "yes")]
        create_ticket: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        priority: Option<Priority>,
    },
    /// End the journey here.
    Exit,
}

fn yes() -> bool {
    true
}

/// An event that ends the journey (and counts as a conversion): a type, or `{event, where}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ExitOn {
    #[schema(value_type = String, example = "purchase.completed")]
    pub event: EventType,
    #[serde(rename = "where", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub filter: Option<Condition>,
}

impl<'de> Deserialize<'de> for ExitOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            event: EventType,
            #[serde(default, rename = "where")]
            filter: Option<Condition>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Type(String),
            Full(Value),
        }
        match Raw::deserialize(d)? {
            Raw::Type(t) => {
                crate::validate::event_type(&t).map_err(de::Error::custom)?;
                Ok(ExitOn {
                    event: EventType(t),
                    filter: None,
                })
            }
            Raw::Full(v @ Value::Object(_)) => {
                let full: Full = serde_json::from_value(v).map_err(de::Error::custom)?;
                Ok(ExitOn {
                    event: full.event,
                    filter: full.filter,
                })
            }
            Raw::Full(_) => Err(de::Error::custom(
                "expected an event type or {\"event\": ..., \"where\": ...}",
            )),
        }
    }
}

/// At most `max` marketing messages per contact in any `per`, across campaigns.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCap {
    pub max: u32,
    #[schema(value_type = String, example = "7d")]
    pub per: Span,
}

/// No message between `start` and `end` in the contact's time zone: it waits for `end`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    #[schema(value_type = String, example = "21:00")]
    pub start: LocalTime,
    #[schema(value_type = String, example = "08:00")]
    pub end: LocalTime,
}

/// Whether a contact may run through the campaign again: `once` (the default), `always`
/// (after the previous journey ended), or after a duration since the last enrolment (`30d`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reentry {
    #[default]
    Once,
    Always,
    After(Span),
}

impl Serialize for Reentry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Reentry::Once => s.serialize_str("once"),
            Reentry::Always => s.serialize_str("always"),
            Reentry::After(span) => s.collect_str(span),
        }
    }
}

impl<'de> Deserialize<'de> for Reentry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        match raw.as_str() {
            "once" => Ok(Reentry::Once),
            "always" => Ok(Reentry::Always),
            other => Span::parse(other).map(Reentry::After).map_err(|_| {
                de::Error::custom(format!(
                    "`{raw}` is not a reentry policy: once, always, or a duration like 30d"
                ))
            }),
        }
    }
}

/// A campaign as written: what `POST /v1/campaigns` takes and each version stores.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    #[schema(example = "First purchase nudge")]
    pub name: String,
    pub trigger: Trigger,
    /// Who may enrol: a CEL condition over `contact` (and the trigger `event`), or a segment
    /// named as `{"segment": "<id>"}` (its condition as it is when the contact is evaluated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<AudienceDoc>)]
    pub audience: Option<Audience>,
    pub steps: Vec<Step>,
    /// Events that end a journey (goals: a purchase ends the nudge).
    #[serde(default)]
    pub exit_on: Vec<ExitOn>,
    /// Hold marketing messages while the contact has an open ticket (default true).
    #[serde(default = "yes")]
    pub suppress_while_ticket_open: bool,
    /// How long a held message may wait for the tickets to close before it is dropped
    /// (default 7d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "7d")]
    pub hold_limit: Option<Span>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_cap: Option<FrequencyCap>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<QuietHours>,
    /// `once` (default), `always`, or a duration such as `30d`.
    #[serde(default)]
    #[schema(value_type = String, example = "once")]
    pub reentry: Reentry,
}

impl Definition {
    /// How long a held send waits for open tickets to close.
    pub fn hold_limit(&self) -> chrono::Duration {
        self.hold_limit
            .unwrap_or(Span::from_secs(7 * 86_400))
            .as_chrono()
    }

    /// The checks serde cannot make: one kind of trigger, steps that can end, sane limits.
    /// Templates are checked against the database by the store.
    pub fn check(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            errors.push(FieldError::new(
                "name",
                "give the campaign a name of 1 to 200 characters",
            ));
        }
        let t = &self.trigger;
        let kinds = [
            t.event.is_some(),
            t.schedule.is_some(),
            t.condition.is_some(),
        ]
        .iter()
        .filter(|k| **k)
        .count();
        if kinds != 1 {
            errors.push(FieldError::new(
                "trigger",
                "give exactly one of `event`, `schedule` or `condition`",
            ));
        }
        if t.filter.is_some() && t.event.is_none() {
            errors.push(FieldError::new(
                "trigger.where",
                "`where` filters an `event` trigger",
            ));
        }
        if t.at.is_some() && t.schedule.is_none() {
            errors.push(FieldError::new(
                "trigger.at",
                "`at` is the time of a `schedule` trigger",
            ));
        }
        if self.steps.is_empty() {
            errors.push(FieldError::new(
                "steps",
                "a campaign needs at least one step",
            ));
        }
        let mut count = 0;
        check_steps(&self.steps, "steps", 0, &mut count, &mut errors);
        if count > MAX_STEPS {
            errors.push(FieldError::new(
                "steps",
                format!("more than {MAX_STEPS} steps"),
            ));
        }
        if let Some(cap) = &self.frequency_cap
            && cap.max == 0
        {
            errors.push(FieldError::new("frequency_cap.max", "must be at least 1"));
        }
        if let Some(q) = &self.quiet_hours
            && q.start == q.end
        {
            errors.push(FieldError::new(
                "quiet_hours",
                "`start` and `end` are the same time",
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Every `send` step's template, with the field that names it.
    pub fn templates(&self) -> Vec<(String, &str, &[Channel])> {
        let mut out = Vec::new();
        collect_templates(&self.steps, "steps", &mut out);
        out
    }

    /// Every condition of the definition itself (trigger, audience, exit goals, `wait_for`
    /// filters at any depth); a segment the audience names is not among them.
    pub fn conditions(&self) -> Vec<&Condition> {
        fn in_steps<'a>(steps: &'a [Step], out: &mut Vec<&'a Condition>) {
            for step in steps {
                if let Step::WaitFor {
                    filter, on_timeout, ..
                } = step
                {
                    out.extend(filter);
                    in_steps(on_timeout, out);
                }
            }
        }
        let mut out: Vec<&Condition> = Vec::new();
        out.extend(&self.trigger.filter);
        out.extend(&self.trigger.condition);
        if let Some(Audience::Condition(c)) = &self.audience {
            out.push(c);
        }
        out.extend(self.exit_on.iter().filter_map(|x| x.filter.as_ref()));
        in_steps(&self.steps, &mut out);
        out
    }

    /// The step at `path` (`[2]`, or `[2, 0]` for the first `on_timeout` step of step 2).
    pub fn step_at(&self, path: &[i32]) -> Option<&Step> {
        let mut steps = &self.steps;
        let mut step = None;
        for (depth, &i) in path.iter().enumerate() {
            let s = steps.get(usize::try_from(i).ok()?)?;
            step = Some(s);
            if depth + 1 < path.len() {
                match s {
                    Step::WaitFor { on_timeout, .. } => steps = on_timeout,
                    _ => return None,
                }
            }
        }
        step
    }

    /// The position after `path`: the next step of the same list, or, at the end of an
    /// `on_timeout` branch, the step after its `wait_for`. Past the last step it points
    /// beyond the top-level list (the journey is complete).
    pub fn next(&self, path: &[i32]) -> Vec<i32> {
        let mut next = path.to_vec();
        loop {
            if let Some(last) = next.last_mut() {
                *last += 1;
            }
            if next.len() <= 1 || self.step_at(&next).is_some() {
                return next;
            }
            next.pop();
        }
    }
}

fn check_steps(
    steps: &[Step],
    at: &str,
    depth: usize,
    count: &mut usize,
    errors: &mut Vec<FieldError>,
) {
    if depth > MAX_DEPTH {
        errors.push(FieldError::new(
            at,
            format!("on_timeout branches nest deeper than {MAX_DEPTH}"),
        ));
        return;
    }
    for (i, step) in steps.iter().enumerate() {
        *count += 1;
        let here = format!("{at}[{i}]");
        if matches!(step, Step::Exit) && i + 1 < steps.len() {
            errors.push(FieldError::new(
                format!("{at}[{}]", i + 1),
                "this step comes after an `exit` and can never run",
            ));
        }
        match step {
            Step::WaitFor {
                timeout,
                on_timeout,
                ..
            } => {
                if timeout.is_none() {
                    errors.push(FieldError::new(
                        format!("{here}.timeout"),
                        "a wait_for without a timeout could wait for ever: give it a `timeout`",
                    ));
                }
                check_steps(
                    on_timeout,
                    &format!("{here}.on_timeout"),
                    depth + 1,
                    count,
                    errors,
                );
            }
            Step::Send { template, .. } if template.trim().is_empty() => {
                errors.push(FieldError::new(
                    format!("{here}.template"),
                    "name a template",
                ));
            }
            Step::NotifyAgent { subject, note, .. } => {
                if subject.as_ref().is_some_and(|s| s.chars().count() > 200) {
                    errors.push(FieldError::new(
                        format!("{here}.subject"),
                        "longer than 200 characters",
                    ));
                }
                if note.as_ref().is_some_and(|s| s.chars().count() > 5_000) {
                    errors.push(FieldError::new(
                        format!("{here}.note"),
                        "longer than 5000 characters",
                    ));
                }
            }
            _ => {}
        }
    }
}

fn collect_templates<'a>(
    steps: &'a [Step],
    at: &str,
    out: &mut Vec<(String, &'a str, &'a [Channel])>,
) {
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Send {
                template, channels, ..
            } => out.push((format!("{at}[{i}].template"), template, channels)),
            Step::WaitFor { on_timeout, .. } => {
                collect_templates(on_timeout, &format!("{at}[{i}].on_timeout"), out)
            }
            _ => {}
        }
    }
}

/// Where a campaign is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum CampaignStatus {
    /// Written, not running yet.
    Draft,
    /// Enrolling contacts and running journeys.
    Active,
    /// Neither enrolling nor sending; journeys wait where they are (exit_on still ends them).
    Paused,
    /// Ended for good; running journeys were exited.
    Archived,
}

impl CampaignStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Draft => "draft",
            CampaignStatus::Active => "active",
            CampaignStatus::Paused => "paused",
            CampaignStatus::Archived => "archived",
        }
    }
}

/// A campaign: its current definition and where it is in its life.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Campaign {
    pub id: Uuid,
    pub status: CampaignStatus,
    /// The version new journeys start on.
    pub version: i32,
    #[serde(flatten)]
    pub definition: Definition,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
}

/// What a campaign did: journeys by state and messages by outcome.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CampaignStats {
    pub campaign_id: Uuid,
    /// Journeys started.
    pub enrolled: i64,
    /// Journeys still running.
    pub active: i64,
    /// Journeys that ran their last step.
    pub completed: i64,
    /// Journeys that ended early (an exit_on event, an `exit` step, archival, erasure).
    pub exited: i64,
    /// Journeys ended by an exit_on (goal) event.
    pub converted: i64,
    /// Messages handed to a provider, per channel.
    #[schema(value_type = Object, example = json!({"viber": 3, "sms": 1}))]
    pub sent: std::collections::BTreeMap<String, i64>,
    /// Messages still waiting in the outbox.
    pub queued: i64,
    pub delivered: i64,
    pub opened: i64,
    pub clicked: i64,
    pub failed: i64,
    /// Messages not sent, per reason (no_consent, frequency_cap, ticket_open...).
    #[schema(value_type = Object, example = json!({"no_consent": 2}))]
    pub suppressed: std::collections::BTreeMap<String, i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_knows_whether_it_may_read_stats() {
        for (source, reads) in [
            ("contact.attributes.tier == 'gold'", false),
            (
                "event.properties.amount > 100.0 && has(contact.email)",
                false,
            ),
            ("contact.stats['purchase.completed'] >= 2", true),
            ("has(contact.last_event_at.visit)", true),
            // `contact` used whole: anything may be read.
            ("contact['stats'].size() > 0", true),
            ("size(contact) > 3", true),
        ] {
            let c = Condition::compile(source).unwrap();
            assert_eq!(c.reads_stats(), reads, "{source}");
        }
    }

    #[test]
    fn spans_parse_and_print() {
        assert_eq!(
            Span::parse("3d").unwrap().as_chrono(),
            chrono::Duration::days(3)
        );
        assert_eq!(Span::parse("1d12h").unwrap().to_string(), "1d12h");
        assert_eq!(Span::parse("90m").unwrap().to_string(), "1h30m");
        for bad in ["", "3", "d", "3x", "0s", "401d", "99999999999999999999d"] {
            assert!(Span::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_condition_that_does_not_compile_names_the_position() {
        let e = Condition::compile("contact.attributes.x &&& 1").unwrap_err();
        assert!(e.contains("line 1, column"), "{e}");
        let e = Condition::compile("customer.plan == 'gold'").unwrap_err();
        assert!(e.contains("customer"), "{e}");
        assert!(Condition::compile("contact.stats.purchase_completed == 1").is_ok());
    }

    #[test]
    fn positions_walk_into_and_out_of_on_timeout_branches() {
        let def: Definition = serde_json::from_value(serde_json::json!({
            "name": "n", "trigger": {"event": "a.b"},
            "steps": [
                {"type": "send", "template": "t"},
                {"type": "wait_for", "event": "message.opened", "timeout": "1d",
                 "on_timeout": [{"type": "send", "template": "u"}, {"type": "wait", "duration": "1h"}]},
                {"type": "exit"}
            ]
        }))
        .unwrap();
        assert_eq!(def.next(&[0]), vec![1]);
        assert_eq!(def.next(&[1, 0]), vec![1, 1]);
        assert_eq!(def.next(&[1, 1]), vec![2]);
        assert_eq!(def.next(&[2]), vec![3]);
        assert!(def.step_at(&[3]).is_none());
        assert!(matches!(def.step_at(&[1, 1]), Some(Step::Wait { .. })));
    }

    #[test]
    fn steps_that_cannot_end_or_run_are_refused() {
        let def: Definition = serde_json::from_value(serde_json::json!({
            "name": "n", "trigger": {"event": "a.b", "schedule": "birthday"},
            "steps": [
                {"type": "wait_for", "event": "x.y"},
                {"type": "exit"},
                {"type": "send", "template": "t"}
            ]
        }))
        .unwrap();
        let fields: Vec<String> = def
            .check()
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["trigger", "steps[0].timeout", "steps[2]"]);
    }
}

/// Where a journey is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum JourneyStatus {
    Active,
    Completed,
    Exited,
}

impl JourneyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JourneyStatus::Active => "active",
            JourneyStatus::Completed => "completed",
            JourneyStatus::Exited => "exited",
        }
    }
}

/// One contact's run through one campaign version.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct JourneyView {
    pub id: Uuid,
    pub campaign_id: Uuid,
    /// The campaign version the journey started on and keeps.
    pub version: i32,
    pub contact_id: Uuid,
    pub status: JourneyStatus,
    /// The step it stands at: `[2]`, or `[2, 0]` inside step 2's `on_timeout`.
    pub position: Vec<i32>,
    /// When the worker looks at it next.
    pub wake_at: Option<DateTime<Utc>>,
    pub enrolled_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub exit_reason: Option<String>,
    pub converted: bool,
    pub trigger_event_id: Option<Uuid>,
    pub last_message_id: Option<Uuid>,
}
