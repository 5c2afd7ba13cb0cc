//! NVMe controllers kept across a crash of this process. With an fd store (systemd's, or
//! `vfblk-keeper`), each controller's VFIO container and device fds, its DMA arenas' memfds,
//! its record (`KeptController`: admin queue positions, I/O queues that may exist, Identify
//! data) and the guest RAM mapped in its IOVA windows are stored there. A successor started
//! after a SIGKILL takes the controller as it is: vfio-pci never resets the function (the
//! store holds the device fd), guest RAM stays pinned and mapped, the dead process's I/O
//! queues are deleted (which ends every command it had out) before anything is re-run.
//! When that cannot be done — a record missing or behind, an unhealthy controller — the
//! stored fds are dropped and the controller is opened afresh, as without a store.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use vfblk_nvme::controller::{Controller, KeptController, Options};
use vfblk_nvme::kept::KeptFile;
use vfblk_nvme::pci::PciAddress;
use vfblk_vhost::fd_store::{FdStore, StoredFds};

use super::{
    lent_windows, LentWindow, MappedRegion, NvmeControllers, SharedController, WINDOWS, WINDOW_SIZE,
};

/// The store names of what is kept of one controller.
#[derive(Clone)]
struct Names {
    prefix: String,
}

/// Every kept name starts with this.
const PREFIX: &str = "nvme-";

impl Names {
    fn of(address: PciAddress) -> Self {
        // `:` may not appear in a stored fd's name.
        Self {
            prefix: format!("{PREFIX}{}", address.to_string().replace(':', "-")),
        }
    }

    /// The controller whose record is stored under `name`, if it is such a name.
    fn record_owner(name: &str) -> Option<PciAddress> {
        name.strip_suffix("/record").and(Self::owner(name))
    }

    /// The controller a kept name belongs to, if it is one.
    fn owner(name: &str) -> Option<PciAddress> {
        let (text, _) = name.strip_prefix(PREFIX)?.split_once('/')?;
        text.replace('-', ":").parse().ok()
    }

    fn container(&self) -> String {
        format!("{}/container", self.prefix)
    }
    fn device(&self) -> String {
        format!("{}/device", self.prefix)
    }
    fn record(&self) -> String {
        format!("{}/record", self.prefix)
    }
    fn windows(&self) -> String {
        format!("{}/windows", self.prefix)
    }
    fn arena_prefix(&self) -> String {
        format!("{}/arena-", self.prefix)
    }
    fn arena(&self, iova: u64) -> String {
        format!("{}{iova:x}", self.arena_prefix())
    }
    /// Every name of the controller, with the arenas at `arenas`.
    fn all(&self, arenas: &[u64]) -> Vec<String> {
        [
            self.record(),
            self.windows(),
            self.container(),
            self.device(),
        ]
        .into_iter()
        .chain(arenas.iter().map(|&iova| self.arena(iova)))
        .collect()
    }
}

/// Where a controller's mapped windows are kept (none without a store).
#[derive(Clone, Default)]
pub(super) struct KeptWindows(Arc<Mutex<Option<KeptFile>>>);

impl KeptWindows {
    /// Records what `mapped` holds now.
    pub(super) fn write(&self, mapped: &BTreeMap<u64, Vec<MappedRegion>>) {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(file) = kept.as_ref() else { return };
        let written = serde_json::to_vec(&lent_windows(mapped))
            .map_err(|e| e.to_string())
            .and_then(|text| file.write(&text).map_err(|e| e.to_string()));
        if let Err(e) = written {
            // Void: a successor then unmaps every window rather than trust one it names.
            file.void();
            tracing::warn!(
                "the record of the guest RAM mapped for an NVMe controller was not updated ({e}); after a crash it would be mapped again"
            );
        }
    }
}

/// What the fd store held of a controller a dead process drove.
pub(super) struct StoredController {
    vfio: vfblk_nvme::vfio::SharedVfio,
    record: KeptFile,
    kept: KeptController,
    arenas: Vec<OwnedFd>,
    windows: Vec<LentWindow>,
    windows_file: Option<KeptFile>,
}

impl NvmeControllers {
    /// Keeps every controller opened from now on in `store`.
    pub fn keep_in(&mut self, store: Arc<FdStore>) {
        self.store = Some(store);
    }

