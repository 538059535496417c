//! The run-by-run tally (`--runs N`): issue 22 asks for "one proxy ≥ nft on
//! every figure, p99s included, in at least 8 of 10 runs". A best-of table
//! hides how often a scenario wins; the tally keeps each run's figures and
//! counts, per figure, the runs in which one scenario was at least as good
//! as another (ties count for it), with the median of the per-run ratios.
//! Pure arithmetic on [`Figures`], so that it is unit-tested apart from the
//! runs themselves.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::{Figures, PairedTails, TailQuantiles};

/// A figure the tally compares: (key, heading, higher is better, value).
pub type Figure = crate::report::Metric;

/// Every figure of the main table.
pub const ALL: &[Figure] = crate::report::METRICS;

/// A chain against nft's single proxy: the target names bulk and rr.
pub const BULK_RR: &[Figure] = &[("bulk_gb_per_s", "bulk", true, |f| f.bulk_gb_per_s), ("rr_per_s", "rr/s", true, |f| f.rr_per_s)];

/// One figure of one comparison over the runs.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct FigureTally {
    pub figure: String,
    pub higher_is_better: bool,
    /// Runs in which both scenarios had this figure.
    pub runs: usize,
    /// Of those, runs in which `scenario` was at least as good as `baseline`.
    pub at_least: usize,
    /// Median of the per-run ratios `scenario / baseline` (higher is better
    /// for conn/s, bulk, rr/s; lower for latencies and CPU per GB).
    pub median_ratio: f64,
    /// The per-run ratios, in run order.
    pub ratios: Vec<f64>,
}

/// `scenario` against `baseline` over the runs.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Comparison {
    pub scenario: String,
    pub baseline: String,
    pub figures: Vec<FigureTally>,
    /// Runs in which both ran, and of those the runs in which `scenario` was
    /// at least `baseline` on every figure compared at once.
    pub runs: usize,
    pub at_least_on_all: usize,
}

/// Whether `a` is at least as good as `b` for a figure.
pub fn at_least(a: f64, b: f64, higher_is_better: bool) -> bool {
    if higher_is_better {
        a >= b
    } else {
        a <= b
    }
}

/// The median (the mean of the two middle values for an even count); 0 for none.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    (s[(n - 1) / 2] + s[n / 2]) / 2.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One figure over the runs from its per-run (scenario, baseline) values;
/// a run whose values are not both positive (a failed test) counts for
/// nothing and clears that run's `all_ok`, as does a run the scenario lost.
fn figure_tally(key: &str, higher: bool, values: &[(f64, f64)], all_ok: &mut [bool]) -> FigureTally {
    let mut t = FigureTally { figure: key.into(), higher_is_better: higher, ..Default::default() };
    for (ok_all, &(x, y)) in all_ok.iter_mut().zip(values) {
        if y <= 0.0 || x <= 0.0 {
            *ok_all = false;
            continue;
        }
        t.runs += 1;
        let ok = at_least(x, y, higher);
        t.at_least += usize::from(ok);
        *ok_all &= ok;
        t.ratios.push(round3(x / y));
    }
    t.median_ratio = round3(median(&t.ratios));
    t
}

/// Compares `scenario` with `baseline` on `figures` over `runs` (each a map
/// scenario name → that run's figures). A run counts only where both
/// scenarios ran and the baseline's figure is not zero (a failed test).
pub fn compare(runs: &[BTreeMap<String, Figures>], scenario: &str, baseline: &str, figures: &[Figure]) -> Comparison {
    let mut c = Comparison { scenario: scenario.into(), baseline: baseline.into(), ..Default::default() };
    let pairs: Vec<(&Figures, &Figures)> = runs.iter().filter_map(|r| Some((r.get(scenario)?, r.get(baseline)?))).collect();
    let mut all_ok = vec![true; pairs.len()];
    for &(key, _, higher, get) in figures {
        let values: Vec<(f64, f64)> = pairs.iter().map(|(s, b)| (get(s), get(b))).collect();
        c.figures.push(figure_tally(key, higher, &values, &mut all_ok));
    }
    c.runs = pairs.len();
    c.at_least_on_all = all_ok.iter().filter(|&&ok| ok).count();
    c
}

