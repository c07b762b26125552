//! `alarms`: the operator's tool for alarm rules and the alarms they raise.
//!
//! Rules live in each storage shard's alarm table (every shard gets every rule: a rule names
//! devices, and devices are spread over the shards); processors read them every 30 s. A rule
//! is checked here before anything is written, and a file with one bad rule writes none.

use anyhow::Context as _;
use infra::cli::{LogArgs, ShardArgs, StorageArgs};
use infra::storage::{Account, Entity, Grant, Queue, RowRef, Table};
use schemas::alarm::{self, Rule, Target};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

/// Set, list and delete alarm rules; list the alarms raised.
///
/// A rule watches one measurement (temperature, humidity, pressure or a numeric extra
/// property by name) of one device, or of every device whose id starts with a prefix. It is
/// raised once the value has been below `low` or above `high` for `forSeconds` of measurement
/// time, and clears when the value is back inside by `hysteresis`. Every raise and clear goes
/// to the alarms queue (`telemetry-alarms`) as JSON.
#[derive(Debug, clap::Parser)]
#[command(version)]
pub struct Cli {
    /// The alarm table (the processor's `PROCESSOR_ALARM_TABLE`).
    #[arg(long, global = true, env = "ALARMS_TABLE", default_value = alarm::DEFAULT_TABLE)]
    pub table: String,

    /// The alarms queue (the processor's `PROCESSOR_ALARM_QUEUE`): `rules delete` puts a
    /// `cleared` event there for each alarm the rules had raised.
    #[arg(long, global = true, env = "ALARMS_QUEUE", default_value = alarm::DEFAULT_QUEUE)]
    pub queue: String,

    #[command(flatten)]
    pub storage: StorageArgs,

    #[command(flatten)]
    pub shards: ShardArgs,

