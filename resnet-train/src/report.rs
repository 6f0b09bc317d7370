//! The report: one self-contained HTML page comparing runs (curves overlaid, confusion matrix as
//! a heat map, per-class accuracy, the most confident mistakes), with each figure also written
//! as a PNG file beside it. Nothing on the page is fetched when it is viewed: the figures are
//! inline `data:` URIs and the style is in the page.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use resnet_data::Split;

use crate::error::{Result, TrainError};
use crate::metrics::{Confusion, ACCURACY_MILESTONES};
use crate::plot::{self, Curves, Labelled};
use crate::run_dir::files;

/// File names the report writes into its directory.
pub mod report_files {
    /// The page.
    pub const HTML: &str = "index.html";
    /// The runs' curves overlaid.
    pub const CURVES: &str = "curves.png";
    /// The confusion matrix heat map.
    pub const CONFUSION: &str = "confusion.png";
    /// Per-class accuracy bars.
    pub const PER_CLASS: &str = "per_class.png";
    /// The grid of the most confident mistakes.
    pub const MISTAKES: &str = "mistakes.png";
}

/// One run as the report shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRun {
    /// The name in legends and tables (the run directory as given).
    pub label: String,
    /// Its series from `metrics.jsonl`.
    pub curves: Curves,
    /// Its `config.json`, when present and readable.
    pub config: Option<serde_json::Value>,
}

impl ReportRun {
    /// Reads `dir/metrics.jsonl` (required) and `dir/config.json` (optional).
    pub fn read(dir: &Path) -> Result<Self> {
        let metrics = dir.join(files::METRICS);
        let text =
            std::fs::read_to_string(&metrics).map_err(|source| TrainError::Io { path: metrics.clone(), source })?;
        let curves = Curves::from_jsonl(&text).map_err(|reason| TrainError::Report {
            path: metrics.clone(),
            reason: format!("not metrics JSON lines: {reason}"),
        })?;
        if curves.test_acc.is_empty() && curves.train_loss.is_empty() {
            return Err(TrainError::Report {
                path: metrics,
                reason: "no training records yet (the run has not finished a fifth of an epoch)".into(),
            });
        }
        let config = std::fs::read(dir.join(files::CONFIG)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        Ok(Self { label: dir.display().to_string(), curves, config })
    }
}

/// A test image the model got wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Mistake {
    /// Index in the test split.
    pub index: usize,
    /// The true class.
    pub truth: usize,
    /// The predicted class.
    pub predicted: usize,
    /// The predicted class's probability.
    pub confidence: f32,
    /// Image width.
    pub width: usize,
    /// Image height.
    pub height: usize,
    /// The test image as stored (grey, row-major).
    pub pixels: Vec<u8>,
}

/// One evaluation-mode prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// The most probable class.
    pub class: u32,
    /// Its softmax probability.
    pub confidence: f32,
}

/// Everything on the page.
#[derive(Debug, Clone)]
pub struct Report {
    /// The runs whose curves are overlaid; the first also names the weights by default.
    pub runs: Vec<ReportRun>,
    /// The weights evaluated for the confusion matrix and the mistakes.
    pub weights: PathBuf,
    /// Their confusion matrix on the test split.
    pub confusion: Confusion,
    /// Class names, by index.
    pub class_names: Vec<String>,
    /// The most confident mistakes, most confident first.
    pub mistakes: Vec<Mistake>,
}

/// The files [`write()`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    /// The HTML page.
    pub html: PathBuf,
    /// The PNG figures, in page order.
    pub figures: Vec<PathBuf>,
}

/// The `n` wrong predictions with the highest confidence, most confident first (ties by index).
pub fn most_confident_mistakes(split: &Split, predictions: &[Prediction], n: usize) -> Vec<Mistake> {
    let mut wrong: Vec<(usize, Prediction)> = predictions
        .iter()
        .enumerate()
        .filter(|(i, p)| split.labels.get(*i).is_some_and(|&l| l as u32 != p.class))
        .map(|(i, p)| (i, *p))
        .collect();
    wrong.sort_by(|a, b| b.1.confidence.total_cmp(&a.1.confidence).then(a.0.cmp(&b.0)));
    wrong
        .into_iter()
        .take(n)
        .filter_map(|(i, p)| {
            let truth = *split.labels.get(i)? as usize;
            let pixels = split.images.get(i * split.rows * split.cols..(i + 1) * split.rows * split.cols)?.to_vec();
            Some(Mistake {
                index: i,
                truth,
                predicted: p.class as usize,
                confidence: p.confidence,
                width: split.cols,
                height: split.rows,
                pixels,
            })
        })
        .collect()
}

