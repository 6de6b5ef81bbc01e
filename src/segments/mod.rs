//! Segments: a named CEL condition over the contact ("available credit over 80% and no
//! purchase in 30 days"), checked when it is saved, counted and listed on demand, and named
//! by broadcasts instead of repeating the condition.
//!
//! A condition is a program Rapport runs, not SQL: counting walks the tenant's contacts a
//! page at a time (each page its own statement, so no lock or snapshot is held across the
//! walk, and one page is in memory at once) and evaluates the condition on each contact off
//! the async threads. The plain comparisons the condition implies (`contact.country == 'HR'`,
//! `contact.attributes.plan in ['gold', 'silver']`, `contact.attributes.score >= 4`) are
//! tested by the database first, so that only the contacts that pass them are read whole.

pub mod model;
pub mod routes;
pub mod store;

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::campaigns::cel::{self, Requirement};
use crate::campaigns::model::Condition;
use crate::contacts::model::Contact;
use crate::contacts::store as contacts;
use crate::domain::TenantId;
use crate::error::{StoreError, StoreResult};

/// Contacts read per statement of a walk.
pub const PAGE: i64 = 2_000;

/// Compiles a segment's condition: a CEL expression over `contact` and `now`, bounded like
/// every tenant condition (see `campaigns::cel::check_cost`). The error names the line and
/// column of the first problem.
pub fn compile(source: &str) -> Result<Condition, String> {
    let condition = Condition::compile(source).map_err(|e| {
        e.replace(
            "conditions see `contact`, `event` and `now`",
            "segment conditions see `contact` and `now`",
        )
    })?;
    cel::check_contact_only(&condition)?;
    Ok(condition)
}

/// A condition made ready for walking the contacts: the fields it reads (bound alone, see
/// `campaigns::cel::contact_of`) and the plain comparisons it implies, which the database
/// applies first so that only candidates are read whole and evaluated.
#[derive(Clone)]
pub struct Scan {
    condition: Condition,
    fields: Option<BTreeSet<String>>,
    clauses: Vec<contacts::Clause>,
    /// Whether members are read with their `stats` and `last_event_at`: when the condition
    /// reads them (or may: it uses `contact` whole), or the caller shows or sends them.
    stats: contacts::Stats,
}

impl Scan {
    pub fn new(condition: Condition) -> Scan {
        let fields = cel::contact_fields(condition.program());
        let clauses = cel::requirements(condition.program())
            .into_iter()
            .filter_map(|r| match r {
                Requirement::Field { field, any_of } => {
                    contacts::narrowing_column(&field).map(|c| contacts::Clause::Column(c, any_of))
                }
                Requirement::Attribute { key, any_of } => {
                    Some(contacts::Clause::Attribute(key, any_of))
                }
                Requirement::Number { key, low, high } => {
                    Some(contacts::Clause::Number(key, low, high))
                }
                Requirement::HasAttribute(key) => Some(contacts::Clause::HasAttribute(key)),
            })
            .collect();
        let stats = if condition.reads_stats() {
            contacts::Stats::Read
        } else {
            contacts::Stats::Skipped
        };
        Scan {
            condition,
            fields,
            clauses,
            stats,
        }
    }

    /// Members are read whole, `stats` and `last_event_at` included, whatever the condition
    /// reads: for callers that show the contacts or hand them to a template.
    pub fn reading_stats(mut self) -> Scan {
        self.stats = contacts::Stats::Read;
        self
    }

    /// Whether members come with their `stats` and `last_event_at`.
    pub fn reads_stats(&self) -> bool {
        self.stats == contacts::Stats::Read
    }

    /// Whether a contact meets the condition at `now`.
    pub fn holds(&self, contact: &Contact, now: DateTime<Utc>) -> bool {
        let bound = cel::contact_of(contact, self.fields.as_ref());
        cel::Facts::of_contact(&bound, now).holds(&self.condition)
    }
}

