//! Usage at a glance: messages, tokens, estimated cost, tool calls and `exec` time per user,
//! family and day — for `moltmate usage` (table, CSV, JSON) and the `/admin` page (charts).
//!
//! Read from the store's activity report (the `inbox`, `token_usage` and `audit_events`
//! tables; see `moltmate_store::reports`); cost is estimated here from a [`PriceTable`]
//! (`model.prices`). A model without a price adds no cost and marks the estimate partial.
//! To add a column: a field on [`Totals`] (summed by [`Totals::add`]), filled in
//! [`Totals::from_day`], and a cell in [`to_csv`] / [`to_table`].

use crate::OpsError;
use moltmate_core::UserId;
use moltmate_store::reports::DayActivity;
use moltmate_store::Store;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// A model's price: US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Price {
    pub input_per_m_tok: f64,
    pub output_per_m_tok: f64,
}

/// Prices by `provider/model`, with `provider/*` for a whole provider.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    by_model: HashMap<String, Price>,
}

impl PriceTable {
    pub fn new(by_model: HashMap<String, Price>) -> Self {
        PriceTable { by_model }
    }

    /// From the config's `model.prices`.
    pub fn from_config(prices: &BTreeMap<String, moltmate_config::PriceConfig>) -> Self {
        PriceTable::new(
            prices
                .iter()
                .map(|(key, price)| {
                    (
                        key.clone(),
                        Price {
                            input_per_m_tok: price.input_per_m_tok,
                            output_per_m_tok: price.output_per_m_tok,
                        },
                    )
                })
                .collect(),
        )
    }

    pub fn get(&self, provider: &str, model: &str) -> Option<Price> {
        self.by_model
            .get(&format!("{provider}/{model}"))
            .or_else(|| self.by_model.get(&format!("{provider}/*")))
            .copied()
    }

    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }

    /// What the tokens cost in millionths of a dollar; `None` without a price.
    pub fn cost_micros(
        &self,
        provider: &str,
        model: &str,
        input_tokens: u64,
        output_tokens: u64,
    ) -> Option<u64> {
        let price = self.get(provider, model)?;
        // Dollars per million tokens = micro-dollars per token. `as` saturates.
        let cost = input_tokens as f64 * price.input_per_m_tok
            + output_tokens as f64 * price.output_per_m_tok;
        Some(cost.max(0.0).ceil() as u64)
    }
}

/// Counts over some span (a day, a whole report) of one user or several.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub messages: u64,
    pub model_calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Estimated cost in millionths of a US dollar, of the models with a price.
    pub cost_micros: u64,
    /// Some tokens were of a model without a price: the cost is a lower bound.
    pub cost_partial: bool,
    pub tool_calls: u64,
    pub exec_calls: u64,
    pub exec_ms: u64,
}

impl Totals {
    fn from_day(day: &DayActivity, prices: &PriceTable) -> Totals {
        let mut totals = Totals {
            messages: day.messages,
            model_calls: day.model_calls,
            input_tokens: day.input_tokens,
            output_tokens: day.output_tokens,
            tool_calls: day.tool_calls,
            exec_calls: day.exec_calls,
            exec_ms: day.exec_ms,
            ..Totals::default()
        };
        for model in &day.by_model {
            match prices.cost_micros(
                &model.provider,
                &model.model,
                model.input_tokens,
                model.output_tokens,
            ) {
                Some(cost) => totals.cost_micros = totals.cost_micros.saturating_add(cost),
                None => totals.cost_partial |= model.input_tokens + model.output_tokens > 0,
            }
        }
        totals
    }

    pub fn add(&mut self, other: &Totals) {
        self.messages = self.messages.saturating_add(other.messages);
        self.model_calls = self.model_calls.saturating_add(other.model_calls);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cost_micros = self.cost_micros.saturating_add(other.cost_micros);
        self.cost_partial |= other.cost_partial;
        self.tool_calls = self.tool_calls.saturating_add(other.tool_calls);
        self.exec_calls = self.exec_calls.saturating_add(other.exec_calls);
        self.exec_ms = self.exec_ms.saturating_add(other.exec_ms);
    }