/// Writes the figures and `index.html` into `out` (created if needed), each file to a temporary
/// name first and then renamed, so an interrupted report never leaves half a file.
pub fn write(report: &Report, out: &Path) -> Result<ReportFiles> {
    std::fs::create_dir_all(out).map_err(|source| TrainError::Io { path: out.to_path_buf(), source })?;
    let curves = out.join(report_files::CURVES);
    let labelled: Vec<Labelled<'_>> =
        report.runs.iter().map(|r| Labelled { label: &r.label, curves: &r.curves }).collect();
    plot::draw_overlay(&labelled, &curves)?;
    let confusion = out.join(report_files::CONFUSION);
    draw_confusion(&report.confusion, &report.class_names, &confusion)?;
    let per_class = out.join(report_files::PER_CLASS);
    draw_per_class(&report.confusion, &report.class_names, &per_class)?;
    let mistakes = out.join(report_files::MISTAKES);
    draw_mistakes(&report.mistakes, &report.class_names, &mistakes)?;
    let figures = vec![curves, confusion, per_class, mistakes];
    let mut uris = Vec::with_capacity(figures.len());
    for f in &figures {
        let bytes = std::fs::read(f).map_err(|source| TrainError::Io { path: f.clone(), source })?;
        uris.push(format!("data:image/png;base64,{}", base64(&bytes)));
    }
    let html_path = out.join(report_files::HTML);
    let html = html(report, &uris);
    resnet_core::checkpoint::write_atomic(&html_path, html.as_bytes())
        .map_err(|source| TrainError::Io { path: html_path.clone(), source })?;
    Ok(ReportFiles { html: html_path, figures })
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn name(names: &[String], c: usize) -> &str {
    names.get(c).map(String::as_str).unwrap_or("?")
}

/// A short column label: `T-shirt/top` → `T-shirt`, `Ankle boot` → `Boot`.
fn short(name: &str) -> String {
    let first = name.split('/').next().unwrap_or(name);
    let word = if first.len() > 8 { first.rsplit(' ').next().unwrap_or(first) } else { first };
    let mut chars = word.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// "3.2 / 7.9 / –": minutes to each of [`ACCURACY_MILESTONES`], a dash for one not reached.
fn minutes_to_milestones(reached: &[(f64, f64, f64)]) -> String {
    ACCURACY_MILESTONES
        .iter()
        .map(|&m| match reached.iter().find(|r| (r.0 - m).abs() < 1e-9) {
            Some(r) => format!("{:.1} (epoch {})", r.2 / 60.0, r.1),
            None => "–".into(),
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "–".into())
}

fn html(report: &Report, uris: &[String]) -> String {
    let mut h = String::new();
    h.push_str(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<title>ResNet on Fashion-MNIST: report</title>\n<style>\n",
        "body { font-family: sans-serif; margin: 2em auto; max-width: 1040px; color: #222; }\n",
        "table { border-collapse: collapse; margin: 0.5em 0 1.5em; }\n",
        "th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }\n",
        "th:first-child, td:first-child { text-align: left; }\n",
        "figure { margin: 0.5em 0 1.5em; } img { max-width: 100%; border: 1px solid #eee; }\n",
        "figcaption { color: #555; font-size: 0.9em; }\n",
        "</style>\n</head>\n<body>\n<h1>ResNet on Fashion-MNIST</h1>\n"
    ));
    h.push_str("<h2>Runs</h2>\n<table id=\"runs\">\n<tr><th>run</th><th>epochs</th><th>lr</th><th>resize</th>");
    h.push_str("<th>final train loss</th><th>final test acc</th><th>best test acc</th><th>early stop</th>");
    h.push_str("<th>minutes to test acc 0.90 / 0.93 / 0.95</th></tr>\n");
    for r in &report.runs {
        let cfg = |path: &[&str]| {
            let mut v = r.config.as_ref();
            for key in path {
                v = v.and_then(|v| v.get(key));
            }
            v.map(|v| v.to_string()).unwrap_or_else(|| "–".into())
        };
        let c = &r.curves;
        let best = c.test_acc.iter().map(|p| p.1).fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.max(v))));
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            escape(&r.label),
            c.test_acc.len(),
            escape(&cfg(&["optimizer", "lr"])),
            escape(&cfg(&["resize"])),
            fmt_opt(c.train_loss.last().map(|p| p.1)),
            fmt_opt(c.test_acc.last().map(|p| p.1)),
            fmt_opt(best),
            c.early_stop.map(|e| format!("after epoch {e}")).unwrap_or_else(|| "–".into()),
            minutes_to_milestones(&c.time_to_accuracy),
        ));
    }
    h.push_str("</table>\n");
    let figure = |h: &mut String, id: &str, i: usize, alt: &str, caption: &str| {
        h.push_str(&format!(
            "<figure id=\"{id}\">\n<img src=\"{}\" alt=\"{}\">\n<figcaption>{}</figcaption>\n</figure>\n",
            uris.get(i).map(String::as_str).unwrap_or(""),
            escape(alt),
            escape(caption)
        ));
    };
    h.push_str("<h2>Curves</h2>\n");
    figure(
        &mut h,
        "curves",
        0,
        "training curves",
        "Left: running train loss. Right: test accuracy (solid, dots at epoch ends), train accuracy \
         (dashed), validation accuracy (dotted, when the run held out a validation split). \
         A vertical dashed line marks an early stop.",
    );
    let total = report.confusion.total();
    h.push_str(&format!(
        "<h2>Confusion matrix</h2>\n<p>Weights <code>{}</code> on {total} test images: accuracy {:.4}.</p>\n",
        escape(&report.weights.display().to_string()),
        report.confusion.accuracy()
    ));
    figure(
        &mut h,
        "confusion",
        1,
        "confusion matrix",
        "Rows: true class; columns: predicted class. Colour: share of the row; numbers: counts.",
    );
    h.push_str("<h2>Per-class accuracy</h2>\n");
    figure(&mut h, "per-class", 2, "per-class accuracy", "Share of each true class predicted correctly.");
    h.push_str("<table id=\"per-class-table\">\n<tr><th>class</th><th>accuracy</th><th>images</th></tr>\n");
    for (c, (acc, row)) in report.confusion.per_class().iter().zip(&report.confusion.counts).enumerate() {
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            escape(name(&report.class_names, c)),
            fmt_opt(*acc),
            row.iter().sum::<u64>()
        ));
    }
    h.push_str("</table>\n<h2>Most confident mistakes</h2>\n");
    figure(
        &mut h,
        "mistakes",
        3,
        "most confident mistakes",
        &format!(
            "The {} wrong predictions with the highest probability: test index, true class, predicted \
             class and its probability.",
            report.mistakes.len()
        ),
    );
    h.push_str("</body>\n</html>\n");
    h
}

