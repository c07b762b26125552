//! The load-test report: Markdown (with each target met or not), JSON, and an SVG chart of
//! throughput and latency over time, in `<report-dir>/<profile>-<time>/`.

use crate::ceiling::Ceiling;
use crate::config::Profile;
use crate::measure::quantile;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

const MIB: f64 = 1024.0 * 1024.0;

/// Everything measured in one run.
#[derive(Debug)]
pub struct Result {
    pub profile: Profile,
    pub steps: Vec<Value>,
    pub ceiling: Ceiling,
    pub load_seconds: f64,
    pub total_seconds: f64,
    /// From the start of the load until the stored count last rose (to 0.25 s).
    pub last_row_seconds: f64,
    /// Distinct readings the simulator sent that the pipeline must store.
    pub expected_rows: u64,
    /// Rows of this run found in the table afterwards.
    pub rows: u64,
    /// The processor's stored-readings counter over the run (probes included).
    pub stored: f64,
    /// CPU seconds and peak RSS bytes, by service.
    pub cpu: BTreeMap<&'static str, (f64, u64)>,
    /// Storage requests by operation, both services.
    pub requests: BTreeMap<String, f64>,
    pub samples: Vec<(f64, f64, usize)>,
    pub probes: Vec<(f64, Option<f64>)>,
    pub simulator_cpu_seconds: f64,
}

struct Target {
    what: String,
    goal: String,
    measured: String,
    met: bool,
}

