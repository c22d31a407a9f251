//! Progress bars of `cstor import` on stderr: one for the whole image, one per layer while
//! it streams; `cstor ostree import` has the one bar, counted in file objects (a commit's
//! content size is only known as its files are opened).

use std::collections::HashMap;
use std::io::IsTerminal;

use cstor_import::ImportEvent;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::args::{Global, ProgressWhen};
use crate::output::{human, short};

/// Whether to draw bars, from `--progress`, `--json`, `--quiet` and stderr.
pub fn wanted(g: &Global) -> bool {
    match g.progress {
        ProgressWhen::Always => true,
        ProgressWhen::Never => false,
        ProgressWhen::Auto => !g.json && !g.quiet && std::io::stderr().is_terminal(),
    }
}

/// Shows the import's events until the channel closes: bars on a terminal, plain lines
/// (at most one a second, and one per layer) elsewhere, e.g. into a log with
/// `--progress always`.
pub async fn show(rx: UnboundedReceiver<ImportEvent>) {
    if std::io::stderr().is_terminal() {
        bars(rx).await;
    } else {
        lines(rx).await;
    }
}

async fn bars(mut rx: UnboundedReceiver<ImportEvent>) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    let total = multi.add(
        ProgressBar::new(0)
            .with_style(style.clone())
            .with_prefix("total"),
    );
    let mut bars = HashMap::new();
    while let Some(e) = rx.recv().await {
        match e {
            ImportEvent::Started {
                bytes,
                bytes_present,
                layers_present,
                ..
            } => {
                total.set_length(bytes);
                total.set_position(bytes_present);
                if layers_present > 0 {
                    total.set_message(format!("{layers_present} layers already present"));
                }
            }
            ImportEvent::LayerStarted {
                index,
                diff_id,
                bytes,
                ..
            } => {
                let b = multi.add(
                    ProgressBar::new(bytes)
                        .with_style(style.clone())
                        .with_prefix(format!("layer {index}"))
                        .with_message(short(&diff_id).to_owned()),
                );
                bars.insert(index, (b, 0u64));
            }
            ImportEvent::LayerProgress {
                index, bytes_done, ..
            } => {
                if let Some((b, last)) = bars.get_mut(&index) {
                    total.inc(bytes_done.saturating_sub(*last));
                    *last = bytes_done;
                    b.set_position(bytes_done);
                }
            }
            ImportEvent::LayerDone { index, bytes, .. } => {
                if let Some((b, last)) = bars.remove(&index) {
                    total.inc(bytes.saturating_sub(last));
                    b.finish_and_clear();
                }
            }
            ImportEvent::OstreeStarted { files, .. } => {
                let files_style = ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {pos:>7}/{len:<7} files {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                total.set_style(files_style);
                total.set_prefix("commit");
                total.set_length(files);
            }
            ImportEvent::OstreeProgress {
                files_done,
                bytes_done,
                ..
            } => {
                total.set_position(files_done);
                total.set_message(human(bytes_done));
            }
            ImportEvent::Finalizing => total.set_message("writing the EROFS image"),
            ImportEvent::Finished => total.finish_and_clear(),
            _ => {}
        }
    }
}

async fn lines(mut rx: UnboundedReceiver<ImportEvent>) {
    let mut total = 0u64;
    let mut done = 0u64;
    let mut per_layer: HashMap<usize, u64> = HashMap::new();
    let mut last = std::time::Instant::now();
    while let Some(e) = rx.recv().await {
        match e {
            ImportEvent::Started {
                bytes,
                bytes_present,
                layers,
                layers_present,
                ..
            } => {
                total = bytes;
                done = bytes_present;
                eprintln!(
                    "importing {layers} layers ({}), {layers_present} already present",
                    human(bytes)
                );
            }
            ImportEvent::LayerStarted {
                index,
                diff_id,
                bytes,
                ..
            } => {
                per_layer.insert(index, 0);
                eprintln!("layer {index} {}: {}", short(&diff_id), human(bytes));
            }
            ImportEvent::LayerProgress {
                index, bytes_done, ..
            } => {
                if let Some(last_done) = per_layer.get_mut(&index) {
                    done += bytes_done.saturating_sub(*last_done);
                    *last_done = bytes_done;
                }
                if last.elapsed() >= std::time::Duration::from_secs(1) {
                    last = std::time::Instant::now();
                    eprintln!("  {} of {}", human(done), human(total));
                }
            }
            ImportEvent::LayerDone { index, bytes, .. } => {
                if let Some(last_done) = per_layer.remove(&index) {
                    done += bytes.saturating_sub(last_done);
                }
                eprintln!("layer {index} stored");
            }
            ImportEvent::OstreeStarted {
                commit,
                metadata_objects,
                files,
                ..
            } => {
                total = files;
                eprintln!(
                    "importing commit {}: {metadata_objects} metadata objects verified, {files} files",
                    short(&commit)
                );
            }
            ImportEvent::OstreeProgress {
                files_done,
                bytes_done,
                ..
            } if last.elapsed() >= std::time::Duration::from_secs(1) || files_done == total => {
                last = std::time::Instant::now();
                eprintln!("  {files_done} of {total} files ({})", human(bytes_done));
            }
            ImportEvent::Finalizing => eprintln!("writing the EROFS image"),
            _ => {}
        }
    }
}