/// `hooks` against `direct` on conn/s, per run: the median of that run's
/// alternating pairs where there are some (drift hits both sides alike),
/// else the ratio of the two scenarios' conn/s; with the runs at or above
/// `target`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct HooksTally {
    pub target: f64,
    pub ratios: Vec<f64>,
    pub at_target: usize,
    pub median_ratio: f64,
}

pub fn hooks_vs_direct(runs: &[BTreeMap<String, Figures>], target: f64) -> Option<HooksTally> {
    let mut t = HooksTally { target, ..Default::default() };
    for r in runs {
        let Some(h) = r.get("hooks") else { continue };
        let x = if !h.paired_conn_ratios.is_empty() {
            median(&h.paired_conn_ratios)
        } else {
            match r.get("direct") {
                Some(d) if d.conns_per_s > 0.0 => h.conns_per_s / d.conns_per_s,
                _ => continue,
            }
        };
        t.ratios.push(round3(x));
        t.at_target += usize::from(x >= target);
    }
    if t.ratios.is_empty() {
        return None;
    }
    t.median_ratio = round3(median(&t.ratios));
    Some(t)
}

/// A latency quantile of the paired tails: (key, value); lower is better.
type Quantile = (&'static str, fn(&TailQuantiles) -> f64);
const QUANTILES: &[Quantile] = &[
    ("connect_p50_us", |q| q.connect_p50_us),
    ("connect_p90_us", |q| q.connect_p90_us),
    ("connect_p99_us", |q| q.connect_p99_us),
    ("connect_p999_us", |q| q.connect_p999_us),
    ("first_byte_p50_us", |q| q.first_byte_p50_us),
    ("first_byte_p90_us", |q| q.first_byte_p90_us),
    ("first_byte_p99_us", |q| q.first_byte_p99_us),
    ("first_byte_p999_us", |q| q.first_byte_p999_us),
];

/// proxy1 against nft on the paired tails of each run (both measured in
/// alternating slices under the same load); `None` without any.
pub fn paired(tails: &[PairedTails]) -> Option<Comparison> {
    if tails.is_empty() {
        return None;
    }
    let mut c = Comparison { scenario: "proxy1 (paired)".into(), baseline: "nft (paired)".into(), runs: tails.len(), ..Default::default() };
    let mut all_ok = vec![true; tails.len()];
    for &(key, get) in QUANTILES {
        let values: Vec<(f64, f64)> = tails.iter().map(|p| (get(&p.proxy1), get(&p.nft))).collect();
        c.figures.push(figure_tally(key, false, &values, &mut all_ok));
    }
    c.at_least_on_all = all_ok.iter().filter(|&&ok| ok).count();
    Some(c)
}

/// Everything `--runs` reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Tally {
    pub runs: usize,
    pub comparisons: Vec<Comparison>,
    pub hooks_vs_direct: Option<HooksTally>,
}

/// The comparisons, those whose scenarios ran: proxy1 vs nft on
/// every figure, the chains (proxy2, proxy2a) vs nft on bulk and rr,
/// proxy1 vs nft on the paired tails, and hooks vs direct on conn/s
/// (target 0.97).
pub fn tally(runs: &[BTreeMap<String, Figures>], tails: &[PairedTails]) -> Tally {
    let ran = |s: &str| runs.iter().any(|r| r.contains_key(s));
    let mut t = Tally { runs: runs.len().max(tails.len()), ..Default::default() };
    if ran("nft") {
        for (s, figs) in [("proxy1", ALL), ("proxy1k", ALL), ("proxy2", BULK_RR), ("proxy2a", BULK_RR)] {
            if ran(s) {
                t.comparisons.push(compare(runs, s, "nft", figs));
            }
        }
    }
    t.comparisons.extend(paired(tails));
    t.hooks_vs_direct = hooks_vs_direct(runs, 0.97);
    t
}

