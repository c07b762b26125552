//! Keeps the rollup table current (`schemas::rollup`): hourly and daily rollups per device,
//! always recomputed from the readings, never incremented, so they stay exact under
//! redelivery and late data.
//!
//! - **The sweep.** Once an hour has ended and `settle` has passed (longer than any processor
//!   round, so its readings are all written), every device's rows of that hour are read with one
//!   partition range query and rolled up. When the hour is a day's last, the day is combined
//!   from its hours in the same transaction. Where it got to is kept in the table
//!   ([`schemas::rollup::STATE`]); a restart carries on from there. A first start sweeps from
//!   the UTC day before that of the newest settled hour (so, in the first hour after
//!   midnight, the two days before), so that the fleet ledger covers the last day and the day
//!   before gets its rollups whatever the time of the start, but from no day old enough to be
//!   archived meanwhile; older history is `archiver rollups` (rebuild) work.
//! - **The marks.** A reading stored more than a minute after its hour ended
//!   ([`schemas::rollup::MARK_AFTER_MS`]; the settle is at least twice that) may come after
//!   the sweep: the processor marks that device-hour ([`schemas::rollup::MARKS`]) before it deletes the
//!   message. Each turn recomputes the marked hours that were swept (reading the archive too, in
//!   case the day was archived meanwhile), and their days if those ended, then deletes each mark
//!   with the ETag it was read with: a mark written again meanwhile stays for the next turn.
//! - **The fleet ledger.** The sweep of an hour of the last day (the ledger's hours are kept
//!   [`schemas::rollup::LEDGER_KEPT_MS`]) also sums every device's completeness ledger of it
//!   into one row ([`schemas::rollup::LEDGER`]), for the dashboard's fleet completeness.
//!   A mark recomputed for an hour of the last day first flags that hour's sums stale (a
//!   durable row, so a crash cannot lose it), and each turn sums a few flagged hours again from
//!   the devices' hourly rows, then deletes each flag with the ETag it was read with. So the
//!   sums are recomputed, never incremented, and late readings (a backlog drained after an
//!   outage) show up in them.
//! - **Retention.** Rollups older than the rollup retention (400 days) are deleted once a day;
//!   the processors' stored-reading counts ([`schemas::rollup::STORED`]) after two hours, and
//!   the fleet ledger's hours after a day, every turn.

use crate::day::retried;
use crate::pass::DevicePages;
use futures::{future, stream, StreamExt};
use infra::storage::{BatchOutcome, Container, Entity, Refusal, RowRef, StorageError, Table};
use schemas::archive::layout::Layout;
use schemas::archive::Format;
use schemas::reading::Reading;
use schemas::rollup::{self, FleetHour, Interval, Rollup, Seqs, DAY_MS, HOUR_MS};
use schemas::timefmt::format_ms;
use std::collections::BTreeMap;
use std::time::Duration;

/// Marks recomputed per turn at most (the rest wait for the next turn).
const MARKS_PER_TURN: usize = 1000;
/// Stale hours of the fleet ledger summed again per turn at most: each reads every device's
/// row of the hour.
const STALE_HOURS_PER_TURN: usize = 2;
const STATE_KEY: &str = "sweep";
const SWEPT_THROUGH: &str = "SweptThrough";

#[derive(Debug, Clone)]
pub struct Keeper {
    pub telemetry: Table,
    pub devices: Table,
    pub rollups: Table,
    pub archive: Container,
    pub layout: Layout,
    pub format: Format,
    pub settle: Duration,
    pub retention: Duration,
    /// How long readings stay in the table (`ARCHIVER_RETENTION`): a first sweep starts at no
    /// day the archive pass may be moving out of it meanwhile (the sweep reads the table alone).
    pub table_retention: Duration,
    pub concurrency: usize,
}

/// Why a turn or a rebuild stopped.
#[derive(Debug, thiserror::Error)]
pub enum KeepError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the rollups of {device} were refused: {refusal}")]
    Refused { device: String, refusal: Refusal },
    #[error("archive blob {blob} cannot be read: {error}")]
    Archive {
        blob: String,
        error: schemas::archive::ArchiveError,
    },
}

/// What one turn did.
#[derive(Debug, Default)]
pub struct Turn {
    pub hours_swept: u64,
    pub rollups_written: u64,
    pub marks_done: u64,
}

