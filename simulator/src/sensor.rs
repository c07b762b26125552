//! Deterministic sensors: every message is a pure function of (seed, device, tick), faults
//! included.

use crate::faults::{Fault, Faults};

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

/// Salt of the per-message fault draw, apart from the value salts.
const FAULT_SALT: u64 = 0xFA17_0000_0000_0000;
/// Bytes of whitespace that push an oversize payload over the 32 KiB limit.
const OVERSIZE_PAD: usize = schemas::MAX_PAYLOAD_BYTES + 1;

/// What the simulated devices publish: a pure function of its settings and (device, tick).
#[derive(Debug, Clone)]
pub struct Generator {
    pub seed: u64,
    pub devices: usize,
    /// Distinct ids the devices take in turn, when more than `devices` (`--id-space`).
    pub id_space: usize,
    pub device_prefix: String,
    pub topic_prefix: String,
    /// Readings per message: 1, or a gateway array of up to 100.
    pub batch: u32,
    /// Time between two messages of one device; a gateway array spreads its readings over it.
    pub interval_ms: i64,
    pub faults: Faults,
}

/// One message, and what the pipeline must make of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub readings: u32,
    /// Readings that must be stored.
    pub valid: u32,
    /// The wrapping sum of those readings' [`schemas::Reading::digest`], as the pipeline must
    /// store them: a check of every stored value, not only of the count.
    pub digest: u64,
    pub fault: Option<Fault>,
    /// The `seq` of its first reading (the others follow it).
    pub first_seq: u64,
}

impl Generator {
    /// Device `device`'s id (in round 0, when the devices take turns over a larger id space).
    pub fn device_id(&self, device: usize) -> String {
        self.id_at(device, 0)
    }

    /// The id device `device` publishes as in round `tick`.
    fn id_at(&self, device: usize, tick: u64) -> String {
        if self.id_space <= self.devices {
            return device_id(&self.device_prefix, device, self.devices);
        }
        let n = (u128::from(tick) * self.devices as u128 + device as u128) % self.id_space as u128;
        device_id(&self.device_prefix, n as usize, self.id_space)
    }

    /// Device `device`'s message for `tick`, its newest reading measured at `at_ms`.
    pub fn message(&self, device: usize, tick: u64, at_ms: i64) -> Message {
        let id = self.id_at(device, tick);
        let fault = self.faults.pick(unit(self.seed, device, FAULT_SALT ^ tick));
        let n = self.batch.clamp(1, 100);
        let spoofed = (fault == Some(Fault::Spoofed)).then(|| {
            let other = (device + 1) % self.devices.max(1);
            if other == device {
                format!("{}-spoof", self.device_prefix)
            } else {
                self.id_at(other, tick)
            }
        });
        let mut parts = Vec::with_capacity(n as usize);
        let mut digest = 0u64;
        let whole_message_refused = matches!(
            fault,
            Some(Fault::Malformed | Fault::Oversize | Fault::Spoofed | Fault::Drop)
        );
        for k in 0..n {
            let seq = tick * u64::from(n) + u64::from(k);
            let mut at = at_ms - i64::from(n - 1 - k) * self.interval_ms / i64::from(n);
            let mut v = values(self.seed, device, seq, at);
            // Reading-level faults spoil the first reading only: a gateway keeps the rest.
            let mut temperature = format!("{:.2}", v.temperature);
            if k == 0 {
                match fault {
                    Some(Fault::Schema) => temperature = "\"warm\"".into(),
                    Some(Fault::OutOfRange) => v.temperature = 999.0,
                    // An hour ahead of the clock, not of the reading: a backfilled reading
                    // an hour later is still in the past, and valid.
                    Some(Fault::Future) => at = at.max(schemas::timefmt::now_ms()) + 3_600_000,
                    Some(Fault::Stale) => at -= 60 * 86_400_000,
                    _ => {}
                }
                if fault == Some(Fault::OutOfRange) {
                    temperature = format!("{:.2}", v.temperature);
                }
            }
            let spoiled = k == 0 && fault.is_some_and(Fault::spoils_one_reading);
            if !spoiled && !whole_message_refused {
                let number = |s: String| s.parse::<f64>().ok();
                let stored = schemas::Reading {
                    device_id: id.clone(),
                    measured_at_ms: at,
                    seq: i64::try_from(seq).ok(),
                    temperature: number(temperature.clone()),
                    humidity: number(format!("{:.1}", v.humidity)),
                    pressure: number(format!("{:.1}", v.pressure)),
                    extras: Vec::new(),
                };
                digest = digest.wrapping_add(stored.digest());
            }
            let device_field = spoofed.as_deref().unwrap_or(&id);
            parts.push(format!(
                r#"{{"deviceId":"{device_field}","timestamp":"{}","seq":{seq},"temperature":{temperature},"humidity":{:.1},"pressure":{:.1}}}"#,
                schemas::timefmt::format_ms(at),
                v.humidity,
                v.pressure,
            ));
        }
        let mut payload = if n == 1 {
            parts.swap_remove(0)
        } else {
            format!("[{}]", parts.join(","))
        };
        let valid = match fault {
            Some(Fault::Malformed) => {
                payload.pop();
                0
            }
            Some(Fault::Oversize) => {
                // Before the closing bracket: the prefix a dead letter keeps of an oversize
                // payload still shows which device and reading it was.
                payload.insert_str(payload.len() - 1, &" ".repeat(OVERSIZE_PAD));
                0
            }
            Some(Fault::Spoofed | Fault::Drop) => 0,
            Some(f) if f.spoils_one_reading() => n - 1,
            _ => n,
        };
        Message {
            topic: schemas::reading::topic_for(&self.topic_prefix, &id),
            payload: payload.into_bytes(),
            readings: n,
            valid,
            digest,
            fault,
            first_seq: tick * u64::from(n),
        }
    }
}

