//! Config entries that could not be served (a backing file not there yet because its mount
//! comes late, a device not bound yet, a definition that no longer fits): the file is the
//! operator's, so they are kept, listed with their error, tried again on `backend_retry`
//! and before every change made over RPC, handed over on an upgrade, and written back to
//! the file as they were.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{
    BackendConfig, ControllerConfig, NvmeAttachConfig, RbdClusterConfig, Section, TargetConfig,
};
use crate::Target;
use crate::{Error, Result};

/// An entry not served, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unserved<T> {
    /// The entry as configured.
    pub entry: T,
    /// Why it is not served (the last attempt's error).
    pub error: String,
}

/// Every entry not served, by section and name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnservedEntries {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    nvme: BTreeMap<String, Unserved<NvmeAttachConfig>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    rbd_clusters: BTreeMap<String, Unserved<RbdClusterConfig>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    backends: BTreeMap<String, Unserved<BackendConfig>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    controllers: BTreeMap<String, Unserved<ControllerConfig>>,
}

impl UnservedEntries {
    /// How many entries are not served.
    pub fn len(&self) -> usize {
        self.nvme.len() + self.rbd_clusters.len() + self.backends.len() + self.controllers.len()
    }

    /// Nothing is left unserved.
    pub fn is_empty(&self) -> bool {
        self.nvme.is_empty()
            && self.rbd_clusters.is_empty()
            && self.backends.is_empty()
            && self.controllers.is_empty()
    }

    /// The entries, as a configuration.
    pub fn config(&self) -> TargetConfig {
        TargetConfig {
            nvme: self.nvme.values().map(|u| u.entry.clone()).collect(),
            rbd_clusters: self
                .rbd_clusters
                .values()
                .map(|u| u.entry.clone())
                .collect(),
            backends: self.backends.values().map(|u| u.entry.clone()).collect(),
            controllers: self.controllers.values().map(|u| u.entry.clone()).collect(),
        }
    }

    /// NVMe attachments not served.
    pub fn nvme(&self) -> impl Iterator<Item = &Unserved<NvmeAttachConfig>> {
        self.nvme.values()
    }

    /// RBD clusters not served.
    pub fn rbd_clusters(&self) -> impl Iterator<Item = &Unserved<RbdClusterConfig>> {
        self.rbd_clusters.values()
    }

    /// Backends not served.
    pub fn backends(&self) -> impl Iterator<Item = &Unserved<BackendConfig>> {
        self.backends.values()
    }

    /// Controllers not served.
    pub fn controllers(&self) -> impl Iterator<Item = &Unserved<ControllerConfig>> {
        self.controllers.values()
    }

    /// The error of the entry `name` of `section`, if it is not served.
    pub fn error_of(&self, section: Section, name: &str) -> Option<&str> {
        match section {
            Section::Nvme => self.nvme.get(name).map(|u| u.error.as_str()),
            Section::RbdClusters => self.rbd_clusters.get(name).map(|u| u.error.as_str()),
            Section::Backends => self.backends.get(name).map(|u| u.error.as_str()),
            Section::Controllers => self.controllers.get(name).map(|u| u.error.as_str()),
        }
    }
}

/// How an entry is named in reports and logs: "backend d0", "controller vm1".
pub(crate) fn label(section: Section, name: &str) -> String {
    format!("{} {name}", section.what())
}

/// What `backend_retry` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RetryReport {
    /// Entries served now ("backend d0", "controller vm1").
    pub served: Vec<String>,
    /// Entries still not served, with why.
    pub failed: Vec<RetryFailure>,
}

/// An entry that failed again.
#[derive(Debug, Clone, Serialize)]
pub struct RetryFailure {
    /// Which entry ("backend d0").
    pub what: String,
    /// Why.
    pub error: String,
}

impl Target {
    /// Creates what `config` lists, in order. Each failure is returned with the entry's name
    /// and does not stop the rest: one broken disk must not keep every other VM down. What
    /// fails is kept as an unserved entry (see the module's doc), unless its name is served
    /// already (a second entry of one name is the file's mistake, not a definition).
    pub fn apply(&mut self, config: TargetConfig) -> Vec<(String, Error)> {
        let mut failures = Vec::new();
        for n in config.nvme {
            if let Err(e) = self.attach_nvme(&n.name, n.address) {
                self.keep_unserved(Section::Nvme, &n.name, &e, |u| &mut u.nvme, n.clone());
                failures.push((label(Section::Nvme, &n.name), e));
            }
        }
        for c in config.rbd_clusters {
            if let Err(e) = self.register_rbd_cluster(c.clone()) {
                self.keep_unserved(
                    Section::RbdClusters,
                    &c.name,
                    &e,
                    |u| &mut u.rbd_clusters,
                    c.clone(),
                );
                failures.push((label(Section::RbdClusters, &c.name), e));
            }
        }
        for b in config.backends {
            if let Err(e) = self.create_backend(&b.name, b.spec.clone()) {
                self.keep_unserved(
                    Section::Backends,
                    &b.name,
                    &e,
                    |u| &mut u.backends,
                    b.clone(),
                );
                failures.push((label(Section::Backends, &b.name), e));
            }
        }
        for c in config.controllers {
            let what = label(Section::Controllers, &c.name);
            if let Err(e) = self.create_controller(c.clone()) {
                self.unserved_controller(c, &e);
                failures.push((what, e));
            }
        }
        failures
    }