    #[command(flatten)]
    pub log: LogArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The rules: set, list, delete.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// The alarms raised now, and those pending (out of band, not yet for long enough).
    List {
        /// Print JSON instead of a table.
        #[arg(long, env = "ALARMS_JSON")]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum RulesCommand {
    /// Adds or replaces rules (by id) from a JSON file holding one rule or an array of them
    /// (`-`: standard input). Every rule is checked first; if one is refused, none is written.
    ///
    /// A rule: {"id": "freezer-warm", "prefix": "freezer-", "measurement": "temperature",
    /// "high": -10, "low": -40, "forSeconds": 120, "hysteresis": 1.5}. Give exactly one of
    /// "device" and "prefix" ("" for every device), and at least one of "low" and "high".
    Set {
        /// The file of rules, or `-`.
        file: PathBuf,
    },
    /// Lists the rules, and any malformed row found in the table.
    List {
        /// Print JSON instead of a table.
        #[arg(long, env = "ALARMS_JSON")]
        json: bool,
    },
    /// Deletes rules by id, with their alarms: each alarm raised gets a `cleared` event
    /// (`"cause": "ruleDeleted"`), and events not sent yet are sent. The rules stop judging
    /// first; their alarms are cleared once processors can no longer be judging under them
    /// (`--settle`). Stopped midway, the same command finishes the deletion.
    Delete {
        /// The rules' ids.
        #[arg(required = true)]
        ids: Vec<String>,

        /// How long processors may go on judging under a rule after it is deleted, counted
        /// from when it was moved aside (a command run again does not wait again): at least
        /// their `PROCESSOR_ALARM_RULES_INTERVAL` (30 s) and the longer of a silence sweep
        /// (`PROCESSOR_ALARM_SILENCE_INTERVAL`, 60 s) and half a round
        /// (`PROCESSOR_VISIBILITY_TIMEOUT` / 2, 30 s) that read the rules just before.
        #[arg(long, env = "ALARMS_DELETE_SETTLE", default_value = "3min", value_parser = humantime::parse_duration)]
        settle: Duration,
    },
}

/// Rules and states are table rows, signed with the key itself; the queue is only added to
/// (the `cleared` events of a deleted rule's alarms).
const STORAGE_GRANT: Grant = Grant {
    services: "q",
    resource_types: "o",
    permissions: "a",
};

/// Tries at clearing one state that processors keep writing before giving up on it.
const CLEAR_TRIES: usize = 5;

/// One shard's alarm table and alarms queue.
struct Shard {
    table: Table,
    queue: Queue,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let accounts = cli.storage.accounts(&cli.shards, STORAGE_GRANT)?;
    let tables: Vec<Table> = accounts
        .iter()
        .map(|a: &Account| a.table(&cli.table))
        .collect();
    match cli.command {
        Command::Rules(RulesCommand::Set { file }) => set(&tables, &file).await,
        Command::Rules(RulesCommand::List { json }) => list_rules(&tables, json).await,
        Command::Rules(RulesCommand::Delete { ids, settle }) => {
            let shards: Vec<Shard> = accounts
                .iter()
                .zip(tables)
                .map(|(a, table)| Shard {
                    table,
                    queue: a.queue(&cli.queue),
                })
                .collect();
            delete(&shards, &ids, settle).await
        }
        Command::List { json } => list_alarms(&tables, json).await,
    }
}

async fn set(tables: &[Table], file: &std::path::Path) -> anyhow::Result<()> {
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the rules from standard input")?;
    } else {
        text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the rules from {}", file.display()))?;
    }
    let rules = alarm::parse_rules(&text).context("no rule was written")?;
    for (shard, table) in tables.iter().enumerate() {
        table
            .create_if_missing()
            .await
            .with_context(|| format!("shard {shard}: creating table {}", table.name()))?;
        for rule in &rules {
            table
                .upsert(&alarm::rule_entity(rule))
                .await
                .with_context(|| format!("shard {shard}: writing rule {}", rule.id))?;
            // Set again, a rule a deletion stopped on is kept (one running sees it is).
            let stopped = RowRef {
                partition_key: alarm::DELETING_PARTITION,
                row_key: &rule.id,
                etag: "*",
            };
            table
                .delete(&stopped)
                .await
                .with_context(|| format!("shard {shard}: writing rule {}", rule.id))?;
        }
    }
    println!(
        "Set {} rule{} in {} shard{}; processors apply them within 30 s.",
        rules.len(),
        plural(rules.len()),
        tables.len(),
        plural(tables.len())
    );
    Ok(())
}

/// The rules of one shard's table: those that parse, and the malformed rows with why.
async fn rules_of(table: &Table) -> anyhow::Result<(Vec<Rule>, Vec<(String, String)>)> {
    let rows = table
        .query(&format!("PartitionKey eq '{}'", alarm::RULES_PARTITION))
        .await
        .with_context(|| format!("reading the rules in table {}", table.name()))?;
    let mut rules = Vec::new();
    let mut refused = Vec::new();
    for row in &rows {
        match alarm::rule_of(row) {
            Ok(rule) => rules.push(rule),
            Err(error) => refused.push((text(row, "RowKey"), error.to_string())),
        }
    }
    Ok((rules, refused))
}

