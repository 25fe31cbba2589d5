//! The eval's plots as PNG (plotters), CLaaS's five, each skipped when it has no data:
//! `logprob_margins.png`, `learning_curves.png`, `collapse_dashboard.png` (entropy ratio,
//! self-ROUGE-L, log-prob drift), `forgetting.png` and `sdpo_diagnostics.png` (distill loss
//! and KL regulariser).
//!
//! Text needs a TrueType font: the first of the usual system fonts found (DejaVu Sans,
//! Liberation Sans, or `CLAAS_PLOT_FONT`); without one, plots are skipped with a reason.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::results::StepResult;

/// One line: a label and its (step, value) points.
pub type Series = (String, Vec<(f64, f64)>);

/// One panel: its y label, its y range (none: the data's) and its lines.
type Panel<'a> = (&'a str, Option<(f64, f64)>, Vec<Series>);

const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers a system font as plotters' `sans-serif` once; the reason when there is none.
fn font() -> Result<(), String> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let custom = std::env::var("CLAAS_PLOT_FONT").ok();
            let path = custom
                .iter()
                .map(String::as_str)
                .chain(FONT_CANDIDATES)
                .find(|p| Path::new(p).is_file())
                .ok_or("no TrueType font found (set CLAAS_PLOT_FONT to a .ttf file)")?;
            let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path}: not a usable TrueType font"))
        })
        .clone()
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Draws line panels side by side into `path`: each panel a title, a y label, a y range
/// (or the data's) and its series.
fn panels(path: &Path, title: &str, panels: &[Panel]) -> Result<(), String> {
    let width = 640 * panels.len() as u32;
    let root = BitMapBackend::new(path, (width, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, (label, range, series)) in areas.iter().zip(panels) {
        let points = series.iter().flat_map(|(_, p)| p.iter());
        let (mut x_hi, mut y_lo, mut y_hi) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
        for (x, y) in points {
            x_hi = x_hi.max(*x);
            y_lo = y_lo.min(*y);
            y_hi = y_hi.max(*y);
        }
        let (y_lo, y_hi) = match range {
            Some(r) => *r,
            None if y_lo.is_finite() => {
                let pad = ((y_hi - y_lo) * 0.1).max(1e-3);
                (y_lo - pad, y_hi + pad)
            }
            None => (0.0, 1.0),
        };
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x_hi, y_lo..y_hi)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(*label)
            .draw()
            .map_err(err)?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// The series of one value per step for each preference, leaving out steps without it.
fn per_preference(
    runs: &[(String, Vec<StepResult>)],
    value: impl Fn(&StepResult) -> Option<f64>,
) -> Vec<Series> {
    runs.iter()
        .map(|(name, steps)| {
            let pts = steps
                .iter()
                .filter_map(|s| value(s).map(|v| (f64::from(s.step), v)))
                .collect();
            (name.clone(), pts)
        })
        .filter(|(_, pts): &Series| !pts.is_empty())
        .collect()
}

/// Draws every plot that has data into `dir`; returns the files written.
pub fn draw_all(dir: &Path, runs: &[(String, Vec<StepResult>)]) -> Result<Vec<PathBuf>, String> {
    font()?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut written = Vec::new();
    let mut plot = |file: &str, title: &str, p: Vec<Panel>| {
        if p.iter().all(|(_, _, s)| s.is_empty()) {
            return Ok(());
        }
        let path = dir.join(file);
        panels(&path, title, &p)?;
        written.push(path);
        Ok::<(), String>(())
    };
    let margin = per_preference(runs, |s| s.eval.logprob_margin.as_ref().map(|m| m.margin));
    plot(
        "logprob_margins.png",
        "Log-prob margin (preferred − dispreferred)",
        vec![("margin", None, margin)],
    )?;
    let compliance = per_preference(runs, |s| s.eval.preference_compliance);
    plot(
        "learning_curves.png",
        "Preference compliance",
        vec![("compliance", Some((-0.05, 1.05)), compliance)],
    )?;
    let collapse = |f: fn(&crate::results::CollapseMetrics) -> f64| {
        per_preference(runs, move |s| s.eval.collapse.as_ref().map(f))
    };
    plot(
        "collapse_dashboard.png",
        "Collapse signals",
        vec![
            (
                "entropy ratio to baseline",
                None,
                collapse(|c| c.entropy_ratio_to_baseline),
            ),
            (
                "self-ROUGE-L",
                Some((0.0, 1.0)),
                collapse(|c| c.self_rouge_l),
            ),
            ("log-prob drift", None, collapse(|c| c.mean_logprob_drift)),
        ],
    )?;
    let general = per_preference(runs, |s| s.eval.general.as_ref().map(|g| g.general_score));
    plot(
        "forgetting.png",
        "General capability",
        vec![("general score", Some((-0.05, 1.05)), general)],
    )?;
    let sdpo = |key: &'static str| per_preference(runs, move |s| s.sdpo_metrics[key].as_f64());
    plot(
        "sdpo_diagnostics.png",
        "SDPO diagnostics",
        vec![
            ("distill loss", None, sdpo("distill_loss")),
            ("KL regulariser", None, sdpo("kl_reg")),
        ],
    )?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{CollapseMetrics, EvalMetrics};

    fn step(i: u32) -> StepResult {
        StepResult {
            preference: "p".into(),
            step: i,
            timestamp: String::new(),
            feedback_given: String::new(),
            sdpo_metrics: serde_json::json!({"distill_loss": 1.0 / f64::from(i + 1), "kl_reg": 0.01}),
            eval: EvalMetrics {
                preference_compliance: Some(f64::from(i) / 3.0),
                collapse: i.is_multiple_of(2).then(|| CollapseMetrics {
                    entropy_ratio_to_baseline: 1.0,
                    self_rouge_l: 0.2,
                    ..Default::default()
                }),
                ..Default::default()
            },
            prompt_used: String::new(),
            response_text: None,
            timing_s: 0.0,
            sub_step_count: 1,
        }
    }

    #[test]
    fn plots_with_data_are_written_as_pngs_and_the_rest_skipped() {
        if let Err(why) = font() {
            panic!("plots need a font on this machine: {why}");
        }
        let dir = claas_testutil::tempdir("plots");
        let runs = vec![("no_emoji".to_string(), (0..4).map(step).collect::<Vec<_>>())];
        let written = draw_all(&dir, &runs).expect("plots");
        let names: Vec<_> = written
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        // No logprob margins and no general scores in these steps: those two are skipped.
        assert_eq!(
            names,
            [
                "learning_curves.png",
                "collapse_dashboard.png",
                "sdpo_diagnostics.png"
            ]
        );
        for p in &written {
            let img = image::open(p).expect("a PNG that decodes");
            assert!(img.width() >= 640 && img.height() == 420, "{}", p.display());
        }
    }
}
