//! The training curves as PNG and SVG: train loss, train acc and test acc against epoch, like
//! d2l's `Animator` figure.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Result, TrainError};
use crate::metrics::MetricsRecord;

/// The three series, as (epoch, value) points.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curves {
    /// Running training loss (about five points per epoch).
    pub train_loss: Vec<(f64, f64)>,
    /// Running training accuracy.
    pub train_acc: Vec<(f64, f64)>,
    /// Test accuracy, once per epoch.
    pub test_acc: Vec<(f64, f64)>,
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
            }
        }
        c
    }
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

/// Draws the curves to `png` and `svg` (each written to a temporary name, then renamed).
pub fn draw(curves: &Curves, epochs: usize, png: &Path, svg: &Path) -> Result<()> {
    register_font();
    // The bitmap encoder picks the format from the extension, so temporaries keep theirs.
    let tmp = |p: &Path, ext: &str| {
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("curves");
        p.with_file_name(format!(".{stem}.{}.tmp.{ext}", std::process::id()))
    };
    let (tmp_png, tmp_svg) = (tmp(png, "png"), tmp(svg, "svg"));
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
}
