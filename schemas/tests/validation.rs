//! Data-driven validation cases from `fixtures/validation.json`.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use schemas::reading::{validate, Override, Policy};
use schemas::timefmt::parse_rfc3339_ms;
use serde_json::Value;

fn payload_of(case: &Value) -> Vec<u8> {
    if let Some(text) = case["payload"].as_str() {
        return text.as_bytes().to_vec();
    }
    if let Some(hex) = case["payloadHex"].as_str() {
        return (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
    }
    let repeat = case["payloadRepeat"].as_array().expect("a payload field");
    repeat[0]
        .as_str()
        .unwrap()
        .repeat(repeat[1].as_u64().unwrap() as usize)
        .into_bytes()
}

#[test]
fn validation_cases() {
    let fixture: Value =
        serde_json::from_str(include_str!("fixtures/validation.json")).expect("fixture is JSON");
    let now = parse_rfc3339_ms(fixture["now"].as_str().unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let payload = payload_of(case);
        let out = validate(
            "devices",
            case["topic"].as_str().unwrap(),
            &payload,
            payload.len(),
            now,
            &Policy::default(),
            &Override::NONE,
        );
        let reasons: Vec<&str> = out.rejections.iter().map(|r| r.reason.as_str()).collect();
        let want: Vec<&str> = case["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let want_stored = case["stored"].as_u64().unwrap() as usize;
        if reasons != want || out.readings.len() != want_stored {
            failures.push(format!(
                "{name}: stored {} (want {want_stored}), rejected {reasons:?} (want {want:?}): {:?}",
                out.readings.len(),
                out.rejections
            ));
        }
        if let Some(indexes) = case["indexes"].as_array() {
            let got: Vec<Option<usize>> = out.rejections.iter().map(|r| r.index).collect();
            let want: Vec<Option<usize>> = indexes
                .iter()
                .map(|v| Some(v.as_u64().unwrap() as usize))
                .collect();
            if got != want {
                failures.push(format!("{name}: indexes {got:?}, want {want:?}"));
            }
        }
        for r in &out.rejections {
            if r.detail.is_empty() {
                failures.push(format!("{name}: empty detail for {}", r.reason));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