/// Writes the report files; returns the Markdown's path.
pub fn write(dir: &Path, r: &Result) -> anyhow::Result<PathBuf> {
    let stamp = schemas::timefmt::format_ms(schemas::timefmt::now_ms()).replace([':', '.'], "-");
    let out = dir.join(format!("{}-{stamp}", r.profile.name()));
    std::fs::create_dir_all(&out)?;

    let mut latencies: Vec<f64> = r.probes.iter().filter_map(|p| p.1).collect();
    latencies.sort_by(f64::total_cmp);
    let lost_probes = r.probes.iter().filter(|p| p.1.is_none()).count();
    let (p50, p95, p99, max) = (
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.95),
        quantile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
    );
    let throughput = sustained(&r.samples, r.load_seconds);
    let best_step = r
        .steps
        .iter()
        .filter_map(|s| s["stored_per_second"].as_f64())
        .fold(0.0, f64::max);
    let cpu_total: f64 = r.cpu.values().map(|c| c.0).sum();
    let per_reading = |x: f64| x / r.stored.max(1.0);
    let cpu_us = per_reading(cpu_total) * 1e6;
    let total_requests: f64 = r.requests.values().sum();
    let queue_requests: f64 = r
        .requests
        .iter()
        .filter(|(op, _)| op.starts_with("queue_"))
        .map(|(_, n)| n)
        .sum();
    let lost = r.expected_rows.saturating_sub(r.rows);

    let mut targets = vec![Target {
        what: "readings lost".into(),
        goal: "0".into(),
        measured: format!("{lost} of {}", r.expected_rows),
        met: lost == 0 && lost_probes == 0,
    }];
    let mut target = |what: &str, goal: String, measured: String, met: bool| {
        targets.push(Target {
            what: what.into(),
            goal,
            measured,
            met,
        })
    };
    let (cpu_goal, requests_goal) = match r.profile {
        Profile::Gateway => (10.0, 0.05),
        _ => (50.0, 1.05),
    };
    match r.profile {
        Profile::Seed => {
            target(
                "publish-to-row p99",
                "≤ 1 s".into(),
                format!("{p99:.3} s"),
                p99 <= 1.0,
            );
            target(
                "queue requests per reading",
                "≤ 0.05".into(),
                format!("{:.3}", per_reading(queue_requests)),
                per_reading(queue_requests) <= 0.05,
            );
            let share = r.simulator_cpu_seconds / r.load_seconds.max(1.0);
            target(
                "simulator CPU",
                "< 5% of a core".into(),
                format!("{:.1}%", share * 100.0),
                share < 0.05,
            );
        }
        Profile::Saturation | Profile::Gateway => {
            let (what, got, ceiling, goal) = if r.profile == Profile::Saturation {
                ("single-write", best_step, r.ceiling.single_per_second, 1.0)
            } else {
                ("batch", throughput, r.ceiling.batch_per_second, 0.7)
            };
            let frac = got / ceiling.max(1.0);
            target(
                &format!("throughput vs {what} ceiling"),
                format!("≥ {:.0}%", goal * 100.0),
                format!("{got:.0}/s = {:.0}%", frac * 100.0),
                frac >= goal,
            );
        }
        Profile::Burst => {
            let publisher = r
                .steps
                .first()
                .and_then(|s| s["publisher_seconds"].as_f64());
            let publisher = publisher.unwrap_or(r.load_seconds);
            let rate = r.rows as f64 / r.last_row_seconds.max(0.001);
            let frac = rate / r.ceiling.batch_per_second.max(1.0);
            target(
                "first publish to last row",
                "keep pace with the publisher".into(),
                format!(
                    "{:.1} s for {} readings = {rate:.0}/s; the publisher took {publisher:.1} s",
                    r.last_row_seconds, r.rows
                ),
                r.last_row_seconds - publisher <= 10.0,
            );
            target(
                "burst throughput vs batch ceiling",
                "≥ 70%".into(),
                format!("{rate:.0}/s = {:.0}%", frac * 100.0),
                frac >= 0.7,
            );
        }
    }
    // Under any load, a backlog included: bounded by configuration, not by luck.
    for (name, (_, rss)) in &r.cpu {
        target(
            &format!("{name} peak RSS"),
            "≤ 64 MiB".into(),
            format!("{:.1} MiB", *rss as f64 / MIB),
            (*rss as f64) <= 64.0 * MIB,
        );
    }
    target(
        "CPU per reading (ingest + processor)",
        format!("≤ {cpu_goal} µs"),
        format!("{cpu_us:.0} µs"),
        cpu_us <= cpu_goal,
    );
    target(
        "storage requests per reading",
        format!("≤ {requests_goal}"),
        format!("{:.3}", per_reading(total_requests)),
        per_reading(total_requests) <= requests_goal,
    );

    let json = json!({
        "profile": r.profile.name(),
        "steps": r.steps,
        "ceiling_entities_per_second": {
            "single": r.ceiling.single_per_second.round(),
            "batch": r.ceiling.batch_per_second.round(),
        },
        "throughput_per_second": {
            "sustained": throughput.round(),
            "best_step": best_step,
            "of_single_ceiling": throughput / r.ceiling.single_per_second.max(1.0),
            "of_batch_ceiling": throughput / r.ceiling.batch_per_second.max(1.0),
        },
        "latency_seconds": {"p50": p50, "p95": p95, "p99": p99, "max": max, "probes": r.probes.len(), "lost_probes": lost_probes},
        "rows": {"expected": r.expected_rows, "found": r.rows, "lost": lost},
        "stored": r.stored,
        "cpu": r.cpu.iter().map(|(k, (cpu, rss))| (k.to_string(), json!({"cpu_seconds": cpu, "peak_rss_bytes": rss}))).collect::<serde_json::Map<_, _>>(),
        "cpu_us_per_reading": cpu_us,
        "storage_requests_per_reading": r.requests.iter().map(|(op, n)| (op.clone(), json!(per_reading(*n)))).collect::<serde_json::Map<_, _>>(),
        "storage_requests_per_reading_total": per_reading(total_requests),
        "simulator_cpu_seconds": r.simulator_cpu_seconds,
        "seconds": {"load": r.load_seconds, "total": r.total_seconds, "last_row": r.last_row_seconds},
        "targets": targets.iter().map(|t| json!({"what": t.what, "goal": t.goal, "measured": t.measured, "met": t.met})).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out.join("chart.svg"), chart(&r.samples, &r.probes))?;

    let mut md = String::new();
    let _ = writeln!(md, "# Load test: {} profile\n", r.profile.name());
    let _ = writeln!(md, "| target | goal | measured | |\n|---|---|---|---|");
    for t in &targets {
        let mark = if t.met { "met" } else { "**not met**" };
        let _ = writeln!(md, "| {} | {} | {} | {mark} |", t.what, t.goal, t.measured);
    }
    let _ = writeln!(
        md,
        "\n**Throughput** {throughput:.0} readings/s sustained; raw storage ceiling in the same run: \
         {:.0} entities/s one per request, {:.0} in 100-entity batches.\n",
        r.ceiling.single_per_second, r.ceiling.batch_per_second
    );
    let _ = writeln!(
        md,
        "| step | seconds | offered/s | stored/s |\n|---|---:|---:|---:|"
    );
    for s in &r.steps {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            s["step"].as_str().unwrap_or(""),
            s["seconds"],
            s["offered_per_second"],
            s["stored_per_second"]
        );
    }
    let _ = writeln!(
        md,
        "\n**Latency**, publish to row readable, {} probes: p50 {p50:.3} s, p95 {p95:.3} s, \
         p99 {p99:.3} s, max {max:.3} s; {lost_probes} never seen.\n",
        r.probes.len()
    );
    let _ = writeln!(
        md,
        "| service | CPU s | µs/reading | peak RSS |\n|---|---:|---:|---:|"
    );
    for (name, (cpu, rss)) in &r.cpu {
        let _ = writeln!(
            md,
            "| {name} | {cpu:.1} | {:.0} | {:.1} MiB |",
            per_reading(*cpu) * 1e6,
            *rss as f64 / MIB
        );
    }
    let _ = writeln!(
        md,
        "\n| storage request | count | per reading |\n|---|---:|---:|"
    );
    for (op, n) in &r.requests {
        let _ = writeln!(md, "| {op} | {n:.0} | {:.4} |", per_reading(*n));
    }
    let _ = writeln!(
        md,
        "\nRows: {} expected, {} found. Readings stored: {:.0}. Chart: `chart.svg`; raw \
         numbers: `report.json`.",
        r.expected_rows, r.rows, r.stored
    );
    let path = out.join("report.md");
    std::fs::write(&path, md)?;
    Ok(path)
}