/// A reading's measurements.
struct Values {
    temperature: f64,
    humidity: f64,
    pressure: f64,
}

/// Temperature on a daily cycle with per-device offset and noise; humidity and pressure
/// drifting slowly around per-device baselines.
fn values(seed: u64, device: usize, seq: u64, at_ms: i64) -> Values {
    let day_fraction = (at_ms.rem_euclid(86_400_000)) as f64 / 86_400_000.0;
    let base = 12.0 + 10.0 * unit(seed, device, 2);
    let noise = unit(seed, device, 1000 + seq) - 0.5;
    let temperature = base + 6.0 * (std::f64::consts::TAU * (day_fraction - 0.375)).sin() + noise;
    let drift = (seq as f64 / 120.0 + 6.0 * unit(seed, device, 3)).sin();
    Values {
        temperature,
        humidity: (45.0 + 20.0 * unit(seed, device, 4) + 10.0 * drift).clamp(0.0, 100.0),
        pressure: 1000.0 + 25.0 * unit(seed, device, 5) + 5.0 * drift,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::reading::{validate, Override, Policy};

    fn generator(batch: u32, faults: &str) -> Generator {
        Generator {
            seed: 7,
            devices: 10_000,
            id_space: 0,
            device_prefix: "sensor".into(),
            topic_prefix: "devices".into(),
            batch,
            interval_ms: 30_000,
            faults: faults.parse().unwrap(),
        }
    }

    const AT: i64 = 1_717_200_000_000;

    /// What the contract makes of a message: (stored readings, rejection reasons).
    fn judge(m: &Message) -> (usize, Vec<&'static str>) {
        let out = validate(
            "devices",
            &m.topic,
            &m.payload,
            m.payload.len(),
            AT + 600_000,
            &Policy::default(),
            &Override::NONE,
        );
        let reasons = out.rejections.iter().map(|r| r.reason.as_str()).collect();
        (out.readings.len(), reasons)
    }

    #[test]
    fn messages_are_deterministic_and_valid() {
        let g = generator(1, "");
        let a = g.message(1, 3, AT);
        assert_eq!(a, g.message(1, 3, AT));
        let other_seed = Generator {
            seed: 8,
            ..g.clone()
        };
        assert_ne!(a, other_seed.message(1, 3, AT));
        for d in 0..500 {
            let m = g.message(d, d as u64, AT + d as i64 * 1000);
            assert_eq!(
                judge(&m),
                (1, vec![]),
                "{}",
                String::from_utf8_lossy(&m.payload)
            );
        }
        assert_eq!(device_id("sensor", 42, 10_000), "sensor-0042");
    }

    #[test]
    fn devices_take_every_id_of_the_id_space_in_turn() {
        let g = Generator {
            devices: 3,
            id_space: 7,
            ..generator(1, "")
        };
        let topics: Vec<String> = (0..7u64)
            .flat_map(|tick| (0..3).map(move |d| (d, tick)))
            .map(|(d, tick)| g.message(d, tick, AT).topic)
            .take(7)
            .collect();
        let ids: std::collections::BTreeSet<&str> = topics
            .iter()
            .map(|t| t.split('/').nth(1).unwrap())
            .collect();
        assert_eq!(ids.len(), 7, "every id once in 7 messages: {topics:?}");
        assert!(ids.contains("sensor-6") && !ids.contains("sensor-7"));
        let m = g.message(2, 2, AT);
        assert_eq!(judge(&m), (1, vec![]), "valid under its turned id");
    }

    #[test]
    fn gateway_arrays_carry_consecutive_seqs_within_the_interval() {
        let g = generator(100, "");
        let m = g.message(5, 2, AT);
        assert_eq!((m.readings, m.valid), (100, 100));
        assert_eq!(judge(&m), (100, vec![]));
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v[0]["seq"], 200);
        assert_eq!(v[99]["seq"], 299);
        assert_eq!(v[99]["timestamp"], schemas::timefmt::format_ms(AT));
    }

    #[test]
    fn each_fault_gets_exactly_its_expected_outcome() {
        for fault in Fault::ALL {
            for batch in [1, 10] {
                let g = generator(batch, &format!("{fault}=1"));
                let m = g.message(3, 9, AT);
                assert_eq!(m.fault, Some(fault));
                if fault == Fault::Drop {
                    // Never published: nothing to store, and its numbers are the gap.
                    assert_eq!((m.valid, m.digest), (0, 0));
                    assert_eq!(m.first_seq, 9 * u64::from(batch));
                    continue;
                }
                let (stored, reasons) = judge(&m);
                assert_eq!(stored, m.valid as usize, "{fault} x{batch}");
                match fault.expected_reason() {
                    Some(reason) => {
                        assert_eq!(reasons.first(), Some(&reason.as_str()), "{fault} x{batch}")
                    }
                    None => assert!(reasons.is_empty(), "{fault} x{batch}: {reasons:?}"),
                }
            }
        }
    }

    #[test]
    fn fault_ratios_hold_over_many_messages() {
        let g = generator(1, "malformed=0.05,duplicate=0.1");
        let picks: Vec<Option<Fault>> = (0..20_000)
            .map(|i| g.message(i % 1000, (i / 1000) as u64, AT).fault)
            .collect();
        let count = |f| picks.iter().filter(|p| **p == Some(f)).count() as f64 / 20_000.0;
        assert!((count(Fault::Malformed) - 0.05).abs() < 0.01);
        assert!((count(Fault::Duplicate) - 0.1).abs() < 0.01);
    }
}
