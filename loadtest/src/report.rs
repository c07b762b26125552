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
    /// Rows of this run found in the table afterwards (`None`: not counted).
    pub rows: Option<u64>,
    /// Messages still in the ingest queue when the drain gave up on a stall (none stored
    /// for a minute): missing rows may be among them, not lost.
    pub stalled_queued: Option<usize>,
    /// The processor's stored-readings counter over the run (probes included).
    pub stored: f64,
    /// CPU seconds and peak RSS bytes, by service.
    pub cpu: BTreeMap<&'static str, (f64, u64)>,
    /// Storage requests by operation, both services.
    pub requests: BTreeMap<String, f64>,
    pub samples: Vec<(f64, f64, usize)>,
    pub probes: Vec<(f64, Option<f64>)>,
    /// Resident memory by service against time.
    pub memory: Vec<(f64, BTreeMap<&'static str, u64>)>,
    /// Peak resident memory (VmHWM) of every service found running, in bytes.
    pub peak_rss: BTreeMap<&'static str, u64>,
    pub simulator_cpu_seconds: f64,
}

struct Target {
    what: String,
    goal: String,
    measured: String,
    met: bool,
}

/// The loss target: rows missing after the drain (`lost`), and probes never seen. A drain
/// that gave up on a stall with messages still queued says so: what is missing may be in the
/// queue, stored once the pipeline resumes, so it is not called lost.
fn loss(r: &Result, lost: Option<u64>, lost_probes: usize) -> Target {
    let measured = match (lost, r.stalled_queued) {
        (Some(missing), Some(queued)) if missing > 0 => format!(
            "{missing} of {} not stored when the pipeline stalled (nothing stored for a minute) \
             with {queued} messages still in the ingest queue: not known lost",
            r.expected_rows
        ),
        (Some(lost), _) => format!("{lost} of {}", r.expected_rows),
        (None, _) => format!(
            "rows not counted; {:.0} stored for {} sent",
            r.stored, r.expected_rows
        ),
    };
    Target {
        what: "readings lost".into(),
        goal: "0".into(),
        measured,
        met: lost_probes == 0 && lost.map_or(r.stored >= r.expected_rows as f64, |lost| lost == 0),
    }
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
    let lost = r.rows.map(|rows| r.expected_rows.saturating_sub(rows));

    let mut targets = vec![loss(r, lost, lost_probes)];
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
            let found = r.rows.unwrap_or(0);
            let rate = found as f64 / r.last_row_seconds.max(0.001);
            let frac = rate / r.ceiling.batch_per_second.max(1.0);
            target(
                "first publish to last row",
                "keep pace with the publisher".into(),
                format!(
                    "{:.1} s for {} readings = {rate:.0}/s; the publisher took {publisher:.1} s",
                    r.last_row_seconds, found
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
        Profile::Million => {
            let rate = |i: usize| {
                r.steps
                    .get(i)
                    .and_then(|s| s["stored_per_second"].as_f64())
                    .unwrap_or(0.0)
            };
            let frac = rate(1) / rate(0).max(1.0);
            target(
                "throughput over the id space vs 10,000 devices",
                "≥ 95%".into(),
                format!(
                    "{:.0}/s vs {:.0}/s = {:.0}%",
                    rate(1),
                    rate(0),
                    frac * 100.0
                ),
                frac >= 0.95,
            );
        }
    }
    // Under any load, a backlog included: bounded by configuration, not by luck.
    for (name, rss) in &r.peak_rss {
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
        "rows": {"expected": r.expected_rows, "found": r.rows, "lost": lost, "stalled_queued": r.stalled_queued},
        "stored": r.stored,
        "cpu": r.cpu.iter().map(|(k, (cpu, rss))| (k.to_string(), json!({"cpu_seconds": cpu, "peak_rss_bytes": rss}))).collect::<serde_json::Map<_, _>>(),
        "cpu_us_per_reading": cpu_us,
        "storage_requests_per_reading": r.requests.iter().map(|(op, n)| (op.clone(), json!(per_reading(*n)))).collect::<serde_json::Map<_, _>>(),
        "storage_requests_per_reading_total": per_reading(total_requests),
        "simulator_cpu_seconds": r.simulator_cpu_seconds,
        "peak_rss_bytes": r.peak_rss,
        "rss_bytes_against_seconds": r.memory.iter().map(|(t, by)| json!({"seconds": t, "rss_bytes": by})).collect::<Vec<_>>(),
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
    md.push_str(&memory_table(&r.memory));
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
        r.expected_rows,
        r.rows.map_or("not counted".to_owned(), |n| n.to_string()),
        r.stored
    );
    let path = out.join("report.md");
    std::fs::write(&path, md)?;
    Ok(path)
}

/// How long a row of the memory table spans.
const MEMORY_WINDOW: f64 = 60.0;

/// Each service's largest resident memory in each minute of the run, as Markdown.
fn memory_table(memory: &[(f64, BTreeMap<&'static str, u64>)]) -> String {
    let Some((_, first)) = memory.first() else {
        return String::new();
    };
    let services: Vec<&str> = first.keys().copied().collect();
    let mut windows: BTreeMap<u64, BTreeMap<&str, u64>> = BTreeMap::new();
    for (t, by) in memory {
        let window = windows.entry((t / MEMORY_WINDOW) as u64).or_default();
        for (name, rss) in by {
            let most = window.entry(name).or_default();
            *most = (*most).max(*rss);
        }
    }
    let mut md = format!(
        "\n**Memory against time**: each service's largest resident set (VmRSS) in each minute.\n\n| minute | {} |\n|---:|{}\n",
        services.join(" | "),
        "---:|".repeat(services.len())
    );
    for (minute, by) in &windows {
        let cells: Vec<String> = services
            .iter()
            .map(|s| format!("{:.1} MiB", by.get(s).copied().unwrap_or(0) as f64 / MIB))
            .collect();
        let _ = writeln!(md, "| {minute} | {} |", cells.join(" | "));
    }
    md
}

/// Readings stored per second over the load window, from the samples.
fn sustained(samples: &[(f64, f64, usize)], load_seconds: f64) -> f64 {
    let in_load: Vec<&(f64, f64, usize)> = samples.iter().filter(|s| s.0 <= load_seconds).collect();
    match (in_load.first(), in_load.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) / (b.0 - a.0),
        _ => 0.0,
    }
}

/// Throughput and probe latency over time: one panel each (their units differ), both on the
/// same time axis, with labelled ticks and gridlines.
fn chart(samples: &[(f64, f64, usize)], probes: &[(f64, Option<f64>)]) -> String {
    let rates: Vec<(f64, f64)> = samples
        .windows(5)
        .map(|win| {
            let (a, b) = (win[0], win[win.len() - 1]);
            (b.0, (b.1 - a.1) / (b.0 - a.0).max(0.001))
        })
        .collect();
    let latencies: Vec<(f64, f64)> = probes
        .iter()
        .filter_map(|(t, l)| l.map(|l| (*t, l)))
        .collect();
    let t_end = samples
        .iter()
        .map(|s| s.0)
        .chain(probes.iter().map(|p| p.0))
        .fold(0.0, f64::max);
    let (height, width) = (2.0 * PANEL_HEIGHT, CHART_WIDTH);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let time = ticks(t_end);
    let throughput = Panel {
        title: "Throughput: stored readings per second",
        unit: "/s",
        color: "#1f77b4",
        dots: false,
    };
    throughput.draw(&mut svg, 0.0, &rates, &time);
    let latency = Panel {
        title: "Latency: publish to row readable, one dot a probe",
        unit: " s",
        color: "#d62728",
        dots: true,
    };
    latency.draw(&mut svg, PANEL_HEIGHT, &latencies, &time);
    svg.push_str("</svg>\n");
    svg
}

const CHART_WIDTH: f64 = 900.0;
/// A panel: its title, the plot, the time labels and the time axis's title.
const PANEL_HEIGHT: f64 = 290.0;
/// Room left of the plot for the value labels, and right of it.
const PLOT_LEFT: f64 = 80.0;
const PLOT_RIGHT: f64 = 25.0;
/// From a panel's top to its plot's, and the plot's height.
const PLOT_TOP: f64 = 35.0;
const PLOT_HEIGHT: f64 = 190.0;

/// One panel of the chart: a measure in its own unit over time.
struct Panel {
    title: &'static str,
    /// Appended to each value label, `/s` or ` s`.
    unit: &'static str,
    color: &'static str,
    /// Dots for separate measurements (probes), else a line.
    dots: bool,
}

impl Panel {
    /// Draws the panel `top` pixels down; `points` are (seconds since the start, value), `time`
    /// the time axis's ticks (from [`ticks`]).
    fn draw(&self, svg: &mut String, top: f64, points: &[(f64, f64)], time: &(f64, Vec<f64>)) {
        let (left, right) = (PLOT_LEFT, CHART_WIDTH - PLOT_RIGHT);
        let (high, low) = (top + PLOT_TOP, top + PLOT_TOP + PLOT_HEIGHT);
        let (t_step, t_ticks) = time;
        let t_max = t_ticks.last().copied().unwrap_or(1.0);
        let (v_step, v_ticks) = ticks(points.iter().map(|p| p.1).fold(0.0, f64::max));
        let v_max = v_ticks.last().copied().unwrap_or(1.0);
        let x = |t: f64| left + t / t_max * (right - left);
        let y = |v: f64| low - v / v_max * (low - high);
        let (title, unit, color) = (self.title, self.unit, self.color);
        let title_y = top + 20.0;
        let _ = writeln!(
            svg,
            "<g class=\"panel\">\n<text x=\"{left}\" y=\"{title_y}\" font-weight=\"bold\">{title}</text>"
        );
        for &v in &v_ticks {
            let (at, label) = (y(v), tick_label(v, v_step));
            let (label_x, label_y) = (left - 8.0, at + 4.0);
            let _ = writeln!(
                svg,
                "<line x1=\"{left}\" y1=\"{at:.1}\" x2=\"{right}\" y2=\"{at:.1}\" stroke=\"#e3e3e3\"/>\
                 <text x=\"{label_x}\" y=\"{label_y:.1}\" text-anchor=\"end\" class=\"tick\">{label}{unit}</text>"
            );
        }
        for &t in t_ticks {
            let (at, label) = (x(t), tick_label(t, *t_step));
            let (tick_end, label_y) = (low + 5.0, low + 19.0);
            let _ = writeln!(
                svg,
                "<line x1=\"{at:.1}\" y1=\"{high}\" x2=\"{at:.1}\" y2=\"{tick_end}\" stroke=\"#e3e3e3\"/>\
                 <text x=\"{at:.1}\" y=\"{label_y}\" text-anchor=\"middle\" class=\"tick\">{label} s</text>"
            );
        }
        let (middle_x, axis_title_y) = ((left + right) / 2.0, low + 38.0);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{high}\" x2=\"{left}\" y2=\"{low}\" stroke=\"#444\"/>\
             <line x1=\"{left}\" y1=\"{low}\" x2=\"{right}\" y2=\"{low}\" stroke=\"#444\"/>\n\
             <text x=\"{middle_x}\" y=\"{axis_title_y}\" text-anchor=\"middle\">seconds since the start</text>"
        );
        if points.is_empty() {
            let middle_y = (high + low) / 2.0;
            let _ = writeln!(
                svg,
                "<text x=\"{middle_x}\" y=\"{middle_y}\" text-anchor=\"middle\" fill=\"#888\">no data</text>"
            );
        } else if self.dots {
            for &(t, v) in points {
                let (cx, cy) = (x(t), y(v));
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"2\" fill=\"{color}\"/>"
                );
            }
        } else {
            let line = points
                .iter()
                .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
                .collect::<Vec<_>>()
                .join(" ");
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{line}\"/>"
            );
        }
        svg.push_str("</g>\n");
    }
}

