//! A small hand-written SVG plot: latency CDFs (log-scaled microseconds) of every scenario
//! against the remote fault floor. No plotting dependency needed for one chart.

use std::fmt::Write;

use serde_json::Value;

const W: f64 = 900.0;
const H: f64 = 520.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 260.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 8] = [
    "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
];

fn samples(v: &Value) -> Vec<f64> {
    v["cdf_samples_us"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_f64)
                .filter(|x| *x > 0.0)
                .collect()
        })
        .unwrap_or_default()
}

/// The SVG document for a `bench latency` result.
pub fn latency_cdfs(result: &Value) -> String {
    let mut series: Vec<(String, Vec<f64>)> = ["cross_vcpu", "same_vcpu"]
        .iter()
        .map(|p| {
            (
                format!("floor: remote fault, {}", p.replace('_', "-")),
                samples(&result["floor"][*p]["remote_fault_floor_us"]),
            )
        })
        .collect();
    for run in result["runs"].as_array().into_iter().flatten() {
        let name = format!(
            "{} push {}{}",
            run["workload"].as_str().unwrap_or(""),
            run["push"].as_str().unwrap_or(""),
            if run["naive_single_connection"] == true {
                " naive"
            } else {
                ""
            }
        );
        series.push((name, samples(&run["fault_latency_us"])));
    }
    // Link profiles: each one's floor, its demand faults and its faults under the push.
    for p in result["profiles"].as_array().into_iter().flatten() {
        let name = p["profile"].as_str().unwrap_or("");
        series.push((
            format!("{name}: floor"),
            samples(&p["floor"]["remote_fault_floor_us"]),
        ));
        for run in p["runs"].as_array().into_iter().flatten() {
            let which = run["profile_scenario"].as_str().unwrap_or("");
            if which == "demand" || which == "push" {
                series.push((
                    format!("{name}: {which}"),
                    samples(&run["fault_latency_us"]),
                ));
            }
        }
    }
    series.retain(|(_, s)| !s.is_empty());
    let all = series.iter().flat_map(|(_, s)| s.iter().copied());
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (lo, hi) = if lo > hi {
        (1.0, 10.0)
    } else {
        (
            lo.max(0.1).log10().floor(),
            hi.log10().ceil().max(lo.log10() + 1.0),
        )
    };
    let x = |us: f64| LEFT + (us.max(1e-3).log10() - lo) / (hi - lo) * (W - LEFT - RIGHT);
    let y = |q: f64| TOP + (1.0 - q) * (H - TOP - BOTTOM);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = write!(
        out,
        r#"<text x="{LEFT}" y="18" font-size="14">First-touch fault latency CDF (µs, log scale)</text>"#
    );
    for decade in lo as i32..=hi as i32 {
        let px = x(10f64.powi(decade));
        let _ = write!(
            out,
            r##"<line x1="{px}" y1="{TOP}" x2="{px}" y2="{}" stroke="#ddd"/><text x="{px}" y="{}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 18.0,
            10f64.powi(decade)
        );
    }
    for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
        let py = y(q);
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{py}" x2="{}" y2="{py}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{q}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0
        );
    }
    for (i, (name, s)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let n = s.len().max(1) as f64;
        let points: Vec<String> = s
            .iter()
            .enumerate()
            .map(|(k, v)| format!("{:.1},{:.1}", x(*v), y((k + 1) as f64 / n)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="{}" points="{}"/>"#,
            if i == 0 { 2.5 } else { 1.5 },
            points.join(" ")
        );
        let ly = TOP + 16.0 * i as f64 + 10.0;
        let lx = W - RIGHT + 15.0;
        let _ = write!(
            out,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0
        );
    }
    out.push_str("</svg>\n");
    out
}
