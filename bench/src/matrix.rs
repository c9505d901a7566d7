//! `bench matrix`: the features together. Every cell is one `bench migrate` of the running
//! KVM guest (keys on, as by default) with a strategy, a saving, a destination page size and
//! no cut or one cut of the link mid-migration (`--cut-after-mib`, a sixteenth of RAM); each
//! is verified (the guest checked every page it touched, the digest of every page matches
//! the source's) and its bytes, downtime, blocktime and reconnects are printed as one table.
//! `--pairwise` runs a subset in which every pair of values of two dimensions meets in at
//! least one cell (9 cells instead of 36).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use clap::Args;
use serde_json::{Value, json};

use crate::procs::sibling;

/// The strategies (`bench migrate --strategy`).
const STRATEGIES: [&str; 3] = ["postcopy", "hybrid", "precopy"];
/// What saves bytes: nothing, a base image 90% like the guest, half the pages free.
const SAVINGS: [Saving; 3] = [Saving::None, Saving::Base90, Saving::Free50];
/// The destination's page size.
const PAGES: [&str; 2] = ["4k", "2m"];
/// Cuts of the link mid-migration.
const CUTS: [&str; 2] = ["none", "one"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Saving {
    None,
    Base90,
    Free50,
}

impl Saving {
    fn name(self) -> &'static str {
        match self {
            Saving::None => "none",
            Saving::Base90 => "base 90%",
            Saving::Free50 => "free 50%",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Saving::None => &[],
            Saving::Base90 => &["--base-similarity", "90"],
            Saving::Free50 => &["--free-pct", "50"],
        }
    }
}

/// One cell: indices into the dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cell {
    strategy: usize,
    saving: usize,
    page: usize,
    cut: usize,
}