impl Keeper {
    /// Sweeps the hours that ended and settled, then recomputes the marked ones.
    pub async fn turn(&self, now: i64) -> Result<Turn, KeepError> {
        let mut turn = Turn::default();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        // The newest hour that has ended and settled.
        let last = Interval::Hour.floor(now.saturating_sub(ms(self.settle))) - HOUR_MS;
        let mut next = match self.swept_through().await? {
            Some(hour) => hour + HOUR_MS,
            None => {
                let kept = Interval::Day.floor(now.saturating_sub(ms(self.table_retention)));
                (Interval::Day.floor(last) - DAY_MS).max(kept)
            }
        };
        while next <= last {
            let ledger = next >= now - rollup::LEDGER_KEPT_MS;
            turn.rollups_written += self.sweep(next, ledger).await?;
            turn.hours_swept += 1;
            self.set_swept_through(next).await?;
            next += HOUR_MS;
        }
        let (done, written) = self.marks(next - HOUR_MS, now).await?;
        turn.marks_done = done;
        turn.rollups_written += written;
        self.sum_stale_hours(now).await?;
        Ok(turn)
    }

    /// Deletes the processors' stored-reading counts older than they are kept
    /// ([`rollup::STORED_KEPT_MS`]; a turn's minute of them at a time, in practice), and the
    /// fleet ledger's hours older than a day ([`rollup::LEDGER_KEPT_MS`]).
    pub async fn expire_stored(&self, now: i64) -> Result<(), StorageError> {
        let filter = format!(
            "PartitionKey eq '{}' and RowKey lt '{}'",
            rollup::STORED,
            rollup::stored_key(now - rollup::STORED_KEPT_MS)
        );
        self.delete_some(&filter, "stored-reading counts").await?;
        // The fleet ledger's hours past the day it is kept for.
        let filter = format!(
            "PartitionKey eq '{}' and RowKey ge '1h|' and RowKey lt '{}'",
            rollup::LEDGER,
            Interval::Hour.row_key(now - rollup::LEDGER_KEPT_MS)
        );
        self.delete_some(&filter, "fleet ledger hours").await
    }

    /// Deletes a turn's worth of the rows `filter` matches. A transaction refused because a
    /// row was rewritten meanwhile (its ETag changed) is left for the next turn.
    async fn delete_some(&self, filter: &str, what: &str) -> Result<(), StorageError> {
        let old = retried(|| self.rollups.query_first(filter, MARKS_PER_TURN)).await?;
        let rows: Vec<RowRef> = old.iter().filter_map(RowRef::of).collect();
        for chunk in rows.chunks(infra::storage::MAX_BATCH_OPERATIONS) {
            if let BatchOutcome::Rejected(refusal) =
                retried(|| self.rollups.delete_batch(chunk)).await?
            {
                tracing::debug!(%refusal, what, "Old rows not deleted this turn.");
            }
        }
        Ok(())
    }

    async fn swept_through(&self) -> Result<Option<i64>, StorageError> {
        let filter = format!(
            "PartitionKey eq '{}' and RowKey eq '{STATE_KEY}'",
            rollup::STATE
        );
        let row = retried(|| self.rollups.first(&filter)).await?;
        Ok(row
            .as_ref()
            .and_then(|e| e.get(SWEPT_THROUGH))
            .and_then(|v| v.as_str())
            .and_then(schemas::timefmt::parse_rfc3339_ms))
    }

    async fn set_swept_through(&self, hour: i64) -> Result<(), StorageError> {
        let mut e = Entity::new();
        e.insert("PartitionKey".into(), rollup::STATE.into());
        e.insert("RowKey".into(), STATE_KEY.into());
        schemas::entity::typed_datetime(&mut e, SWEPT_THROUGH, hour);
        retried(|| self.rollups.upsert(&e)).await
    }