type Drawn = std::result::Result<(), String>;

fn e(err: impl std::fmt::Display) -> String {
    err.to_string()
}

fn heat(f: f64) -> RGBColor {
    let f = f.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    RGBColor(lerp(255.0, 8.0), lerp(255.0, 48.0), lerp(255.0, 107.0))
}

fn draw_confusion(confusion: &Confusion, names: &[String], path: &Path) -> Result<()> {
    let n = confusion.counts.len().max(1) as i32;
    let (left, top, cell) = (100i32, 56i32, 52i32);
    let size = ((left + n * cell + 16) as u32, (top + n * cell + 40) as u32);
    plot::png_atomic(path, size, |root| -> Drawn {
        root.fill(&WHITE).map_err(e)?;
        let font = |px: i32| ("sans-serif", px).into_font();
        root.draw(&Text::new("predicted class →", (left, 6), font(15))).map_err(e)?;
        for (i, row) in confusion.counts.iter().enumerate() {
            let i = i as i32;
            let row_sum: u64 = row.iter().sum();
            root.draw(&Text::new(short(name(names, i as usize)), (6, top + i * cell + cell / 2 - 7), font(13)))
                .map_err(e)?;
            for (j, &count) in row.iter().enumerate() {
                let j = j as i32;
                let f = if row_sum > 0 { count as f64 / row_sum as f64 } else { 0.0 };
                let (x, y) = (left + j * cell, top + i * cell);
                root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], heat(f).filled())).map_err(e)?;
                root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], RGBColor(220, 220, 220))).map_err(e)?;
                let text = count.to_string();
                let colour = if f > 0.5 { WHITE } else { BLACK };
                let tx = x + cell / 2 - 4 * text.len() as i32;
                root.draw(&Text::new(text, (tx, y + cell / 2 - 7), font(13).color(&colour))).map_err(e)?;
            }
        }
        for j in 0..n {
            let label = short(name(names, j as usize));
            let tx = left + j * cell + cell / 2 - 3 * label.len() as i32;
            root.draw(&Text::new(label, (tx, top - 20), font(11))).map_err(e)?;
        }
        root.draw(&Text::new("rows: true class", (6, top + n * cell + 12), font(13))).map_err(e)?;
        root.present().map_err(e)
    })
}

