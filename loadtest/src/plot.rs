//! An SVG plot of server CPU and forwarded packets against subscribers, one line per server.

use std::fmt::Write;

use crate::report::Report;

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 80.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 4] = ["#c0392b", "#2471a3", "#1e8449", "#7d3c98"];

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|m| *m >= v)
        .unwrap_or(10.0 * mag)
}

/// Solid lines: server CPU (% of one core, left axis). Dashed: packets forwarded per second
/// (right axis). x: subscribers.
pub fn svg(reports: &[&Report]) -> String {
    let steps = reports.iter().flat_map(|r| r.steps.iter());
    let x_max = nice_max(
        steps
            .clone()
            .map(|s| s.subscribers as f64)
            .fold(0.0, f64::max),
    );
    let cpu_max = nice_max(
        steps
            .clone()
            .filter_map(|s| s.server_cpu_percent)
            .fold(0.0, f64::max),
    );
    let pkt_max = nice_max(steps.map(|s| s.packets_per_second).fold(0.0, f64::max));
    let px = |x: f64| LEFT + x / x_max * (W - LEFT - RIGHT);
    let py = |y: f64, max: f64| H - BOTTOM - y / max * (H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let title = reports
        .first()
        .map_or(String::new(), |r| format!("{} · {}", r.scenario, r.machine));
    let _ = write!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="14" font-weight="bold">{}</text>"#,
        escape(&title)
    );
    for i in 0..=5 {
        let f = f64::from(i) / 5.0;
        let y = py(f * cpu_max, cpu_max);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{:.0}%</text><text x="{}" y="{}">{:.0}k</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            f * cpu_max,
            W - RIGHT + 6.0,
            y + 4.0,
            f * pkt_max / 1000.0
        );
        let x = px(f * x_max);
        let _ = write!(
            s,
            r#"<text x="{x}" y="{}" text-anchor="middle">{:.0}</text>"#,
            H - BOTTOM + 18.0,
            f * x_max
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">subscribers</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">server CPU (% of one core), solid</text><text x="{}" y="{}" transform="rotate(90 {} {})" text-anchor="middle">packets forwarded per second, dashed</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 20.0,
        H / 2.0,
        H / 2.0,
        W - 16.0,
        H / 2.0,
        W - 16.0,
        H / 2.0
    );
    for (i, r) in reports.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let cpu: Vec<(f64, f64)> = r
            .steps
            .iter()
            .filter_map(|st| {
                st.server_cpu_percent
                    .map(|c| (px(st.subscribers as f64), py(c, cpu_max)))
            })
            .collect();
        let pkts: Vec<(f64, f64)> = r
            .steps
            .iter()
            .map(|st| {
                (
                    px(st.subscribers as f64),
                    py(st.packets_per_second, pkt_max),
                )
            })
            .collect();
        polyline(&mut s, &cpu, color, "");
        polyline(&mut s, &pkts, color, r#" stroke-dasharray="6 4""#);
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="14" height="4" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            LEFT + 10.0 + 150.0 * i as f64,
            TOP - 14.0,
            LEFT + 30.0 + 150.0 * i as f64,
            TOP - 9.0,
            escape(&r.server)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn polyline(s: &mut String, pts: &[(f64, f64)], color: &str, extra: &str) {
    let points: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ = write!(
        s,
        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{extra}/>"#,
        points.join(" ")
    );
    for (x, y) in pts {
        let _ = write!(
            s,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#
        );
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_round_up() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(73.0), 100.0);
        assert_eq!(nice_max(180.0), 200.0);
        assert_eq!(nice_max(21_000.0), 25_000.0);
    }
}
