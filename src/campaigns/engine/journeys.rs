//! Journeys as rows: their timeline entries, their end, and writing them back in bulk.

use super::*;
use crate::domain::kinds;

pub(super) fn campaign_name(scope: &Scope<'_>, campaign: Uuid) -> String {
    scope
        .campaigns
        .get(&campaign)
        .map(|c| c.name.clone())
        .unwrap_or_default()
}

/// Puts a journey decision on the contact's timeline.
pub(super) fn log_step(
    scope: &Scope<'_>,
    j: &Journey,
    step: &str,
    details: Value,
) -> EngineResult<()> {
    let mut properties = json!({"campaign_id": j.campaign_id,
        "campaign": campaign_name(scope, j.campaign_id), "journey_id": j.id,
        "version": j.version, "step": step, "position": j.position});
    if let (Some(p), Value::Object(d)) = (properties.as_object_mut(), details) {
        p.extend(d);
    }
    scope.emit(kinds::CAMPAIGN_STEP, properties, j.id);
    Ok(())
}

/// Ends a journey: `completed` after its last step, `exited` otherwise.
pub(super) fn end_journey(
    scope: &Scope<'_>,
    j: &mut Journey,
    status: JourneyStatus,
    reason: &str,
    converted: bool,
) -> EngineResult<()> {
    j.status = status;
    j.exit_reason = (status == JourneyStatus::Exited).then(|| reason.to_owned());
    j.converted = converted;
    j.wake_at = None;
    j.dirty = true;
    let kind = if status == JourneyStatus::Completed {
        kinds::CAMPAIGN_COMPLETED
    } else {
        kinds::CAMPAIGN_EXITED
    };
    scope.emit(
        kind,
        json!({"campaign_id": j.campaign_id, "campaign": campaign_name(scope, j.campaign_id),
               "journey_id": j.id, "version": j.version, "reason": reason,
               "converted": converted}),
        j.id,
    );
    metrics::counter!("campaign_journeys_ended_total", "status" => status.as_str()).increment(1);
    Ok(())
}