async fn list_rules(tables: &[Table], json: bool) -> anyhow::Result<()> {
    let (rules, refused) = rules_of(&tables[0]).await?;
    // Rules a deletion has moved aside, in any shard.
    let filter = format!("PartitionKey eq '{}'", alarm::DELETING_PARTITION);
    let mut deleting = BTreeSet::new();
    for (shard, table) in tables.iter().enumerate() {
        let rows = table
            .query(&filter)
            .await
            .with_context(|| format!("shard {shard}: reading the rules being deleted"))?;
        deleting.extend(rows.iter().map(|row| text(row, "RowKey")));
    }
    for id in &deleting {
        if rules.iter().any(|r| &r.id == id) {
            eprintln!("rule {id:?}: a deletion of it stopped before it was moved aside (it still judges); `alarms rules delete {id}` deletes it, `alarms rules set` of it keeps it");
        } else {
            eprintln!("rule {id:?} is being deleted (it judges nothing); unless a deletion is running, `alarms rules delete {id}` finishes it");
        }
    }
    // Every shard should hold the same rules; say so when one does not.
    for (shard, table) in tables.iter().enumerate().skip(1) {
        if rules_of(table).await?.0 != rules {
            eprintln!("warning: shard {shard} holds other rules than shard 0; run `alarms rules set` again");
        }
    }
    if json {
        let rules: Vec<Value> = rules
            .iter()
            .map(|r| serde_json::from_str(&r.to_json()).expect("a rule is JSON"))
            .collect();
        let refused: Vec<Value> = refused
            .iter()
            .map(|(id, error)| json!({"id": id, "error": error}))
            .collect();
        println!(
            "{}",
            json!({"rules": rules, "malformed": refused, "deleting": deleting})
        );
        return Ok(());
    }
    println!(
        "{:<24} {:<28} {:<12} {:>10} {:>10} {:>8} {:>10}",
        "RULE", "DEVICES", "MEASUREMENT", "LOW", "HIGH", "FOR", "HYSTERESIS"
    );
    for r in &rules {
        let devices = match &r.target {
            Target::Device(d) => d.clone(),
            Target::Prefix(p) => format!("{p}*"),
        };
        println!(
            "{:<24} {:<28} {:<12} {:>10} {:>10} {:>7}s {:>10}",
            r.id,
            devices,
            r.measurement.name(),
            bound(r.low),
            bound(r.high),
            r.for_ms / 1_000,
            r.hysteresis
        );
    }
    for (id, error) in &refused {
        println!("malformed row {id:?}, ignored by processors: {error}");
    }
    Ok(())
}

/// The row at `partition` and `row_key`, if any.
async fn row_at(table: &Table, partition: &str, row_key: &str) -> anyhow::Result<Option<Entity>> {
    let filter = format!(
        "PartitionKey eq '{}' and RowKey eq '{}'",
        partition.replace('\'', "''"),
        row_key.replace('\'', "''")
    );
    table
        .first(&filter)
        .await
        .with_context(|| format!("reading row {row_key} in table {}", table.name()))
}

/// What a deletion did, over every shard.
#[derive(Debug, Default)]
struct Cleared {
    rules: BTreeSet<String>,
    kept: BTreeSet<String>,
    /// Moved aside again, or finished, by another deletion while this one waited.
    elsewhere: BTreeSet<String>,
    /// Set again while its alarms were being cleared: kept, its old alarms cleared.
    reset: BTreeSet<String>,
    raised: usize,
    pending: usize,
    unsent: usize,
    /// Raised under a rule whose row does not parse: no `cleared` event can be made.
    silent: usize,
}

/// A rule being deleted in one shard: its id, the rule if its row parses, and when it was
/// moved aside.
struct Deleting {
    shard: usize,
    id: String,
    rule: Option<Rule>,
    moved_at: Option<i64>,
}

