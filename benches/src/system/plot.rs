//! PNG plots of the suite's results (the `plotters` crate): IOPS against queue depth per
//! backend, and latency distributions. Text is drawn with a system TrueType font (DejaVu Sans,
//! Debian's `fonts-dejavu-core`, which the setup script installs).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::system::suite_results::{pauses_ms, Backend, Client, SuiteResult, WORKLOADS};
use crate::{Error, Result};

/// Where the font is looked for, in order.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = FONTS
                .iter()
                .find(|p| Path::new(p).exists())
                .ok_or_else(|| {
                    format!(
                        "no font for the plots (install fonts-dejavu-core; looked in {FONTS:?})"
                    )
                })?;
            let bytes = std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))?;
            // Registered once for the process's lifetime.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a font plotters can read"))
        })
        .clone()
        .map_err(Error::Run)
}

fn draw_error<E: std::fmt::Debug>(what: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Run(format!("drawing {}: {e:?}", what.display()))
}

/// One colour per backend (as many as [`Backend::ALL`]).
/// One backend's line in its colour, in the legend under its name; with `markers`, a dot at
/// each measured point.
fn draw_backend<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    b: Backend,
    points: Vec<(f64, f64)>,
    markers: bool,
    path: &Path,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let err = draw_error(path);
    let c = colour(b);
    if markers {
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(&err)?;
    }
    chart
        .draw_series(LineSeries::new(points, c.stroke_width(2)))
        .map_err(&err)?
        .label(b.describe())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    Ok(())
}

/// Draws the legend at `position` and writes the image.
fn legend_and_save<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    root: &DrawingArea<DB, plotters::coord::Shift>,
    position: SeriesLabelPosition,
    path: &Path,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate,
{
    let err = draw_error(path);
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)
}

const COLOURS: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];

fn colour(b: Backend) -> RGBColor {
    let i = Backend::ALL.iter().position(|x| *x == b).unwrap_or(0);
    COLOURS[i % COLOURS.len()]
}

/// IOPS against queue depth (1, 32, 128; 4 KiB, one queue) per backend, for one client and
/// direction. None when the result has fewer than two depths.
fn iops_by_depth(r: &SuiteResult, client: Client, write: bool, path: &Path) -> Result<bool> {
    let mut series: Vec<(Backend, Vec<(f64, f64)>)> = Vec::new();
    for m in &r.measurements {
        let w = m.workload;
        if m.client != client
            || w.write != write
            || w.queues != 1
            || w.sequential
            || w.block_size != 4096
        {
            continue;
        }
        let Ok(report) = &m.report else { continue };
        let iops = report["iops"].as_f64().unwrap_or(0.0);
        let point = (f64::from(w.qd), iops);
        match series.iter_mut().find(|(b, _)| *b == m.backend) {
            Some((_, points)) => points.push(point),
            None => series.push((m.backend, vec![point])),
        }
    }
    if !series.iter().any(|(_, p)| p.len() >= 2) {
        return Ok(false);
    }
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(0.0, f64::max)
        * 1.1
        / 1e6;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    let err = draw_error(path);
    root.fill(&WHITE).map_err(&err)?;
    let title = format!(
        "4 KiB random {} IOPS by queue depth — client {}",
        if write { "write" } else { "read" },
        client.id()
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((1f64..160f64).log_scale(), 0f64..top.max(0.01))
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("requests in flight (queue depth)")
        .y_desc("million IOPS")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()
        .map_err(&err)?;
    for (b, mut points) in series {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let scaled: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x, y / 1e6)).collect();
        draw_backend(&mut chart, b, scaled, true, path)?;
    }
    legend_and_save(&mut chart, &root, SeriesLabelPosition::UpperLeft, path)?;
    Ok(true)
}

