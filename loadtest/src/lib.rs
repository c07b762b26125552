//! `loadtest`: drives a load profile through the locally running pipeline and measures it end
//! to end.
//!
//! It first measures the raw storage ceiling ([`ceiling`]), then runs the simulator in-process
//! with the profile's settings while it samples the processor's progress and times probe
//! readings from publish to a readable row ([`measure`]). It waits for the pipeline to drain,
//! counts the rows the run produced against what the simulator says it sent, reads CPU and
//! memory of ingest and processor from `/proc`, and their storage requests from their metrics,
//! then writes the report ([`report`]).

mod ceiling;
mod config;
pub mod measure;
mod report;

pub use config::{Config, Profile};

use ceiling::Ceiling;
use measure::{lock, Memory, Probes, Samples};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One simulator run within a profile: its flags, for how long.
#[derive(Debug, Clone)]
struct Step {
    label: String,
    args: Vec<String>,
    duration: Duration,
}

/// The profile's steps. Saturation and gateway loads are set from the ceiling measured in the
/// same run, so they load this machine's storage the same way whatever its speed.
fn steps(config: &Config, prefix: &str, ceiling: &Ceiling) -> Vec<Step> {
    let duration = config.duration;
    let step = |label: String, devices: u64, extra: &[&str], duration: Duration| Step {
        label,
        args: ["--devices", &devices.to_string(), "--device-prefix", prefix]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect(),
        duration,
    };
    match config.profile {
        Profile::Seed => vec![step(
            "10,000 sensors every 30 s".into(),
            10_000,
            &["--interval", "30s"],
            duration.unwrap_or(Duration::from_secs(300)),
        )],
        Profile::Gateway => {
            // 1.2 × the batch ceiling, in messages of 100 readings.
            let rate = (ceiling.batch_per_second * 1.2 / 100.0).max(1.0).round();
            vec![step(
                format!(
                    "1,000 gateways, arrays of 100, {} readings/s offered",
                    rate * 100.0
                ),
                1_000,
                &["--batch", "100", "--rate", &rate.to_string()],
                duration.unwrap_or(Duration::from_secs(120)),
            )]
        }
        Profile::Burst => vec![step(
            format!("{BURST_DEVICES} devices × {BURST_ROUNDS} single readings, flat out"),
            BURST_DEVICES,
            &["--flat-out", "--rounds", &BURST_ROUNDS.to_string()],
            duration.unwrap_or(Duration::from_secs(600)),
        )],
        Profile::Saturation => SATURATION_STEPS
            .iter()
            .map(|share| {
                let rate = (ceiling.single_per_second * share).max(1.0).round();
                step(
                    format!(
                        "{rate} single readings/s offered ({:.0}% of the ceiling)",
                        share * 100.0
                    ),
                    2_000,
                    &["--rate", &rate.to_string()],
                    duration.unwrap_or(Duration::from_secs(30)),
                )
            })
            .collect(),
        Profile::Million => {
            let rate = (ceiling.single_per_second * MILLION_SHARE).max(1.0).round();
            let ids = config.id_space.max(MILLION_DEVICES);
            // Every id once, and one interval more for the last round's stragglers.
            let turns = Duration::from_secs_f64((ids as f64 + MILLION_DEVICES as f64) / rate);
            let rate_arg = rate.to_string();
            vec![
                step(
                    format!("{MILLION_DEVICES} devices, {rate} single readings/s offered"),
                    MILLION_DEVICES,
                    &["--rate", &rate_arg],
                    duration.unwrap_or(Duration::from_secs(60)),
                ),
                step(
                    format!(
                        "{MILLION_DEVICES} devices taking turns over {ids} ids, {rate} single readings/s offered"
                    ),
                    MILLION_DEVICES,
                    &["--rate", &rate_arg, "--id-space", &ids.to_string()],
                    turns,
                ),
            ]
        }
    }
}

/// The `million` profile: this many devices publish at this share of the single ceiling.
const MILLION_DEVICES: u64 = 10_000;
const MILLION_SHARE: f64 = 0.7;

/// The most one page of the final row count may take.
const COUNT_TIMEOUT: Duration = Duration::from_secs(600);

/// The burst profile: this many devices publish this many readings each.
const BURST_DEVICES: u64 = 1_000;
const BURST_ROUNDS: u64 = 100;

/// Offered load of the saturation profile's steps, as shares of the single-write ceiling.
const SATURATION_STEPS: [f64; 6] = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5];

