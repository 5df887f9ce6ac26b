//! The latency-percentile plot of `loadgen report`, as hand-written SVG.
//!
//! It is HdrHistogram's classic percentile-distribution chart: x is the
//! percentile on a log scale of 1 / (1 − p) from 0 to 99.999 %, so the tail
//! gets as much room as the median; one line per result. The y axis
//! (latency) is logarithmic too, because results worth comparing side by
//! side (one message in flight vs. a saturated fan-out) differ by orders of
//! magnitude. This module also reads the histogram out of an `--hdr-log`
//! file (HdrHistogram interval log, base64 of V2-deflate histograms).

use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;

use crate::stats::new_histogram;

/// Rightmost percentile plotted: 1 / (1 − p) = 10^5.
const MAX_NINES: f64 = 5.0;
/// Points per line.
const STEPS: usize = 200;
const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 560.0;
/// Plot area inside the margins.
const LEFT: f64 = 80.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// x of percentile tick `nines` (0 = 0 %, 1 = 90 %, 2 = 99 %, ...).
fn nines_label(nines: u32) -> String {
    match nines {
        0 => "0%".into(),
        1 => "90%".into(),
        2 => "99%".into(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)),
    }
}

/// Microseconds as a short label: 1 µs, 10 ms, 2 s.
fn latency_label(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{} ms", us / 1e3)
    } else {
        format!("{us} µs")
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The (log10 of 1 / (1 − p), latency µs) points of one histogram.
pub fn percentile_points(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    (0..=STEPS)
        .map(|i| {
            let nines = MAX_NINES * i as f64 / STEPS as f64;
            let quantile = 1.0 - 10f64.powf(-nines);
            (nines, h.value_at_quantile(quantile).max(1))
        })
        .collect()
}

/// An SVG percentile plot of `lines` (label, histogram); empty histograms
/// are left out. `None` when nothing is left to plot.
pub fn svg(title: &str, lines: &[(String, Histogram<u64>)]) -> Option<String> {
    let lines: Vec<_> = lines.iter().filter(|(_, h)| !h.is_empty()).collect();
    let highest = lines.iter().map(|(_, h)| h.max()).max()?;
    let lowest = lines.iter().map(|(_, h)| h.min().max(1)).min()?;
    // Whole decades around the data.
    let y_low = (lowest as f64).log10().floor();
    let y_high = ((highest as f64).log10().ceil()).max(y_low + 1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_of = |nines: f64| LEFT + nines / MAX_NINES * plot_w;
    let y_of = |us: f64| TOP + plot_h - (us.max(1.0).log10() - y_low) / (y_high - y_low) * plot_h;

    let mut s = String::new();
    s.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    ));
    s.push_str(&format!(
        "<rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"28\" text-anchor=\"middle\" font-size=\"16\">{}</text>\n",
        LEFT + plot_w / 2.0,
        escape(title)
    ));
    // Grid and ticks.
    s.push_str("<g class=\"x-axis\" stroke=\"#ddd\">\n");
    for nines in 0..=MAX_NINES as u32 {
        let x = x_of(f64::from(nines));
        s.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{:.1}\"/>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" stroke=\"none\" fill=\"black\">{}</text>\n",
            TOP + plot_h,
            TOP + plot_h + 18.0,
            nines_label(nines)
        ));
    }
    s.push_str("</g>\n<g class=\"y-axis\" stroke=\"#ddd\">\n");
    for decade in y_low as i32..=y_high as i32 {
        let us = 10f64.powi(decade);
        let y = y_of(us);
        s.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" stroke=\"none\" fill=\"black\">{}</text>\n",
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            latency_label(us)
        ));
    }
    s.push_str("</g>\n");
    s.push_str(&format!(
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"black\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>\n\
         <text x=\"18\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {:.1})\">latency (log scale)</text>\n",
        LEFT + plot_w / 2.0,
        HEIGHT - 18.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    ));
    // One line per result, and its legend entry.
    for (i, (label, h)) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = percentile_points(h)
            .iter()
            .map(|(nines, us)| format!("{:.1},{:.1}", x_of(*nines), y_of(*us as f64)))
            .collect();
        s.push_str(&format!(
            "<polyline class=\"series\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n",
            points.join(" ")
        ));
        let y = TOP + 10.0 + 20.0 * i as f64;
        let x = WIDTH - RIGHT + 15.0;
        s.push_str(&format!(
            "<g class=\"legend\"><line x1=\"{x}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{colour}\" stroke-width=\"3\"/>\
             <text x=\"{}\" y=\"{}\">{}</text></g>\n",
            x + 20.0,
            x + 26.0,
            y + 4.0,
            escape(label)
        ));
    }
    s.push_str("</svg>\n");
    Some(s)
}

