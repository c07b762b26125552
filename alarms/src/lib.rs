//! `alarms`: the operator's tool for alarm rules and the alarms they raise.
//!
//! Rules live in each storage shard's alarm table (every shard gets every rule: a rule names
//! devices, and devices are spread over the shards); processors read them every 30 s. A rule
//! is checked here before anything is written, and a file with one bad rule writes none.

use anyhow::Context as _;
use infra::cli::{LogArgs, ShardArgs, StorageArgs};
use infra::storage::{Account, Entity, Grant, RowRef, Table};
use schemas::alarm::{self, Rule, Target};
use serde_json::{json, Value};
use std::io::Read as _;
use std::path::PathBuf;

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
    /// Deletes rules by id, with their alarms.
    Delete {
        /// The rules' ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// The tool uses no queue or blob; tables are signed with the key itself.
const STORAGE_GRANT: Grant = Grant {
    services: "q",
    resource_types: "co",
    permissions: "r",
};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let accounts = cli.storage.accounts(&cli.shards, STORAGE_GRANT)?;
    let tables: Vec<Table> = accounts
        .iter()
        .map(|a: &Account| a.table(&cli.table))
        .collect();
    match cli.command {
        Command::Rules(RulesCommand::Set { file }) => set(&tables, &file).await,
        Command::Rules(RulesCommand::List { json }) => list_rules(&tables, json).await,
        Command::Rules(RulesCommand::Delete { ids }) => delete(&tables, &ids).await,
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
        println!("{}", json!({"rules": rules, "malformed": refused}));
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

async fn delete(tables: &[Table], ids: &[String]) -> anyhow::Result<()> {
    for (shard, table) in tables.iter().enumerate() {
        for id in ids {
            let rule = RowRef {
                partition_key: alarm::RULES_PARTITION,
                row_key: id,
                etag: "*",
            };
            let found = table
                .delete(&rule)
                .await
                .with_context(|| format!("shard {shard}: deleting rule {id}"))?;
            if !found {
                eprintln!("shard {shard}: no rule {id:?}");
            }
            // Its alarms, band and silence: the active list's rows, then the states (a scan
            // of the table).
            let silence = alarm::key(id, alarm::Condition::Silence);
            let states = table
                .query(&format!(
                    "RowKey eq '{}' or RowKey eq '{}'",
                    alarm::state_key(id).replace('\'', "''"),
                    alarm::state_key(&silence).replace('\'', "''")
                ))
                .await
                .with_context(|| format!("shard {shard}: finding rule {id}'s states"))?;
            for state in &states {
                let device = text(state, "PartitionKey");
                let row_key = text(state, "RowKey");
                let rule_key = row_key.strip_prefix("state|").unwrap_or(id);
                let key = alarm::active_key(&device, rule_key);
                for (partition, row_key) in [
                    (alarm::ACTIVE_PARTITION, key.as_str()),
                    (device.as_str(), row_key.as_str()),
                ] {
                    let row = RowRef {
                        partition_key: partition,
                        row_key,
                        etag: "*",
                    };
                    table
                        .delete(&row)
                        .await
                        .with_context(|| format!("shard {shard}: deleting rule {id}'s alarms"))?;
                }
            }
        }
    }
    println!(
        "Deleted {} rule{} in {} shard{}.",
        ids.len(),
        plural(ids.len()),
        tables.len(),
        plural(tables.len())
    );
    Ok(())
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
            let filter = format!(
                "PartitionKey eq '{}' and RowKey eq '{}'",
                device.replace('\'', "''"),
                alarm::state_key(rule).replace('\'', "''")
            );
            let Some(state) = table
                .first(&filter)
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