    /// Takes what `stored` holds of the controllers a dead predecessor drove: each is taken
    /// over when it is next opened ([`NvmeControllers::get_or_open`]). What does not add up
    /// to a controller (a record that does not read, an fd missing) is dropped from the
    /// store, so that the device can be opened afresh.
    pub fn take_stored(&mut self, stored: &mut StoredFds) {
        let owners: Vec<PciAddress> = stored
            .names()
            .iter()
            .filter_map(|n| Names::record_owner(n))
            .collect();
        // A controller with fds but no record (a process killed between storing them and
        // its record, or after removing another's): released now, so that it can be opened
        // afresh; the store must not hold its device meanwhile.
        let orphans: Vec<String> = stored
            .names()
            .into_iter()
            .filter(|n| Names::owner(n).is_some_and(|a| !owners.contains(&a)))
            .collect();
        if !orphans.is_empty() {
            tracing::warn!(
                "NVMe fds in the fd store without a record of their controller ({}); released",
                orphans.join(", ")
            );
            for name in &orphans {
                drop(stored.take(name));
            }
            forget(self.store.as_ref(), &orphans);
        }
        for address in owners {
            let names = Names::of(address);
            let taken = take_one(address, stored);
            // Arenas the record does not name (made after its last write, or by another
            // process) go now: a controller opened afresh may store its own under the
            // same names.
            let mut unrecorded: Vec<String> = stored
                .names()
                .into_iter()
                .filter(|n| n.starts_with(&names.arena_prefix()))
                .collect();
            unrecorded.dedup();
            for name in &unrecorded {
                drop(stored.take(name));
            }
            forget(self.store.as_ref(), &unrecorded);
            match taken {
                Ok(c) => {
                    self.stored.insert(address, c);
                }
                Err((why, arenas)) => {
                    tracing::warn!(
                        "{address}: what the fd store kept of it cannot be used ({why}); it will be opened afresh"
                    );
                    forget(self.store.as_ref(), &names.all(&arenas));
                }
            }
        }
    }

    /// Drops what the store kept of controllers nothing opened after the restart.
    pub fn drop_unclaimed(&mut self) {
        for (address, c) in std::mem::take(&mut self.stored) {
            tracing::info!(
                "{address}: kept in the fd store by the previous process but not in the configuration; released"
            );
            let arenas: Vec<u64> = c.kept.controller.arenas.iter().map(|a| a.iova).collect();
            forget(self.store.as_ref(), &Names::of(address).all(&arenas));
        }
    }
}

/// What the store holds of the controller at `address`, checked; else why not and the
/// arenas whose names it took.
fn take_one(
    address: PciAddress,
    stored: &mut StoredFds,
) -> Result<StoredController, (String, Vec<u64>)> {
    let names = Names::of(address);
    let mut take = |name: String| stored.take(&name).ok_or(format!("{name} is not stored"));
    let fail = |why: String| (why, Vec::new());
    let record_fd = take(names.record()).map_err(fail)?;
    let container = take(names.container()).map_err(fail)?;
    let device = take(names.device()).map_err(fail)?;
    let windows_fd = take(names.windows()).ok();
    let record = KeptFile::open(std::fs::File::from(record_fd)).map_err(|e| fail(e.to_string()))?;
    let text = record
        .read()
        .ok_or_else(|| fail("its record was never written, or was voided".into()))?;
    let kept: KeptController = serde_json::from_slice(&text)
        .map_err(|e| fail(format!("its record does not read: {e}")))?;
    let iovas: Vec<u64> = kept.controller.arenas.iter().map(|a| a.iova).collect();
    if kept.arena_files.len() != iovas.len() {
        return Err((
            format!(
                "{} arena file(s) recorded for {} arenas",
                kept.arena_files.len(),
                iovas.len()
            ),
            iovas,
        ));
    }
    let mut arenas = Vec::with_capacity(iovas.len());
    for (&iova, &file) in iovas.iter().zip(&kept.arena_files) {
        let fd = take(names.arena(iova)).map_err(|why| (why, iovas.clone()))?;
        // The memory mapped at that IOVA, not another memfd under its name.
        use std::os::fd::AsFd;
        if vfblk_hugepages::file_identity(fd.as_fd()) != file {
            return Err((
                format!("the memfd stored for the arena at IOVA {iova:#x} is not the one recorded"),
                iovas,
            ));
        }
        arenas.push(fd);
    }
    let (windows, windows_file) = match windows_fd {
        None => (Vec::new(), None),
        Some(fd) => {
            let file = KeptFile::open(std::fs::File::from(fd))
                .map_err(|e| (e.to_string(), iovas.clone()))?;
            let windows = match file.read() {
                None => Vec::new(),
                Some(text) => serde_json::from_slice(&text).map_err(|e| {
                    (
                        format!("its windows record does not read: {e}"),
                        iovas.clone(),
                    )
                })?,
            };
            (windows, Some(file))
        }
    };
    Ok(StoredController {
        vfio: vfblk_nvme::vfio::SharedVfio {
            container,
            device,
            layout: kept.layout,
        },
        record,
        kept,
        arenas,
        windows,
        windows_file,
    })
}