/// Standard base64 (with padding; whitespace ignored), as HdrHistogram
/// logs encode histograms.
fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let body = clean
        .strip_suffix(b"==")
        .or_else(|| clean.strip_suffix(b"="))
        .unwrap_or(&clean);
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in body {
        let v = value(c).ok_or_else(|| format!("not base64: byte {c:#04x}"))?;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// The histogram of an `--hdr-log` file: every interval in it, added up.
pub fn histogram_from_log(text: &str) -> Result<Histogram<u64>, String> {
    let mut total = new_histogram();
    let mut intervals = 0;
    for entry in IntervalLogIterator::new(text.as_bytes()) {
        let entry = entry.map_err(|e| format!("not an HdrHistogram interval log: {e:?}"))?;
        if let LogEntry::Interval(interval) = entry {
            let bytes = base64_decode(interval.encoded_histogram())?;
            let h: Histogram<u64> = Deserializer::new()
                .deserialize(&mut bytes.as_slice())
                .map_err(|e| format!("cannot decode an interval's histogram: {e:?}"))?;
            total.add(h).map_err(|e| format!("cannot add intervals: {e:?}"))?;
            intervals += 1;
        }
    }
    if intervals == 0 {
        return Err("the log holds no histogram".into());
    }
    Ok(total)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A minimal XML well-formedness check: every tag closes in order,
    /// attributes are quoted, text holds no raw `<` or stray `&`.
    pub fn check_xml(doc: &str) -> Result<Vec<String>, String> {
        let mut stack: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        let mut rest = doc;
        while let Some(open) = rest.find('<') {
            check_text(&rest[..open])?;
            let close = rest[open..].find('>').ok_or("unclosed tag")? + open;
            let tag = &rest[open + 1..close];
            rest = &rest[close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let top = stack.pop().ok_or(format!("</{name}> closes nothing"))?;
                if top != name.trim() {
                    return Err(format!("</{name}> closes <{top}>"));
                }
                continue;
            }
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let name = tag.split_whitespace().next().ok_or("empty tag")?.to_string();
            check_attributes(&tag[name.len()..])?;
            seen.push(name.clone());
            if !self_closing {
                stack.push(name);
            }
        }
        check_text(rest)?;
        match stack.pop() {
            Some(open) => Err(format!("<{open}> never closed")),
            None => Ok(seen),
        }
    }

    fn check_text(text: &str) -> Result<(), String> {
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..];
            let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                .iter()
                .any(|e| entity.starts_with(e));
            if !ok {
                return Err(format!("stray & in {text:?}"));
            }
        }
        Ok(())
    }

    fn check_attributes(mut attrs: &str) -> Result<(), String> {
        loop {
            attrs = attrs.trim_start();
            if attrs.is_empty() {
                return Ok(());
            }
            let eq = attrs
                .find('=')
                .ok_or(format!("attribute without value: {attrs}"))?;
            let value = attrs[eq + 1..]
                .strip_prefix('"')
                .ok_or(format!("unquoted attribute: {attrs}"))?;
            let end = value.find('"').ok_or("unterminated attribute")?;
            check_text(&value[..end])?;
            if value[..end].contains('<') {
                return Err("< in an attribute".into());
            }
            attrs = &value[end + 1..];
        }
    }

    fn histogram(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = new_histogram();
        for v in values {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn the_plot_is_well_formed_with_a_line_and_legend_per_result() {
        let lines = vec![
            ("pairs <w1> & co".to_string(), histogram(1..=10_000)),
            ("groups".to_string(), histogram((1..=1000).map(|v| v * 1000))),
            ("empty".to_string(), new_histogram()),
        ];
        let doc = svg("latency \"by\" percentile", &lines).unwrap();
        let tags = check_xml(&doc).unwrap();
        assert_eq!(tags.first().map(String::as_str), Some("svg"));
        assert_eq!(
            doc.matches("<polyline class=\"series\"").count(),
            2,
            "empty left out"
        );
        assert_eq!(doc.matches("<g class=\"legend\">").count(), 2);
        assert!(doc.contains("pairs &lt;w1&gt; &amp; co"));
        for label in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "1 µs", "1 s"] {
            assert!(doc.contains(&format!(">{label}</text>")), "no tick {label}");
        }
        assert!(svg("nothing", &[("e".into(), new_histogram())]).is_none());
        assert!(check_xml("<a><b></a></b>").is_err());
        assert!(check_xml("<a x=1/>").is_err());
        assert!(check_xml("<a>&</a>").is_err());
    }

    #[test]
    fn points_climb_to_the_tail() {
        let points = percentile_points(&histogram(1..=100_000));
        assert_eq!(points.len(), STEPS + 1);
        assert_eq!(points[0].0, 0.0);
        assert!((points[STEPS].0 - MAX_NINES).abs() < 1e-9);
        assert!(points.windows(2).all(|w| w[0].1 <= w[1].1));
        // 90th percentile at x = 1.
        let p90 = points.iter().find(|(x, _)| (*x - 1.0).abs() < 1e-9).unwrap().1;
        assert!((89_900..=90_100).contains(&p90), "{p90}");
    }

    #[test]
    fn hdr_logs_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lat.hlog");
        let h = histogram([5, 50, 500, 5000]);
        crate::report::write_hdr_log(&path, &h, 2.0).unwrap();
        let back = histogram_from_log(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back.max(), h.max());
        assert!(histogram_from_log("#nothing here\n").is_err());
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert!(base64_decode("a$==").is_err());
    }
}