/// Runs the profile, writes the report and prints its Markdown.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let account = config.storage.account(infra::storage::Grant::ALL)?;
    let table = account.table(&config.table_name);
    let queue = account.queue(&config.queue_name);
    let pids = [
        ("ingest", measure::find_pid("ingest")),
        ("processor", measure::find_pid("processor")),
    ];
    for (name, pid) in pids {
        anyhow::ensure!(
            pid.is_some(),
            "no single running `{name}` process: start the pipeline first \
             (`scripts/loadtest.sh` does it for you)"
        );
    }
    anyhow::ensure!(
        infra::serve::http_get(config.processor_metrics, "/readyz")
            .await
            .is_some_and(|r| r.0 == 200),
        "the processor's /readyz on {} is not ready",
        config.processor_metrics
    );

    tracing::info!(seconds = ?config.ceiling_duration, "Measuring the raw storage ceiling.");
    let ceiling = ceiling::measure(
        &account,
        config.ceiling_duration,
        config.ceiling_concurrency,
    )
    .await?;
    tracing::info!(
        single = ceiling.single_per_second.round(),
        batch = ceiling.batch_per_second.round(),
        "Storage ceiling (entities/s)."
    );

    let run_id = format!("lt{}", schemas::timefmt::now_ms() / 1000 % 1_000_000);
    let before_cpu: Vec<f64> = pids
        .iter()
        .map(|(_, pid)| pid.map_or(0.0, |p| measure::proc_stat(p).cpu_seconds))
        .collect();
    let before_requests = (
        measure::storage_requests(config.ingest_metrics).await,
        measure::storage_requests(config.processor_metrics).await,
    );
    let stored_before = measure::stored(config.processor_metrics).await;
    let simulator_cpu_before = measure::children_cpu_seconds();

    let start = Instant::now();
    let stop = CancellationToken::new();
    let load_done = CancellationToken::new();
    let samples: Samples = Default::default();
    let probes: Probes = Default::default();
    let memory: Memory = Default::default();
    let watched: Vec<(&'static str, u32)> = ["ingest", "processor", "archiver", "dashboard"]
        .into_iter()
        .filter_map(|name| measure::find_pid(name).map(|pid| (name, pid)))
        .collect();
    let memory_sampler = tokio::spawn(measure::memory(
        watched.clone(),
        start,
        memory.clone(),
        stop.clone(),
    ));
    let sampler = tokio::spawn(measure::sample(
        config.processor_metrics,
        queue.clone(),
        start,
        samples.clone(),
        stop.clone(),
    ));
    let prober = tokio::spawn(measure::probe(
        config.mqtt.connection()?,
        table.clone(),
        format!("{run_id}probe"),
        start,
        probes.clone(),
        load_done.clone(),
        stop.clone(),
    ));

    let mut expected_rows = 0u64;
    let mut step_reports = Vec::new();
    for step in steps(&config, &run_id, &ceiling) {
        if shutdown.is_cancelled() {
            break;
        }
        tracing::info!(step = %step.label, "Load step starting.");
        let stored_at_start = measure::stored(config.processor_metrics).await;
        let step_start = Instant::now();
        let summary = simulate(&config, &step, &shutdown).await?;
        let secs = step_start.elapsed().as_secs_f64();
        let stored_in_step = measure::stored(config.processor_metrics).await - stored_at_start;
        expected_rows += summary["expected_rows"].as_u64().unwrap_or(0);
        step_reports.push(serde_json::json!({
            "step": step.label,
            "seconds": (secs * 10.0).round() / 10.0,
            "publisher_seconds": summary["seconds"],
            "offered_per_second": (summary["readings"].as_f64().unwrap_or(0.0) / secs).round(),
            "stored_per_second": (stored_in_step / secs).round(),
        }));
    }
    let load_seconds = start.elapsed().as_secs_f64();
    let simulator_cpu_seconds = measure::children_cpu_seconds() - simulator_cpu_before;
    load_done.cancel();

    // Drain: until nothing new is stored for 5 s with the queue empty. A backlog (saturation)
    // drains as long as it makes progress; a minute without any is a stall, and what is
    // missing then counts as lost. When the stored count last rose is the last row's time.
    tracing::info!("Waiting for the pipeline to drain.");
    let mut last = (
        measure::stored(config.processor_metrics).await,
        Instant::now(),
    );
    let mut stalled_queued = None;
    while !shutdown.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = measure::stored(config.processor_metrics).await;
        let depth = queue.approximate_depth().await.ok();
        if now != last.0 {
            last = (now, Instant::now());
        } else if depth == Some(0) && last.1.elapsed() > Duration::from_secs(5) {
            break;
        } else if last.1.elapsed() > Duration::from_secs(60) {
            // Messages still queued are not lost: the report tells them from missing rows.
            stalled_queued = depth.filter(|d| *d > 0);
            tracing::warn!(queued = ?depth, "The pipeline stalled: nothing stored for a minute.");
            break;
        }
    }
    stop.cancel();
    let _ = tokio::join!(sampler, prober, memory_sampler);
    let total_seconds = start.elapsed().as_secs_f64();
    let last_row_seconds = last.1.duration_since(start).as_secs_f64();

    let stored = measure::stored(config.processor_metrics).await - stored_before;
    let filter = format!("PartitionKey ge '{run_id}-' and PartitionKey lt '{run_id}.'");
    // Counting a few hundred thousand rows is a slow scan on the emulator (each page of 1,000
    // rescans the table): the count gets far more time per page than the services' calls.
    // A million rows would take most of an hour, so the `million` profile, which measures
    // memory and throughput, does not count them.
    let counting = infra::cli::StorageArgs {
        storage_timeout: COUNT_TIMEOUT.max(config.storage.storage_timeout),
        ..config.storage.clone()
    };
    let rows = if config.profile == Profile::Million {
        None
    } else {
        tracing::info!("Counting the run's rows.");
        let table = counting
            .account(infra::storage::Grant::ALL)?
            .table(&config.table_name);
        Some(table.count(&filter).await? as u64)
    };
    let cpu: BTreeMap<&str, (f64, u64)> = pids
        .iter()
        .zip(&before_cpu)
        .map(|((name, pid), before)| {
            let s = pid.map(measure::proc_stat).unwrap_or_default();
            (*name, (s.cpu_seconds - before, s.peak_rss))
        })
        .collect();
    let after_requests = (
        measure::storage_requests(config.ingest_metrics).await,
        measure::storage_requests(config.processor_metrics).await,
    );
    let mut requests: BTreeMap<String, f64> = BTreeMap::new();
    for (before, after) in [
        (&before_requests.0, &after_requests.0),
        (&before_requests.1, &after_requests.1),
    ] {
        for (op, n) in after {
            *requests.entry(op.clone()).or_default() += n - before.get(op).copied().unwrap_or(0.0);
        }
    }

    let result = report::Result {
        profile: config.profile,
        steps: step_reports,
        ceiling,
        load_seconds,
        total_seconds,
        last_row_seconds,
        expected_rows,
        rows,
        stalled_queued,
        stored,
        cpu,
        requests,
        samples: lock(&samples).clone(),
        probes: lock(&probes).clone(),
        memory: lock(&memory).clone(),
        peak_rss: watched
            .iter()
            .map(|&(name, pid)| (name, measure::proc_stat(pid).peak_rss))
            .collect(),
        simulator_cpu_seconds,
    };
    let path = report::write(&config.report_dir, &result)?;
    println!("{}", std::fs::read_to_string(&path)?);
    tracing::info!(report = %path.display(), "Load test finished.");
    Ok(())
}

/// Runs one step's simulator as its own process (so its CPU is its own) for the step's
/// duration, and returns the summary it prints. At `shutdown` (Ctrl-C reaches it too, being
/// in the same process group) it stops early and still prints its summary.
async fn simulate(
    config: &Config,
    step: &Step,
    shutdown: &CancellationToken,
) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe()?.with_file_name("simulator");
    anyhow::ensure!(
        exe.exists(),
        "{} is missing: build it with `cargo build --release --bins`",
        exe.display()
    );
    let child = std::process::Command::new(&exe)
        .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
        .envs(config.mqtt.child_env())
        .args([
            "--duration",
            &humantime::format_duration(step.duration).to_string(),
        ])
        .args(&step.args)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
    tokio::pin!(waited);
    let output = tokio::select! {
        out = &mut waited => out,
        _ = shutdown.cancelled() => {
            measure::terminate(pid);
            waited.await
        }
    }??;
    anyhow::ensure!(
        output.status.success(),
        "the simulator failed ({}); its log is above",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| anyhow::anyhow!("the simulator's summary {last:?}: {e}"))
}