/// Takes over the controller a dead process kept, or — when it cannot be taken as it is —
/// drops what was kept (the caller opens it afresh) and returns None.
pub(super) fn recover(
    store: Option<&Arc<FdStore>>,
    address: PciAddress,
    stored: StoredController,
    options: &Options,
) -> Option<SharedController> {
    let names = Names::of(address);
    let arenas: Vec<u64> = stored
        .kept
        .controller
        .arenas
        .iter()
        .map(|a| a.iova)
        .collect();
    let StoredController {
        vfio,
        record,
        kept,
        arenas: memfds,
        windows,
        windows_file,
    } = stored;
    let recovered = Controller::recover(address, vfio, &kept, record, memfds, options)
        .and_then(|taken| injected_recover_fault().map(|()| taken));
    let (ctrl, done) = match recovered {
        Ok(taken) => taken,
        Err(e) => {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "{address}: not taken over as the previous process left it ({}); resetting it",
                vfblk_vhost::error_chain(&e)
            );
            // Every fd of it goes (ours with `stored`, the store's by name): the device is
            // opened afresh once nobody holds it.
            forget(store, &names.all(&arenas));
            return None;
        }
    };
    // A window the record does not name may still hold what the dead process mapped just
    // before or unmapped just after its last record: removed, so that it can be used again.
    let valid: Vec<LentWindow> = windows
        .into_iter()
        .filter(|w| w.base % WINDOW_SIZE == 0 && w.base / WINDOW_SIZE < WINDOWS as u64)
        .collect();
    let mut unmapped = 0;
    for slot in 0..WINDOWS as u64 {
        let base = slot * WINDOW_SIZE;
        if valid.iter().any(|w| w.base == base) {
            continue;
        }
        match ctrl.unmap_within(base, WINDOW_SIZE) {
            Ok(n) => unmapped += n,
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "{address}: the dead process's mappings at IOVA {base:#x} could not be removed; resetting it"
                );
                drop(ctrl);
                forget(store, &names.all(&arenas));
                return None;
            }
        }
    }
    tracing::info!(
        "{address}: taken over as the previous process left it, with no reset: {} of its I/O queue pair(s) deleted (every command on them completed or aborted), {} admin command(s) completed, {} KiB of its other DMA memory and {} KiB of unrecorded guest RAM mappings removed, {} window(s) of guest RAM kept mapped, in {:.2} ms",
        done.queues_deleted,
        done.admin_completed,
        done.unmapped_bytes >> 10,
        unmapped >> 10,
        valid.len(),
        done.elapsed.as_secs_f64() * 1e3
    );
    let shared = SharedController::adopted(ctrl, &valid);
    keep(store, address, &shared, Some(windows_file));
    Some(shared)
}

/// In a test build (feature `test-delay`), `VFBLK_TEST_RECOVER_FAULT=1` makes the take-over
/// of a dead process's controller fail after it succeeded (its queues deleted, its memory
/// adopted), so that the controller is reset and opened afresh while the store still held
/// its fds: the fallback, tested.
fn injected_recover_fault() -> vfblk_nvme::Result<()> {
    #[cfg(feature = "test-delay")]
    if std::env::var("VFBLK_TEST_RECOVER_FAULT").as_deref() == Ok("1") {
        return Err(vfblk_nvme::Error::BadArgument(
            "the take-over failed by VFBLK_TEST_RECOVER_FAULT".into(),
        ));
    }
    Ok(())
}

/// Keeps `shared` in `store` (if there is one): its fds, its arenas (and those to come), its
/// record and its windows. A controller taken over from a dead process (`recovered`: with
/// its windows record, if the store had one) has its records from the store already (the
/// record inside it); else new ones replace whatever the store holds under their names. A
/// failure is logged: the controller serves on, and a crash would reset it.
pub(super) fn keep(
    store: Option<&Arc<FdStore>>,
    address: PciAddress,
    shared: &SharedController,
    recovered: Option<Option<KeptFile>>,
) {
    let Some(store) = store else { return };
    if let Err(why) = keep_fallible(store, address, shared, recovered) {
        tracing::warn!(
            "{address}: not kept in the fd store ({why}); after a crash it would be reset"
        );
    }
}

