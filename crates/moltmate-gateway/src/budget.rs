//! Budgets: how many messages, tokens, dollars and seconds of `exec` a user (and their family)
//! may use per day or month, and the guard that enforces them during a turn.
//!
//! Usage is charged to the store as it happens (after each model call, after each sandboxed
//! command), so what a failed or repeated turn spent still counts. The guard checks the stored
//! totals before the turn (all budgets; the message is then answered with a notice and no
//! model is called), before every further model call and before every tool round (tokens and
//! spend: a turn stops at most one model call past its budget), and before every `exec`
//! (whose timeout is lowered to the seconds left).
//!
//! Days and months are the gateway host's local calendar: budgets reset at 00:00 and on the
//! 1st, and the notice says when, in the user's language.

use chrono::{DateTime, Datelike, Duration as TimeSpan, Local, NaiveDate, TimeZone};
use moltmate_core::model::TokenUsage;
use moltmate_core::UserId;
use moltmate_store::{Store, StoreError, UsageCharge, UsageTotals};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A user's or a family's budget. `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub messages_per_day: Option<u64>,
    pub tokens_per_day: Option<u64>,
    /// Millionths of a US dollar per calendar month.
    pub spend_micros_per_month: Option<u64>,
    pub exec_seconds_per_day: Option<u64>,
}

impl Budget {
    /// No limit at all.
    pub const UNLIMITED: Budget = Budget {
        messages_per_day: None,
        tokens_per_day: None,
        spend_micros_per_month: None,
        exec_seconds_per_day: None,
    };

    pub fn is_unlimited(&self) -> bool {
        *self == Budget::UNLIMITED
    }
}

/// Price of a model: millionths of a dollar per token (= dollars per million tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Price {
    pub input_micros_per_token: f64,
    pub output_micros_per_token: f64,
}

/// Prices by `provider/model`, with `provider/*` as a fallback for a whole provider.
#[derive(Debug, Clone, Default)]
pub struct Prices {
    by_model: Arc<HashMap<String, Price>>,
}

impl Prices {
    pub fn new(by_model: HashMap<String, Price>) -> Self {
        Prices {
            by_model: Arc::new(by_model),
        }
    }

    pub fn get(&self, provider: &str, model: &str) -> Option<Price> {
        self.by_model
            .get(&format!("{provider}/{model}"))
            .or_else(|| self.by_model.get(&format!("{provider}/*")))
            .copied()
    }

    /// What `usage` of `provider/model` cost, in micro-dollars (0 without a price).
    pub fn cost_micros(&self, provider: &str, model: &str, usage: TokenUsage) -> u64 {
        let Some(price) = self.get(provider, model) else {
            return 0;
        };
        let cost = usage.input_tokens as f64 * price.input_micros_per_token
            + usage.output_tokens as f64 * price.output_micros_per_token;
        // `as` saturates; prices are validated finite and non-negative.
        cost.ceil() as u64
    }
}

/// Which budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Messages,
    Tokens,
    Spend,
    ExecSeconds,
}

/// Whose budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    User,
    Family,
}

/// A budget that is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub kind: Kind,
    pub scope: Scope,
    /// The budget (messages, tokens, micro-dollars or seconds).
    pub allowed: u64,
}

/// The calendar periods budgets count in, at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periods {
    pub now: DateTime<Local>,
    /// `YYYY-MM-DD`
    pub day: String,
    /// `YYYY-MM`
    pub month: String,
}

impl Periods {
    pub fn at(now: DateTime<Local>) -> Periods {
        Periods {
            day: now.format("%Y-%m-%d").to_string(),
            month: now.format("%Y-%m").to_string(),
            now,
        }
    }

    pub fn now() -> Periods {
        Periods::at(Local::now())
    }

    /// The next local midnight.
    pub fn next_day(&self) -> DateTime<Local> {
        let tomorrow = self.now.date_naive().succ_opt();
        local_midnight(tomorrow).unwrap_or(self.now + TimeSpan::hours(24))
    }

    /// 00:00 on the 1st of next month.
    pub fn next_month(&self) -> DateTime<Local> {
        let date = self.now.date_naive();
        let first = if date.month() == 12 {
            NaiveDate::from_ymd_opt(date.year() + 1, 1, 1)
        } else {
            NaiveDate::from_ymd_opt(date.year(), date.month() + 1, 1)
        };
        local_midnight(first).unwrap_or(self.now + TimeSpan::days(31))
    }
}

fn local_midnight(date: Option<NaiveDate>) -> Option<DateTime<Local>> {
    let midnight = date?.and_hms_opt(0, 0, 0)?;
    // A DST change at midnight can skip or repeat it: take the first valid instant.
    Local.from_local_datetime(&midnight).earliest()
}

/// Which budget of `budget` the totals have used up. With `admitting`, a message needs one
/// more message of room; during a turn (the message was admitted) only tokens and spend stop
/// it, and `exec` is checked per command.
pub fn exceeded(
    budget: &Budget,
    used: &UsageTotals,
    scope: Scope,
    admitting: bool,
) -> Option<Exceeded> {
    let over = |limit: Option<u64>, used: u64| limit.filter(|l| used >= *l);
    let checks = [
        (
            Kind::Messages,
            if admitting {
                over(budget.messages_per_day, used.messages_today)
            } else {
                None
            },
        ),
        (Kind::Tokens, over(budget.tokens_per_day, used.tokens_today)),
        (
            Kind::Spend,
            over(budget.spend_micros_per_month, used.cost_micros_month),
        ),
    ];
    checks.into_iter().find_map(|(kind, allowed)| {
        allowed.map(|allowed| Exceeded {
            kind,
            scope,
            allowed,
        })
    })
}

fn german(language: &str) -> bool {
    language.starts_with("de")
}

/// `1,234,567` (English) or `1.234.567` (German).
fn grouped(n: u64, language: &str) -> String {
    let digits = n.to_string();
    let separator = if german(language) { '.' } else { ',' };
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(separator);
        }
        out.push(c);
    }
    out
}

fn dollars(micros: u64, language: &str) -> String {
    let cents = micros.div_ceil(10_000);
    if german(language) {
        format!("{},{:02} $", grouped(cents / 100, language), cents % 100)
    } else {
        format!("${}.{:02}", grouped(cents / 100, language), cents % 100)
    }
}

/// "in 5 h", "in 35 min", "in 12 days" (German: "in 5 Std.", "in 35 Min.", "in 12 Tagen").
pub fn until(now: DateTime<Local>, then: DateTime<Local>, language: &str) -> String {
    let minutes = (then - now).num_minutes().max(1);
    let de = german(language);
    if minutes < 60 {
        format!("in {minutes} {}", if de { "Min." } else { "min" })
    } else if minutes < 48 * 60 {
        let hours = (minutes + 30) / 60;
        format!("in {hours} {}", if de { "Std." } else { "h" })
    } else {
        let days = (minutes + 12 * 60) / (24 * 60);
        format!("in {days} {}", if de { "Tagen" } else { "days" })
    }
}

const MONTHS_EN: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const MONTHS_DE: [&str; 12] = [
    "Januar",
    "Februar",
    "März",
    "April",
    "Mai",
    "Juni",
    "Juli",
    "August",
    "September",
    "Oktober",
    "November",
    "Dezember",
];

impl Exceeded {
    /// When this budget starts over.
    pub fn resets(&self, periods: &Periods) -> DateTime<Local> {
        match self.kind {
            Kind::Spend => periods.next_month(),
            Kind::Messages | Kind::Tokens | Kind::ExecSeconds => periods.next_day(),
        }
    }

    /// What the user is told, e.g. "You have used today's 200 messages; it resets at 00:00
    /// (in 5 h)."
    pub fn notice(&self, periods: &Periods, language: &str) -> String {
        let de = german(language);
        if self.allowed == 0 {
            // Nothing was ever allowed: "used up" and a reset time would mislead.
            let noun = match (self.kind, de) {
                (Kind::Messages, false) => "daily budget for messages",
                (Kind::Tokens, false) => "daily budget for tokens",
                (Kind::ExecSeconds, false) => "daily budget for command time",
                (Kind::Spend, false) => "monthly budget",
                (Kind::Messages, true) => "Tageskontingent für Nachrichten",
                (Kind::Tokens, true) => "Tageskontingent für Tokens",
                (Kind::ExecSeconds, true) => "Tageskontingent für Rechenzeit",
                (Kind::Spend, true) => "Monatsbudget",
            };
            return match (self.scope, de) {
                (Scope::User, false) => {
                    format!("Your {noun} is 0; ask the operator to raise it.")
                }
                (Scope::Family, false) => {
                    format!("Your family's {noun} is 0; ask the operator to raise it.")
                }
                (Scope::User, true) => {
                    format!("Dein {noun} ist 0; bitte den Betreiber, es zu erhöhen.")
                }
                (Scope::Family, true) => {
                    format!("Das {noun} deiner Familie ist 0; bitte den Betreiber, es zu erhöhen.")
                }
            };
        }
        let resets = self.resets(periods);
        let when = until(periods.now, resets, language);
        let reset_phrase = match (self.kind, de) {
            (Kind::Spend, false) => format!(
                "it resets on {} {} ({when})",
                resets.day(),
                MONTHS_EN[resets.month0() as usize]
            ),
            (Kind::Spend, true) => format!(
                "es wird am {}. {} zurückgesetzt ({when})",
                resets.day(),
                MONTHS_DE[resets.month0() as usize]
            ),
            (_, false) => format!("it resets at 00:00 ({when})"),
            (_, true) => format!("es wird um 00:00 zurückgesetzt ({when})"),
        };
        let n = grouped(self.allowed, language);
        let what = match (self.kind, de) {
            (Kind::Messages, false) => format!("today's {n} messages"),
            (Kind::Tokens, false) => format!("today's {n} tokens"),
            (Kind::ExecSeconds, false) => format!("today's {n} seconds of command time"),
            (Kind::Spend, false) => {
                format!("this month's budget of {}", dollars(self.allowed, language))
            }
            (Kind::Messages, true) => format!("das Kontingent von {n} Nachrichten für heute"),
            (Kind::Tokens, true) => format!("das Kontingent von {n} Tokens für heute"),
            (Kind::ExecSeconds, true) => {
                format!("das Kontingent von {n} Sekunden Rechenzeit für heute")
            }
            (Kind::Spend, true) => format!(
                "das Budget von {} für diesen Monat",
                dollars(self.allowed, language)
            ),
        };
        match (self.scope, de) {
            (Scope::User, false) => format!("You have used {what}; {reset_phrase}."),
            (Scope::Family, false) => format!("Your family has used {what}; {reset_phrase}."),
            (Scope::User, true) => format!("Du hast {what} aufgebraucht; {reset_phrase}."),
            (Scope::Family, true) => {
                format!("Deine Familie hat {what} aufgebraucht; {reset_phrase}.")
            }
        }
    }
}

/// A family's shared budget and who counts towards it.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyBudget {
    pub members: Vec<UserId>,
    pub budget: Budget,
}

/// Enforces one user's budgets during one turn (including a compaction before it).
pub struct BudgetGuard {
    store: Store,
    user: UserId,
    budget: Budget,
    family: Option<FamilyBudget>,
    prices: Prices,
    language: String,
    /// The turn's message is counted with its first model call.
    counted: AtomicBool,
    /// Nothing was charged since the last check read the store (skips a redundant read).
    fresh: AtomicBool,
    /// When the turn began (ms): charges land only on a user who existed then, never on a
    /// user removed meanwhile or created since under the same id.
    since: i64,
    /// The last model call's charge, held for the turn's own commit (see `defer_model`).
    deferred: std::sync::Mutex<Option<moltmate_store::DeferredCharge>>,
}

/// A guard dropped with a charge still held (its turn's task was aborted between the model's
/// answer and the commit: the user was removed or reset, the gateway stopped) charges it
/// then: the model was called, so it is spent.
impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let held = self
            .deferred
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (Some(held), Ok(runtime)) = (held, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let (store, user) = (self.store.clone(), self.user.clone());
        runtime.spawn(async move {
            if let Err(e) = store
                .charge_usage_since(&user, &held.day, held.charge, held.since)
                .await
            {
                tracing::error!(user = %user, error = %e, "could not record usage");
            }
        });
    }
}

/// What the user is told when the store cannot say what they used (fail closed).
fn unknown_usage(language: &str) -> String {
    if german(language) {
        "Entschuldigung, ich konnte dein Nutzungskontingent gerade nicht prüfen. Bitte versuche es später noch einmal.".to_string()
    } else {
        "Sorry, I could not check your usage budget just now. Please try again later.".to_string()
    }
}

impl BudgetGuard {
    pub fn new(
        store: Store,
        user: UserId,
        budget: Budget,
        family: Option<FamilyBudget>,
        prices: Prices,
        language: &str,
    ) -> Self {
        BudgetGuard {
            store,
            user,
            budget,
            family: family.filter(|f| !f.budget.is_unlimited()),
            prices,
            language: language.to_string(),
            counted: AtomicBool::new(false),
            fresh: AtomicBool::new(false),
            since: chrono::Utc::now().timestamp_millis(),
            deferred: std::sync::Mutex::new(None),
        }
    }

    /// Budgets that nothing can exceed need no reads at all.
    fn unlimited(&self) -> bool {
        self.budget.is_unlimited() && self.family.is_none()
    }

    async fn totals(
        &self,
        periods: &Periods,
    ) -> Result<(UsageTotals, Option<UsageTotals>), StoreError> {
        let own = self
            .store
            .usage_totals(
                std::slice::from_ref(&self.user),
                &periods.day,
                &periods.month,
            )
            .await?;
        let family = match &self.family {
            Some(family) => Some(
                self.store
                    .usage_totals(&family.members, &periods.day, &periods.month)
                    .await?,
            ),
            None => None,
        };
        Ok((own, family))
    }

    fn first_exceeded(
        &self,
        own: &UsageTotals,
        family: Option<&UsageTotals>,
        admitting: bool,
    ) -> Option<Exceeded> {
        exceeded(&self.budget, own, Scope::User, admitting).or_else(|| {
            let family_budget = self.family.as_ref()?;
            exceeded(&family_budget.budget, family?, Scope::Family, admitting)
        })
    }

    /// Before the turn: `Some(notice)` when a budget is used up or the user's stored
    /// conversations fill `transcript_cap` (then no model is called). One read.
    pub async fn admit(
        &self,
        periods: &Periods,
        transcript_cap: u64,
    ) -> Result<Option<String>, StoreError> {
        let members = self.family.as_ref().map(|f| f.members.as_slice());
        let (own, family, stored) = self
            .store
            .usage_before_turn(&self.user, members, &periods.day, &periods.month)
            .await?;
        self.fresh.store(true, Ordering::SeqCst);
        if let Some(exceeded) = self.first_exceeded(&own, family.as_ref(), true) {
            return Ok(Some(exceeded.notice(periods, &self.language)));
        }
        Ok(crate::limits::storage_notice(
            stored,
            transcript_cap,
            &self.language,
        ))
    }

    /// Before a model call or a tool round during the turn: `Some(notice)` stops the turn.
    /// A store failure stops it too (fail closed).
    pub async fn check(&self) -> Option<String> {
        if self.unlimited() || self.fresh.swap(false, Ordering::SeqCst) {
            return None;
        }
        let periods = Periods::now();
        match self.totals(&periods).await {
            Ok((own, family)) => self
                .first_exceeded(&own, family.as_ref(), false)
                .map(|e| e.notice(&periods, &self.language)),
            Err(e) => {
                tracing::error!(user = %self.user, error = %e, "could not read usage; turn stopped");
                Some(unknown_usage(&self.language))
            }
        }
    }

    /// Charges one model call's usage (and, with the first call, the message).
    pub async fn charge_model(&self, usage: &[(String, String, TokenUsage)]) {
        let charge = self.model_charge(usage);
        self.charge(charge).await;
    }

    /// Charges the turn's last model call with the turn's own commit instead of now: the
    /// turn ends with this answer, so no check of this turn reads the store after it, and a
    /// database call per message is saved. The worker takes it with [`Self::take_deferred`]
    /// into the turn's record. A turn whose commit fails is charged at once
    /// ([`Self::charge_held`]), one discarded (its user was reset or removed meanwhile) in the
    /// discarding transaction, and a guard dropped still holding it charges it then.
    pub fn defer_model(&self, usage: &[(String, String, TokenUsage)]) {
        let charge = self.model_charge(usage);
        if charge.is_empty() {
            return;
        }
        self.fresh.store(false, Ordering::SeqCst);
        let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        let day = Periods::now().day;
        *deferred = Some(match deferred.take() {
            Some(mut held) => {
                held.charge = held.charge.plus(charge);
                held
            }
            None => moltmate_store::DeferredCharge {
                day,
                charge,
                since: self.since,
            },
        });
    }

    /// Charges `held` (what [`Self::take_deferred`] gave) now: the commit that was to carry it
    /// failed, or no turn commit follows (the memory flush before a compaction).
    pub async fn charge_held(&self, held: Option<moltmate_store::DeferredCharge>) {
        if let Some(held) = held {
            self.charge(held.charge).await;
        }
    }

    /// The charge [`Self::defer_model`] held, for the turn's record.
    pub fn take_deferred(&self) -> Option<moltmate_store::DeferredCharge> {
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn model_charge(&self, usage: &[(String, String, TokenUsage)]) -> UsageCharge {
        let mut charge = UsageCharge {
            messages: u64::from(!self.counted.swap(true, Ordering::SeqCst)),
            ..UsageCharge::default()
        };
        for (provider, model, u) in usage {
            charge.input_tokens = charge.input_tokens.saturating_add(u.input_tokens);
            charge.output_tokens = charge.output_tokens.saturating_add(u.output_tokens);
            charge.cost_micros = charge
                .cost_micros
                .saturating_add(self.prices.cost_micros(provider, model, *u));
        }
        charge
    }

    /// Charges time a command ran in the sandbox.
    pub async fn charge_exec(&self, ran: Duration) {
        let exec_ms = u64::try_from(ran.as_millis()).unwrap_or(u64::MAX);
        self.charge(UsageCharge {
            exec_ms,
            ..UsageCharge::default()
        })
        .await;
    }

    async fn charge(&self, charge: UsageCharge) {
        self.fresh.store(false, Ordering::SeqCst);
        let day = Periods::now().day;
        match self
            .store
            .charge_usage_since(&self.user, &day, charge, self.since)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(user = %self.user, "usage of a turn whose user was removed is not charged to anyone");
            }
            // The next check reads the store and fails closed if it is still broken.
            Err(e) => tracing::error!(user = %self.user, error = %e, "could not record usage"),
        }
    }

    /// Before an `exec`: the seconds of command time left today (`Ok(None)`: unlimited), or
    /// the message for the model when none are left.
    pub async fn exec_allowance(&self) -> Result<Option<Duration>, String> {
        let user_limit = self.budget.exec_seconds_per_day;
        let family_limit = self
            .family
            .as_ref()
            .and_then(|f| f.budget.exec_seconds_per_day);
        if user_limit.is_none() && family_limit.is_none() {
            return Ok(None);
        }
        let periods = Periods::now();
        let (own, family) = self.totals(&periods).await.map_err(|e| {
            tracing::error!(user = %self.user, error = %e, "could not read usage; exec refused");
            unknown_usage(&self.language)
        })?;
        let mut left: Option<(u64, Scope, u64)> = None;
        for (limit, used, scope) in [
            (user_limit, Some(own.exec_ms_today), Scope::User),
            (family_limit, family.map(|f| f.exec_ms_today), Scope::Family),
        ] {
            let (Some(limit), Some(used)) = (limit, used) else {
                continue;
            };
            let remaining = limit.saturating_mul(1000).saturating_sub(used);
            if left.is_none_or(|(l, _, _)| remaining < l) {
                left = Some((remaining, scope, limit));
            }
        }
        match left {
            Some((remaining, scope, allowed)) if remaining < 1000 => Err(format!(
                "exec refused: {} Tell your user; do not retry today.",
                Exceeded {
                    kind: Kind::ExecSeconds,
                    scope,
                    allowed,
                }
                .notice(&periods, &self.language)
            )),
            Some((remaining, _, _)) => Ok(Some(Duration::from_millis(remaining))),
            None => Ok(None),
        }
    }
}

/// One line of a user's usage against their limits, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageLine {
    /// `messages today`, `tokens today`, `spend this month`, `exec today`, `stored`.
    pub what: &'static str,
    pub used: String,
    /// `unlimited` when there is none.
    pub limit: String,
}

/// What a user used today / this month and has stored, next to their budgets and cap.
pub fn usage_lines(
    limits: &crate::limits::UserLimits,
    used: &UsageTotals,
    transcript_bytes: u64,
) -> Vec<UsageLine> {
    let budget = &limits.budget;
    let or_unlimited =
        |limit: Option<u64>, show: &dyn Fn(u64) -> String| limit.map_or("unlimited".into(), show);
    let count = |n: u64| grouped(n, "en");
    let money = |micros: u64| dollars(micros, "en");
    let seconds = |s: u64| format!("{} s", grouped(s, "en"));
    let mb = |b: u64| format!("{:.1} MB", b as f64 / (1024.0 * 1024.0));
    vec![
        UsageLine {
            what: "messages today",
            used: count(used.messages_today),
            limit: or_unlimited(budget.messages_per_day, &count),
        },
        UsageLine {
            what: "tokens today",
            used: count(used.tokens_today),
            limit: or_unlimited(budget.tokens_per_day, &count),
        },
        UsageLine {
            what: "spend this month",
            used: money(used.cost_micros_month),
            limit: or_unlimited(budget.spend_micros_per_month, &money),
        },
        UsageLine {
            what: "exec today",
            used: seconds(used.exec_ms_today.div_ceil(1000)),
            limit: or_unlimited(budget.exec_seconds_per_day, &seconds),
        },
        UsageLine {
            what: "stored",
            used: mb(transcript_bytes),
            limit: mb(limits.transcript_bytes),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Local> {
        let naive = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M").unwrap();
        Local.from_local_datetime(&naive).earliest().unwrap()
    }

    #[test]
    fn notices_say_what_ran_out_and_when_it_resets_in_the_users_words() {
        let periods = Periods::at(at("2026-11-18 19:00"));
        let messages = Exceeded {
            kind: Kind::Messages,
            scope: Scope::User,
            allowed: 200,
        };
        assert_eq!(
            messages.notice(&periods, "en"),
            "You have used today's 200 messages; it resets at 00:00 (in 5 h)."
        );
        assert_eq!(
            messages.notice(&periods, "de"),
            "Du hast das Kontingent von 200 Nachrichten für heute aufgebraucht; es wird um 00:00 zurückgesetzt (in 5 Std.)."
        );
        let tokens = Exceeded {
            kind: Kind::Tokens,
            scope: Scope::Family,
            allowed: 2_500_000,
        };
        assert_eq!(
            tokens.notice(&periods, "en"),
            "Your family has used today's 2,500,000 tokens; it resets at 00:00 (in 5 h)."
        );
        let spend = Exceeded {
            kind: Kind::Spend,
            scope: Scope::User,
            allowed: 2_500_000,
        };
        assert_eq!(
            spend.notice(&periods, "en"),
            "You have used this month's budget of $2.50; it resets on 1 December (in 12 days)."
        );
        assert!(spend
            .notice(&periods, "de")
            .contains("2,50 $ für diesen Monat aufgebraucht; es wird am 1. Dezember zurückgesetzt (in 12 Tagen)"));
        let nothing = Exceeded {
            kind: Kind::Messages,
            scope: Scope::User,
            allowed: 0,
        };
        assert_eq!(
            nothing.notice(&periods, "en"),
            "Your daily budget for messages is 0; ask the operator to raise it."
        );
        let late = Periods::at(at("2026-12-31 23:35"));
        assert_eq!(
            messages.notice(&late, "en"),
            "You have used today's 200 messages; it resets at 00:00 (in 25 min)."
        );
        assert!(spend.notice(&late, "en").contains("1 January (in 25 min)"));
    }

    #[test]
    fn periods_roll_over_at_midnight_and_on_the_first() {
        let p = Periods::at(at("2026-12-31 10:00"));
        assert_eq!(
            (p.day.as_str(), p.month.as_str()),
            ("2026-12-31", "2026-12")
        );
        assert_eq!(p.next_day(), at("2027-01-01 00:00"));
        assert_eq!(p.next_month(), at("2027-01-01 00:00"));
        assert_eq!(
            Periods::at(at("2026-02-10 00:00")).next_month(),
            at("2026-03-01 00:00")
        );
    }

    #[test]
    fn a_budget_is_used_up_at_its_limit_and_messages_count_only_when_admitting() {
        let budget = Budget {
            messages_per_day: Some(2),
            tokens_per_day: Some(100),
            spend_micros_per_month: Some(1_000_000),
            exec_seconds_per_day: None,
        };
        let mut used = UsageTotals {
            messages_today: 1,
            tokens_today: 99,
            exec_ms_today: 0,
            cost_micros_month: 999_999,
        };
        assert_eq!(exceeded(&budget, &used, Scope::User, true), None);
        used.messages_today = 2;
        assert_eq!(
            exceeded(&budget, &used, Scope::User, true).map(|e| e.kind),
            Some(Kind::Messages)
        );
        assert_eq!(
            exceeded(&budget, &used, Scope::User, false),
            None,
            "the admitted message itself does not stop its own turn"
        );
        used.tokens_today = 100;
        assert_eq!(
            exceeded(&budget, &used, Scope::User, false).map(|e| e.kind),
            Some(Kind::Tokens)
        );
        used.tokens_today = 0;
        used.cost_micros_month = 1_000_000;
        assert_eq!(
            exceeded(&budget, &used, Scope::Family, false),
            Some(Exceeded {
                kind: Kind::Spend,
                scope: Scope::Family,
                allowed: 1_000_000
            })
        );
        assert_eq!(exceeded(&Budget::UNLIMITED, &used, Scope::User, true), None);
    }

    #[test]
    fn prices_by_model_then_provider_and_unknown_models_are_free() {
        let prices = Prices::new(HashMap::from([
            (
                "anthropic/claude-sonnet-4-5".to_string(),
                Price {
                    input_micros_per_token: 3.0,
                    output_micros_per_token: 15.0,
                },
            ),
            (
                "openai/*".to_string(),
                Price {
                    input_micros_per_token: 1.0,
                    output_micros_per_token: 2.0,
                },
            ),
        ]));
        let usage = TokenUsage {
            input_tokens: 1_000_000,
            output_tokens: 100_000,
        };
        assert_eq!(
            prices.cost_micros("anthropic", "claude-sonnet-4-5", usage),
            4_500_000
        );
        assert_eq!(prices.cost_micros("openai", "gpt-4o", usage), 1_200_000);
        assert_eq!(prices.cost_micros("anthropic", "other", usage), 0);
    }

    #[tokio::test]
    async fn the_guard_charges_the_message_once_and_stops_at_the_budget() {
        let store = Store::open_in_memory().unwrap();
        let user = UserId::new("anna").unwrap();
        store.ensure_user(&user, None).await.unwrap();
        let guard = BudgetGuard::new(
            store.clone(),
            user.clone(),
            Budget {
                tokens_per_day: Some(100),
                exec_seconds_per_day: Some(10),
                ..Budget::UNLIMITED
            },
            None,
            Prices::default(),
            "en",
        );
        let periods = Periods::now();
        assert_eq!(guard.admit(&periods, u64::MAX).await.unwrap(), None);
        assert_eq!(guard.check().await, None);
        let call = vec![(
            "p".to_string(),
            "m".to_string(),
            TokenUsage {
                input_tokens: 40,
                output_tokens: 20,
            },
        )];
        guard.charge_model(&call).await;
        assert_eq!(guard.check().await, None);
        guard.charge_model(&call).await;
        let notice = guard.check().await.expect("over the token budget");
        assert!(
            notice.starts_with("You have used today's 100 tokens"),
            "{notice}"
        );
        let used = store
            .usage_totals(std::slice::from_ref(&user), &periods.day, &periods.month)
            .await
            .unwrap();
        assert_eq!((used.messages_today, used.tokens_today), (1, 120));

        assert_eq!(
            guard.exec_allowance().await,
            Ok(Some(Duration::from_secs(10)))
        );
        guard.charge_exec(Duration::from_millis(9_500)).await;
        let refused = guard.exec_allowance().await.unwrap_err();
        assert!(
            refused.contains("today's 10 seconds of command time"),
            "{refused}"
        );
    }

    #[test]
    fn usage_lines_show_used_against_limits() {
        let lines = usage_lines(
            &crate::limits::UserLimits::default(),
            &UsageTotals {
                messages_today: 12,
                tokens_today: 34_567,
                exec_ms_today: 1_200,
                cost_micros_month: 1_230_000,
            },
            3 * 1024 * 1024,
        );
        let text: Vec<String> = lines
            .iter()
            .map(|l| format!("{}: {} / {}", l.what, l.used, l.limit))
            .collect();
        assert_eq!(
            text,
            [
                "messages today: 12 / 2,000",
                "tokens today: 34,567 / 10,000,000",
                "spend this month: $1.23 / unlimited",
                "exec today: 2 s / 14,400 s",
                "stored: 3.0 MB / 1024.0 MB",
            ]
        );
    }

    #[tokio::test]
    async fn a_family_budget_counts_every_member() {
        let store = Store::open_in_memory().unwrap();
        let (anna, ben) = (UserId::new("anna").unwrap(), UserId::new("ben").unwrap());
        let periods = Periods::now();
        store
            .charge_usage(
                &ben,
                &periods.day,
                UsageCharge {
                    messages: 3,
                    ..UsageCharge::default()
                },
            )
            .await
            .unwrap();
        let guard = BudgetGuard::new(
            store,
            anna.clone(),
            Budget::UNLIMITED,
            Some(FamilyBudget {
                members: vec![anna, ben],
                budget: Budget {
                    messages_per_day: Some(3),
                    ..Budget::UNLIMITED
                },
            }),
            Prices::default(),
            "en",
        );
        let notice = guard.admit(&periods, u64::MAX).await.unwrap().unwrap();
        assert!(
            notice.starts_with("Your family has used today's 3 messages"),
            "{notice}"
        );
    }
}