    pub fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// The estimated cost in dollars, as text (`$0.0123`, `≥ $0.01` when partial, `—` when
    /// nothing had a price).
    pub fn cost_text(&self) -> String {
        if self.cost_micros == 0 && self.cost_partial {
            return "—".to_string();
        }
        let dollars = format!("${:.4}", self.cost_micros as f64 / 1_000_000.0);
        if self.cost_partial {
            format!("≥ {dollars}")
        } else {
            dollars
        }
    }
}

/// One user's day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DayRow {
    /// `YYYY-MM-DD`, local time.
    pub day: String,
    pub user: String,
    #[serde(flatten)]
    pub totals: Totals,
}

/// A user over the whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserUsage {
    pub user: String,
    pub display_name: Option<String>,
    pub family: Option<String>,
    /// Unix millis of the last message or model call, over all time.
    pub last_seen: Option<i64>,
    pub totals: Totals,
    /// Per day, oldest first, every day of the report (zeros included).
    pub days: Vec<(String, Totals)>,
}

/// A family over the whole report (its members summed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyUsage {
    pub family: String,
    pub members: Vec<String>,
    pub totals: Totals,
    pub days: Vec<(String, Totals)>,
}

/// Everything `moltmate usage` and `/admin` show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    /// First day of the report (`YYYY-MM-DD`).
    pub since: String,
    /// Last day of the report (today).
    pub until: String,
    /// One row per user and day with any activity, by day then user.
    pub rows: Vec<DayRow>,
    pub users: Vec<UserUsage>,
    pub families: Vec<FamilyUsage>,
    /// Whether any price is configured (`model.prices`).
    pub priced: bool,
    /// The store cut a table at its row bound: some old rows are missing.
    pub truncated: bool,
}

/// Which usage to report.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub user: Option<UserId>,
    /// First day, local time.
    pub since: chrono::NaiveDate,
}

impl UsageQuery {
    /// The last `days` days, today included.
    pub fn last_days(days: u32) -> UsageQuery {
        let today = chrono::Local::now().date_naive();
        UsageQuery {
            user: None,
            since: today - chrono::Days::new(u64::from(days.max(1) - 1)),
        }
    }
}

/// Reports at most this many days (a `--since` further back is refused).
pub const MAX_DAYS: i64 = 3660;

fn local_midnight_millis(day: chrono::NaiveDate) -> i64 {
    use chrono::TimeZone;
    let midnight = day.and_hms_opt(0, 0, 0).unwrap_or_default();
    chrono::Local
        .from_local_datetime(&midnight)
        .earliest()
        .map(|t| t.timestamp_millis())
        .unwrap_or_else(|| midnight.and_utc().timestamp_millis())
}

