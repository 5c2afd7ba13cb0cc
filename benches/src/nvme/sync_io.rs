//! Running single commands to completion: for tools and tests, not the data path.

use std::time::{Duration, Instant};

use vfblk_nvme::queue::{IoCompletion, QueuePair, SubmitError};
use vfblk_nvme::spec::Status;
use vfblk_nvme::{Error, Result};

/// How long one synchronous I/O may take before it is reported as timed out.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How often [`run`] resubmits a command aborted by a controller reset.
pub const MAX_RESUBMITS: u32 = 3;

/// Submits with `submit`, rings, and polls until that command completes. A non-success
/// status is returned as [`Error::Command`] naming `what`.
pub fn run(
    device: &str,
    qp: &mut QueuePair,
    what: &str,
    mut submit: impl FnMut(&mut QueuePair) -> std::result::Result<u16, SubmitError>,
) -> Result<IoCompletion> {
    // A controller reset aborts what was in flight; re-executing a block command is safe.
    let (mut c, mut opcode) = run_status(device, qp, what, &mut submit)?;
    for _ in 0..MAX_RESUBMITS {
        if c.status != Status::ABORTED_BY_RESET {
            break;
        }
        (c, opcode) = run_status(device, qp, what, &mut submit)?;
    }
    if !c.status.is_success() {
        return Err(Error::Command {
            device: device.to_string(),
            queue: qp.qid(),
            cid: c.cid,
            opcode,
            what: what.to_string(),
            status: c.status,
        });
    }
    Ok(c)
}

/// Like [`run`], but returns the completion whatever its status, with the command's opcode.
pub fn run_status(
    device: &str,
    qp: &mut QueuePair,
    what: &str,
    submit: impl FnOnce(&mut QueuePair) -> std::result::Result<u16, SubmitError>,
) -> Result<(IoCompletion, u8)> {
    let cid = submit(qp).map_err(|e| Error::Device {
        device: device.to_string(),
        what: format!("queue {}: cannot submit {what}: {e}", qp.qid()),
    })?;
    let opcode = qp.opcode_of(cid).unwrap_or(0);
    qp.ring();
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut done: Option<IoCompletion> = None;
    loop {
        qp.poll(usize::MAX, |c| {
            if c.cid == cid {
                done = Some(c);
            }
        });
        if let Some(c) = done {
            return Ok((c, opcode));
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                device: device.to_string(),
                what: format!("queue {}, cid {cid}: {what}", qp.qid()),
            });
        }
        std::hint::spin_loop();
    }
}
