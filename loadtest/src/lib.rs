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

use measure::{lock, Probes, Samples};
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

fn steps(profile: Profile, duration: Option<Duration>, prefix: &str) -> Vec<Step> {
    let step = |label: String, devices: u64, extra: &[&str], duration: Duration| Step {
        label,
        args: ["--devices", &devices.to_string(), "--device-prefix", prefix]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect(),
        duration,
    };
    match profile {
        Profile::Seed => vec![step(
            "10,000 sensors every 30 s".into(),
            10_000,
            &["--interval", "30s"],
            duration.unwrap_or(Duration::from_secs(300)),
        )],
        Profile::Gateway => vec![step(
            "1,000 gateways, arrays of 100, flat out".into(),
            1_000,
            &["--batch", "100", "--flat-out"],
            duration.unwrap_or(Duration::from_secs(120)),
        )],
        Profile::Saturation => [250, 500, 1000, 1500, 2000, 3000, 4000]
            .into_iter()
            .map(|rate: u64| {
                step(
                    format!("{rate} single readings/s offered"),
                    2_000,
                    &["--rate", &rate.to_string()],
                    duration.unwrap_or(Duration::from_secs(30)),
                )
            })
            .collect(),
    }
}

/// Runs the profile, writes the report and prints its Markdown.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let account = config.storage.account()?;
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
    let own_cpu_before = own_cpu();

    let start = Instant::now();
    let stop = CancellationToken::new();
    let samples: Samples = Default::default();
    let probes: Probes = Default::default();
    let sampler = tokio::spawn(measure::sample(
        config.processor_metrics,
        queue.clone(),
        start,
        samples.clone(),
        stop.clone(),
    ));
    let prober = tokio::spawn(measure::probe(
        config.mqtt_url.clone(),
        table.clone(),
        format!("{run_id}probe"),
        Duration::from_millis(250),
        start,
        probes.clone(),
        stop.clone(),
    ));

    let mut expected_rows = 0u64;
    let mut step_reports = Vec::new();
    for step in steps(config.profile, config.duration, &run_id) {
        if shutdown.is_cancelled() {
            break;
        }
        tracing::info!(step = %step.label, "Load step starting.");
        let args = ["simulator", "--metrics-addr", "127.0.0.1:0", "--mqtt-url"]
            .into_iter()
            .map(str::to_owned)
            .chain([config.mqtt_url.to_string()])
            .chain(step.args.iter().cloned())
            .chain(["--log-format".into(), "json".into()]);
        let sim = <simulator::Config as clap::Parser>::try_parse_from(args)?;
        let stored_at_start = measure::stored(config.processor_metrics).await;
        let step_start = Instant::now();
        // The step ends after its duration (or at shutdown); the simulator flushes and stops.
        let step_stop = shutdown.child_token();
        let timer = {
            let (stop, d) = (step_stop.clone(), step.duration);
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                stop.cancel();
            })
        };
        let summary = simulator::run(sim, step_stop).await?;
        timer.abort();
        let secs = step_start.elapsed().as_secs_f64();
        let stored_in_step = measure::stored(config.processor_metrics).await - stored_at_start;
        expected_rows += summary["expected_rows"].as_u64().unwrap_or(0);
        step_reports.push(serde_json::json!({
            "step": step.label,
            "seconds": (secs * 10.0).round() / 10.0,
            "offered_per_second": (summary["readings"].as_f64().unwrap_or(0.0) / secs).round(),
            "stored_per_second": (stored_in_step / secs).round(),
        }));
    }
    let load_seconds = start.elapsed().as_secs_f64();

    // Drain: until nothing new is stored for 5 s and the queue is empty (3 minutes at most).
    tracing::info!("Waiting for the pipeline to drain.");
    let drain_until = Instant::now() + Duration::from_secs(180);
    let mut last = (
        measure::stored(config.processor_metrics).await,
        Instant::now(),
    );
    while Instant::now() < drain_until && !shutdown.is_cancelled() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = measure::stored(config.processor_metrics).await;
        let depth = queue.approximate_depth().await.unwrap_or(usize::MAX);
        if now != last.0 {
            last = (now, Instant::now());
        } else if depth == 0 && last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    stop.cancel();
    let _ = tokio::join!(sampler, prober);
    let total_seconds = start.elapsed().as_secs_f64();
    let own_cpu_seconds = own_cpu() - own_cpu_before;

    let stored = measure::stored(config.processor_metrics).await - stored_before;
    let filter = format!("PartitionKey ge '{run_id}-' and PartitionKey lt '{run_id}.'");
    let rows = table.count(&filter).await? as u64;
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
        expected_rows,
        rows,
        stored,
        cpu,
        requests,
        samples: lock(&samples).clone(),
        probes: lock(&probes).clone(),
        simulator_cpu_seconds: own_cpu_seconds,
    };
    let path = report::write(&config.report_dir, &result)?;
    println!("{}", std::fs::read_to_string(&path)?);
    tracing::info!(report = %path.display(), "Load test finished.");
    Ok(())
}

/// This process's CPU time (the in-process simulator and the probes).
fn own_cpu() -> f64 {
    measure::proc_stat(std::process::id()).cpu_seconds
}
