//! vhost-user-blk device: protocol handler, guest memory, virtqueues, inflight tracking,
//! virtio-blk requests and pluggable block backends (RAM, file, NVMe).
//!
//! Not built yet: this crate is where issue 4 ("vhost-user-blk device with inflight
//! tracking") lands. It is a workspace member now so the layout is fixed from the start.

#![deny(missing_docs)]