/// Deletes rules with their alarms, crash-safely: (1) each rule's row moves to
/// [`alarm::DELETING_PARTITION`], where processors do not look, noting when; (2) once
/// `settle` has passed since then (no processor can be judging under it any more), each state
/// under it is cleared: its unsent events and a `cleared` event for a raise are put on the
/// queue, then the state row is deleted with the ETag it was read with (one written meanwhile
/// is read again); then the active list's rows under it; (3) the rule's row goes. Run again
/// after a stop, it finds the rules in (1)'s partition and carries on; a repeated event has
/// the same id. A rule set again meanwhile keeps its alarms.
async fn delete(shards: &[Shard], ids: &[String], settle: Duration) -> anyhow::Result<()> {
    let ids: BTreeSet<&String> = ids.iter().collect();
    for (n, shard) in shards.iter().enumerate() {
        for id in &ids {
            let Some(row) = row_at(&shard.table, alarm::RULES_PARTITION, id).await? else {
                continue;
            };
            let moved = alarm::deleting_entity(&row, schemas::timefmt::now_ms());
            shard
                .table
                .upsert(&moved)
                .await
                .with_context(|| format!("shard {n}: moving rule {id} aside"))?;
            // Only the row as read: one set again meanwhile is kept (and found so below).
            let etag = text(&row, "odata.etag");
            let old = RowRef {
                partition_key: alarm::RULES_PARTITION,
                row_key: id,
                etag: &etag,
            };
            shard
                .table
                .delete_if_unchanged(&old)
                .await
                .with_context(|| format!("shard {n}: deleting rule {id}"))?;
        }
    }
    let mut deleting = Vec::new();
    for (n, shard) in shards.iter().enumerate() {
        for id in &ids {
            if let Some(row) = row_at(&shard.table, alarm::DELETING_PARTITION, id).await? {
                deleting.push(Deleting {
                    shard: n,
                    id: (*id).clone(),
                    rule: alarm::rule_of(&row).ok(),
                    moved_at: alarm::moved_at(&row),
                });
            }
        }
    }
    for id in &ids {
        if !deleting.iter().any(|d| &&d.id == id) {
            // Set again between the read and the move: it stays.
            if row_at(&shards[0].table, alarm::RULES_PARTITION, id)
                .await?
                .is_some()
            {
                eprintln!("Rule {id:?} was set again meanwhile: it is kept.");
            } else {
                eprintln!("No rule {id:?}.");
            }
        }
    }
    // Until `settle` after the latest move (a row without its time: a full `settle` now).
    let now = schemas::timefmt::now_ms();
    let settle_ms = i64::try_from(settle.as_millis()).unwrap_or(i64::MAX);
    let Some(until) = deleting
        .iter()
        .map(|d| {
            d.moved_at
                .unwrap_or(now)
                .clamp(0, now)
                .saturating_add(settle_ms)
        })
        .max()
    else {
        return Ok(());
    };
    let wait = Duration::from_millis(u64::try_from(until.saturating_sub(now)).unwrap_or(0));
    if !wait.is_zero() {
        eprintln!(
            "Rules deleted; processors stop judging under them once they read the rules again. Clearing their alarms in {} (--settle; if stopped, the same command finishes the deletion).",
            humantime::format_duration(Duration::from_secs(wait.as_secs()))
        );
        tokio::time::sleep(wait).await;
    }
    let mut done = Cleared::default();
    for d in &deleting {
        let (n, shard) = (d.shard, &shards[d.shard]);
        let set_again = row_at(&shard.table, alarm::RULES_PARTITION, &d.id)
            .await?
            .is_some();
        // Gone (set again, or finished by another run), or moved again by another run (set,
        // then deleted again): that run waits for it.
        let row = row_at(&shard.table, alarm::DELETING_PARTITION, &d.id).await?;
        let Some(row) = row.filter(|row| alarm::moved_at(row) == d.moved_at) else {
            if set_again {
                done.kept.insert(d.id.clone());
            } else {
                done.elsewhere.insert(d.id.clone());
            }
            continue;
        };
        if set_again {
            done.kept.insert(d.id.clone());
        } else if clear_states(shard, &d.id, d.rule.as_ref(), &mut done)
            .await
            .with_context(|| format!("shard {n}: clearing the alarms of rule {}; run the same command again to finish", d.id))?
        {
            done.rules.insert(d.id.clone());
        } else {
            done.reset.insert(d.id.clone());
        }
        let etag = text(&row, "odata.etag");
        let moved = RowRef {
            partition_key: alarm::DELETING_PARTITION,
            row_key: &d.id,
            etag: &etag,
        };
        shard
            .table
            .delete_if_unchanged(&moved)
            .await
            .with_context(|| format!("shard {n}: deleting rule {}", d.id))?;
    }
    for id in &done.elsewhere {
        eprintln!("Rule {id:?} was deleted by another run meanwhile: that run clears its alarms (if it stopped, run this command again).");
    }
    for id in &done.reset {
        eprintln!("Rule {id:?} was set again while its alarms were cleared: it is kept, and judges anew from here.");
    }
    for id in &done.kept {
        eprintln!("Rule {id:?} was set again meanwhile: it and its alarms are kept.");
    }
    if done.silent > 0 {
        eprintln!(
            "warning: {} alarm{} raised under a rule whose row does not parse were dropped without a cleared event.",
            done.silent,
            plural(done.silent)
        );
    }
    let n = done.rules.len();
    println!(
        "Deleted {n} rule{}: {} alarm{} cleared with an event, {} pending dropped, {} event{} sent that had not been.",
        plural(n),
        done.raised,
        plural(done.raised),
        done.pending,
        done.unsent,
        plural(done.unsent)
    );
    Ok(())
}