    /// [`Target::apply`], telling what it served from what failed (each by its
    /// [`label`]).
    pub(crate) fn apply_and_sort(
        &mut self,
        config: TargetConfig,
    ) -> (Vec<String>, Vec<(String, Error)>) {
        let tried: Vec<String> = Section::ALL
            .iter()
            .flat_map(|&section| {
                let names: Vec<&str> = match section {
                    Section::Nvme => config.nvme.iter().map(|n| n.name.as_str()).collect(),
                    Section::RbdClusters => config
                        .rbd_clusters
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect(),
                    Section::Backends => config.backends.iter().map(|b| b.name.as_str()).collect(),
                    Section::Controllers => {
                        config.controllers.iter().map(|c| c.name.as_str()).collect()
                    }
                };
                names.into_iter().map(move |n| label(section, n))
            })
            .collect();
        let failed = self.apply(config);
        let served = tried
            .into_iter()
            .filter(|t| !failed.iter().any(|(what, _)| what == t))
            .collect();
        (served, failed)
    }

    /// Keeps controller `config` as unserved because of `error`.
    pub(super) fn unserved_controller(&mut self, config: ControllerConfig, error: &Error) {
        let name = config.name.clone();
        self.keep_unserved(
            Section::Controllers,
            &name,
            error,
            |u| &mut u.controllers,
            config,
        );
    }

    fn keep_unserved<T>(
        &mut self,
        section: Section,
        name: &str,
        error: &Error,
        table: impl FnOnce(&mut UnservedEntries) -> &mut BTreeMap<String, Unserved<T>>,
        entry: T,
    ) {
        let error = vfblk_vhost::error_chain(error);
        let what = section.what();
        if self.serves(section, name) {
            tracing::warn!("a second {what} named {name} in the configuration, ignored: {error}");
            return;
        }
        // Retried before every change: the same failure again is no news.
        if self.retrying.error_of(section, name) == Some(error.as_str()) {
            tracing::debug!("{what} {name}: still not served: {error}");
        } else {
            tracing::warn!("{what} {name}: kept in the configuration, not served: {error}");
        }
        table(&mut self.unserved).insert(name.to_string(), Unserved { entry, error });
    }

    fn serves(&self, section: Section, name: &str) -> bool {
        match section {
            Section::Nvme => self.attachments.contains_key(name),
            Section::RbdClusters => self.rbd_clusters.contains_key(name),
            Section::Backends => self.backends.contains_key(name),
            Section::Controllers => self.controllers.contains_key(name),
        }
    }

    /// Entries of the configuration not served.
    pub fn unserved(&self) -> &UnservedEntries {
        &self.unserved
    }

    /// Tries every unserved entry again, in the order a config file is applied (a backend
    /// served now lets its controller be served too).
    pub fn retry_unserved(&mut self) -> RetryReport {
        if self.unserved.is_empty() {
            return RetryReport::default();
        }
        self.retrying = std::mem::take(&mut self.unserved);
        let config = self.retrying.config();
        let (served, failed) = self.apply_and_sort(config);
        self.retrying = UnservedEntries::default();
        let failed: Vec<RetryFailure> = failed
            .into_iter()
            .map(|(what, e)| RetryFailure {
                what,
                error: vfblk_vhost::error_chain(&e),
            })
            .collect();
        for s in &served {
            tracing::info!("{s}: served now");
        }
        RetryReport { served, failed }
    }

    /// Refuses to create `name` in `section` while an unserved entry holds the name: the
    /// operator's definition is not replaced behind their back.
    pub(super) fn check_not_unserved(&self, section: Section, name: &str) -> Result<()> {
        match self.unserved.error_of(section, name) {
            Some(error) => Err(Error::BadArgument(format!(
                "{} {name} is in the configuration but not served ({error}): backend_retry, or delete it first",
                section.what()
            ))),
            None => Ok(()),
        }
    }

    /// Removes an unserved entry on a delete; `Ok(false)` when there is none of that name.
    pub(super) fn delete_unserved(&mut self, section: Section, name: &str) -> Result<bool> {
        let found = match section {
            Section::Nvme => self.unserved.nvme.contains_key(name),
            Section::RbdClusters => self.unserved.rbd_clusters.contains_key(name),
            Section::Backends => self.unserved.backends.contains_key(name),
            Section::Controllers => self.unserved.controllers.contains_key(name),
        };
        if !found {
            return Ok(false);
        }
        if section == Section::Backends {
            let users = self.users_of(name);
            if !users.is_empty() {
                return Err(Error::Busy {
                    name: name.to_string(),
                    users,
                });
            }
        }
        if section == Section::RbdClusters {
            self.check_rbd_cluster_unused(name)?;
        }
        match section {
            Section::Nvme => drop(self.unserved.nvme.remove(name)),
            Section::RbdClusters => drop(self.unserved.rbd_clusters.remove(name)),
            Section::Backends => drop(self.unserved.backends.remove(name)),
            Section::Controllers => drop(self.unserved.controllers.remove(name)),
        }
        self.forget_in_file(section, name);
        tracing::info!("{} {name} (not served) deleted", section.what());
        Ok(true)
    }

    /// Takes unserved entries over from a predecessor process.
    pub(super) fn adopt_unserved(&mut self, entries: UnservedEntries) {
        self.unserved = entries;
    }
}
