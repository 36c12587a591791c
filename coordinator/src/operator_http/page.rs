//! The status page and the login page: server-rendered HTML with inline CSS and SVG, no
//! script and nothing fetched from elsewhere, so it renders on an isolated operator network.
//! Every value comes from one [`StatusReport`], the operator view `GetStatus` returns, and every
//! text from it is escaped.

use std::fmt::Write as _;

use fedtune_shared::round::{PrivacyStatus, RoundSummary, StatusReport};

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:24px;color:#1d2330;background:#f7f8fa}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}\
.sum{color:#4b5563}table{border-collapse:collapse;background:#fff}\
th,td{padding:4px 10px;border-bottom:1px solid #e5e7eb;text-align:right}th{background:#eef1f5}\
td.l,th.l{text-align:left}.ok{color:#15803d}.bad{color:#b91c1c}.dim{color:#6b7280}\
.bar{width:420px;height:18px;background:#e5e7eb;border-radius:4px;overflow:hidden}\
.fill{height:100%;background:#2563eb}.fill.over{background:#b91c1c}\
form{background:#fff;padding:16px;border:1px solid #e5e7eb;width:420px}";

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "–".into()
    }
}

fn document(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>{STYLE}</style></head><body>{body}</body></html>",
        esc(title)
    )
}

/// The login form (and why the last attempt failed, if it did): what an unauthenticated
/// request gets, with no federation data.
pub fn login(message: Option<&str>) -> String {
    let mut body = String::from("<h1>fedtune coordinator</h1><p class=\"sum\">Operator sign-in</p>");
    if let Some(m) = message {
        let _ = write!(body, "<p id=\"login-error\" class=\"bad\">{}</p>", esc(m));
    }
    body.push_str(
        "<form id=\"login\" method=\"post\" action=\"/login\">\
         <label for=\"token\">Operator token (<code>operator.token</code> in the state directory)</label><br>\
         <input id=\"token\" name=\"token\" type=\"password\" size=\"48\" autocomplete=\"off\" required> \
         <button id=\"sign-in\" type=\"submit\">Sign in</button></form>",
    );
    document("fedtune: sign in", &body)
}

/// The operator's status page.
pub fn status(report: &StatusReport) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>fedtune coordinator</h1><p class=\"sum\">phase <b id=\"phase\">{}</b> · round \
         <b id=\"round\">{}</b> (attempt {}) · model <b id=\"model-version\">v{}</b> of {} rounds · \
         strategy {}</p>",
        report.phase,
        report.round.round,
        report.round.attempt,
        report.model_version.0,
        report.total_rounds,
        esc(&report.strategy)
    );
    if let Some(reason) = &report.finished_reason {
        let _ = write!(b, "<p id=\"finished\">finished: {}</p>", esc(reason));
    }
    if let Some(d) = report.deadline_in {
        let _ = write!(
            b,
            "<p>deadline in {:.1} s, {} updates accepted so far</p>",
            d.as_secs_f64(),
            report.accepted_updates
        );
    }
    budget(&mut b, &report.privacy);
    rounds(&mut b, report);
    chart(&mut b, &report.recent_rounds);
    clients(&mut b, report);
    document("fedtune: status", &b)
}

/// The privacy budget as a bar: ε spent of `privacy.target_epsilon`.
fn budget(b: &mut String, p: &PrivacyStatus) {
    let spent = p.local_epsilon.unwrap_or(p.epsilon);
    let _ = write!(b, "<h2>Privacy</h2><p id=\"guarantee\">{}</p>", esc(&p.guarantee));
    match p.target_epsilon {
        Some(target) if target > 0.0 => {
            let pct = (spent / target * 100.0).clamp(0.0, 100.0);
            let over = if spent > target { " over" } else { "" };
            let _ = write!(
                b,
                "<div id=\"budget-bar\" class=\"bar\" role=\"meter\" aria-valuemin=\"0\" \
                 aria-valuemax=\"{target}\" aria-valuenow=\"{spent}\" data-epsilon=\"{spent}\" \
                 data-budget=\"{target}\"><div class=\"fill{over}\" style=\"width:{pct:.1}%\"></div></div>\
                 <p class=\"sum\">ε spent <b id=\"epsilon\">{}</b> of budget {} ({pct:.1}%), {} left · δ = {}</p>",
                num(spent),
                num(target),
                num((target - spent).max(0.0)),
                p.delta
            );
        }
        _ => {
            let _ = write!(
                b,
                "<p class=\"sum\" id=\"budget-bar\" data-epsilon=\"{spent}\">ε spent <b id=\"epsilon\">{}</b>, \
                 no budget set (privacy.target_epsilon)</p>",
                num(spent)
            );
        }
    }
}

/// The round timeline: recent attempts, newest first.
fn rounds(b: &mut String, report: &StatusReport) {
    let mark = if report.privacy.evaluation_outside_guarantee { "*" } else { "" };
    let _ = write!(
        b,
        "<h2>Rounds</h2><table id=\"rounds\"><tr><th>round</th><th>attempt</th><th class=\"l\">outcome</th>\
         <th>selected</th><th>accepted</th><th>failed</th><th>examples</th><th>train loss</th>\
         <th>eval loss{mark}</th><th>accuracy{mark}</th><th>ε</th><th>seconds</th><th class=\"l\">reason</th></tr>"
    );
    for r in &report.recent_rounds {
        let class = match r.status.as_str() {
            "completed" => "ok",
            "failed" | "aborted" => "bad",
            _ => "dim",
        };
        let _ = write!(
            b,
            "<tr class=\"round\" data-round=\"{}\" data-attempt=\"{}\" data-status=\"{}\"><td>{}</td><td>{}</td>\
             <td class=\"l {class}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"accuracy\">{}</td><td>{}</td><td>{:.1}</td><td class=\"l dim\">{}</td></tr>",
            r.id.round,
            r.id.attempt,
            esc(&r.status),
            r.id.round,
            r.id.attempt,
            esc(&r.status),
            r.selected,
            r.accepted,
            r.failed,
            r.total_examples,
            num(r.train_loss),
            num(r.eval_loss),
            num(r.eval_accuracy),
            r.epsilon.map_or_else(|| "–".into(), num),
            r.duration.as_secs_f64(),
            esc(&r.reason)
        );
    }
    b.push_str("</table>");
    if !mark.is_empty() {
        let _ = write!(b, "<p class=\"sum\">* {}</p>", PrivacyStatus::EVALUATION_OUTSIDE);
    }
}

/// Accuracy and loss per completed round as an inline SVG line chart (accuracy on a 0–1 axis,
/// loss scaled to its largest value).
fn chart(b: &mut String, recent: &[RoundSummary]) {
    let mut points: Vec<&RoundSummary> = recent
        .iter()
        .filter(|r| r.status == "completed" && (r.eval_accuracy.is_finite() || r.eval_loss.is_finite()))
        .collect();
    points.sort_by_key(|r| r.id.round);
    b.push_str("<h2>Accuracy and loss per round</h2>");
    if points.is_empty() {
        b.push_str("<p class=\"dim\" id=\"accuracy-chart\">no evaluated round yet</p>");
        return;
    }
    let (w, h, pad) = (480.0, 200.0, 30.0);
    let first = points[0].id.round as f64;
    let span = (points[points.len() - 1].id.round as f64 - first).max(1.0);
    let x = |round: u64| pad + (round as f64 - first) / span * (w - 2.0 * pad);
    let y = |v: f64| h - pad - v.clamp(0.0, 1.0) * (h - 2.0 * pad);
    let max_loss = points.iter().map(|r| r.eval_loss).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let line = |value: &dyn Fn(&RoundSummary) -> f64| {
        points
            .iter()
            .filter(|r| value(r).is_finite())
            .map(|r| format!("{:.1},{:.1}", x(r.id.round), y(value(r))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let acc = line(&|r| r.eval_accuracy);
    let loss = line(&|r| if max_loss > 0.0 { r.eval_loss / max_loss } else { f64::NAN });
    let _ = write!(
        b,
        "<svg id=\"accuracy-chart\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"accuracy and loss per round\">\
         <rect width=\"{w}\" height=\"{h}\" fill=\"#fff\"/>\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#9ca3af\"/>\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"#9ca3af\"/>\
         <text x=\"4\" y=\"{}\" font-size=\"10\">1.0</text><text x=\"4\" y=\"{}\" font-size=\"10\">0</text>\
         <polyline class=\"accuracy\" points=\"{acc}\" fill=\"none\" stroke=\"#2563eb\" stroke-width=\"2\"/>\
         <polyline class=\"loss\" points=\"{loss}\" fill=\"none\" stroke=\"#d97706\" stroke-width=\"2\" \
         stroke-dasharray=\"5 3\"/>",
        h - pad,
        w - pad,
        h - pad,
        h - pad,
        pad + 4.0,
        h - pad
    );
    for r in &points {
        let _ = write!(
            b,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            x(r.id.round),
            h - pad + 14.0,
            r.id.round
        );
        if r.eval_accuracy.is_finite() {
            let _ = write!(
                b,
                "<circle class=\"accuracy-point\" data-round=\"{}\" data-accuracy=\"{}\" cx=\"{:.1}\" cy=\"{:.1}\" \
                 r=\"3\" fill=\"#2563eb\"/>",
                r.id.round,
                r.eval_accuracy,
                x(r.id.round),
                y(r.eval_accuracy)
            );
        }
    }
    let _ = write!(
        b,
        "<text x=\"{}\" y=\"14\" font-size=\"11\" fill=\"#2563eb\">accuracy</text>\
         <text x=\"{}\" y=\"26\" font-size=\"11\" fill=\"#d97706\">loss ÷ {}</text></svg>",
        w - 140.0,
        w - 140.0,
        num(max_loss)
    );
}

/// Per-client health: liveness, last heartbeat, what it is doing, rounds contributed.
fn clients(b: &mut String, report: &StatusReport) {
    let alive = report.clients.iter().filter(|c| c.alive).count();
    let _ = write!(
        b,
        "<h2>Clients</h2><p class=\"sum\"><span id=\"clients-alive\">{alive}</span> alive of \
         <span id=\"clients-known\">{}</span> known</p><table id=\"clients\"><tr><th class=\"l\">client</th>\
         <th class=\"l\">health</th><th class=\"l\">activity</th><th>last seen (s ago)</th>\
         <th>rounds contributed</th></tr>",
        report.clients.len()
    );
    for c in &report.clients {
        let (health, class) = if c.alive { ("alive", "ok") } else { ("gone", "bad") };
        let _ = write!(
            b,
            "<tr class=\"client\" data-client=\"{}\"><td class=\"l\">{}</td><td class=\"l {class}\">{health}</td>\
             <td class=\"l\">{}</td><td>{:.1}</td><td>{}</td></tr>",
            esc(c.client_id.as_str()),
            esc(c.client_id.as_str()),
            c.activity,
            c.last_seen_ago.as_secs_f64(),
            c.rounds_contributed
        );
    }
    b.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_the_federation_is_escaped() {
        assert_eq!(esc("<b a=\"x\">&'"), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
    }

    #[test]
    fn the_login_page_holds_a_form_and_no_federation_data() {
        let page = login(Some("not the operator token"));
        assert!(page.contains("<form id=\"login\" method=\"post\" action=\"/login\">"), "{page}");
        assert!(page.contains("not the operator token"));
        assert!(!page.contains("id=\"rounds\"") && !page.contains("budget-bar"));
    }
}