/// Clears every state under rule `id` in `shard` (band and silence; a scan of the table),
/// then the active list's rows under it (also those a stopped deletion left), each with the
/// ETag it was read with. Returns false if the rule was set again meanwhile: its alarms are
/// then its own again, and the list is left to the processors.
async fn clear_states(
    shard: &Shard,
    id: &str,
    rule: Option<&Rule>,
    done: &mut Cleared,
) -> anyhow::Result<bool> {
    let keys = [alarm::Condition::Band, alarm::Condition::Silence]
        .map(|condition| (condition, alarm::key(id, condition)));
    for (condition, key) in &keys {
        let filter = format!("RowKey eq '{}'", alarm::state_key(key).replace('\'', "''"));
        for state in shard.table.query(&filter).await? {
            clear_state(shard, rule, *condition, state, done).await?;
        }
    }
    if row_at(&shard.table, alarm::RULES_PARTITION, id)
        .await?
        .is_some()
    {
        return Ok(false);
    }
    let filter = format!("PartitionKey eq '{}'", alarm::ACTIVE_PARTITION);
    for row in shard.table.query(&filter).await? {
        let key = text(&row, "RowKey");
        let under = alarm::active_of(&key).map(|(_, rule)| rule);
        if keys.iter().any(|(_, k)| Some(k.as_str()) == under) {
            let etag = text(&row, "odata.etag");
            let listed = RowRef {
                partition_key: alarm::ACTIVE_PARTITION,
                row_key: &key,
                etag: &etag,
            };
            // Listed again meanwhile: a processor judges under the rule set again.
            shard.table.delete_if_unchanged(&listed).await?;
        }
    }
    Ok(true)
}

