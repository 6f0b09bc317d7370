//! The training curves as PNG and SVG: train loss, train acc and test acc against epoch, like
//! d2l's `Animator` figure; and the same series of several runs overlaid, for reports.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Result, TrainError};
use crate::metrics::MetricsRecord;

/// The series, as (epoch, value) points.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curves {
    /// Running training loss (about five points per epoch).
    pub train_loss: Vec<(f64, f64)>,
    /// Running training accuracy.
    pub train_acc: Vec<(f64, f64)>,
    /// Test accuracy, once per epoch.
    pub test_acc: Vec<(f64, f64)>,
    /// Validation accuracy, once per epoch, when the run held out a validation split.
    pub val_acc: Vec<(f64, f64)>,
    /// The epoch after which the run stopped early, if it did.
    pub early_stop: Option<f64>,
    /// Test accuracy milestones reached: (accuracy, epoch, wall-clock seconds).
    pub time_to_accuracy: Vec<(f64, f64, f64)>,
}

impl Curves {
    /// Collects the series from the metrics history.
    pub fn from_history(history: &[MetricsRecord]) -> Self {
        let mut c = Curves::default();
        for r in history {
            match r {
                MetricsRecord::Step { epoch, train_loss, train_acc, .. } => {
                    c.train_loss.push((*epoch, *train_loss));
                    c.train_acc.push((*epoch, *train_acc));
                }
                MetricsRecord::Epoch(m) => c.test_acc.push((m.epoch as f64, m.test_acc)),
                MetricsRecord::EarlyStop(_) => {}
                MetricsRecord::TimeToAccuracy(t) => {
                    c.time_to_accuracy.push((t.test_acc, t.epoch as f64, t.wall_seconds))
                }
            }
        }
        c
    }

    /// Reads the series from `metrics.jsonl` text, leniently: records are taken by their
    /// `kind` (`step`, `epoch`, `early_stop`) and fields, so files from runs with validation
    /// splits or early stopping read as well as plain ones. A line that is not JSON is an error
    /// naming its (1-based) number.
    pub fn from_jsonl(text: &str) -> std::result::Result<Self, String> {
        let mut c = Curves::default();
        let num = |v: &serde_json::Value, key: &str| v.get(key).and_then(serde_json::Value::as_f64);
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
            let Some(epoch) = num(&v, "epoch") else {
                continue;
            };
            match v.get("kind").and_then(serde_json::Value::as_str) {
                Some("step") => {
                    if let (Some(loss), Some(acc)) = (num(&v, "train_loss"), num(&v, "train_acc")) {
                        c.train_loss.push((epoch, loss));
                        c.train_acc.push((epoch, acc));
                    }
                }
                Some("epoch") => {
                    if let Some(acc) = num(&v, "test_acc") {
                        c.test_acc.push((epoch, acc));
                    }
                    if let Some(acc) = num(&v, "val_acc") {
                        c.val_acc.push((epoch, acc));
                    }
                }
                Some("early_stop") => c.early_stop = Some(epoch),
                Some("time_to_accuracy") => {
                    if let (Some(acc), Some(secs)) = (num(&v, "test_acc"), num(&v, "wall_seconds")) {
                        c.time_to_accuracy.push((acc, epoch, secs));
                    }
                }
                _ => {}
            }
        }
        Ok(c)
    }

    /// The last epoch any series reaches.
    pub fn epochs(&self) -> f64 {
        [&self.train_loss, &self.train_acc, &self.test_acc, &self.val_acc]
            .iter()
            .flat_map(|s| s.iter().map(|p| p.0))
            .fold(0.0, f64::max)
    }
}

/// One run's curves under a label, for [`draw_overlay`].
#[derive(Debug, Clone, Copy)]
pub struct Labelled<'a> {
    /// The name shown in the legend (usually the run directory).
    pub label: &'a str,
    /// The run's series.
    pub curves: &'a Curves,
}

/// A named line of (epoch, value) points and its colour.
type Series<'a> = (&'static str, &'a [(f64, f64)], RGBColor);

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // Bundled DejaVu Sans, so plots render the same on machines without fonts installed.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// A temporary sibling of `p` for an atomic write; the bitmap encoder picks the format from the
/// extension, so the temporary keeps it.
pub(crate) fn temporary(p: &Path, ext: &str) -> std::path::PathBuf {
    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("figure");
    p.with_file_name(format!(".{stem}.{}.tmp.{ext}", std::process::id()))
}