/// Builds the report. `families` maps users to their family (from `families.<name>.members`
/// in `moltmate.json`).
pub async fn report(
    store: &Store,
    query: &UsageQuery,
    families: &BTreeMap<String, Vec<UserId>>,
    prices: &PriceTable,
) -> Result<UsageReport, OpsError> {
    let today = chrono::Local::now().date_naive();
    if query.since > today {
        return Err(OpsError::Failed(format!(
            "--since {} is in the future",
            query.since
        )));
    }
    if (today - query.since).num_days() >= MAX_DAYS {
        return Err(OpsError::Failed(format!(
            "--since {} is more than {MAX_DAYS} days ago",
            query.since
        )));
    }
    let activity = store
        .activity(local_midnight_millis(query.since), query.user.as_ref())
        .await?;
    let users = store.list_users().await?;
    let names: HashMap<String, Option<String>> = users
        .iter()
        .map(|u| (u.id.as_str().to_string(), u.display_name.clone()))
        .collect();
    let family_of: HashMap<&str, &str> = families
        .iter()
        .flat_map(|(family, members)| members.iter().map(move |m| (m.as_str(), family.as_str())))
        .collect();
    let mut all_days = Vec::new();
    let mut day = query.since;
    while day <= today {
        all_days.push(day.format("%Y-%m-%d").to_string());
        day = day.succ_opt().unwrap_or(today + chrono::Days::new(1));
    }

    let mut rows = Vec::new();
    let mut per_user: BTreeMap<String, BTreeMap<String, Totals>> = BTreeMap::new();
    for activity_day in &activity.days {
        let totals = Totals::from_day(activity_day, prices);
        per_user
            .entry(activity_day.user.clone())
            .or_default()
            .insert(activity_day.day.clone(), totals);
        rows.push(DayRow {
            day: activity_day.day.clone(),
            user: activity_day.user.clone(),
            totals,
        });
    }
    rows.sort_by(|a, b| (&a.day, &a.user).cmp(&(&b.day, &b.user)));
    // Every known user is listed (a quiet one with zeros), plus anyone with activity.
    for user in &users {
        if query.user.as_ref().is_none_or(|u| u == &user.id) {
            per_user.entry(user.id.as_str().to_string()).or_default();
        }
    }
    let series = |days: &BTreeMap<String, Totals>| -> (Totals, Vec<(String, Totals)>) {
        let mut total = Totals::default();
        let series = all_days
            .iter()
            .map(|day| {
                let totals = days.get(day).copied().unwrap_or_default();
                total.add(&totals);
                (day.clone(), totals)
            })
            .collect();
        (total, series)
    };
    let user_rows: Vec<UserUsage> = per_user
        .iter()
        .map(|(user, days)| {
            let (totals, days) = series(days);
            UserUsage {
                user: user.clone(),
                display_name: names.get(user).cloned().flatten(),
                family: family_of.get(user.as_str()).map(|f| f.to_string()),
                last_seen: activity.last_seen.get(user).copied(),
                totals,
                days,
            }
        })
        .collect();
    let family_rows = families
        .iter()
        .map(|(family, members)| {
            let mut days: BTreeMap<String, Totals> = BTreeMap::new();
            for member in members {
                for (day, totals) in per_user.get(member.as_str()).into_iter().flatten() {
                    days.entry(day.clone()).or_default().add(totals);
                }
            }
            let (totals, days) = series(&days);
            FamilyUsage {
                family: family.clone(),
                members: members.iter().map(|m| m.as_str().to_string()).collect(),
                totals,
                days,
            }
        })
        .collect();
    Ok(UsageReport {
        since: query.since.format("%Y-%m-%d").to_string(),
        until: today.format("%Y-%m-%d").to_string(),
        rows,
        users: user_rows,
        families: family_rows,
        priced: !prices.is_empty(),
        truncated: activity.truncated,
    })
}

/// A spreadsheet cell for text someone else chose (a display name): a leading `=`, `+`, `-`,
/// `@`, tab or carriage return would make Excel or LibreOffice read it as a formula
/// (`=HYPERLINK(...)`, `=cmd|...`), so it gets a `'` in front.
pub fn spreadsheet_text(text: &str) -> String {
    match text.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{text}"),
        _ => text.to_string(),
    }
}

fn seconds(ms: u64) -> String {
    format!("{:.1}", ms as f64 / 1000.0)
}

fn dollars(micros: u64) -> String {
    format!("{:.6}", micros as f64 / 1_000_000.0)
}

/// CSV: one row per user and day with activity; quoting by the `csv` crate, text cells
/// guarded against formula injection.
pub fn to_csv(report: &UsageReport) -> Result<String, OpsError> {
    let names: HashMap<&str, (&Option<String>, &Option<String>)> = report
        .users
        .iter()
        .map(|u| (u.user.as_str(), (&u.display_name, &u.family)))
        .collect();
    let mut out = csv::Writer::from_writer(Vec::new());
    let failed = |e: csv::Error| OpsError::Failed(format!("writing CSV: {e}"));
    out.write_record([
        "day",
        "user",
        "display_name",
        "family",
        "messages",
        "model_calls",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "cost_partial",
        "tool_calls",
        "exec_calls",
        "exec_seconds",
    ])
    .map_err(failed)?;
    for row in &report.rows {
        let (name, family) = names
            .get(row.user.as_str())
            .copied()
            .unwrap_or((&None, &None));
        let t = &row.totals;
        out.write_record([
            row.day.clone(),
            spreadsheet_text(&row.user),
            spreadsheet_text(name.as_deref().unwrap_or("")),
            spreadsheet_text(family.as_deref().unwrap_or("")),
            t.messages.to_string(),
            t.model_calls.to_string(),
            t.input_tokens.to_string(),
            t.output_tokens.to_string(),
            dollars(t.cost_micros),
            t.cost_partial.to_string(),
            t.tool_calls.to_string(),
            t.exec_calls.to_string(),
            seconds(t.exec_ms),
        ])
        .map_err(failed)?;
    }
    let bytes = out
        .into_inner()
        .map_err(|e| OpsError::Failed(format!("writing CSV: {}", e.error())))?;
    String::from_utf8(bytes).map_err(|e| OpsError::Failed(format!("writing CSV: {e}")))
}