/// Clears one device's state under a rule (read as `row`; `rule` if its row parses): events
/// first, then the row with its ETag (written meanwhile: read again and cleared again).
async fn clear_state(
    shard: &Shard,
    rule: Option<&Rule>,
    condition: alarm::Condition,
    mut row: Entity,
    done: &mut Cleared,
) -> anyhow::Result<()> {
    let device = text(&row, "PartitionKey");
    let row_key = text(&row, "RowKey");
    for _ in 0..CLEAR_TRIES {
        let state = alarm::state_of(&row);
        let mut events = state.as_ref().map(|s| s.unsent.clone()).unwrap_or_default();
        let raised = state.as_ref().and_then(|s| match s.state.status {
            alarm::Status::Raised { since } => Some((since, s.state.at)),
            _ => None,
        });
        if let (Some(rule), Some((since, at))) = (rule, raised) {
            // Never before the reading it judged last (a device's clock may run ahead).
            let now = schemas::timefmt::now_ms().max(at.saturating_add(1));
            events.push(rule.deleted_event(&device, condition, since, now));
        }
        for event in &events {
            let text = serde_json::to_string(event).expect("an event is JSON");
            shard
                .queue
                .put(text)
                .await
                .with_context(|| format!("putting an event on queue {}", shard.queue.name()))?;
        }
        let etag = text(&row, "odata.etag");
        let state_row = RowRef {
            partition_key: &device,
            row_key: &row_key,
            etag: &etag,
        };
        match shard.table.delete(&state_row).await {
            Ok(_) => {
                if let Some(state) = &state {
                    done.unsent += state.unsent.len();
                    match (state.state.status, rule) {
                        (alarm::Status::Raised { .. }, Some(_)) => done.raised += 1,
                        (alarm::Status::Raised { .. }, None) => done.silent += 1,
                        (alarm::Status::Pending { .. }, _) => done.pending += 1,
                        (alarm::Status::Clear, _) => {}
                    }
                }
                return Ok(());
            }
            Err(e) if e.is_changed() => match row_at(&shard.table, &device, &row_key).await? {
                Some(again) => row = again,
                None => return Ok(()),
            },
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!(
        "device {device}'s state {row_key} kept changing: a processor still judges under the rule"
    )
}

/// One alarm as `alarms list` shows it.
struct Shown {
    device: String,
    rule: String,
    condition: &'static str,
    status: &'static str,
    since: i64,
    value: Option<f64>,
    at: i64,
}

async fn list_alarms(tables: &[Table], json: bool) -> anyhow::Result<()> {
    let mut shown = Vec::new();
    for (shard, table) in tables.iter().enumerate() {
        let listed = table
            .query(&format!("PartitionKey eq '{}'", alarm::ACTIVE_PARTITION))
            .await
            .with_context(|| format!("shard {shard}: reading the active alarms"))?;
        for row in &listed {
            let key = text(row, "RowKey");
            let Some((device, rule)) = alarm::active_of(&key) else {
                continue;
            };
            // The state row is the truth; the list may name one cleared a moment ago.
            let Some(state) = row_at(table, device, &alarm::state_key(rule))
                .await
                .with_context(|| format!("shard {shard}: reading an alarm's state"))?
                .as_ref()
                .and_then(alarm::state_of)
            else {
                continue;
            };
            let (status, since) = match state.state.status {
                alarm::Status::Raised { since } => ("raised", since),
                alarm::Status::Pending { since } => ("pending", since),
                alarm::Status::Clear => continue,
            };
            let (rule, condition) = alarm::split_key(rule);
            shown.push(Shown {
                device: device.to_owned(),
                rule: rule.to_owned(),
                condition: condition.name(),
                status,
                since,
                value: state.state.value,
                at: state.state.at,
            });
        }
    }
    // Raised first, the oldest first.
    shown.sort_by_key(|s| (s.status != "raised", s.since));
    let time = schemas::timefmt::format_ms;
    if json {
        let items: Vec<Value> = shown
            .iter()
            .map(|s| {
                json!({"deviceId": s.device, "rule": s.rule, "condition": s.condition, "status": s.status,
                       "since": time(s.since), "value": s.value, "measuredAt": time(s.at)})
            })
            .collect();
        println!("{}", Value::Array(items));
        return Ok(());
    }
    println!(
        "{:<8} {:<24} {:<8} {:<24} {:<24} {:>10} {:<24}",
        "STATUS", "RULE", "ON", "DEVICE", "SINCE", "VALUE", "LAST READING"
    );
    for s in &shown {
        println!(
            "{:<8} {:<24} {:<8} {:<24} {:<24} {:>10} {:<24}",
            s.status,
            s.rule,
            s.condition,
            s.device,
            time(s.since),
            s.value.map(|v| v.to_string()).unwrap_or_default(),
            time(s.at)
        );
    }
    if shown.is_empty() {
        println!("No alarm is raised or pending.");
    }
    Ok(())
}

fn text(e: &Entity, name: &str) -> String {
    e.get(name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn bound(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
