//! The public survey page `/s/{token}`, in the contact's language under the company's name:
//! the ticket it is about, the question, five labelled answers and a comment box in one form
//! (a comment typed before the score is kept), then a thank-you page that offers the comment
//! box if it was left empty. The token names the tenant and the ticket, is signed, and expires;
//! the score can be given once (a second one is a 409 page), a comment may follow. Every
//! answer, errors included, is a page (`crate::http::pages`), never a trace.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::store::{self, RatingRow};
use crate::AppState;
use crate::domain::TenantId;
use crate::error::ApiResult;
use crate::http::extract::ApiPath;
use crate::http::pages::{self, Brand, Page, Words, escape, fill};
use crate::signing::Purpose;
use crate::support::model::Ticket;
use crate::support::store as support;
use crate::tenants::store as tenants;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(survey_page, answer))
}

/// The longest comment kept, in characters.
const MAX_COMMENT: usize = 5000;

/// What a survey token leads to.
struct Target {
    tenant: TenantId,
    ticket: Ticket,
    words: &'static Words,
    brand: Brand,
}

impl Target {
    fn page(&self, status: StatusCode, title: &str, body: String) -> Response {
        pages::render(Page {
            status,
            words: self.words,
            brand: Some(&self.brand),
            title,
            body,
        })
    }

    /// "Request #42: The card does not work".
    fn ticket_line(&self) -> String {
        format!(
            r#"<p class="ticket">{} #{}: {}</p>"#,
            escape(self.words.ticket),
            self.ticket.number,
            escape(&self.ticket.subject)
        )
    }

    /// The whole survey: score and comment in one form. `error` says what was missing.
    fn survey(&self, status: StatusCode, comment: &str, error: Option<&str>) -> Response {
        let w = self.words;
        let error_html = error.map_or_else(String::new, |e| {
            format!(
                r#"<p class="error" role="alert" id="score-error">{}</p>"#,
                escape(e)
            )
        });
        let described = if error.is_some() {
            r#" aria-describedby="score-error""#
        } else {
            ""
        };
        let options: String = w
            .scores
            .iter()
            .enumerate()
            .map(|(i, label)| {
                format!(
                    r#"<label><input type="radio" name="score" value="{n}" required><span class="n">{n}</span><span>{}</span></label>"#,
                    escape(label),
                    n = i + 1
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        let body = format!(
            r#"{ticket}
{error_html}<form method="post">
<fieldset{described}>
<legend>{question}</legend>
<div class="scale">
{options}
</div>
</fieldset>
<label class="comment" for="comment">{comment_label}</label>
<textarea id="comment" name="comment" maxlength="{MAX_COMMENT}" rows="5">{comment}</textarea>
<button type="submit">{submit}</button>
</form>"#,
            ticket = self.ticket_line(),
            question = escape(w.question),
            comment_label = escape(w.comment_label),
            comment = escape(comment),
            submit = escape(w.submit),
        );
        self.page(status, w.survey_title, body)
    }

    /// After the score: thanks, the score given, and the comment box while there is no comment.
    fn thanks(
        &self,
        status: StatusCode,
        lead: &str,
        score: i16,
        commented: bool,
        comment_thanks: bool,
    ) -> Response {
        let w = self.words;
        let mut body = format!(
            "{}\n<p>{}</p>\n<p class=\"rating\">{}</p>",
            self.ticket_line(),
            escape(lead),
            fill(w.your_rating, &[("score", &score.to_string())])
        );
        if comment_thanks {
            body.push_str(&format!("\n<p>{}</p>", escape(w.thanks_comment)));
        }
        if !commented {
            body.push_str(&format!(
                r#"
<form method="post">
<label class="comment" for="comment">{}</label>
<textarea id="comment" name="comment" maxlength="{MAX_COMMENT}" rows="5" required></textarea>
<button type="submit">{}</button>
</form>"#,
                escape(w.add_comment),
                escape(w.send_comment)
            ));
        }
        self.page(status, w.thanks_title, body)
    }
}

async fn target(
    state: &AppState,
    token: &str,
    headers: &HeaderMap,
) -> ApiResult<Result<Target, Response>> {
    let signer = state.links.get(&state.pool).await?;
    let Some(claims) = signer.verify(token, Purpose::Survey) else {
        return Ok(Err(pages::invalid_link(headers)));
    };
    let tenant = TenantId(claims.tenant);
    let mut conn = state.pool.acquire().await?;
    let Some(ticket) = support::get_ticket(&mut conn, tenant, claims.subject).await? else {
        return Ok(Err(pages::invalid_link(headers)));
    };
    let Some(brand) = tenants::brand(&mut conn, tenant).await? else {
        return Ok(Err(pages::invalid_link(headers)));
    };
    // The contact's language, else the tenant's.
    let locale = crate::contacts::store::locale_of(&mut conn, tenant, ticket.contact_id)
        .await?
        .unwrap_or_default();
    let t = Target {
        tenant,
        ticket,
        words: pages::for_locale(&locale),
        brand,
    };
    if claims.expired() {
        let body = format!("<p>{}</p>", escape(t.words.expired));
        return Ok(Err(t.page(StatusCode::GONE, t.words.expired_title, body)));
    }
    Ok(Ok(t))
}

/// The survey page.
#[utoipa::path(get, path = "/s/{token}", tag = "csat",
    params(("token" = String, Path, description = "Signed survey token")),
    responses((status = 200, description = "The survey", content_type = "text/html"),
              (status = 404, description = "Not a valid link", content_type = "text/html"),
              (status = 410, description = "Expired", content_type = "text/html")))]
async fn survey_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(token): ApiPath<String>,
) -> ApiResult<Response> {
    let t = match target(&state, &token, &headers).await? {
        Ok(t) => t,
        Err(page) => return Ok(page),
    };
    let mut conn = state.pool.acquire().await?;
    Ok(
        match store::survey_rating(&mut conn, t.tenant, t.ticket.id).await? {
            None => t.survey(StatusCode::OK, "", None),
            Some(r) => t.thanks(
                StatusCode::OK,
                t.words.already_rated,
                r.score,
                r.comment.is_some(),
                false,
            ),
        },
    )
}

