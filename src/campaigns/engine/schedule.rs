//! Date-based enrolment (birthdays), once per occurrence.

use super::*;

/// Enrols the contacts whose date comes round: for each active campaign with a schedule, the
/// contacts whose birthday is today in their time zone and whose local time has passed `at`,
/// once a year. 29 February birthdays are kept on 28 February in other years.
pub(super) async fn run_schedules(state: &AppState, now: DateTime<Utc>) -> EngineResult<usize> {
    let running = {
        let mut conn = state.pool.acquire().await?;
        store::active_everywhere(&mut conn).await?
    };
    let mut enrolled = 0;
    for (tenant, campaign, version) in running {
        let mut conn = state.pool.acquire().await?;
        let def = state
            .campaigns
            .get(&mut conn, tenant, campaign, version)
            .await?;
        let Some(Schedule::Birthday) = def.trigger.schedule else {
            continue;
        };
        let at = def
            .trigger
            .at
            .map(|a| a.0)
            .unwrap_or_else(|| chrono::NaiveTime::from_hms_opt(9, 0, 0).unwrap_or_default());
        let due = store::birthdays_due(&mut conn, tenant, campaign, now, at).await?;
        drop(conn);
        for (contact, year) in due {
            let key = format!("birthday:{year}");
            if process_contact_logged(state, tenant, contact, &[(campaign, version, key)])
                .await
                .is_some()
            {
                enrolled += 1;
            }
        }
    }
    Ok(enrolled)
}