/// Latency CDFs of one workload, a line per backend, for one client.
fn latency_cdf(r: &SuiteResult, client: Client, workload: &str, path: &Path) -> Result<bool> {
    let mut series: Vec<(Backend, Vec<(f64, f64)>)> = Vec::new();
    for m in &r.measurements {
        if m.client != client || m.workload.id != workload {
            continue;
        }
        let Ok(report) = &m.report else { continue };
        let points: Vec<(f64, f64)> = report["lat_cdf_us"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        if !points.is_empty() {
            series.push((m.backend, points));
        }
    }
    if series.is_empty() {
        return Ok(false);
    }
    // From the fastest sample to the 99.9th percentile of the slowest backend.
    let low = series
        .iter()
        .filter_map(|(_, p)| p.first().map(|&(x, _)| x))
        .fold(f64::MAX, f64::min)
        .max(0.1);
    let high = series
        .iter()
        .filter_map(|(_, p)| p.iter().find(|&&(_, f)| f >= 0.999).map(|&(x, _)| x))
        .fold(low * 2.0, f64::max);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    let err = draw_error(path);
    root.fill(&WHITE).map_err(&err)?;
    let description = WORKLOADS
        .iter()
        .find(|w| w.id == workload)
        .map(|w| w.id)
        .unwrap_or(workload);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Latency distribution, {description} — client {}",
                client.id()
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((low * 0.8..high * 1.2).log_scale(), 0f64..1f64)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs)")
        .y_desc("fraction of requests at or below")
        .x_label_formatter(&|x| format!("{x:.1}"))
        .draw()
        .map_err(&err)?;
    for (b, points) in series {
        let clipped: Vec<(f64, f64)> = points
            .into_iter()
            .filter(|&(x, _)| x <= high * 1.2)
            .collect();
        draw_backend(&mut chart, b, clipped, false, path)?;
    }
    legend_and_save(&mut chart, &root, SeriesLabelPosition::LowerRight, path)?;
    Ok(true)
}

/// The client's I/O pause at each restart, a line per backend.
fn restart_pauses(r: &SuiteResult, path: &Path) -> Result<bool> {
    let series: Vec<(Backend, Vec<(f64, f64)>)> = r
        .restarts
        .iter()
        .filter_map(|run| {
            let pauses = pauses_ms(run.report.as_ref().ok()?);
            let points = pauses
                .iter()
                .enumerate()
                .map(|(i, &p)| ((i + 1) as f64, p))
                .collect::<Vec<_>>();
            (!points.is_empty()).then_some((run.backend, points))
        })
        .collect();
    if series.is_empty() {
        return Ok(false);
    }
    let count = series.iter().map(|(_, p)| p.len()).max().unwrap_or(1) as f64;
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(1.0, f64::max)
        * 1.15;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    let err = draw_error(path);
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "I/O pause the client sees at each SIGKILL + restart",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..count + 0.5, 0f64..top)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("restart")
        .y_desc("pause (ms)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(&err)?;
    for (b, points) in series {
        draw_backend(&mut chart, b, points, true, path)?;
    }
    legend_and_save(&mut chart, &root, SeriesLabelPosition::UpperRight, path)?;
    Ok(true)
}

/// Draws every plot the result has data for into `dir`; returns the files written.
pub fn plots(r: &SuiteResult, dir: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    let mut written = Vec::new();
    for client in [Client::Loadgen, Client::Blkio] {
        for write in [false, true] {
            let path = dir.join(format!(
                "iops-by-depth-{}-{}.png",
                if write { "randwrite" } else { "randread" },
                client.id()
            ));
            if iops_by_depth(r, client, write, &path)? {
                written.push(path);
            }
        }
        for workload in ["randread-4k-qd1", "randread-4k-qd32"] {
            let path = dir.join(format!("latency-{workload}-{}.png", client.id()));
            if latency_cdf(r, client, workload, &path)? {
                written.push(path);
            }
        }
    }
    let path = dir.join("restart-pauses.png");
    if restart_pauses(r, &path)? {
        written.push(path);
    }
    Ok(written)
}