/// Draws a PNG of `size` to a temporary name with `draw`, then renames it to `png`.
pub(crate) fn png_atomic(
    png: &Path,
    size: (u32, u32),
    draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> std::result::Result<(), String>,
) -> Result<()> {
    register_font();
    let tmp = temporary(png, "png");
    let drawn = draw(BitMapBackend::new(&tmp, size).into_drawing_area());
    if let Err(reason) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(TrainError::Plot { path: png.to_path_buf(), reason });
    }
    std::fs::rename(&tmp, png).map_err(|source| TrainError::Io { path: png.to_path_buf(), source })
}

/// Draws the curves to `png` and `svg` (each written to a temporary name, then renamed).
pub fn draw(curves: &Curves, epochs: usize, png: &Path, svg: &Path) -> Result<()> {
    register_font();
    let (tmp_png, tmp_svg) = (temporary(png, "png"), temporary(svg, "svg"));
    let result = (|| {
        {
            let root = BitMapBackend::new(&tmp_png, (700, 450)).into_drawing_area();
            chart(root, curves, epochs).map_err(|reason| TrainError::Plot { path: png.to_path_buf(), reason })?;
        }
        {
            let root = SVGBackend::new(&tmp_svg, (700, 450)).into_drawing_area();
            chart(root, curves, epochs).map_err(|reason| TrainError::Plot { path: svg.to_path_buf(), reason })?;
        }
        for (tmp, dst) in [(&tmp_png, png), (&tmp_svg, svg)] {
            std::fs::rename(tmp, dst).map_err(|source| TrainError::Io { path: dst.to_path_buf(), source })?;
        }
        Ok(())
    })();
    if result.is_err() {
        // A failed plot (a full disk, say) must not leave its half-written temporaries behind.
        for tmp in [&tmp_png, &tmp_svg] {
            let _ = std::fs::remove_file(tmp);
        }
    }
    result
}

