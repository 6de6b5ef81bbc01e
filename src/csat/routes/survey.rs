//! The public survey page `/s/{token}`: a small, accessible, mobile-friendly HTML page in the
//! contact's language with the question, five buttons and a comment box. The token names the
//! tenant and the ticket, is signed, and expires; the score can be given once (a second one is
//! a 409 page), a comment may follow. Every answer, errors included, is a page, never a trace.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::store::{self, RatingRow};
use crate::AppState;
use crate::domain::TenantId;
use crate::error::ApiResult;
use crate::http::extract::ApiPath;
use crate::signing::Purpose;
use crate::support::store as support;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(survey_page, answer))
}

/// The page's words in one language.
struct Words {
    lang: &'static str,
    title: &'static str,
    question: &'static str,
    scores: [&'static str; 5],
    comment: &'static str,
    send: &'static str,
    thanks: &'static str,
    already: &'static str,
    invalid: &'static str,
    expired: &'static str,
    choose: &'static str,
}

const EN: Words = Words {
    lang: "en",
    title: "How did we do?",
    question: "How satisfied are you with the help you received?",
    scores: [
        "1 - Very dissatisfied",
        "2 - Dissatisfied",
        "3 - Neutral",
        "4 - Satisfied",
        "5 - Very satisfied",
    ],
    comment: "Anything you would like to add? (optional)",
    send: "Send comment",
    thanks: "Thank you for your answer.",
    already: "You have already rated this request. You can still add a comment.",
    invalid: "This survey link is not valid.",
    expired: "This survey has expired.",
    choose: "Please choose a score from 1 to 5.",
};

const HR: Words = Words {
    lang: "hr",
    title: "Kako smo vam pomogli?",
    question: "Koliko ste zadovoljni pomoći koju ste dobili?",
    scores: [
        "1 - Vrlo nezadovoljan",
        "2 - Nezadovoljan",
        "3 - Neutralno",
        "4 - Zadovoljan",
        "5 - Vrlo zadovoljan",
    ],
    comment: "Želite li nešto dodati? (nije obavezno)",
    send: "Pošalji komentar",
    thanks: "Hvala na odgovoru.",
    already: "Već ste ocijenili ovaj upit. Komentar možete dodati i sada.",
    invalid: "Ova poveznica na anketu nije valjana.",
    expired: "Ova anketa je istekla.",
    choose: "Odaberite ocjenu od 1 do 5.",
};

fn words(locale: &str) -> &'static Words {
    match locale.split('-').next().unwrap_or_default() {
        "hr" | "bs" | "sr" => &HR,
        _ => &EN,
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(status: StatusCode, w: &Words, body: &str) -> Response {
    let html = format!(
        r#"<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:34rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}
.scores{{display:flex;flex-wrap:wrap;gap:.5rem;margin:1rem 0}}
.scores button{{flex:1 1 5.5rem;min-height:3rem;font-size:1rem;border:2px solid #335;border-radius:.5rem;background:#fff;cursor:pointer}}
.scores button:focus,.scores button:hover{{background:#335;color:#fff}}
textarea{{width:100%;min-height:6rem;font-size:1rem}} label{{display:block;margin-top:1rem}}
.send{{margin-top:.5rem;font-size:1rem;padding:.5rem 1rem}}
</style></head>
<body><main><h1>{title}</h1>{body}</main></body></html>"#,
        lang = w.lang,
        title = w.title,
    );
    (status, Html(html)).into_response()
}

fn form(token: &str, w: &Words, with_scores: bool) -> String {
    let scores = if with_scores {
        let buttons: String = w
            .scores
            .iter()
            .enumerate()
            .map(|(i, label)| {
                format!(
                    r#"<button type="submit" name="score" value="{}" aria-label="{}">{}</button>"#,
                    i + 1,
                    escape(label),
                    i + 1
                )
            })
            .collect();
        format!(
            r#"<fieldset><legend>{}</legend><div class="scores">{buttons}</div></fieldset>"#,
            w.question
        )
    } else {
        String::new()
    };
    format!(
        r#"<form method="post" action="/s/{token}">{scores}<label for="comment">{}</label>
<textarea id="comment" name="comment" maxlength="5000"></textarea>
<button class="send" type="submit">{}</button></form>"#,
        w.comment, w.send
    )
}

/// What a survey token leads to.
struct Target {
    tenant: TenantId,
    ticket: crate::support::model::Ticket,
    words: &'static Words,
}

async fn target(state: &AppState, token: &str) -> ApiResult<Result<Target, Response>> {
    let signer = state.links.get(&state.pool).await?;
    let Some(claims) = signer.verify(token, Purpose::Survey) else {
        return Ok(Err(page(
            StatusCode::NOT_FOUND,
            &EN,
            &format!("<p>{}</p>", EN.invalid),
        )));
    };
    let tenant = TenantId(claims.tenant);
    let mut conn = state.pool.acquire().await?;
    let Some(ticket) = support::get_ticket(&mut conn, tenant, claims.subject).await? else {
        return Ok(Err(page(
            StatusCode::NOT_FOUND,
            &EN,
            &format!("<p>{}</p>", EN.invalid),
        )));
    };
    let locale = crate::contacts::store::locale_of(&mut conn, tenant, ticket.contact_id)
        .await?
        .unwrap_or_default();
    let w = words(&locale);
    if claims.expired() {
        return Ok(Err(page(
            StatusCode::GONE,
            w,
            &format!("<p>{}</p>", w.expired),
        )));
    }
    Ok(Ok(Target {
        tenant,
        ticket,
        words: w,
    }))
}

/// The survey page.
#[utoipa::path(get, path = "/s/{token}", tag = "csat",
    params(("token" = String, Path, description = "Signed survey token")),
    responses((status = 200, description = "The survey", content_type = "text/html"),
              (status = 404, description = "Not a valid link", content_type = "text/html"),
              (status = 410, description = "Expired", content_type = "text/html")))]
async fn survey_page(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
) -> ApiResult<Response> {
    let t = match target(&state, &token).await? {
        Ok(t) => t,
        Err(page) => return Ok(page),
    };
    let mut conn = state.pool.acquire().await?;
    let rated = store::survey_rating(&mut conn, t.tenant, t.ticket.id)
        .await?
        .is_some();
    let body = if rated {
        format!("<p>{}</p>{}", t.words.already, form(&token, t.words, false))
    } else {
        form(&token, t.words, true)
    };
    Ok(page(StatusCode::OK, t.words, &body))
}

/// The survey page's form, as the browser posts it.
#[derive(utoipa::ToSchema)]
#[expect(
    dead_code,
    reason = "documents the form the handler reads field by field"
)]
pub struct SurveyForm {
    /// 1 (very unhappy) to 5 (very happy); once per survey.
    #[schema(minimum = 1, maximum = 5)]
    score: Option<i16>,
    /// Free text; may follow the score in a later post.
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
    ApiPath(token): ApiPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let t = match target(&state, &token).await? {
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
        .map(|c| c.chars().take(5000).collect::<String>());
    let score = field("score");
    let w = t.words;
    let mut tx = state.pool.begin().await?;
    let already = store::survey_rating(&mut tx, t.tenant, t.ticket.id).await?;
    match (score, already) {
        (Some(_), Some(_)) => {
            return Ok(page(
                StatusCode::CONFLICT,
                w,
                &format!("<p>{}</p>{}", w.already, form(&token, w, false)),
            ));
        }
        (Some(raw), None) => {
            let Some(score) = raw.parse::<i16>().ok().filter(|s| (1..=5).contains(s)) else {
                return Ok(page(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    w,
                    &format!("<p>{}</p>{}", w.choose, form(&token, w, true)),
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
            match store::record(&mut tx, t.tenant, &row, state.config.outbox_max_attempts).await {
                Ok(_) => {}
                Err(crate::error::StoreError::Conflict(_)) => {
                    return Ok(page(
                        StatusCode::CONFLICT,
                        w,
                        &format!("<p>{}</p>{}", w.already, form(&token, w, false)),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        (None, Some(_)) => {
            if let Some(c) = &comment {
                store::add_comment(&mut tx, t.tenant, t.ticket.id, c).await?;
            }
        }
        (None, None) => {
            return Ok(page(
                StatusCode::UNPROCESSABLE_ENTITY,
                w,
                &format!("<p>{}</p>{}", w.choose, form(&token, w, true)),
            ));
        }
    }
    tx.commit().await?;
    let follow = if comment.is_none() {
        form(&token, w, false)
    } else {
        String::new()
    };
    Ok(page(
        StatusCode::OK,
        w,
        &format!("<p>{}</p>{follow}", w.thanks),
    ))
}
