//! What Rapport itself writes on a ticket (author `system`): a missed call to return, a
//! customer a campaign hands to an agent. Agents read it in the tenant's language (`en`, `hr`,
//! `sl`, `hu` or `pl`; any other falls back to `en`).

/// The language of `locale` this module writes (`hr-HR` is `hr`).
fn language(locale: &str) -> &'static str {
    match locale.split('-').next().unwrap_or_default() {
        "hr" => "hr",
        "sl" => "sl",
        "hu" => "hu",
        "pl" => "pl",
        _ => "en",
    }
}

/// The subject and first message of a call-back ticket. `when` is already in the tenant's
/// time zone.
pub fn missed_call(
    locale: &str,
    number: Option<&str>,
    when: &str,
    voicemail: Option<&str>,
) -> (String, String) {
    let lang = language(locale);
    let subject = match (lang, number) {
        ("hr", Some(n)) => format!("Propušten poziv s broja {n}"),
        ("hr", None) => "Propušten poziv s nepoznatog broja".to_owned(),
        ("sl", Some(n)) => format!("Zgrešen klic s številke {n}"),
        ("sl", None) => "Zgrešen klic z neznane številke".to_owned(),
        ("hu", Some(n)) => format!("Nem fogadott hívás: {n}"),
        ("hu", None) => "Nem fogadott hívás ismeretlen számról".to_owned(),
        ("pl", Some(n)) => format!("Nieodebrane połączenie z numeru {n}"),
        ("pl", None) => "Nieodebrane połączenie z nieznanego numeru".to_owned(),
        (_, Some(n)) => format!("Missed call from {n}"),
        (_, None) => "Missed call from an unknown number".to_owned(),
    };
    let voicemail = voicemail.map(|url| match lang {
        "hr" => format!(" Ostavljena je glasovna poruka: {url}"),
        "sl" => format!(" Klicatelj je pustil glasovno sporočilo: {url}"),
        "hu" => format!(" A hívó hangüzenetet hagyott: {url}"),
        "pl" => format!(" Pozostawiono wiadomość głosową: {url}"),
        _ => format!(" The caller left a voicemail: {url}"),
    });
    let call_back = match lang {
        "hr" => "Molimo, nazovite klijenta.",
        "sl" => "Prosimo, pokličite stranko nazaj.",
        "hu" => "Kérjük, hívja vissza az ügyfelet.",
        "pl" => "Prosimy oddzwonić do klienta.",
        _ => "Please call the customer back.",
    };
    let body = format!(
        "{subject} ({when}).{} {call_back}",
        voicemail.unwrap_or_default()
    );
    (subject, body)
}

/// The subject and first message of the ticket a campaign's hand-over step opens, unless the
/// campaign wrote its own.
pub fn campaign_handover(
    locale: &str,
    campaign: &str,
    who: &str,
    trigger: &str,
    phone: Option<&str>,
) -> (String, String) {
    let lang = language(locale);
    let subject = match lang {
        "hr" => format!("Nazvati: {who} ({campaign})"),
        "sl" => format!("Poklicati: {who} ({campaign})"),
        "hu" => format!("Visszahívandó: {who} ({campaign})"),
        "pl" => format!("Do kontaktu: {who} ({campaign})"),
        _ => format!("Call {who} ({campaign})"),
    };
    let phone = phone.map(str::to_owned);
    let body = match lang {
        "hr" => format!(
            "Kampanja „{campaign}“ predaje Vam klijenta {who} nakon događaja `{trigger}`. Telefon: {}.",
            phone.unwrap_or_else(|| "nije upisan".to_owned())
        ),
        "sl" => format!(
            "Kampanja „{campaign}“ vam predaja stranko {who} po dogodku `{trigger}`. Telefon: {}.",
            phone.unwrap_or_else(|| "ni vpisan".to_owned())
        ),
        "hu" => format!(
            "A(z) „{campaign}” kampány átadja Önnek az ügyfelet ({who}) a(z) `{trigger}` esemény után. Telefon: {}.",
            phone.unwrap_or_else(|| "nincs megadva".to_owned())
        ),
        "pl" => format!(
            "Kampania „{campaign}” przekazuje Państwu klienta {who} po zdarzeniu `{trigger}`. Telefon: {}.",
            phone.unwrap_or_else(|| "brak".to_owned())
        ),
        _ => format!(
            "Campaign \u{201c}{campaign}\u{201d} hands {who} to you after `{trigger}`. Phone: {}.",
            phone.unwrap_or_else(|| "none on file".to_owned())
        ),
    };
    (subject, body)
}

/// The internal note that carries a customer's comment sent after the low-score alert.
pub fn late_rating_comment(locale: &str, score: i16, comment: &str) -> String {
    match language(locale) {
        "hr" => format!("Klijent je naknadno dodao komentar uz ocjenu {score}/5:\n\n{comment}"),
        "sl" => format!("Stranka je naknadno dodala komentar k oceni {score}/5:\n\n{comment}"),
        "hu" => {
            format!("Az ügyfél utólag megjegyzést fűzött a(z) {score}/5 értékeléshez:\n\n{comment}")
        }
        "pl" => format!("Klient dodał komentarz do oceny {score}/5:\n\n{comment}"),
        _ => format!("The customer added a comment to their rating of {score}/5:\n\n{comment}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_in_the_tenants_language_with_english_as_the_fallback() {
        let (s, b) = missed_call("hr-HR", Some("+385911234567"), "2026-12-02 14:05", None);
        assert_eq!(s, "Propušten poziv s broja +385911234567");
        assert_eq!(
            b,
            "Propušten poziv s broja +385911234567 (2026-12-02 14:05). Molimo, nazovite klijenta."
        );
        let (_, b) = missed_call("de", None, "2026-12-02 14:05", Some("https://v.example/1"));
        assert!(b.starts_with("Missed call from an unknown number"), "{b}");
        assert!(b.contains("voicemail: https://v.example/1"), "{b}");
        for l in ["en", "hr", "sl", "hu", "pl"] {
            let (s, b) = campaign_handover(l, "Nudge", "Ana", "credit.approved", None);
            assert!(s.contains("Ana") && b.contains("Nudge"), "{l}: {s} / {b}");
        }
    }
}
