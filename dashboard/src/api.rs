//! The versioned, read-only API: `/api/v1/devices`, `/api/v1/devices/{id}/readings`,
//! `/rollups`, `/gaps` and `/alarms`, `/api/v1/alarms` and `/api/v1/pipeline`. Every parameter is checked in [`crate::params`] first, so what reaches
//! a storage filter is a validated device id or a formatted time, never client text.

use crate::gaps::{self, Hour, Step};
use crate::merge;
use crate::params::{self, Format, Params};
use crate::problem::Problem;
use crate::readings::Sources;
use crate::views;
use bytes::Bytes;
use futures::StreamExt as _;
use infra::storage::{Queue, StorageError, Table};
use schemas::alarm;
use schemas::device::{self, Device};
use schemas::rollup::{self, Interval, Rollup, HOUR_MS};
use schemas::timefmt::{format_ms, now_ms};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// The default range of a readings request: the last day.
const DEFAULT_SPAN: Duration = Duration::from_secs(86_400);
/// Devices per page unless `limit` says otherwise, and the most a page may hold.
const DEVICES_PAGE: usize = 100;
const DEVICES_PAGE_MAX: usize = 1000;
/// The most rollups one answer holds: 500 days of hours (the longest hourly range), ten
/// years of days.
const ROLLUPS_MAX: usize = 12_001;
/// How much earlier than the reading before its gap a refusal may be recorded and still be
/// taken for one of the gap's numbers (clocks of devices and processors differ).
const REFUSAL_SKEW_MS: i64 = 10 * 60_000;

#[derive(Debug)]
pub struct Api {
    /// Every shard (storage account), in shard order: one without shards.
    pub shards: Vec<Shard>,
    /// Which shard holds a device, now and before the count last grew.
    pub layout: schemas::shard::Layout,
    pub max_raw_range: Duration,
    pub max_readings: usize,
    pub silent_after: Duration,
    /// Readings requests answered at once (each holds up to `max_readings` readings and a
    /// day's archive blob); more get a 503 to retry.
    pub readings_permits: tokio::sync::Semaphore,
}

/// One shard's tables, archive and queues.
#[derive(Debug)]
pub struct Shard {
    pub devices: Table,
    pub rollups: Table,
    /// Alarm rules and states (`schemas::alarm`).
    pub alarms: Table,
    pub sources: Sources,
    pub ingest: Queue,
    pub dead_letters: Queue,
}

/// What the pipeline view counts, in one shard.
#[derive(Debug, Default)]
struct Counts {
    ingest: usize,
    dead: usize,
    total: usize,
    silent: usize,
    /// `None` when the stored-reading counts cannot be read.
    last_hour: Option<u64>,
    /// The fleet ledger's sums over the last day, and the hours they cover; `None` when it
    /// cannot be read.
    ledger: Option<(rollup::FleetHour, usize)>,
}

/// Readings requests answered at once.
pub const READINGS_AT_ONCE: usize = 4;

/// The most alarms one answer lists.
const ALARMS_MAX: usize = 500;

/// How long after a shard count ended its shards may still hold a device's readings: a
/// device's clock may run ahead (the processor accepts readings up to
/// `PROCESSOR_MAX_FUTURE`, 5 minutes by default, ahead of its own).
const LATE_MARGIN_MS: i64 = 15 * 60 * 1000;

/// A successful answer.
#[derive(Debug)]
pub struct Reply {
    pub content_type: &'static str,
    pub body: Bytes,
    /// The next page's URL, sent as `Link: <...>; rel="next"`.
    pub next: Option<String>,
}

impl Reply {
    fn json(value: serde_json::Value) -> Self {
        Self {
            content_type: "application/json",
            body: Bytes::from(value.to_string()),
            next: None,
        }
    }
}