/// The tally as text.
pub fn text(t: &Tally) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "run-by-run tally over {} run(s) (ties count as at least; ratio = scenario / baseline):", t.runs);
    for c in &t.comparisons {
        let _ = writeln!(s, "  {} vs {}:", c.scenario, c.baseline);
        for f in &c.figures {
            let _ = writeln!(
                s,
                "    {:<18} at least {} in {:>2} of {:>2} runs, median ratio {:.3}x ({}) {:?}",
                f.figure,
                c.baseline,
                f.at_least,
                f.runs,
                f.median_ratio,
                if f.higher_is_better { "higher is better" } else { "lower is better" },
                f.ratios
            );
        }
        let _ = writeln!(s, "    on every figure above at once: {} of {} runs", c.at_least_on_all, c.runs);
    }
    if let Some(h) = &t.hooks_vs_direct {
        let _ = writeln!(
            s,
            "  hooks vs direct conn/s (each run's paired median): >= {:.2}x in {} of {} runs, median {:.3}x {:?}",
            h.target,
            h.at_target,
            h.ratios.len(),
            h.median_ratio,
            h.ratios
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(name: &str, conns: f64, p99: f64, bulk: f64) -> Figures {
        Figures {
            scenario: name.into(),
            conns_per_s: conns,
            connect_p50_us: 50.0,
            connect_p99_us: p99,
            first_byte_p99_us: 2.0 * p99,
            bulk_gb_per_s: bulk,
            rr_per_s: 1000.0,
            cpu_s_per_gb: 1.0,
            ..Default::default()
        }
    }

    fn run(figs: Vec<Figures>) -> BTreeMap<String, Figures> {
        figs.into_iter().map(|f| (f.scenario.clone(), f)).collect()
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn at_least_follows_the_direction_and_counts_ties() {
        assert!(at_least(2.0, 1.0, true));
        assert!(at_least(1.0, 1.0, true));
        assert!(!at_least(1.0, 2.0, true));
        assert!(at_least(1.0, 2.0, false));
        assert!(at_least(2.0, 2.0, false));
        assert!(!at_least(2.0, 1.0, false));
    }

    #[test]
    fn counts_per_figure_and_on_all_at_once() {
        let runs = vec![
            // proxy1 ahead on conn/s, p99 shorter (better), bulk ahead: ahead on all.
            run(vec![fig("proxy1", 110.0, 90.0, 2.0), fig("nft", 100.0, 100.0, 1.0)]),
            // conn/s behind, p99 longer (worse), bulk tied.
            run(vec![fig("proxy1", 90.0, 120.0, 1.0), fig("nft", 100.0, 100.0, 1.0)]),
            // conn/s ahead, p99 longer: not on all.
            run(vec![fig("proxy1", 120.0, 150.0, 1.5), fig("nft", 100.0, 100.0, 1.0)]),
            // nft missing: not counted.
            run(vec![fig("proxy1", 120.0, 50.0, 1.5)]),
        ];
        let c = compare(&runs, "proxy1", "nft", ALL);
        assert_eq!(c.runs, 3);
        let get = |k: &str| c.figures.iter().find(|f| f.figure == k).unwrap().clone();
        let conns = get("conns_per_s");
        assert_eq!((conns.runs, conns.at_least), (3, 2));
        assert_eq!(conns.ratios, vec![1.1, 0.9, 1.2]);
        assert_eq!(conns.median_ratio, 1.1);
        let p99 = get("connect_p99_us");
        assert_eq!(p99.at_least, 1);
        assert_eq!(p99.median_ratio, 1.2);
        assert!(!p99.higher_is_better);
        // The first-byte p99 follows the connect p99 in these figures.
        assert_eq!(get("first_byte_p99_us").at_least, 1);
        let bulk = get("bulk_gb_per_s");
        assert_eq!(bulk.at_least, 3, "a tie counts as at least");
        assert_eq!(bulk.median_ratio, 1.5);
        // Equal p50, rr/s, CPU: ties everywhere.
        assert_eq!(get("rr_per_s").at_least, 3);
        assert_eq!(c.at_least_on_all, 1);
    }

    #[test]
    fn a_failed_figure_is_no_win() {
        let runs = vec![run(vec![fig("proxy2", 100.0, 90.0, 0.0), fig("nft", 100.0, 100.0, 1.0)])];
        let c = compare(&runs, "proxy2", "nft", BULK_RR);
        assert_eq!(c.figures[0].runs, 0);
        assert_eq!(c.figures[0].at_least, 0);
        assert_eq!(c.figures[1].at_least, 1);
        assert_eq!(c.at_least_on_all, 0);
    }

    #[test]
    fn hooks_uses_the_paired_median_else_the_table() {
        let mut h1 = fig("hooks", 95.0, 1.0, 1.0);
        h1.paired_conn_ratios = vec![0.96, 1.0, 0.99, 0.90];
        let runs = vec![
            run(vec![h1, fig("direct", 100.0, 1.0, 1.0)]),
            run(vec![fig("hooks", 96.0, 1.0, 1.0), fig("direct", 100.0, 1.0, 1.0)]),
            run(vec![fig("hooks", 99.0, 1.0, 1.0), fig("direct", 100.0, 1.0, 1.0)]),
        ];
        let h = hooks_vs_direct(&runs, 0.97).unwrap();
        assert_eq!(h.ratios, vec![0.975, 0.96, 0.99]);
        assert_eq!(h.at_target, 2);
        assert_eq!(h.median_ratio, 0.975);
        assert!(hooks_vs_direct(&[run(vec![fig("direct", 1.0, 1.0, 1.0)])], 0.97).is_none());
    }

    #[test]
    fn paired_tails_count_lower_as_better() {
        let q = |c: Vec<f64>| TailQuantiles::of(c.clone(), c.iter().map(|x| x * 4.0).collect());
        let hundred = |at: f64| (1..=100).map(|i| if i == 100 { at } else { i as f64 }).collect::<Vec<_>>();
        // p99 of 1..=99 plus one outlier: the 99th value (index 98 of 0..99) is 99 whatever the outlier;
        // the p99.9 is the outlier.
        let tails = vec![
            PairedTails { proxy1: q(hundred(500.0)), nft: q(hundred(1000.0)), ..Default::default() },
            PairedTails { proxy1: q(hundred(2000.0)), nft: q(hundred(1000.0)), ..Default::default() },
        ];
        assert_eq!(tails[0].proxy1.connect_p99_us, 99.0);
        assert_eq!(tails[0].proxy1.connect_p999_us, 500.0);
        assert_eq!(tails[0].proxy1.first_byte_p999_us, 2000.0);
        let c = paired(&tails).unwrap();
        let get = |k: &str| c.figures.iter().find(|f| f.figure == k).unwrap().clone();
        let p99 = get("connect_p99_us");
        assert_eq!((p99.runs, p99.at_least, p99.median_ratio), (2, 2, 1.0), "ties count");
        let p999 = get("first_byte_p999_us");
        assert_eq!(p999.ratios, vec![0.5, 2.0]);
        assert_eq!(p999.at_least, 1);
        assert_eq!(c.at_least_on_all, 1);
        assert!(paired(&[]).is_none());
        let t = tally(&[], &tails);
        assert_eq!(t.runs, 2);
        assert_eq!(t.comparisons.len(), 1);
    }

    #[test]
    fn tally_names_only_what_ran() {
        let runs = vec![run(vec![fig("proxy1", 1.0, 1.0, 1.0), fig("proxy2", 1.0, 1.0, 1.0), fig("nft", 1.0, 1.0, 1.0)])];
        let t = tally(&runs, &[]);
        let names: Vec<&str> = t.comparisons.iter().map(|c| c.scenario.as_str()).collect();
        assert_eq!(names, ["proxy1", "proxy2"]);
        assert_eq!(t.comparisons[1].figures.len(), 2);
        assert!(t.hooks_vs_direct.is_none());
        assert!(text(&t).contains("on every figure above at once: 1 of 1 runs"));
    }
}
