//! Deterministic sensor values: a pure function of (seed, device, tick).

use std::fmt::Write;

/// A well-mixed 64-bit hash (SplitMix64 finaliser).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Uniform in [0, 1) from the inputs.
fn unit(seed: u64, device: usize, salt: u64) -> f64 {
    (mix(seed ^ mix(device as u64 ^ mix(salt))) >> 11) as f64 / (1u64 << 53) as f64
}

/// The device's phase within an interval, in [0, 1).
pub fn phase(seed: u64, device: usize) -> f64 {
    unit(seed, device, 1)
}

/// `sensor-00042` for device 42 of 10,000: zero-padded so ids sort numerically.
pub fn device_id(prefix: &str, device: usize, total: usize) -> String {
    let width = total.saturating_sub(1).max(1).to_string().len();
    format!("{prefix}-{device:0width$}")
}

/// One reading as JSON: temperature on a daily cycle with per-device offset and noise,
/// humidity and pressure drifting slowly around per-device baselines.
pub fn reading(seed: u64, id: &str, device: usize, tick: u64, at_ms: i64) -> String {
    let day_fraction = (at_ms.rem_euclid(86_400_000)) as f64 / 86_400_000.0;
    let base = 12.0 + 10.0 * unit(seed, device, 2);
    let noise = unit(seed, device, 1000 + tick) - 0.5;
    let temperature = base + 6.0 * (std::f64::consts::TAU * (day_fraction - 0.375)).sin() + noise;
    let drift = (tick as f64 / 120.0 + 6.0 * unit(seed, device, 3)).sin();
    let humidity = (45.0 + 20.0 * unit(seed, device, 4) + 10.0 * drift).clamp(0.0, 100.0);
    let pressure = 1000.0 + 25.0 * unit(seed, device, 5) + 5.0 * drift;
    let mut s = String::with_capacity(160);
    let _ = write!(
        s,
        r#"{{"deviceId":"{id}","timestamp":"{}","seq":{tick},"temperature":{temperature:.2},"humidity":{humidity:.1},"pressure":{pressure:.1}}}"#,
        schemas::timefmt::format_ms(at_ms)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::reading::{validate, Policy};

    #[test]
    fn readings_are_deterministic_and_valid() {
        let at = 1_717_200_000_000;
        let a = reading(7, "sensor-1", 1, 3, at);
        assert_eq!(a, reading(7, "sensor-1", 1, 3, at));
        assert_ne!(a, reading(8, "sensor-1", 1, 3, at));
        for d in 0..500 {
            let id = device_id("sensor", d, 10_000);
            let payload = reading(1, &id, d, d as u64, at + d as i64 * 1000);
            let topic = schemas::reading::topic_for("devices", &id);
            let out = validate(
                "devices",
                &topic,
                payload.as_bytes(),
                payload.len(),
                at + 600_000,
                &Policy::default(),
            );
            assert!(out.rejections.is_empty(), "{payload}: {:?}", out.rejections);
        }
        assert_eq!(device_id("sensor", 42, 10_000), "sensor-0042");
    }
}