/// Which of `contacts` meet the scan's condition at `now`. CPU work: run it off the async
/// threads (see [`page`]). A page is split over the machine's cores (at most 4).
pub fn members(scan: &Scan, contacts: &[Contact], now: DateTime<Utc>) -> Vec<bool> {
    let one = |c: &Contact| scan.holds(c, now);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if cores < 2 || contacts.len() < 256 {
        return contacts.iter().map(one).collect();
    }
    let chunk = contacts.len().div_ceil(cores);
    std::thread::scope(|scope| {
        let mut parts = contacts.chunks(chunk);
        let first = parts.next().unwrap_or_default();
        let others: Vec<_> = parts
            .map(|part| scope.spawn(move || part.iter().map(one).collect::<Vec<bool>>()))
            .collect();
        let mut found: Vec<bool> = first.iter().map(one).collect();
        for other in others {
            // A panic in one part (none is expected: evaluation errors are `false`) is
            // re-raised here, as it would be without the split.
            match other.join() {
                Ok(part) => found.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        found
    })
}

/// One page of a walk over the tenant's contacts.
pub struct Page {
    /// Live contacts walked past (members or not).
    pub scanned: u64,
    /// The last of them, to go on after; None when there were none.
    pub last: Option<Uuid>,
    /// The members among them, in id order.
    pub members: Vec<Contact>,
}

/// The members among the next `limit` live contacts after `after`, decided at `now`: the
/// database rules out the contacts that fail the scan's clauses, and the condition decides
/// on the others, read whole, on a blocking thread. One statement or two, no lock or
/// snapshot held after it.
pub async fn page(
    pool: &PgPool,
    tenant: TenantId,
    after: Option<Uuid>,
    limit: i64,
    scan: &Scan,
    now: DateTime<Utc>,
) -> StoreResult<Page> {
    let mut conn = pool.acquire().await?;
    let (candidates, scanned, last) = if scan.clauses.is_empty() {
        let all = contacts::scan_page(&mut conn, tenant, after, limit, scan.stats).await?;
        let last = all.last().map(|c| c.id);
        let scanned = all.len() as u64;
        (all, scanned, last)
    } else {
        let ids = contacts::scan_ids(&mut conn, tenant, after, limit, &scan.clauses).await?;
        let last = ids.last().map(|(id, _)| *id);
        let passed: Vec<Uuid> = ids.iter().filter(|(_, p)| *p).map(|(id, _)| *id).collect();
        let mut read = if passed.is_empty() {
            Vec::new()
        } else {
            contacts::read_many(&mut conn, tenant, &passed, scan.stats).await?
        };
        read.sort_unstable_by_key(|c| c.id);
        (read, ids.len() as u64, last)
    };
    drop(conn);
    let scan = scan.clone();
    let members = tokio::task::spawn_blocking(move || {
        let found = members(&scan, &candidates, now);
        candidates
            .into_iter()
            .zip(found)
            .filter_map(|(c, member)| member.then_some(c))
            .collect()
    })
    .await
    .map_err(|e| StoreError::Internal(anyhow::anyhow!("segment evaluation stopped: {e}")))?;
    Ok(Page {
        scanned,
        last,
        members,
    })
}

/// How many contacts meet a condition now, and how many were looked at.
pub async fn count(
    pool: &PgPool,
    tenant: TenantId,
    condition: &Condition,
) -> StoreResult<(u64, u64)> {
    let now = Utc::now();
    let scan = Scan::new(condition.clone());
    let (mut after, mut matched, mut scanned) = (None::<Uuid>, 0u64, 0u64);
    loop {
        let page = page(pool, tenant, after, PAGE, &scan, now).await?;
        scanned += page.scanned;
        matched += page.members.len() as u64;
        match page.last {
            Some(last) if page.scanned == PAGE as u64 => after = Some(last),
            _ => return Ok((matched, scanned)),
        }
    }
}

/// Up to `limit` members after `after` in id order, looking at no more than `budget`
/// contacts; with the id to go on from when the walk is not over (the last member listed, or
/// the last contact looked at when the budget ran out first).
pub async fn list_members(
    pool: &PgPool,
    tenant: TenantId,
    condition: &Condition,
    mut after: Option<Uuid>,
    limit: usize,
    budget: u64,
) -> StoreResult<(Vec<Contact>, Option<Uuid>)> {
    let now = Utc::now();
    // The members listed are shown whole.
    let scan = Scan::new(condition.clone()).reading_stats();
    let mut out = Vec::new();
    let mut scanned = 0u64;
    let asked = PAGE.min(limit as i64 * 4).max(100);
    loop {
        let page = page(pool, tenant, after, asked, &scan, now).await?;
        let Some(last) = page.last else {
            return Ok((out, None));
        };
        scanned += page.scanned;
        let full = page.scanned == asked as u64;
        for contact in page.members {
            out.push(contact);
            if out.len() == limit {
                let at = out.last().map(|c| c.id);
                return Ok((out, at));
            }
        }
        if !full {
            return Ok((out, None));
        }
        after = Some(last);
        if scanned >= budget {
            return Ok((out, after));
        }
    }
}
