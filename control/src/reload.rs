//! SIGHUP: the config file read again. What it adds is served, what failed before is tried
//! again; nothing running is removed or changed by it (that would pull a disk from under a
//! VM): an entry the operator changed in the file keeps running as it is, says so, and the
//! file's version stays in the file for the next start.

use serde::Serialize;

use crate::config::{Entry, Section, TargetConfig};
use crate::Result;
use crate::{RetryReport, Target};

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    /// Entries new in the file, now served ("backend d1").
    pub added: Vec<String>,
    /// Entries new in the file that could not be served (kept, listed as failed).
    pub not_served: Vec<String>,
    /// Entries the file defines differently from what runs: not applied.
    pub changed_in_file: Vec<String>,
    /// The retry of entries that had failed.
    pub retried: RetryReport,
}

impl Target {
    /// An entry deleted: it leaves the config file at the next save, whatever the file says.
    pub(super) fn forget_in_file(&mut self, section: Section, name: &str) {
        let key = (section, name.to_string());
        self.file_edits.file_wins.remove(&key);
        self.file_edits.removed.insert(key);
    }

    /// Reads the config file again (see the module's doc). Without a config file there is
    /// nothing to read: only the retry runs.
    pub fn reload(&mut self) -> Result<ReloadReport> {
        let mut report = ReloadReport::default();
        if let Some(path) = self.settings.config_file.clone() {
            let file = TargetConfig::load(&path)?;
            let running = self.config();
            let mut new = TargetConfig::default();
            self.sort_entries(
                Section::Nvme,
                file.nvme,
                &running.nvme,
                &mut new.nvme,
                &mut report,
            );
            self.sort_entries(
                Section::RbdClusters,
                file.rbd_clusters,
                &running.rbd_clusters,
                &mut new.rbd_clusters,
                &mut report,
            );
            self.sort_entries(
                Section::Backends,
                file.backends,
                &running.backends,
                &mut new.backends,
                &mut report,
            );
            self.sort_entries(
                Section::Controllers,
                file.controllers,
                &running.controllers,
                &mut new.controllers,
                &mut report,
            );
            let (added, failed) = self.apply_and_sort(new);
            report.added = added;
            report.not_served = failed.into_iter().map(|(what, _)| what).collect();
        }
        report.retried = self.retry_unserved();
        tracing::info!(
            "reload: {} added, {} not served (listed as failed), {} changed in the file and not applied, {} served now after failing before",
            report.added.len(),
            report.not_served.len(),
            report.changed_in_file.len(),
            report.retried.served.len()
        );
        Ok(report)
    }

    /// Splits a section of the file into entries new to this process (into `new`) and
    /// entries it has (the same, or changed: noted, not applied).
    fn sort_entries<T: Entry + Clone>(
        &mut self,
        section: Section,
        in_file: Vec<T>,
        running: &[T],
        new: &mut Vec<T>,
        report: &mut ReloadReport,
    ) {
        for entry in in_file {
            match running.iter().find(|r| r.name() == entry.name()) {
                None => new.push(entry),
                Some(r) if *r == entry => {}
                Some(_) => {
                    let what = crate::unserved::label(section, entry.name());
                    tracing::warn!(
                        "{what}: the config file defines it differently from what runs; not applied now (delete and create it over RPC to apply it at once); the file keeps its version for the next start"
                    );
                    self.file_edits
                        .file_wins
                        .insert((section, entry.name().to_string()));
                    report.changed_in_file.push(what);
                }
            }
        }
    }
}