fn draw_per_class(confusion: &Confusion, names: &[String], path: &Path) -> Result<()> {
    let per_class = confusion.per_class();
    let n = per_class.len().max(1) as i32;
    let (left, top, row, width) = (110i32, 16i32, 30i32, 420i32);
    let size = ((left + width + 70) as u32, (top + n * row + 16) as u32);
    plot::png_atomic(path, size, |root| -> Drawn {
        root.fill(&WHITE).map_err(e)?;
        let font = ("sans-serif", 13).into_font();
        for (i, acc) in per_class.iter().enumerate() {
            let y = top + i as i32 * row;
            root.draw(&Text::new(name(names, i).to_string(), (6, y + 7), font.clone())).map_err(e)?;
            root.draw(&Rectangle::new([(left, y + 3), (left + width, y + row - 3)], RGBColor(235, 235, 235).filled()))
                .map_err(e)?;
            if let Some(a) = acc {
                let w = (a.clamp(0.0, 1.0) * width as f64).round() as i32;
                let colour = plot::PALETTE.first().copied().unwrap_or(BLUE);
                root.draw(&Rectangle::new([(left, y + 3), (left + w, y + row - 3)], colour.filled())).map_err(e)?;
            }
            root.draw(&Text::new(fmt_opt(*acc), (left + width + 8, y + 7), font.clone())).map_err(e)?;
        }
        root.present().map_err(e)
    })
}

fn draw_mistakes(mistakes: &[Mistake], names: &[String], path: &Path) -> Result<()> {
    const COLUMNS: usize = 8;
    const SCALE: i32 = 3;
    let (cell_w, cell_h) = (124i32, 150i32);
    let rows = mistakes.len().div_ceil(COLUMNS).max(1) as i32;
    let size = ((COLUMNS as i32 * cell_w) as u32, (rows * cell_h) as u32);
    plot::png_atomic(path, size, |root| -> Drawn {
        root.fill(&WHITE).map_err(e)?;
        let font = ("sans-serif", 12).into_font();
        if mistakes.is_empty() {
            root.draw(&Text::new("no mistakes on the test images", (12, 60), font)).map_err(e)?;
            return root.present().map_err(e);
        }
        for (k, m) in mistakes.iter().enumerate() {
            let (cx, cy) = ((k % COLUMNS) as i32 * cell_w, (k / COLUMNS) as i32 * cell_h);
            let x0 = cx + (cell_w - m.width as i32 * SCALE) / 2;
            let y0 = cy + 6;
            for (p, &v) in m.pixels.iter().enumerate() {
                let (px, py) = ((p % m.width.max(1)) as i32, (p / m.width.max(1)) as i32);
                let (x, y) = (x0 + px * SCALE, y0 + py * SCALE);
                root.draw(&Rectangle::new([(x, y), (x + SCALE, y + SCALE)], RGBColor(v, v, v).filled())).map_err(e)?;
            }
            let ty = y0 + m.height as i32 * SCALE + 4;
            let lines = [
                format!("#{} true: {}", m.index, short(name(names, m.truth))),
                format!("pred: {} {:.2}", short(name(names, m.predicted)), m.confidence),
            ];
            for (l, text) in lines.into_iter().enumerate() {
                let colour = if l == 0 { RGBColor(20, 110, 20) } else { RGBColor(190, 30, 30) };
                root.draw(&Text::new(text, (cx + 6, ty + 16 * l as i32), font.clone().color(&colour))).map_err(e)?;
            }
        }
        root.present().map_err(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let cases =
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn short_names_fit_a_column() {
        let got: Vec<String> = resnet_data::CLASS_NAMES.iter().map(|n| short(n)).collect();
        assert_eq!(
            got,
            ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
        );
    }

    #[test]
    fn mistakes_are_wrong_and_most_confident_first() {
        let split = Split::synthetic(6, 4, 4, 3);
        let wrong = |i: usize| (split.labels[i] as u32 + 1) % 10;
        let preds: Vec<Prediction> = (0..6)
            .map(|i| match i {
                1 => Prediction { class: wrong(1), confidence: 0.6 },
                3 => Prediction { class: wrong(3), confidence: 0.9 },
                4 => Prediction { class: wrong(4), confidence: 0.6 },
                _ => Prediction { class: split.labels[i] as u32, confidence: 0.99 },
            })
            .collect();
        let m = most_confident_mistakes(&split, &preds, 2);
        assert_eq!(m.iter().map(|m| m.index).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(m[0].pixels, split.image(3));
        assert_eq!((m[0].truth, m[0].predicted), (split.labels[3] as usize, wrong(3) as usize));
        assert_eq!(most_confident_mistakes(&split, &preds, 10).len(), 3);
    }
}
