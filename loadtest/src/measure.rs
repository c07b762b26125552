//! What the load tester watches while load runs: the processor's progress, publish-to-row
//! latency of probe readings, and the services' CPU, memory and storage requests.

use infra::mqtt::Connection;
use infra::storage::{Queue, Table};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One sample per second: (seconds since start, readings stored so far, queue depth).
pub type Samples = Arc<Mutex<Vec<(f64, f64, usize)>>>;
/// Resident memory every few seconds: (seconds since start, bytes by service).
pub type Memory = Arc<Mutex<Vec<(f64, BTreeMap<&'static str, u64>)>>>;
/// Probe latencies: (seconds since start when sent, latency in seconds, or `None` if lost).
pub type Probes = Arc<Mutex<Vec<(f64, Option<f64>)>>>;

/// The processor's stored-readings counter.
pub async fn stored(processor: SocketAddr) -> f64 {
    match infra::serve::http_get(processor, "/metrics").await {
        Some((_, body)) => infra::serve::metric_sum(&body, "processor_readings_stored_total"),
        None => 0.0,
    }
}

/// Samples progress every second until `stop`.
pub async fn sample(
    processor: SocketAddr,
    queue: Queue,
    start: Instant,
    samples: Samples,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let stored = stored(processor).await;
        let depth = queue.approximate_depth().await.unwrap_or(0);
        lock(&samples).push((start.elapsed().as_secs_f64(), stored, depth));
    }
}

/// How often [`memory`] samples.
const MEMORY_EVERY: Duration = Duration::from_secs(5);

/// Samples the resident memory (VmRSS) of each of `services` every [`MEMORY_EVERY`] until
/// `stop`.
pub async fn memory(
    services: Vec<(&'static str, u32)>,
    start: Instant,
    memory: Memory,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(MEMORY_EVERY);
    while !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now: BTreeMap<&'static str, u64> = services
            .iter()
            .map(|&(name, pid)| (name, status_kib(pid, "VmRSS:") * 1024))
            .collect();
        lock(&memory).push((start.elapsed().as_secs_f64(), now));
    }
}

/// How often a probe reading is published.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Publishes a probe reading every [`PROBE_EVERY`] until `load_done`, and times how long until its row
/// can be read. One query every 25 ms reads every outstanding probe at once (a RowKey range from
/// the oldest), so the measuring load on storage stays constant however long the latency grows.
/// It returns once every probe is seen, or at `stop` (after the drain), when a last query
/// settles which probes never arrived: only those count as lost.
pub async fn probe(
    mqtt: Connection,
    table: Table,
    device: String,
    start: Instant,
    probes: Probes,
    load_done: CancellationToken,
    stop: CancellationToken,
) {
    let mut options = mqtt.options(format!("{device}-{}", std::process::id()));
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let topic = schemas::reading::topic_for("devices", &device);
    // RowKey -> (seconds since start when sent, when sent).
    let mut outstanding: BTreeMap<String, (f64, Instant)> = BTreeMap::new();
    let mut publish = tokio::time::interval(PROBE_EVERY);
    let mut check = tokio::time::interval(Duration::from_millis(25));
    let mut seq = 0u64;
    loop {
        let last_look = stop.is_cancelled();
        if load_done.is_cancelled() && outstanding.is_empty() {
            break;
        }
        tokio::select! {
            _ = publish.tick(), if !load_done.is_cancelled() => {
                let sent_ms = schemas::timefmt::now_ms();
                let row_key = schemas::timefmt::format_ms(sent_ms);
                let payload = format!(
                    r#"{{"deviceId":"{device}","timestamp":"{row_key}","seq":{seq},"temperature":20.0}}"#
                );
                seq += 1;
                if client.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await.is_err() {
                    break;
                }
                outstanding.insert(row_key, (start.elapsed().as_secs_f64(), Instant::now()));
            }
            _ = check.tick() => {
                let Some(oldest) = outstanding.keys().next().cloned() else { continue };
                let filter = format!("PartitionKey eq '{device}' and RowKey ge '{oldest}'");
                if let Ok(rows) = table.query(&filter).await {
                    let mut seen = lock(&probes);
                    for key in rows.iter().filter_map(|e| e.get("RowKey").and_then(|v| v.as_str())) {
                        if let Some((sent_at, sent)) = outstanding.remove(key) {
                            seen.push((sent_at, Some(sent.elapsed().as_secs_f64())));
                        }
                    }
                }
            }
        }
        if last_look {
            break;
        }
    }
    lock(&probes).extend(outstanding.values().map(|(sent_at, _)| (*sent_at, None)));
    let _ = client.disconnect().await;
    poller.abort();
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A service process as the kernel sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStat {
    pub cpu_seconds: f64,
    /// Peak resident set (VmHWM), in bytes.
    pub peak_rss: u64,
}

/// The pid of the one running process named `name`, if exactly one.
pub fn find_pid(name: &str) -> Option<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == name {
            found.push(pid);
        }
    }
    (found.len() == 1).then(|| found[0])
}

pub fn proc_stat(pid: u32) -> ProcStat {
    let ticks = stat_ticks(&pid.to_string());
    ProcStat {
        cpu_seconds: (ticks[0] + ticks[1]) / 100.0,
        peak_rss: status_kib(pid, "VmHWM:") * 1024,
    }
}

/// A KiB figure of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), 0 if unreadable.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

/// CPU seconds of this process's finished, reaped children (the simulator runs).
pub fn children_cpu_seconds() -> f64 {
    let ticks = stat_ticks("self");
    (ticks[2] + ticks[3]) / 100.0
}

/// utime, stime, cutime and cstime of `/proc/<pid>/stat`, in clock ticks (zeros if unreadable).
fn stat_ticks(pid: &str) -> [f64; 4] {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    [tick(11), tick(12), tick(13), tick(14)]
}

/// Asks process `pid` to stop (SIGTERM), as a service manager would.
pub fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// `storage_requests_total` by `op` from a service's metrics.
pub async fn storage_requests(addr: SocketAddr) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Some((_, body)) = infra::serve::http_get(addr, "/metrics").await else {
        return out;
    };
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("storage_requests_total{op=\"") else {
            continue;
        };
        if let Some((op, value)) = rest.split_once("\"} ") {
            *out.entry(op.to_owned()).or_default() += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    out
}

/// The `q`-quantile of sorted `values`.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