fn chart<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    c: &Curves,
    epochs: usize,
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let y_max = c.train_loss.iter().map(|p| p.1).fold(1.0f64, f64::max).min(10.0) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..epochs.max(1) as f64, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("epoch").light_line_style(WHITE.mix(0.0)).draw().map_err(|e| err(&e))?;
    let series: [Series; 3] = [
        ("train loss", &c.train_loss[..], RGBColor(31, 119, 180)),
        ("train acc", &c.train_acc[..], RGBColor(214, 39, 40)),
        ("test acc", &c.test_acc[..], RGBColor(44, 160, 44)),
    ];
    for (name, points, color) in series {
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if points.len() == 1 {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// Colours of successive runs in overlays (matplotlib's first ten).
pub(crate) const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Several runs' curves as one PNG of two panels: train loss on the left; on the right test
/// accuracy (solid), train accuracy (dashed) and validation accuracy (dotted, when recorded).
/// Each run has its own colour; an early stop is a vertical line in it.
pub fn draw_overlay(runs: &[Labelled<'_>], png: &Path) -> Result<()> {
    png_atomic(png, (1000, 420), |root| overlay(root, runs))
}

fn overlay<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    runs: &[Labelled<'_>],
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let epochs = runs.iter().map(|r| r.curves.epochs()).fold(1.0, f64::max).ceil();
    let (left, right) = root.split_horizontally(500);
    let loss_max =
        runs.iter().flat_map(|r| r.curves.train_loss.iter().map(|p| p.1)).fold(0.1f64, f64::max).min(10.0) * 1.05;
    let colour = |i: usize| PALETTE.get(i % PALETTE.len()).copied().unwrap_or(BLACK);
    {
        let mut chart = ChartBuilder::on(&left)
            .caption("train loss", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..epochs, 0f64..loss_max)
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("epoch").light_line_style(WHITE.mix(0.0)).draw().map_err(|e| err(&e))?;
        for (i, run) in runs.iter().enumerate() {
            let c = colour(i);
            chart
                .draw_series(LineSeries::new(run.curves.train_loss.iter().copied(), c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(run.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            if let Some(stop) = run.curves.early_stop {
                chart
                    .draw_series(DashedLineSeries::new([(stop, 0.0), (stop, loss_max)], 4, 4, c.stroke_width(1)))
                    .map_err(|e| err(&e))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    let acc_min = runs
        .iter()
        .flat_map(|r| [&r.curves.train_acc, &r.curves.test_acc, &r.curves.val_acc])
        .flat_map(|s| s.iter().map(|p| p.1))
        .fold(1.0f64, f64::min);
    let acc_min = ((acc_min - 0.02) * 10.0).floor().clamp(0.0, 9.0) / 10.0;
    let mut chart = ChartBuilder::on(&right)
        .caption("accuracy (test solid, train dashed, val dotted)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..epochs, acc_min..1.0)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("epoch").light_line_style(WHITE.mix(0.0)).draw().map_err(|e| err(&e))?;
    for (i, run) in runs.iter().enumerate() {
        let c = colour(i);
        let curves = run.curves;
        chart.draw_series(LineSeries::new(curves.test_acc.iter().copied(), c.stroke_width(2))).map_err(|e| err(&e))?;
        chart.draw_series(curves.test_acc.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(|e| err(&e))?;
        chart
            .draw_series(DashedLineSeries::new(curves.train_acc.iter().copied(), 6, 4, c.stroke_width(1)))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(DashedLineSeries::new(curves.val_acc.iter().copied(), 2, 3, c.stroke_width(2)))
            .map_err(|e| err(&e))?;
        if let Some(stop) = curves.early_stop {
            chart
                .draw_series(DashedLineSeries::new([(stop, acc_min), (stop, 1.0)], 4, 4, c.stroke_width(1)))
                .map_err(|e| err(&e))?
                .label(format!("{}: early stop", run.label))
                .legend(move |(x, y)| PathElement::new(vec![(x + 10, y - 6), (x + 10, y + 6)], c.stroke_width(1)));
        }
    }
    if runs.iter().any(|r| r.curves.early_stop.is_some()) {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::EpochMetrics;

    #[test]
    fn draws_png_and_svg() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let m = |e: usize, acc: f64| {
            MetricsRecord::Epoch(EpochMetrics {
                epoch: e,
                train_loss: 0.5,
                train_acc: 0.8,
                test_acc: acc,
                val_acc: None,
                examples_per_sec: 1.0,
                examples: 1,
                step_seconds: 1.0,
                wall_seconds: 1.0,
                lr: 0.1,
            })
        };
        let step = |e: f64| MetricsRecord::Step { epoch: e, train_loss: 1.0 / e, train_acc: 0.5 + e / 10.0, lr: 0.1 };
        let history = vec![step(0.5), step(1.0), m(1, 0.7), step(1.5), step(2.0), m(2, 0.8)];
        let curves = Curves::from_history(&history);
        assert_eq!((curves.train_loss.len(), curves.test_acc.len()), (4, 2));
        let (png, svg) = (dir.path().join("c.png"), dir.path().join("c.svg"));
        draw(&curves, 2, &png, &svg)?;
        let png_bytes = std::fs::read(&png)?;
        assert_eq!(&png_bytes[1..4], b"PNG");
        let svg_text = std::fs::read_to_string(&svg)?;
        assert!(svg_text.contains("<svg") && svg_text.contains("test acc"), "legend missing");
        Ok(())
    }

    #[test]
    fn a_failed_plot_leaves_no_temporary_file() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let curves =
            Curves::from_history(&[MetricsRecord::Step { epoch: 1.0, train_loss: 1.0, train_acc: 0.5, lr: 0.1 }]);
        // A folder where the SVG must go: its rename fails after both files were drawn.
        let (png, svg) = (dir.path().join("c.png"), dir.path().join("c.svg"));
        std::fs::create_dir(&svg)?;
        assert!(draw(&curves, 1, &png, &svg).is_err());
        let mut names: Vec<String> = std::fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        assert_eq!(names, ["c.png", "c.svg"], "temporaries left behind");
        Ok(())
    }

    #[test]
    fn jsonl_reads_validation_and_early_stop_records() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let text = concat!(
            "{\"kind\":\"step\",\"epoch\":0.5,\"train_loss\":2.0,\"train_acc\":0.3,\"lr\":0.1}\n",
            "{\"kind\":\"epoch\",\"epoch\":1,\"train_loss\":1.5,\"train_acc\":0.4,\"test_acc\":0.5,\"val_acc\":0.55}\n",
            "\n",
            "{\"kind\":\"epoch\",\"epoch\":2,\"test_acc\":0.6}\n",
            "{\"kind\":\"early_stop\",\"epoch\":2,\"best_epoch\":1}\n",
            "{\"kind\":\"something_new\",\"epoch\":3}\n",
        );
        let c = Curves::from_jsonl(text)?;
        assert_eq!((c.train_loss, c.train_acc), (vec![(0.5, 2.0)], vec![(0.5, 0.3)]));
        assert_eq!(c.test_acc, vec![(1.0, 0.5), (2.0, 0.6)]);
        assert_eq!(c.val_acc, vec![(1.0, 0.55)]);
        assert_eq!(c.early_stop, Some(2.0));
        let err = Curves::from_jsonl("{\"kind\":\"step\"}\nnot json\n").err().unwrap_or_default();
        assert!(err.starts_with("line 2"), "{err}");
        Ok(())
    }
}