/// The survey page's form, as the browser posts it.
#[derive(utoipa::ToSchema)]
#[expect(
    dead_code,
    reason = "documents the form the handler reads field by field"
)]
pub struct SurveyForm {
    /// 1 (very dissatisfied) to 5 (very satisfied); once per survey.
    #[schema(minimum = 1, maximum = 5)]
    score: Option<i16>,
    /// Free text, with the score or in a later post.
    #[schema(max_length = 5000)]
    comment: Option<String>,
}

/// An answer: a score (once) and/or a comment.
#[utoipa::path(post, path = "/s/{token}", tag = "csat",
    params(("token" = String, Path, description = "Signed survey token")),
    request_body(content = SurveyForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "Thanks", content_type = "text/html"),
              (status = 404, description = "Not a valid link", content_type = "text/html"),
              (status = 409, description = "Already rated", content_type = "text/html"),
              (status = 410, description = "Expired", content_type = "text/html"),
              (status = 422, description = "No valid score", content_type = "text/html")))]
async fn answer(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(token): ApiPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let t = match target(&state, &token, &headers).await? {
        Ok(t) => t,
        Err(page) => return Ok(page),
    };
    let fields: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_owned())
    };
    let comment = field("comment")
        .filter(|c| !c.is_empty())
        .map(|c| c.chars().take(MAX_COMMENT).collect::<String>());
    let score = field("score").filter(|s| !s.is_empty());
    let w = t.words;
    let max_attempts = state.config.outbox_max_attempts;
    let mut tx = crate::db::begin(&state.pool).await?;
    let already = store::survey_rating(&mut tx, t.tenant, t.ticket.id).await?;
    let page = match (score, already) {
        (Some(raw), None) => {
            let Some(score) = raw.parse::<i16>().ok().filter(|s| (1..=5).contains(s)) else {
                return Ok(t.survey(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    comment.as_deref().unwrap_or_default(),
                    Some(w.choose),
                ));
            };
            let row = RatingRow {
                contact_id: t.ticket.contact_id,
                ticket_id: Some(t.ticket.id),
                agent_id: t.ticket.assignee_id,
                score,
                comment: comment.as_deref(),
                source: "survey",
                channel: Some(t.ticket.channel.as_str()),
            };
            match store::record(&mut tx, t.tenant, &row, max_attempts).await {
                Ok(_) => t.thanks(
                    StatusCode::OK,
                    w.thanks_score,
                    score,
                    comment.is_some(),
                    comment.is_some(),
                ),
                // Rated meanwhile, by another tab.
                Err(crate::error::StoreError::Conflict(_)) => {
                    return Ok(t.survey(StatusCode::CONFLICT, "", Some(w.already_rated)));
                }
                Err(e) => return Err(e.into()),
            }
        }
        // A second score is refused; a comment that came with it is kept.
        (Some(_), Some(r)) => {
            if let Some(c) = &comment {
                store::add_comment(&mut tx, t.tenant, t.ticket.id, c, max_attempts).await?;
            }
            let commented = r.comment.is_some() || comment.is_some();
            t.thanks(
                StatusCode::CONFLICT,
                w.already_rated,
                r.score,
                commented,
                comment.is_some(),
            )
        }
        (None, Some(r)) => {
            if let Some(c) = &comment {
                store::add_comment(&mut tx, t.tenant, t.ticket.id, c, max_attempts).await?;
            }
            let commented = r.comment.is_some() || comment.is_some();
            t.thanks(
                StatusCode::OK,
                w.thanks_score,
                r.score,
                commented,
                comment.is_some(),
            )
        }
        (None, None) => {
            return Ok(t.survey(
                StatusCode::UNPROCESSABLE_ENTITY,
                comment.as_deref().unwrap_or_default(),
                Some(w.choose),
            ));
        }
    };
    tx.commit().await?;
    Ok(page)
}
