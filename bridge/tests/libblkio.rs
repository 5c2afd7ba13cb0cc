//! Interop with a stock, independent vhost-user-blk frontend: libblkio (the `blkio` crate,
//! Red Hat's client library, driver `virtio-blk-vhost-user`). It needs CONFIGURE_MEM_SLOTS
//! (it adds memory with ADD_MEM_REG), and its kick and call eventfds are blocking. Each case
//! connects, reads the capacity, and writes then verifies data on every queue, with the bridge
//! polling and sleeping, on the mem and file backends.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use vfblk_bridge::backend::{Backend, FileBackend, MemBackend};
use vfblk_bridge::device::BlkDevice;
use vfblk_vhost::guest_errors::GuestErrors;
use vfblk_vhost::poller::{PollMode, Poller};
use vfblk_vhost::protocol::DeviceConfig;

const DISK: u64 = 16 << 20;
const CHUNK: usize = 64 << 10;

#[derive(Clone, Copy, Debug)]
enum BackendKind {
    Mem,
    File,
}

/// Serves a fresh disk on a socket in this process; returns the socket.
fn serve(name: &str, kind: BackendKind, queues: u16, poll: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vfblk-libblkio-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let backend: Arc<dyn Backend> = match kind {
        BackendKind::Mem => Arc::new(MemBackend::open(&dir.join("disk"), DISK).unwrap()),
        BackendKind::File => Arc::new(FileBackend::open(&dir.join("disk"), Some(DISK)).unwrap()),
    };
    let mode = PollMode {
        idle_before_sleep: if poll {
            None
        } else {
            Some(Duration::from_micros(100))
        },
    };
    let pollers = (0..2)
        .map(|i| Arc::new(Poller::spawn(format!("test-poller{i}"), None, mode).unwrap()))
        .collect();
    let config = Arc::new(DeviceConfig {
        num_queues: queues,
        inflight: true,
        device: Arc::new(BlkDevice::new(backend, queues, "libblkio-test")),
        pollers,
        errors: Arc::new(GuestErrors::new(name)),
        fd_store: None,
        dirty_log_marks: true,
    });
    let socket = dir.join("blk.sock");
    // Serves until the test process ends.
    std::mem::forget(vfblk_vhost::server::SocketServer::start(&socket, config).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the server did not listen");
        std::thread::sleep(Duration::from_millis(5));
    }
    socket
}

fn pattern(queue: usize, round: usize, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = (i as u32)
            .wrapping_mul(31)
            .wrapping_add((queue * 7 + round * 13) as u32) as u8;
    }
}

/// Waits (bounded) for one completion and returns its result code.
fn complete_one(q: &mut blkio::Blkioq, what: &str) -> i32 {
    let mut done = [MaybeUninit::<Completion>::uninit(); 1];
    let mut timeout = Duration::from_secs(10);
    let n = q
        .do_io(&mut done, 1, Some(&mut timeout), None)
        .unwrap_or_else(|e| panic!("{what}: do_io: {}", e.message()));
    assert_eq!(n, 1, "{what}: no completion within 10 s");
    // SAFETY: do_io initialised the first `n` entries.
    unsafe { done[0].assume_init_ref() }.ret
}

/// A started libblkio instance with `queues` queues and 2 * CHUNK bytes of mapped memory.
fn connect(socket: &Path, queues: usize) -> (Blkio, Vec<blkio::Blkioq>, *mut u8, *mut u8) {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    b.connect()
        .unwrap_or_else(|e| panic!("libblkio connect: {}", e.message()));
    assert_eq!(
        b.get_u64("capacity").unwrap(),
        DISK,
        "capacity from config space"
    );
    b.set_i32("num-queues", queues as i32).unwrap();
    let started = b
        .start()
        .unwrap_or_else(|e| panic!("libblkio start: {}", e.message()));
    assert_eq!(started.queues.len(), queues);
    let region = b.alloc_mem_region(2 * CHUNK).unwrap();
    b.map_mem_region(&region)
        .unwrap_or_else(|e| panic!("map_mem_region (ADD_MEM_REG): {}", e.message()));
    let (wbuf, rbuf) = (region.addr as *mut u8, (region.addr + CHUNK) as *mut u8);
    (b, started.queues, wbuf, rbuf)
}

fn exercise(socket: &Path, queues: usize) {
    let (b, mut queues_of_b, wbuf, rbuf) = connect(socket, queues);
    let started = &mut queues_of_b;
    for round in 0..4 {
        for (qi, q) in started.iter_mut().enumerate() {
            let offset = ((qi * 4 + round) * CHUNK) as u64;
            // SAFETY: the region holds 2 * CHUNK bytes, mapped while `b` lives.
            let (w, r) = unsafe {
                (
                    std::slice::from_raw_parts_mut(wbuf, CHUNK),
                    std::slice::from_raw_parts_mut(rbuf, CHUNK),
                )
            };
            pattern(qi, round, w);
            r.fill(0);
            q.write(offset, wbuf, CHUNK, 1, ReqFlags::empty());
            assert_eq!(complete_one(q, "write"), 0, "write on queue {qi}");
            q.read(offset, rbuf, CHUNK, 2, ReqFlags::empty());
            assert_eq!(complete_one(q, "read"), 0, "read on queue {qi}");
            assert!(w == r, "queue {qi} round {round}: data read back differs");
        }
    }
    let q = &mut started[0];
    q.flush(3, ReqFlags::empty());
    assert_eq!(complete_one(q, "flush"), 0);
    // A read past the end is refused, and the device keeps serving.
    q.read(DISK, rbuf, 4096, 4, ReqFlags::empty());
    assert_ne!(complete_one(q, "read past the end"), 0);
    q.read(0, rbuf, 4096, 5, ReqFlags::empty());
    assert_eq!(complete_one(q, "read after an error"), 0);
    // The client goes away (its blocking kick fds with it); the next one is served and
    // finds the data.
    drop(queues_of_b);
    drop(b);
    let (_b2, mut again, _, rbuf) = connect(socket, 1);
    let offset = (3 * CHUNK) as u64; // queue 0, round 3
    again[0].read(offset, rbuf, CHUNK, 6, ReqFlags::empty());
    assert_eq!(complete_one(&mut again[0], "read by a second client"), 0);
    let mut expect = vec![0u8; CHUNK];
    pattern(0, 3, &mut expect);
    // SAFETY: the second client's region holds 2 * CHUNK bytes.
    let got = unsafe { std::slice::from_raw_parts(rbuf, CHUNK) };
    assert!(
        got == expect.as_slice(),
        "the second client reads the first one's data"
    );
}

#[test]
fn libblkio_one_queue_mem_sleeping() {
    exercise(&serve("mem1s", BackendKind::Mem, 1, false), 1);
}

#[test]
fn libblkio_four_queues_mem_polling() {
    exercise(&serve("mem4p", BackendKind::Mem, 4, true), 4);
}

#[test]
fn libblkio_one_queue_file_polling() {
    exercise(&serve("file1p", BackendKind::File, 1, true), 1);
}

#[test]
fn libblkio_four_queues_file_sleeping() {
    exercise(&serve("file4s", BackendKind::File, 4, false), 4);
}