/// Round ticks from 0 past `max` (at least 1 when there is nothing to show): a step of 1, 2 or
/// 5 times a power of ten giving about five of them, and the ticks.
fn ticks(max: f64) -> (f64, Vec<f64>) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let rough = max / 5.0;
    let power = 10f64.powi(rough.log10().floor() as i32);
    let step = [1.0_f64, 2.0, 5.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * power);
    let count = (max / step).ceil() as usize;
    (step, (0..=count).map(|i| i as f64 * step).collect())
}

/// A tick's value with the decimals its step needs: 0.5 for 0.5000000000000001 in steps of 0.1.
fn tick_label(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10() - 1e-9).ceil() as usize
    };
    format!("{value:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_a_panel_per_unit_with_labelled_ticks() {
        // 1000 readings/s for a minute; a probe every 2 s taking 0.20 to 0.49 s, one lost.
        let samples: Vec<(f64, f64, usize)> = (0..=60_i32)
            .map(|i| (f64::from(i), f64::from(i) * 1000.0, 0))
            .collect();
        let probes: Vec<(f64, Option<f64>)> = (0..30_i32)
            .map(|i| {
                (
                    f64::from(i) * 2.0,
                    if i == 5 {
                        None
                    } else {
                        Some(0.2 + f64::from(i) / 100.0)
                    },
                )
            })
            .collect();
        let svg = chart(&samples, &probes);
        assert!(
            svg.starts_with("<svg") && svg.ends_with("</svg>\n"),
            "{svg}"
        );
        assert_eq!(svg.matches("<g class=\"panel\">").count(), 2, "{svg}");
        assert!(svg.contains(">Throughput: stored readings per second</text>"));
        assert!(svg.contains(">Latency: publish to row readable, one dot a probe</text>"));
        // Values with their units: 0 to 1000/s in steps of 200; 0 to 0.5 s in steps of 0.1.
        for label in ["0/s", "200/s", "1000/s", "0.0 s", "0.1 s", "0.5 s"] {
            assert!(
                svg.contains(&format!(">{label}</text>")),
                "no {label}: {svg}"
            );
        }
        // Time in both panels: 0 to 60 s in steps of 20.
        for label in ["0 s", "20 s", "60 s"] {
            assert_eq!(
                svg.matches(&format!(">{label}</text>")).count(),
                2,
                "{label}: {svg}"
            );
        }
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 29);
    }

    #[test]
    fn a_stall_with_messages_queued_is_not_called_a_loss() {
        let mut r = Result {
            profile: Profile::Seed,
            steps: Vec::new(),
            ceiling: Ceiling::default(),
            load_seconds: 60.0,
            total_seconds: 130.0,
            last_row_seconds: 70.0,
            expected_rows: 1000,
            rows: Some(900),
            stalled_queued: Some(12),
            stored: 900.0,
            cpu: BTreeMap::new(),
            requests: BTreeMap::new(),
            samples: Vec::new(),
            probes: Vec::new(),
            memory: Vec::new(),
            peak_rss: BTreeMap::new(),
            simulator_cpu_seconds: 0.0,
        };
        let stalled = loss(&r, Some(100), 0);
        assert!(!stalled.met);
        assert!(
            stalled.measured.starts_with("100 of 1000 not stored")
                && stalled
                    .measured
                    .contains("12 messages still in the ingest queue"),
            "{}",
            stalled.measured
        );
        r.stalled_queued = None;
        let lost = loss(&r, Some(100), 0);
        assert_eq!((lost.measured.as_str(), lost.met), ("100 of 1000", false));
        r.rows = Some(1000);
        assert!(loss(&r, Some(0), 0).met);
        assert!(!loss(&r, Some(0), 1).met, "a probe never seen");
    }

    #[test]
    fn an_empty_run_still_draws_both_panels() {
        let svg = chart(&[], &[]);
        assert_eq!(svg.matches("<g class=\"panel\">").count(), 2, "{svg}");
        assert_eq!(svg.matches(">no data</text>").count(), 2, "{svg}");
        assert!(svg.contains(">1.0 s</text>"), "{svg}");
    }

    #[test]
    fn the_memory_table_keeps_each_minutes_largest() {
        let at = |t: f64, ingest: u64, processor: u64| {
            (
                t,
                BTreeMap::from([("ingest", ingest), ("processor", processor)]),
            )
        };
        let mib = 1024 * 1024;
        let table = memory_table(&[
            at(5.0, 10 * mib, 20 * mib),
            at(55.0, 12 * mib, 18 * mib),
            at(65.0, 11 * mib, 30 * mib),
        ]);
        assert!(table.contains("| minute | ingest | processor |"), "{table}");
        assert!(table.contains("| 0 | 12.0 MiB | 20.0 MiB |"), "{table}");
        assert!(table.contains("| 1 | 11.0 MiB | 30.0 MiB |"), "{table}");
        assert_eq!(memory_table(&[]), "");
    }

    #[test]
    fn ticks_are_round_and_reach_past_the_maximum() {
        let (step, values) = ticks(950.0);
        assert_eq!(step, 200.0);
        assert_eq!(values.len(), 6);
        assert_eq!(values[5], 1000.0);
        assert_eq!(ticks(0.0).1.last().copied(), Some(1.0));
        assert_eq!(ticks(f64::NAN).1.last().copied(), Some(1.0));
        assert_eq!(tick_label(3.0 * 0.1, 0.1), "0.3");
        assert_eq!(tick_label(0.05, 0.05), "0.05");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
    }
}