/// Readings stored per second over the load window, from the samples.
fn sustained(samples: &[(f64, f64, usize)], load_seconds: f64) -> f64 {
    let in_load: Vec<&(f64, f64, usize)> = samples.iter().filter(|s| s.0 <= load_seconds).collect();
    match (in_load.first(), in_load.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) / (b.0 - a.0),
        _ => 0.0,
    }
}

/// Throughput (readings/s, left axis) and probe latency (ms, right axis) over time.
fn chart(samples: &[(f64, f64, usize)], probes: &[(f64, Option<f64>)]) -> String {
    let (w, h, pad) = (900.0, 360.0, 50.0);
    let rates: Vec<(f64, f64)> = samples
        .windows(5)
        .map(|win| {
            let (a, b) = (win[0], win[win.len() - 1]);
            (b.0, (b.1 - a.1) / (b.0 - a.0).max(0.001))
        })
        .collect();
    let lat: Vec<(f64, f64)> = probes
        .iter()
        .filter_map(|(t, l)| l.map(|l| (*t, l * 1000.0)))
        .collect();
    let t_max = samples.last().map_or(1.0, |s| s.0).max(1.0);
    let r_max = rates.iter().map(|r| r.1).fold(1.0, f64::max) * 1.1;
    let l_max = lat.iter().map(|l| l.1).fold(1.0, f64::max) * 1.1;
    let x = |t: f64| pad + t / t_max * (w - 2.0 * pad);
    let y = |v: f64, max: f64| h - pad - v / max * (h - 2.0 * pad);
    let line = |pts: &[(f64, f64)], max: f64| {
        pts.iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v, max)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#444"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="#444"/>
<line x1="{r}" y1="{pad}" x2="{r}" y2="{b}" stroke="#444"/>
<text x="{pad}" y="30" fill="#1f77b4">stored readings/s (max {r_max:.0})</text>
<text x="{lx}" y="30" fill="#d62728" text-anchor="end">publish-to-row latency, ms (max {l_max:.0})</text>
<text x="{cx}" y="{tb}" text-anchor="middle">seconds (0 to {t_max:.0})</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{rates}"/>
<polyline fill="none" stroke="#d62728" stroke-width="1" points="{lat}"/>
</svg>
"##,
        b = h - pad,
        r = w - pad,
        lx = w - pad,
        cx = w / 2.0,
        tb = h - 15.0,
        rates = line(&rates, r_max),
        lat = line(&lat, l_max),
    );
    svg
}