/// Arguments of `bench matrix`.
#[derive(Debug, Args)]
pub struct MatrixArgs {
    /// Run only a pairwise-covering subset: every pair of values of two dimensions in at
    /// least one cell.
    #[arg(long)]
    pairwise: bool,
    /// Guest RAM size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// How long the guest runs on the source after filling RAM (each cell).
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
    /// How long the guest runs on the destination after every page arrived (each cell).
    #[arg(long, default_value_t = 2000)]
    after_ms: u64,
    /// Write every cell's results as a JSON array here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Every cell, or a pairwise-covering subset: for each strategy and saving one cell, its
/// page size and cut chosen so that each strategy and each saving meet both page sizes and
/// both cuts, and each page size meets both cuts.
fn cells(pairwise: bool) -> Vec<Cell> {
    let mut out = Vec::new();
    for strategy in 0..STRATEGIES.len() {
        for saving in 0..SAVINGS.len() {
            if pairwise {
                out.push(Cell {
                    strategy,
                    saving,
                    page: (strategy + saving) % PAGES.len(),
                    cut: usize::from((saving == 2) != (strategy == 2)),
                });
                continue;
            }
            for page in 0..PAGES.len() {
                out.extend((0..CUTS.len()).map(|cut| Cell {
                    strategy,
                    saving,
                    page,
                    cut,
                }));
            }
        }
    }
    out
}

/// Runs the cells one after the other and prints the table; fails if any cell failed or
/// was not verified (after running them all).
///
/// # Errors
/// A cell failed or was not verified, or the results cannot be written.
pub fn run(args: &MatrixArgs) -> Result<()> {
    let work = std::env::temp_dir().join(format!("pagemig-matrix-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_cells(args, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run_cells(args: &MatrixArgs, work: &Path) -> Result<()> {
    let cells = cells(args.pairwise);
    let mut rows = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        eprintln!(
            "bench matrix: cell {}/{}: {} · {} · {} pages · cut: {}",
            i + 1,
            cells.len(),
            STRATEGIES[cell.strategy],
            SAVINGS[cell.saving].name(),
            PAGES[cell.page],
            CUTS[cell.cut]
        );
        rows.push(run_cell(args, *cell, &work.join(format!("cell-{i}.json"))));
    }
    println!(
        "{:<9} {:<9} {:<4} {:<4} {:<9} {:>9} {:>11} {:>13} {:>9} {:>10}",
        "strategy",
        "saving",
        "page",
        "cut",
        "verified",
        "MiB",
        "downtime ms",
        "blocktime ms",
        "total ms",
        "reconnects"
    );
    for row in &rows {
        let num = |key: &str| row[key].as_f64().map_or("-".into(), |v| format!("{v:.1}"));
        println!(
            "{:<9} {:<9} {:<4} {:<4} {:<9} {:>9} {:>11} {:>13} {:>9} {:>10}",
            row["strategy"].as_str().unwrap_or("?"),
            row["saving"].as_str().unwrap_or("?"),
            row["page"].as_str().unwrap_or("?"),
            row["cut"].as_str().unwrap_or("?"),
            if row["verified"] == true { "yes" } else { "NO" },
            num("mib"),
            num("downtime_ms"),
            num("blocktime_ms"),
            num("total_ms"),
            row["reconnects"]
                .as_u64()
                .map_or("-".into(), |n| n.to_string()),
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rows)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r["verified"] != true)
        .map(|r| {
            format!(
                "{} · {} · {} · cut {}: {}",
                r["strategy"].as_str().unwrap_or("?"),
                r["saving"].as_str().unwrap_or("?"),
                r["page"].as_str().unwrap_or("?"),
                r["cut"].as_str().unwrap_or("?"),
                r["error"].as_str().unwrap_or("not verified")
            )
        })
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {} cells failed:\n  {}",
        failed.len(),
        rows.len(),
        failed.join("\n  ")
    );
    Ok(())
}

/// One `bench migrate`; its row (with `verified` and, on failure, `error`).
fn run_cell(args: &MatrixArgs, cell: Cell, out: &Path) -> Value {
    let (strategy, saving, page) = (
        STRATEGIES[cell.strategy],
        SAVINGS[cell.saving],
        PAGES[cell.page],
    );
    let cut = CUTS[cell.cut];
    let mut row = json!({"strategy": strategy, "saving": saving.name(), "page": page, "cut": cut});
    let cut_args = if cell.cut == 0 {
        Vec::new()
    } else {
        let mib = (args.size_mib / 16).max(2).to_string();
        vec!["--cut-after-mib".to_owned(), mib]
    };
    let result = (|| -> Result<Value> {
        let output = Command::new(sibling("bench")?)
            .arg("migrate")
            .args(["--strategy", strategy, "--page-size", page])
            .args(saving.args())
            .args(&cut_args)
            .args(["--size-mib", &args.size_mib.to_string()])
            .args(["--warmup-ms", &args.warmup_ms.to_string()])
            .args(["--after-ms", &args.after_ms.to_string()])
            .arg("--json")
            .arg(out)
            .output()
            .context("cannot run bench migrate")?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
            anyhow::bail!(
                "bench migrate failed ({}): {}",
                output.status,
                last.unwrap_or("")
            );
        }
        let text = std::fs::read_to_string(out).context("bench migrate wrote no JSON")?;
        Ok(serde_json::from_str(&text)?)
    })();
    match result {
        Ok(r) => {
            let bytes = r["bytes_precopy"].as_f64().unwrap_or(0.0)
                + r["bytes_postcopy"].as_f64().unwrap_or(0.0);
            row["verified"] = json!(r["digest_match"] == true && r["guest"]["mismatches"] == 0);
            row["mib"] = json!(bytes / f64::from(1 << 20));
            row["downtime_ms"] = r["downtime_ms"].clone();
            row["blocktime_ms"] = r["blocktime_ms"].clone();
            row["total_ms"] = r["total_ms"].clone();
            row["precopy_rounds"] = r["precopy_rounds"].clone();
            row["converged_by"] = r["converged_by"].clone();
            row["reconnects"] = r["faultd"]["reconnects"].clone();
        }
        Err(e) => {
            row["verified"] = json!(false);
            row["error"] = json!(format!("{e:#}"));
        }
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_pairwise_subset_covers_every_pair_of_values() {
        let subset = cells(true);
        assert_eq!(subset.len(), 9);
        assert_eq!(cells(false).len(), 36);
        let dims = |c: &Cell| [c.strategy, c.saving, c.page, c.cut];
        let sizes = [STRATEGIES.len(), SAVINGS.len(), PAGES.len(), CUTS.len()];
        for a in 0..sizes.len() {
            for b in a + 1..sizes.len() {
                for va in 0..sizes[a] {
                    for vb in 0..sizes[b] {
                        assert!(
                            subset.iter().any(|c| dims(c)[a] == va && dims(c)[b] == vb),
                            "dimensions {a} and {b}: values {va}, {vb} never meet"
                        );
                    }
                }
            }
        }
    }
}