fn keep_fallible(
    store: &Arc<FdStore>,
    address: PciAddress,
    shared: &SharedController,
    recovered: Option<Option<KeptFile>>,
) -> Result<(), String> {
    let names = Names::of(address);
    let err = |e: &dyn std::error::Error| vfblk_vhost::error_chain(e);
    // Taken over from a dead process with its records (the windows' may be missing).
    let (recovered, windows) = match recovered {
        Some(windows) => (true, windows),
        None => (false, None),
    };
    if !recovered {
        // Whatever record the store holds under the name is another process's (an
        // upgrade's other side): gone before anything else, so that a failure below leaves
        // no record a successor would trust.
        store.remove(&names.record()).map_err(|e| err(&e))?;
    }
    let (hook_store, hook_names) = (store.clone(), names.clone());
    // Before the arenas are listed, so that none made meanwhile is missed.
    shared.ctrl.on_new_arena(Arc::new(
        move |fd: std::os::fd::BorrowedFd<'_>, iova: u64, _len: usize| {
            if let Err(e) = hook_store.store(&hook_names.arena(iova), &fd) {
                tracing::warn!(
                    "a DMA arena of {} at IOVA {iova:#x} is not in the fd store ({}); after a crash the controller would be reset",
                    hook_names.prefix,
                    vfblk_vhost::error_chain(&e)
                );
            }
        },
    ));
    let (vfio, arenas) = shared.ctrl.kept_fds().map_err(|e| err(&e))?;
    // What a record names is stored before the record.
    store
        .store(&names.container(), &vfio.container)
        .map_err(|e| err(&e))?;
    store
        .store(&names.device(), &vfio.device)
        .map_err(|e| err(&e))?;
    for (iova, fd) in &arenas {
        store.store(&names.arena(*iova), fd).map_err(|e| err(&e))?;
    }
    let create =
        |what: &str| KeptFile::create(&format!("vfblk-{what}-{address}")).map_err(|e| err(&e));
    if !shared.ctrl.kept() {
        shared.ctrl.keep(create("record")?).map_err(|e| err(&e))?;
    }
    let mut replace = Vec::new();
    // The record the store holds is this controller's when it was taken over from a dead
    // process with it; else this process's goes in (last: what it names is stored).
    if !recovered {
        let fd = shared.ctrl.kept_record_fd().map_err(|e| err(&e))?;
        replace.push((names.record(), fd));
    }
    // The windows a dead process recorded stay as they are until a backend takes them
    // over (or the restart drops them); new windows start empty.
    let windows = match windows {
        Some(file) => file,
        None => {
            let file = create("windows")?;
            replace.push((
                names.windows(),
                file.file().try_clone().map_err(|e| err(&e))?.into(),
            ));
            file
        }
    };
    *shared
        .kept_windows
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(windows);
    if !replace.is_empty() {
        shared
            .kept_windows
            .write(&shared.mapped.lock().unwrap_or_else(|e| e.into_inner()));
    }
    for (name, fd) in replace {
        store.remove(&name).map_err(|e| err(&e))?;
        store.store(&name, &fd).map_err(|e| err(&e))?;
    }
    Ok(())
}

/// Removes from the store the names of `ctrl`'s arenas (its memory is going: an upgrade's
/// new process brought the controller up in memory of its own).
pub(super) fn forget_arenas(store: Option<&Arc<FdStore>>, address: PciAddress, ctrl: &Controller) {
    let names = Names::of(address);
    let arenas: Vec<String> = ctrl.arena_iovas().iter().map(|&i| names.arena(i)).collect();
    forget(store, &arenas);
}

/// Removes the record of the controller at `address` from the store: this process is
/// about to drive it in a way the record there does not follow (taking it back after a
/// failed upgrade); [`keep`] stores its own afterwards.
pub(super) fn forget_record(store: Option<&Arc<FdStore>>, address: PciAddress) {
    forget(store, &[Names::of(address).record()]);
}

/// Removes from the store everything kept of `ctrl` (it is closed for good).
pub(super) fn forget_controller(
    store: Option<&Arc<FdStore>>,
    address: PciAddress,
    ctrl: &Controller,
) {
    forget(store, &Names::of(address).all(&ctrl.arena_iovas()));
}

fn forget(store: Option<&Arc<FdStore>>, names: &[String]) {
    let Some(store) = store else { return };
    for name in names {
        if let Err(e) = store.remove(name) {
            tracing::warn!("fd store: {}", vfblk_vhost::error_chain(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_names_are_store_names_and_lead_back_to_their_controller() {
        let address: PciAddress = "0000:00:04.0".parse().unwrap();
        let names = Names::of(address);
        for name in [
            names.record(),
            names.container(),
            names.device(),
            names.windows(),
            names.arena(0x40_0000_0000),
        ] {
            assert!(!name.contains(':'), "{name}");
        }
        assert_eq!(Names::record_owner(&names.record()), Some(address));
        assert_eq!(Names::record_owner(&names.container()), None);
        assert_eq!(Names::record_owner("vm1/record"), None);
        assert_eq!(Names::owner(&names.arena(0x1000)), Some(address));
        assert_eq!(Names::owner("vm1/sock"), None);
    }
}