/// JSON: the whole report.
pub fn to_json(report: &UsageReport) -> Result<String, OpsError> {
    serde_json::to_string_pretty(report).map_err(|e| OpsError::Failed(format!("writing JSON: {e}")))
}

/// Text for a terminal: what is not printable is shown escaped, so a display name cannot
/// move the cursor or change colours.
fn terminal_text(text: &str, width: usize) -> String {
    let clean: String = text
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    let mut cut: String = clean.chars().take(width).collect();
    if clean.chars().count() > width {
        cut.pop();
        cut.push('…');
    }
    cut
}

/// A table for a terminal: per user (and family) totals, then per user and day.
pub fn to_table(report: &UsageReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Usage {} to {} (local days)",
        report.since, report.until
    );
    if !report.priced {
        let _ = writeln!(
            out,
            "(no model.prices in moltmate.json: costs are not estimated)"
        );
    }
    if report.truncated {
        let _ = writeln!(
            out,
            "(the report was cut at its row bound; use a later --since)"
        );
    }
    let header = format!(
        "{:<24} {:>8} {:>12} {:>12} {:>12} {:>8} {:>9}  {}",
        "USER", "MESSAGES", "TOKENS IN", "TOKENS OUT", "COST", "TOOLS", "EXEC S", "LAST SEEN"
    );
    let line = |out: &mut String, name: &str, t: &Totals, last: &str| {
        let _ = writeln!(
            out,
            "{:<24} {:>8} {:>12} {:>12} {:>12} {:>8} {:>9}  {}",
            terminal_text(name, 24),
            t.messages,
            t.input_tokens,
            t.output_tokens,
            t.cost_text(),
            t.tool_calls,
            seconds(t.exec_ms),
            last
        );
    };
    let _ = writeln!(out, "\n{header}");
    for user in &report.users {
        let last = user
            .last_seen
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| {
                t.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M")
                    .to_string()
            })
            .unwrap_or_else(|| "-".to_string());
        line(&mut out, &user.user, &user.totals, &last);
    }
    if !report.families.is_empty() {
        let _ = writeln!(out, "\n{}", header.replacen("USER    ", "FAMILY  ", 1));
        for family in &report.families {
            line(&mut out, &family.family, &family.totals, "");
        }
    }
    if !report.rows.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<10} {:<24} {:>8} {:>12} {:>12} {:>12} {:>8} {:>9}",
            "DAY", "USER", "MESSAGES", "TOKENS IN", "TOKENS OUT", "COST", "TOOLS", "EXEC S"
        );
        for row in &report.rows {
            let t = &row.totals;
            let _ = writeln!(
                out,
                "{:<10} {:<24} {:>8} {:>12} {:>12} {:>12} {:>8} {:>9}",
                row.day,
                terminal_text(&row.user, 24),
                t.messages,
                t.input_tokens,
                t.output_tokens,
                t.cost_text(),
                t.tool_calls,
                seconds(t.exec_ms)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_by_model_then_provider_and_unknown_models_have_none() {
        let prices = PriceTable::new(HashMap::from([
            (
                "anthropic/claude-sonnet-4-5".to_string(),
                Price {
                    input_per_m_tok: 3.0,
                    output_per_m_tok: 15.0,
                },
            ),
            (
                "openai/*".to_string(),
                Price {
                    input_per_m_tok: 1.0,
                    output_per_m_tok: 2.0,
                },
            ),
        ]));
        assert_eq!(
            prices.cost_micros("anthropic", "claude-sonnet-4-5", 1_000_000, 100_000),
            Some(4_500_000)
        );
        assert_eq!(
            prices.cost_micros("openai", "gpt-4o", 1000, 1000),
            Some(3000)
        );
        assert_eq!(prices.cost_micros("anthropic", "other", 1, 1), None);
    }

    #[test]
    fn formulas_are_defused() {
        for (input, expected) in [
            ("=cmd|'/c calc'!A1", "'=cmd|'/c calc'!A1"),
            ("+1", "'+1"),
            ("-2", "'-2"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\t=x", "'\t=x"),
            ("Anna", "Anna"),
            ("", ""),
        ] {
            assert_eq!(spreadsheet_text(input), expected);
        }
        assert_eq!(terminal_text("a\u{1b}[31mb", 40), "a\\u{1b}[31mb");
    }
}