/// The route a path names, as a metric label (never the device id).
pub fn route_of(path: &str) -> &'static str {
    let rest = path.strip_prefix("/api/v1/").unwrap_or_default();
    match rest.split('/').collect::<Vec<_>>().as_slice() {
        ["devices"] => "devices",
        ["devices", _, "readings"] => "readings",
        ["devices", _, "rollups"] => "rollups",
        ["devices", _, "gaps"] => "gaps",
        ["devices", _, "alarms"] => "device_alarms",
        ["alarms"] => "alarms",
        ["pipeline"] => "pipeline",
        _ => "unknown",
    }
}

impl Api {
    pub async fn answer(&self, path: &str, query: Option<&str>) -> Result<Reply, Problem> {
        let params = Params::parse(query)?;
        let rest = path.strip_prefix("/api/v1/").unwrap_or_default();
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            ["devices"] => self.list_devices(&params).await,
            ["devices", id, "readings"] => self.readings(&params, id).await,
            ["devices", id, "rollups"] => self.rollups(&params, id).await,
            ["devices", id, "gaps"] => self.gaps(&params, id).await,
            ["devices", id, "alarms"] => self.device_alarms(id).await,
            ["alarms"] => self.alarms().await,
            ["pipeline"] => self.pipeline().await,
            _ => Err(Problem::not_found(
                "no such endpoint: try /api/v1/devices, /api/v1/devices/{id}/readings, /api/v1/devices/{id}/rollups, /api/v1/devices/{id}/gaps or /api/v1/pipeline",
            )),
        }
    }

    async fn list_devices(&self, params: &Params) -> Result<Reply, Problem> {
        let prefix = params.prefix()?;
        let limit = params.limit(DEVICES_PAGE, DEVICES_PAGE_MAX)?;
        let after = params.cursor()?;
        let silent = params.duration("silent")?;
        let now = now_ms();
        let mut filter = format!("PartitionKey eq '{}'", device::PARTITION);
        if !prefix.is_empty() {
            // '~' sorts after every character a device id may hold.
            filter.push_str(&format!(
                " and RowKey ge '{prefix}' and RowKey lt '{prefix}~'"
            ));
        }
        if let Some(after) = &after {
            filter.push_str(&format!(" and RowKey gt '{after}'"));
        }
        if let Some(silent) = silent {
            filter.push_str(&format!(
                " and IngestedAt lt datetime'{}'",
                format_ms(silent_since(now, silent))
            ));
        }
        // A full page has a cursor, even when nothing follows (the next page is then empty):
        // asking for one row more to know would cost a second request whenever the page is
        // the table service's largest (1,000 rows).
        let answers = futures::future::join_all(
            self.shards
                .iter()
                .map(|s| read(&s.devices, &filter, limit, device::from_row, "a device row")),
        )
        .await;
        let (pages, unavailable) = available(answers)?;
        let merged = merge::devices(pages, |id| self.layout.shard(id), limit);
        let cursor = (merged.len() == limit)
            .then(|| params::cursor_after(&merged[limit - 1].1.latest.device_id));
        let devices = self.current_rows_only(merged).await;
        let next = cursor.as_ref().map(|c| {
            let mut url = format!("/api/v1/devices?limit={limit}&cursor={c}");
            if !prefix.is_empty() {
                url.push_str(&format!("&prefix={prefix}"));
            }
            if let Some(silent) = silent {
                url.push_str(&format!("&silent={}s", silent.as_secs()));
            }
            url
        });
        let mut reply = Reply::json(json!({
            "devices": devices.iter().map(|d| views::device(d, now)).collect::<Vec<_>>(),
            "cursor": cursor,
            "next": next,
            "unavailableShards": unavailable,
        }));
        reply.next = next;
        Ok(reply)
    }

    /// The shards that may hold `id`'s data from `from_ms` on, the one it writes to now first,
    /// each with the end of what it can hold: `to`, or for a shard the device wrote to under
    /// an earlier count, the end of that count plus [`LATE_MARGIN_MS`].
    fn holding(&self, id: &str, from_ms: i64, to: i64) -> Vec<(&Shard, i64)> {
        self.layout
            .shards_holding(id, from_ms)
            .into_iter()
            .filter_map(|(shard, until)| {
                let end = until.map_or(to, |u| to.min(u.saturating_add(LATE_MARGIN_MS)));
                // The layout was checked against the shards at start.
                self.shards.get(shard).map(|s| (s, end))
            })
            .collect()
    }

    /// `merged` without the rows of a shard a device no longer writes to when the shard it
    /// writes to now has a row of it too: that one is the device's (a filter may have left it
    /// out, when the device is not silent there). A lookup that fails keeps the row.
    async fn current_rows_only(&self, merged: Vec<(usize, Device)>) -> Vec<Device> {
        let mut devices = Vec::with_capacity(merged.len());
        for (shard, d) in merged {
            let id = &d.latest.device_id;
            let home = self.layout.shard(id);
            if shard != home {
                let plain = format!(
                    "PartitionKey eq '{}' and RowKey eq '{id}'",
                    device::PARTITION
                );
                if let Ok(Some(_)) = self.shards[home].devices.first(&plain).await {
                    continue;
                }
            }
            devices.push(d);
        }
        devices
    }

    /// Checks that `id` names a device the pipeline has stored readings of (in any shard it
    /// may have written to).
    async fn known(&self, id: &str) -> Result<(), Problem> {
        let filter = format!(
            "PartitionKey eq '{}' and RowKey eq '{id}'",
            device::PARTITION
        );
        for (shard, _) in self.holding(id, schemas::timefmt::MIN_MS, i64::MAX) {
            let known = shard
                .devices
                .first(&filter)
                .await
                .or_else(|e| if e.is_not_found() { Ok(None) } else { Err(e) })
                .map_err(|e| Problem::storage(&e))?;
            if known.is_some() {
                return Ok(());
            }
        }
        Err(Problem::not_found(format!(
            "no device {id:?}: the pipeline has never stored a reading of it"
        )))
    }

    async fn rollups(&self, params: &Params, id: &str) -> Result<Reply, Problem> {
        let id = params::device_id(id)?;
        let interval = params.interval()?;
        let format = params.format()?;
        // Default and longest ranges; the longest holds at most ROLLUPS_MAX periods.
        let (span, max) = match interval {
            Interval::Hour => (30 * 86_400, 500 * 86_400),
            Interval::Day => (366 * 86_400, 3660 * 86_400),
        };
        let (from, to) = params.range(
            now_ms(),
            Duration::from_secs(span),
            Duration::from_secs(max),
        )?;
        self.known(&id).await?;
        let what = format!("a rollup row of {id}");
        let lists =
            futures::future::try_join_all(self.holding(&id, from, to).into_iter().map(
                |(s, end)| {
                    // Periods that start in the range.
                    let filter = format!(
                        "PartitionKey eq '{id}' and RowKey ge '{}' and RowKey lt '{}'",
                        interval.row_key(from),
                        interval.row_key(end)
                    );
                    let what = &what;
                    async move {
                        read(&s.rollups, &filter, ROLLUPS_MAX, Rollup::from_entity, what).await
                    }
                },
            ))
            .await?;
        let rollups = merge::rollups(interval, lists);
        match format {
            Format::Json => Ok(Reply::json(json!({
                "device": id,
                "interval": interval.name(),
                "from": format_ms(from),
                "to": format_ms(to),
                "rollups": rollups.iter().map(views::rollup).collect::<Vec<_>>(),
            }))),
            Format::Csv => Ok(Reply {
                content_type: "text/csv; charset=utf-8",
                body: Bytes::from(views::rollups_csv(&rollups)),
                next: None,
            }),
            Format::Parquet => Ok(Reply {
                content_type: "application/vnd.apache.parquet",
                body: schemas::archive::rollups::encode(&rollups)
                    .map_err(|e| Problem::internal(format!("encoding Parquet: {e}")))?,
                next: None,
            }),
        }
    }

    /// The `seq` numbers `id` skipped in the whole UTC hours that cover `[from, to)` (default:
    /// the last day; at most 31 days, and at most `DASHBOARD_MAX_RAW_RANGE`). An hour whose
    /// ledger says it is complete costs nothing more; the others ([`gaps::step`]) are read, a
    /// day's at once, at most `max_readings` readings in all.
    /// The alarms raised and pending in every shard: raised first, the longest-standing first;
    /// at most [`ALARMS_MAX`] (`truncated` says when there are more).
    async fn alarms(&self) -> Result<Reply, Problem> {
        let filter = &format!("PartitionKey eq '{}'", alarm::ACTIVE_PARTITION);
        let answers = futures::future::join_all(self.shards.iter().map(|s| async move {
            let listed = s
                .alarms
                .query_first(filter, ALARMS_MAX + 1)
                .await
                .or_else(none_if_missing)
                .map_err(|e| Problem::storage(&e))?;
            let keys: Vec<String> = listed
                .iter()
                .filter_map(|e| e.get("RowKey")?.as_str().map(str::to_owned))
                .collect();
            // The state row is the truth: the list may name one cleared a moment ago.
            let listed: Vec<(String, String)> = keys
                .iter()
                .filter_map(|k| alarm::active_of(k))
                // A row not of this pipeline's making names no valid device: never a filter.
                .filter(|(device, key)| {
                    schemas::reading::is_valid_device_id(device)
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-~".contains(c))
                })
                .map(|(device, key)| (device.to_owned(), key.to_owned()))
                .collect();
            let states = futures::stream::iter(listed)
                .map(|(device, key)| async move {
                    let filter = format!(
                        "PartitionKey eq '{device}' and RowKey eq '{}'",
                        alarm::state_key(&key)
                    );
                    let row = s
                        .alarms
                        .first(&filter)
                        .await
                        .map_err(|e| Problem::storage(&e))?;
                    Ok::<_, Problem>(row.as_ref().and_then(alarm::state_of).map(|r| (device, r)))
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await;
            let states: Vec<(String, alarm::StateRow)> = states
                .into_iter()
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .flatten()
                .collect();
            let measures = measurements(&s.alarms).await?;
            Ok::<_, Problem>((states, keys.len() > ALARMS_MAX, measures))
        }))
        .await;
        let (answers, unavailable) = available(answers)?;
        let truncated = answers.iter().any(|(_, (_, more, _))| *more);
        let mut shown: Vec<serde_json::Value> = Vec::new();
        let mut measures: BTreeMap<String, String> = BTreeMap::new();
        let mut all: Vec<(String, alarm::StateRow)> = Vec::new();
        for (_, (states, _, of)) in answers {
            measures.extend(of);
            all.extend(
                states
                    .into_iter()
                    .filter(|(_, row)| row.state.status.is_active()),
            );
        }
        all.sort_by_key(|(_, row)| match row.state.status {
            alarm::Status::Raised { since } => (0, since),
            alarm::Status::Pending { since } => (1, since),
            alarm::Status::Clear => (2, 0),
        });
        for (device, row) in all.iter().take(ALARMS_MAX) {
            let measure = measures
                .get(alarm::split_key(&row.rule).0)
                .map(String::as_str);
            shown.push(views::alarm(device, row, measure));
        }
        Ok(Reply::json(json!({
            "alarms": shown,
            "truncated": truncated || all.len() > ALARMS_MAX,
            "unavailableShards": unavailable,
        })))
    }

    /// One device's state under every rule that has judged it (clear ones too).
    async fn device_alarms(&self, id: &str) -> Result<Reply, Problem> {
        let id = params::device_id(id)?;
        let shard = &self.shards[self.layout.shard(&id)];
        let rows = shard
            .alarms
            .query_first(&alarm::states_filter(&id), ALARMS_MAX)
            .await
            .or_else(none_if_missing)
            .map_err(|e| Problem::storage(&e))?;
        let mut states: Vec<alarm::StateRow> = rows.iter().filter_map(alarm::state_of).collect();
        states.sort_by_key(|row| (!row.state.status.is_active(), row.rule.clone()));
        let measures = measurements(&shard.alarms).await?;
        let shown: Vec<serde_json::Value> = states
            .iter()
            .map(|row| {
                let measure = measures
                    .get(alarm::split_key(&row.rule).0)
                    .map(String::as_str);
                views::alarm(&id, row, measure)
            })
            .collect();
        Ok(Reply::json(json!({ "alarms": shown })))
    }

    async fn gaps(&self, params: &Params, id: &str) -> Result<Reply, Problem> {
        let id = params::device_id(id)?;
        let _permit = self
            .readings_permits
            .try_acquire()
            .map_err(|_| Problem::busy())?;
        let longest = Duration::from_secs(31 * 86_400).min(self.max_raw_range);
        let (from, to) = params.range(now_ms(), DEFAULT_SPAN, longest)?;
        let (from, to) = (
            Interval::Hour.floor(from),
            Interval::Hour.floor(to - 1) + HOUR_MS,
        );
        self.known(&id).await?;
        let what = format!("a rollup row of {id}");
        let holding = self.holding(&id, from, to);
        let lists =
            futures::future::try_join_all(
                holding.iter().map(|(s, end)| {
                    let filter = format!(
                        "PartitionKey eq '{id}' and RowKey ge '{}' and RowKey lt '{}'",
                        Interval::Hour.row_key(from),
                        Interval::Hour.row_key(*end)
                    );
                    let what = &what;
                    async move {
                        read(&s.rollups, &filter, ROLLUPS_MAX, Rollup::from_entity, what).await
                    }
                }),
            )
            .await?;
        let mut ledgers: BTreeMap<i64, Vec<Rollup>> = BTreeMap::new();
        for r in lists.into_iter().flatten() {
            ledgers.entry(r.start_ms).or_default().push(r);
        }
        let steps: Vec<(i64, Step)> = (from..to)
            .step_by(HOUR_MS as usize)
            .map(|hour| {
                let holders = holding.iter().filter(|(_, end)| *end > hour).count();
                let parts = ledgers.get(&hour).map(Vec::as_slice).unwrap_or_default();
                (hour, gaps::step(parts, holders))
            })
            .collect();
        // The hours to read, a day at a time: from the day's first to its last.
        let mut days: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        for (hour, _) in steps.iter().filter(|(_, s)| *s == Step::Read) {
            let span = days
                .entry(Interval::Day.floor(*hour))
                .or_insert((*hour, *hour));
            span.1 = hour + HOUR_MS;
        }
        let mut numbered: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
        let mut budget = self.max_readings;
        for (a, b) in days.into_values() {
            let pages = futures::future::try_join_all(
                holding
                    .iter()
                    .filter(|(_, end)| *end > a)
                    .map(|(s, end)| s.sources.readings(&id, a, b.min(*end), budget)),
            )
            .await?;
            let page = merge::pages(pages, budget);
            if page.next_from.is_some() {
                return Err(Problem::bad_request(format!(
                    "more than {} readings to look through: ask for a shorter range (DASHBOARD_MAX_READINGS)",
                    self.max_readings
                )));
            }
            budget -= page.readings.len();
            for r in &page.readings {
                if let Some(seq) = r.reading.seq {
                    let at = r.reading.measured_at_ms;
                    numbered
                        .entry(Interval::Hour.floor(at))
                        .or_default()
                        .push((seq, at));
                }
            }
        }
        let hours = steps.into_iter().filter_map(|(hour, step)| match step {
            Step::Ledger(complete) => Some(complete),
            Step::Read => Some(Hour::Read(numbered.remove(&hour).unwrap_or_default())),
            Step::Skip => None,
        });
        let gaps = gaps::find(hours);
        // The numbers in the gaps that the processor refused (dead-lettered), with reasons:
        // one range query per shard, bounded like the rows of a page.
        let mut refused: BTreeMap<i64, Vec<rollup::Refused>> = BTreeMap::new();
        // Gaps are in time order; after a device's restart its numbers start again, so the
        // range is from the least first to the greatest last.
        let lo = gaps.iter().map(|g| g.first).min();
        let hi = gaps.iter().map(|g| g.last).max();
        if let (Some(lo), Some(hi)) = (lo, hi) {
            let (lo, hi) = rollup::refusal_keys(lo, hi);
            let filter =
                format!("PartitionKey eq '{id}' and RowKey ge '{lo}' and RowKey le '{hi}'");
            let lists = futures::future::try_join_all(holding.iter().map(|(s, _)| async {
                s.rollups
                    .query_first(&filter, self.max_readings)
                    .await
                    .or_else(none_if_missing)
                    .map_err(|e| Problem::storage(&e))
            }))
            .await?;
            for r in lists.iter().flatten().filter_map(rollup::parse_refusal) {
                refused.entry(r.seq).or_default().push(r);
            }
        }
        // A refusal belongs to a gap only if it came after the reading before the gap (less
        // the clock skew allowed): an older one of the same number is from before a restart.
        let gaps: Vec<serde_json::Value> = gaps
            .iter()
            .map(|g| {
                let since = g.after_ms.saturating_sub(REFUSAL_SKEW_MS);
                let of_gap = refused
                    .range(g.first..=g.last)
                    .filter_map(|(_, all)| all.iter().find(|r| r.at_ms >= since));
                views::gap(g, of_gap)
            })
            .collect();
        let sum = |key: &str| {
            gaps.iter().fold(0u64, |n, g| {
                n.saturating_add(match &g[key] {
                    serde_json::Value::Array(items) => items.len() as u64,
                    v => v.as_u64().unwrap_or(0),
                })
            })
        };
        let (missing, refused_in_gaps) = (sum("missing"), sum("refused"));
        Ok(Reply::json(json!({
            "device": id,
            "from": format_ms(from),
            "to": format_ms(to),
            "missing": missing,
            "refused": refused_in_gaps,
            "gaps": gaps,
        })))
    }

    async fn readings(&self, params: &Params, id: &str) -> Result<Reply, Problem> {
        let id = params::device_id(id)?;
        let _permit = self
            .readings_permits
            .try_acquire()
            .map_err(|_| Problem::busy())?;
        let format = params.format()?;
        let limit = params.limit(self.max_readings, self.max_readings)?;
        let (from, to) = params.range(now_ms(), DEFAULT_SPAN, self.max_raw_range)?;
        self.known(&id).await?;
        let pages = futures::future::try_join_all(
            self.holding(&id, from, to)
                .into_iter()
                .map(|(s, end)| s.sources.readings(&id, from, end, limit)),
        )
        .await?;
        let page = merge::pages(pages, limit);
        let format_name = match format {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Parquet => "parquet",
        };
        let next = page.next_from.map(|next_from| {
            format!(
                "/api/v1/devices/{id}/readings?from={}&to={}&limit={limit}&format={format_name}",
                format_ms(next_from),
                format_ms(to)
            )
        });
        let mut reply = match format {
            Format::Json => Reply::json(json!({
                "device": id,
                "from": format_ms(from),
                "to": format_ms(to),
                "count": page.readings.len(),
                "readings": page.readings.iter().map(views::reading).collect::<Vec<_>>(),
                "next": next,
            })),
            Format::Csv => Reply {
                content_type: "text/csv; charset=utf-8",
                body: Bytes::from(views::readings_csv(&page.readings)),
                next: None,
            },
            Format::Parquet => Reply {
                content_type: "application/vnd.apache.parquet",
                body: schemas::archive::encode_download(&page.readings)
                    .map_err(|e| Problem::internal(format!("encoding Parquet: {e}")))?,
                next: None,
            },
        };
        reply.next = next;
        Ok(reply)
    }

    async fn pipeline(&self) -> Result<Reply, Problem> {
        let now = now_ms();
        let answers = futures::future::join_all(self.shards.iter().map(|s| async move {
            s.counts(now, self.silent_after)
                .await
                .map_err(|e| Problem::storage(&e))
        }))
        .await;
        let (per_shard, unavailable) = available(answers)?;
        let per_shard: Vec<Counts> = per_shard.into_iter().map(|(_, c)| c).collect();
        // A device a resharding moved counts in each shard it has a row in.
        let mut all = Counts {
            last_hour: Some(0),
            ledger: Some((rollup::FleetHour::default(), usize::MAX)),
            ..Counts::default()
        };
        for c in &per_shard {
            all.ingest += c.ingest;
            all.dead += c.dead;
            all.total += c.total;
            all.silent += c.silent;
            all.last_hour = all.last_hour.zip(c.last_hour).map(|(a, b)| a + b);
            // The hours every shard has summed: a shard behind (or not keeping rollups) shows.
            all.ledger = all.ledger.zip(c.ledger).map(|((mut a, h), (b, k))| {
                a.merge(&b);
                (a, h.min(k))
            });
        }
        let completeness = all.ledger.map(|(fleet, hours)| {
            let expected = fleet.distinct.saturating_add(fleet.missing);
            json!({
                // Rounded down: never 100 while a number is missing.
                "percent": (expected > 0).then(|| {
                    (fleet.distinct as f64 * 100.0 / expected as f64 * 1000.0).floor() / 1000.0
                }),
                "received": fleet.distinct,
                "missing": fleet.missing,
                "hours": hours,
            })
        });
        let first = &self.shards[0];
        Ok(Reply::json(json!({
            "at": format_ms(now),
            "shards": self.shards.len(),
            "unavailableShards": unavailable,
            "queues": {
                "ingest": { "name": first.ingest.name(), "depth": all.ingest },
                "deadLetter": { "name": first.dead_letters.name(), "depth": all.dead },
            },
            "readings": { "storedLastHour": all.last_hour },
            "completeness": { "lastDay": completeness },
            "devices": {
                "total": all.total,
                "silent": all.silent,
                "silentAfter": humantime::format_duration(self.silent_after).to_string(),
                "silentAfterSeconds": self.silent_after.as_secs(),
            },
        })))
    }
}

impl Shard {
    /// This shard's queue depths, device counts and readings stored in the last hour.
    async fn counts(&self, now: i64, silent_after: Duration) -> Result<Counts, StorageError> {
        let all = format!("PartitionKey eq '{}'", device::PARTITION);
        let silent = format!(
            "{all} and IngestedAt lt datetime'{}'",
            format_ms(silent_since(now, silent_after))
        );
        // A queue or table not created yet reads as empty.
        let zero = |e: StorageError| if e.is_not_found() { Ok(0) } else { Err(e) };
        // The processors' counts of the last 60 minutes, the current one included.
        let minute = rollup::stored_minute(now);
        let stored = format!(
            "PartitionKey eq '{}' and RowKey ge '{}'",
            rollup::STORED,
            rollup::stored_key(minute - 59 * rollup::MINUTE_MS)
        );
        let depths_and_counts = futures::future::try_join4(
            async { self.ingest.approximate_depth().await.or_else(zero) },
            async { self.dead_letters.approximate_depth().await.or_else(zero) },
            async { self.devices.count(&all).await.or_else(zero) },
            async { self.devices.count(&silent).await.or_else(zero) },
        );
        // The fleet ledger's hours that ended in the last day (swept ones only).
        let ledger = format!(
            "PartitionKey eq '{}' and RowKey ge '{}' and RowKey lt '1h|~'",
            rollup::LEDGER,
            Interval::Hour.row_key(Interval::Hour.floor(now) - 24 * HOUR_MS)
        );
        let (depths, counts, ledger) = futures::join!(
            depths_and_counts,
            async { self.rollups.query(&stored).await.or_else(none_if_missing) },
            async { self.rollups.query(&ledger).await.or_else(none_if_missing) }
        );
        let (ingest, dead, total, silent) = depths?;
        // A nice-to-have: unknown (null) rather than a failed answer.
        let last_hour = counts
            .inspect_err(|error| tracing::debug!(%error, "Cannot read stored-reading counts."))
            .ok()
            .map(|rows| rows.iter().map(rollup::stored_readings).sum::<u64>());
        let ledger = ledger
            .inspect_err(|error| tracing::debug!(%error, "Cannot read the fleet ledger."))
            .ok()
            .map(|rows| {
                let mut fleet = rollup::FleetHour::default();
                let mut hours = 0;
                for (_, hour) in rows.iter().filter_map(rollup::FleetHour::from_entity) {
                    fleet.merge(&hour);
                    hours += 1;
                }
                (fleet, hours)
            });
        Ok(Counts {
            ingest,
            dead,
            total,
            silent,
            last_hour,
            ledger,
        })
    }
}

/// Answers by shard, and the shards that did not answer.
type Available<T> = (Vec<(usize, T)>, Vec<usize>);

/// The shards' answers that came, by shard, and the shards that did not answer; the first
/// problem when none did (with one shard, its problem).
fn available<T>(answers: Vec<Result<T, Problem>>) -> Result<Available<T>, Problem> {
    let (mut got, mut unavailable, mut first_problem) = (Vec::new(), Vec::new(), None);
    for (shard, answer) in answers.into_iter().enumerate() {
        match answer {
            Ok(value) => got.push((shard, value)),
            Err(problem) => {
                unavailable.push(shard);
                first_problem.get_or_insert(problem);
            }
        }
    }
    match first_problem {
        Some(problem) if got.is_empty() => Err(problem),
        _ => Ok((got, unavailable)),
    }
}

/// The first `limit` rows of `table` matching `filter`, each read by `parse` (`what` names a
/// row in the error when one cannot be read); none for a table not created yet.
async fn read<T>(
    table: &Table,
    filter: &str,
    limit: usize,
    parse: fn(&infra::storage::Entity) -> Result<T, schemas::entity::RowError>,
    what: &str,
) -> Result<Vec<T>, Problem> {
    let rows = table
        .query_first(filter, limit)
        .await
        .or_else(none_if_missing)
        .map_err(|e| Problem::storage(&e))?;
    rows.iter()
        .map(parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Problem::internal(format!("{what}: {e}")))
}

/// The measurement each alarm rule of a shard watches, by rule id (rules that do not parse
/// are left out, as processors leave them).
async fn measurements(table: &Table) -> Result<BTreeMap<String, String>, Problem> {
    let filter = format!("PartitionKey eq '{}'", alarm::RULES_PARTITION);
    let rows = table
        .query_first(&filter, ALARMS_MAX)
        .await
        .or_else(none_if_missing)
        .map_err(|e| Problem::storage(&e))?;
    Ok(rows
        .iter()
        .filter_map(|row| alarm::rule_of(row).ok())
        .map(|rule| (rule.id.clone(), rule.measurement.name().to_owned()))
        .collect())
}

/// No rows, for a table not created yet.
pub fn none_if_missing<T>(error: StorageError) -> Result<Vec<T>, StorageError> {
    if error.is_not_found() {
        Ok(Vec::new())
    } else {
        Err(error)
    }
}

/// The time before which a device counts as silent.
fn silent_since(now: i64, silent: Duration) -> i64 {
    now.saturating_sub(i64::try_from(silent.as_millis()).unwrap_or(i64::MAX))
        .max(schemas::timefmt::MIN_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_labelled_without_device_ids() {
        assert_eq!(route_of("/api/v1/devices"), "devices");
        assert_eq!(route_of("/api/v1/devices/sensor-1/readings"), "readings");
        assert_eq!(route_of("/api/v1/devices/sensor-1/gaps"), "gaps");
        assert_eq!(route_of("/api/v1/pipeline"), "pipeline");
        assert_eq!(route_of("/api/v1/devices/x/y/z"), "unknown");
        assert_eq!(route_of("/api/v2/devices"), "unknown");
    }
}