    /// Rolls up every device's hour starting at `hour`, a page of devices at a time
    /// ([`crate::pass::DEVICE_PAGE`]), and sums its fleet ledger if `ledger` (not for an hour
    /// older than the ledger is kept). Returns the rollups written; a device that fails fails
    /// the sweep, but only once every other device's hour was rolled up.
    async fn sweep(&self, hour: i64, ledger: bool) -> Result<u64, KeepError> {
        let mut written = 0;
        let mut fleet = FleetHour::default();
        let mut failed = None;
        let mut pages = DevicePages::new(&self.devices);
        while let Some(devices) = pages.next_page().await? {
            stream::iter(devices)
                .map(|device| async move {
                    let (n, seqs) = self.recompute(&device, hour, false).await?;
                    let part = match seqs {
                        Some(seqs) if ledger && seqs.numbered() => {
                            self.fleet_part(&device, hour, Some(seqs)).await?
                        }
                        _ => None,
                    };
                    Ok::<_, KeepError>((n, part))
                })
                .buffer_unordered(self.concurrency.max(1))
                .for_each(|r| {
                    match r {
                        Ok((n, seqs)) => {
                            written += n;
                            if let Some(seqs) = &seqs {
                                fleet.add(seqs);
                            }
                        }
                        Err(e) if failed.is_none() => failed = Some(e),
                        Err(_) => {}
                    }
                    future::ready(())
                })
                .await;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if ledger {
            let row = fleet.to_entity(hour);
            retried(|| self.rollups.upsert(&row)).await?;
        }
        tracing::debug!(hour = %format_ms(hour), written, "Hour rolled up.");
        Ok(written)
    }

    /// Sums the fleet ledger again for a few hours that late readings made stale (oldest
    /// first), from every device's hourly row; a flag for an hour past the day the ledger is
    /// kept for is only deleted.
    async fn sum_stale_hours(&self, now: i64) -> Result<(), KeepError> {
        let (lo, hi) = rollup::ledger_stale_range();
        let filter = format!(
            "PartitionKey eq '{}' and RowKey ge '{lo}' and RowKey lt '{hi}'",
            rollup::LEDGER
        );
        let flags = retried(|| self.rollups.query_first(&filter, STALE_HOURS_PER_TURN)).await?;
        for flag in &flags {
            let Some(hour) = flag
                .get("RowKey")
                .and_then(|v| v.as_str())
                .and_then(rollup::parse_ledger_stale)
            else {
                continue;
            };
            // Only an hour the sweep summed: one before the keeper's first sweep has readings
            // rolled up by marks alone, and its sums would cover only those devices.
            let swept = format!(
                "PartitionKey eq '{}' and RowKey eq '{}'",
                rollup::LEDGER,
                Interval::Hour.row_key(hour)
            );
            if hour >= now - rollup::LEDGER_KEPT_MS
                && retried(|| self.rollups.first(&swept)).await?.is_some()
            {
                let row = self.sum_hour(hour).await?.to_entity(hour);
                retried(|| self.rollups.upsert(&row)).await?;
            }
            if let Some(row) = RowRef::of(flag) {
                // Flagged again meanwhile (a later mark): it stays for the next turn.
                self.rollups.delete_if_unchanged(&row).await?;
            }
        }
        Ok(())
    }

    /// The fleet ledger of the hour starting at `hour`, from every device's stored hourly rows
    /// (that hour's and the one before).
    async fn sum_hour(&self, hour: i64) -> Result<FleetHour, KeepError> {
        let mut fleet = FleetHour::default();
        let mut pages = DevicePages::new(&self.devices);
        while let Some(devices) = pages.next_page().await? {
            let parts: Vec<Result<Option<Seqs>, StorageError>> = stream::iter(devices)
                .map(|device| async move { self.fleet_part(&device, hour, None).await })
                .buffer_unordered(self.concurrency.max(1))
                .collect()
                .await;
            for part in parts {
                if let Some(seqs) = part? {
                    fleet.add(&seqs);
                }
            }
        }
        Ok(fleet)
    }

    /// `device`'s part of the fleet ledger of `hour`: its hour's ledger (`this`, or read from
    /// its row), with the numbers skipped since the last of its hour before added, so that a
    /// loss at an hour's boundary counts (in the later hour). One query.
    async fn fleet_part(
        &self,
        device: &str,
        hour: i64,
        this: Option<Seqs>,
    ) -> Result<Option<Seqs>, StorageError> {
        let (before, at) = (
            Interval::Hour.row_key(hour - HOUR_MS),
            Interval::Hour.row_key(hour),
        );
        let filter = match this {
            Some(_) => format!("PartitionKey eq '{device}' and RowKey eq '{before}'"),
            None => {
                format!("PartitionKey eq '{device}' and RowKey ge '{before}' and RowKey le '{at}'")
            }
        };
        let rows = retried(|| self.rollups.query(&filter)).await?;
        let ledger = |start: i64| {
            rows.iter()
                .filter_map(|e| Rollup::from_entity(e).ok())
                .find(|r| r.start_ms == start)
                .and_then(|r| r.seqs)
        };
        let Some(this) = this.or_else(|| ledger(hour)) else {
            return Ok(None);
        };
        let skipped = ledger(hour - HOUR_MS).map_or(0, |before| this.skipped_since(&before));
        Ok(Some(Seqs {
            missing: this.missing.saturating_add(skipped),
            ..this
        }))
    }

    /// Recomputes `device`'s hour starting at `hour`, and its day when the hour is the day's
    /// last or `with_day`; reads the archive too when `with_day` (a marked, possibly old hour).
    /// Returns the rollups written.
    async fn recompute(
        &self,
        device: &str,
        hour: i64,
        with_day: bool,
    ) -> Result<(u64, Option<Seqs>), KeepError> {
        let mut readings = self.table_readings(device, hour, hour + HOUR_MS).await?;
        if with_day {
            let archived = self.archived(device, Interval::Day.floor(hour)).await?;
            readings = merge(archived, readings, hour, hour + HOUR_MS);
        }
        let hourly = Rollup::of(Interval::Hour, hour, &readings);
        let seqs = hourly.as_ref().and_then(|h| h.seqs);
        let day = Interval::Day.floor(hour);
        let last_of_day = hour + HOUR_MS == day + DAY_MS;
        let mut rows: Vec<Entity> = hourly.iter().map(Rollup::to_entity).collect();
        // The day, from its stored hours and this one: also when this hour has no readings (a
        // device quiet at the end of the day still gets its day).
        if last_of_day || with_day {
            let filter = format!(
                "PartitionKey eq '{device}' and RowKey ge '{}' and RowKey lt '{}'",
                Interval::Hour.row_key(day),
                Interval::Hour.row_key(day + DAY_MS)
            );
            let stored = retried(|| self.rollups.query(&filter)).await?;
            let mut hours: BTreeMap<i64, Rollup> = stored
                .iter()
                .filter_map(|e| Rollup::from_entity(e).ok())
                .map(|r| (r.start_ms, r))
                .collect();
            if let Some(hourly) = hourly {
                hours.insert(hour, hourly);
            }
            let hours: Vec<Rollup> = hours.into_values().collect();
            if let Some(daily) = Rollup::combine(Interval::Day, day, &hours) {
                rows.push(daily.to_entity());
            }
        }
        if rows.is_empty() {
            return Ok((0, None));
        }
        match retried(|| self.rollups.upsert_batch(&rows)).await? {
            BatchOutcome::Committed => Ok((rows.len() as u64, seqs)),
            BatchOutcome::Rejected(refusal) => Err(KeepError::Refused {
                device: device.to_owned(),
                refusal,
            }),
        }
    }

    async fn table_readings(
        &self,
        device: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<Reading>, StorageError> {
        let filter = format!(
            "PartitionKey eq '{device}' and RowKey ge '{}' and RowKey lt '{}'",
            format_ms(from),
            format_ms(to)
        );
        let rows = retried(|| self.telemetry.query(&filter)).await?;
        Ok(rows
            .iter()
            .filter_map(|e| schemas::entity::from_entity(e).ok())
            .map(|r| r.reading)
            .collect())
    }

    /// Read after the table: the archiver writes a day's blob before it deletes the day's
    /// rows, so in this order no reading falls between the two reads.
    async fn archived(&self, device: &str, day: i64) -> Result<Vec<Reading>, KeepError> {
        let name = self.layout.blob_name(device, day, self.format.extension());
        let Some(blob) = retried(|| self.archive.get(&name)).await? else {
            return Ok(Vec::new());
        };
        match schemas::archive::decode(self.format, blob.bytes) {
            Ok(rows) => Ok(rows.into_iter().map(|r| r.reading).collect()),
            Err(error) => Err(KeepError::Archive { blob: name, error }),
        }
    }

    /// Recomputes marked device-hours up to `swept` (later ones the sweep will cover).
    async fn marks(&self, swept: i64, now: i64) -> Result<(u64, u64), KeepError> {
        // Every mark partition (`~marks-0` to `~marks-f`).
        let filter = format!(
            "PartitionKey ge '{0}' and PartitionKey lt '{0}~'",
            rollup::MARKS
        );
        let marks = retried(|| self.rollups.query_first(&filter, MARKS_PER_TURN)).await?;
        let (mut done, mut written) = (0, 0);
        for mark in &marks {
            let Some((device, hour)) = mark
                .get("RowKey")
                .and_then(|v| v.as_str())
                .and_then(rollup::parse_mark)
            else {
                continue;
            };
            if hour > swept {
                continue;
            }
            let day_ended = Interval::Day.floor(hour) + DAY_MS <= now;
            written += self.recompute(&device, hour, day_ended).await?.0;
            // The fleet's sums of that hour, and of the next (whose boundary count starts from
            // this hour's last number), are stale now: flagged before the mark goes, so that a
            // crash between the two leaves the mark, and the flags are made again.
            for stale in [hour, hour + HOUR_MS] {
                if stale >= now - rollup::LEDGER_KEPT_MS {
                    let flag = rollup::ledger_stale(stale);
                    retried(|| self.rollups.upsert(&flag)).await?;
                }
            }
            if let Some(row) = RowRef::of(mark) {
                // Changed since read (marked again): it stays for the next turn.
                match self.rollups.delete(&row).await {
                    Ok(_) => done += 1,
                    Err(e) if e.is_changed() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok((done, written))
    }

    /// Deletes every rollup older than the retention, and every refused reading's number
    /// recorded before it, device by device, a page of devices at a time. A failure stops it; what it deleted stays deleted, and the next try walks again.
    pub async fn expire(&self, now: i64) -> Result<u64, StorageError> {
        let keep = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = Interval::Day.floor(now.saturating_sub(keep)).max(0);
        let mut deleted = 0;
        let mut pages = DevicePages::new(&self.devices);
        while let Some(devices) = pages.next_page().await? {
            for device in devices {
                let by_interval = [Interval::Hour, Interval::Day].map(|interval| {
                    format!(
                        "PartitionKey eq '{device}' and RowKey ge '{}|' and RowKey lt '{}'",
                        interval.name(),
                        interval.row_key(cutoff)
                    )
                });
                // The refused readings' numbers, by when they were refused.
                let refused = format!(
                    "PartitionKey eq '{device}' and RowKey ge '{0}' and RowKey lt '{0}~' and {1} lt datetime'{2}'",
                    rollup::REFUSED,
                    rollup::REFUSED_AT,
                    format_ms(cutoff)
                );
                for filter in by_interval.iter().chain([&refused]) {
                    let old = retried(|| self.rollups.query(filter)).await?;
                    let rows: Vec<RowRef> = old.iter().filter_map(RowRef::of).collect();
                    for chunk in rows.chunks(100) {
                        retried(|| self.rollups.delete_batch(chunk)).await?;
                        deleted += chunk.len() as u64;
                    }
                }
            }
        }
        Ok(deleted)
    }

    /// Rebuilds `device`'s rollups of the UTC day starting at `day` from the archive and the
    /// table. Returns the rollups written.
    pub async fn rebuild_day(&self, device: &str, day: i64) -> Result<u64, KeepError> {
        let table = self.table_readings(device, day, day + DAY_MS).await?;
        let archived = self.archived(device, day).await?;
        let readings = merge(archived, table, day, day + DAY_MS);
        let hours = rollup::hourly(&readings);
        let Some(daily) = Rollup::combine(Interval::Day, day, &hours) else {
            return Ok(0);
        };
        let mut rows: Vec<Entity> = hours.iter().map(Rollup::to_entity).collect();
        rows.push(daily.to_entity());
        match retried(|| self.rollups.upsert_batch(&rows)).await? {
            BatchOutcome::Committed => Ok(rows.len() as u64),
            BatchOutcome::Rejected(refusal) => Err(KeepError::Refused {
                device: device.to_owned(),
                refusal,
            }),
        }
    }
}

/// Both sources' readings in `[from, to)`, one per timestamp (the table's wins), in order.
fn merge(archived: Vec<Reading>, table: Vec<Reading>, from: i64, to: i64) -> Vec<Reading> {
    let mut by_time = BTreeMap::new();
    for r in archived.into_iter().chain(table) {
        if (from..to).contains(&r.measured_at_ms) {
            by_time.insert(r.measured_at_ms, r);
        }
    }
    by_time.into_values().collect()
}
