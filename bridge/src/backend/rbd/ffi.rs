//! The parts of librados and librbd (Ceph 16, librbd 1.16) the RBD backend calls, loaded at
//! run time (`dlopen`): a target that serves no RBD image needs no Ceph library, and the lab
//! guests carry none. No maintained Rust binding exists (the `ceph` crate covers librados
//! only); these declarations are ours, and a test compiles their C types against the
//! installed headers ([`SIGNATURES`]).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// `rados_t`.
pub type Rados = *mut c_void;
/// `rados_ioctx_t`.
pub type IoCtx = *mut c_void;
/// `rbd_image_t`.
pub type Image = *mut c_void;
/// `rbd_completion_t`.
pub type Completion = *mut c_void;
/// `rbd_callback_t`.
pub type Callback = unsafe extern "C" fn(Completion, *mut c_void);

/// `RBD_LOCK_MODE_EXCLUSIVE`.
pub const LOCK_MODE_EXCLUSIVE: c_int = 0;

/// Declares each function once: its Rust type, the library it lives in, and its C type as
/// the header declares it. Makes [`Api`], [`SIGNATURES`] and the loader.
macro_rules! functions {
    ($($lib:ident $name:ident $c:literal: $rust:ty;)*) => {
        /// The functions, resolved.
        #[allow(missing_docs)]
        pub struct Api {
            $(pub $name: $rust,)*
        }

        /// Every function used, with its C type (checked by a test that compiles these
        /// against `<rbd/librbd.h>` and `<rados/librados.h>`).
        pub const SIGNATURES: &[(&str, &str)] = &[$((stringify!($name), $c),)*];

        fn resolve(rados: *mut c_void, rbd: *mut c_void) -> Result<Api, String> {
            Ok(Api {
                $($name: {
                    let lib = match stringify!($lib) { "rados" => rados, _ => rbd };
                    let cname = concat!(stringify!($name), "\0");
                    // SAFETY: dlsym on a handle we opened, with a NUL-terminated name.
                    let p = unsafe { libc::dlsym(lib, cname.as_ptr().cast()) };
                    if p.is_null() {
                        return Err(format!("{} missing from the Ceph libraries", stringify!($name)));
                    }
                    // SAFETY: the symbol is the function the header declares with this type
                    // (the signature test checks the declaration against the header).
                    unsafe { std::mem::transmute::<*mut c_void, $rust>(p) }
                },)*
            })
        }
    };
}

functions! {
    rados rados_create2 "int (*)(rados_t *, const char *const, const char *const, uint64_t)":
        unsafe extern "C" fn(*mut Rados, *const c_char, *const c_char, u64) -> c_int;
    rados rados_conf_read_file "int (*)(rados_t, const char *)":
        unsafe extern "C" fn(Rados, *const c_char) -> c_int;
    rados rados_conf_set "int (*)(rados_t, const char *, const char *)":
        unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int;
    rados rados_conf_get "int (*)(rados_t, const char *, char *, size_t)":
        unsafe extern "C" fn(Rados, *const c_char, *mut c_char, usize) -> c_int;
    rados rados_connect "int (*)(rados_t)":
        unsafe extern "C" fn(Rados) -> c_int;
    rados rados_shutdown "void (*)(rados_t)":
        unsafe extern "C" fn(Rados);
    rados rados_getaddrs "int (*)(rados_t, char **)":
        unsafe extern "C" fn(Rados, *mut *mut c_char) -> c_int;
    rados rados_buffer_free "void (*)(char *)":
        unsafe extern "C" fn(*mut c_char);
    rados rados_cluster_fsid "int (*)(rados_t, char *, size_t)":
        unsafe extern "C" fn(Rados, *mut c_char, usize) -> c_int;
    rados rados_ioctx_create "int (*)(rados_t, const char *, rados_ioctx_t *)":
        unsafe extern "C" fn(Rados, *const c_char, *mut IoCtx) -> c_int;
    rados rados_ioctx_destroy "void (*)(rados_ioctx_t)":
        unsafe extern "C" fn(IoCtx);
    rbd rbd_create2 "int (*)(rados_ioctx_t, const char *, uint64_t, uint64_t, int *)":
        unsafe extern "C" fn(IoCtx, *const c_char, u64, u64, *mut c_int) -> c_int;
    rbd rbd_open "int (*)(rados_ioctx_t, const char *, rbd_image_t *, const char *)":
        unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int;
    rbd rbd_open_read_only "int (*)(rados_ioctx_t, const char *, rbd_image_t *, const char *)":
        unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int;
    rbd rbd_close "int (*)(rbd_image_t)":
        unsafe extern "C" fn(Image) -> c_int;
    rbd rbd_remove "int (*)(rados_ioctx_t, const char *)":
        unsafe extern "C" fn(IoCtx, *const c_char) -> c_int;
    rbd rbd_get_size "int (*)(rbd_image_t, uint64_t *)":
        unsafe extern "C" fn(Image, *mut u64) -> c_int;
    rbd rbd_resize "int (*)(rbd_image_t, uint64_t)":
        unsafe extern "C" fn(Image, u64) -> c_int;
    rbd rbd_aio_create_completion "int (*)(void *, rbd_callback_t, rbd_completion_t *)":
        unsafe extern "C" fn(*mut c_void, Callback, *mut Completion) -> c_int;
    rbd rbd_aio_get_return_value "ssize_t (*)(rbd_completion_t)":
        unsafe extern "C" fn(Completion) -> isize;
    rbd rbd_aio_release "void (*)(rbd_completion_t)":
        unsafe extern "C" fn(Completion);
    rbd rbd_aio_readv "int (*)(rbd_image_t, const struct iovec *, int, uint64_t, rbd_completion_t)":
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int;
    rbd rbd_aio_writev "int (*)(rbd_image_t, const struct iovec *, int, uint64_t, rbd_completion_t)":
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int;
    rbd rbd_aio_flush "int (*)(rbd_image_t, rbd_completion_t)":
        unsafe extern "C" fn(Image, Completion) -> c_int;
    rbd rbd_aio_discard "int (*)(rbd_image_t, uint64_t, uint64_t, rbd_completion_t)":
        unsafe extern "C" fn(Image, u64, u64, Completion) -> c_int;
    rbd rbd_aio_write_zeroes "int (*)(rbd_image_t, uint64_t, size_t, rbd_completion_t, int, int)":
        unsafe extern "C" fn(Image, u64, usize, Completion, c_int, c_int) -> c_int;
    rbd rbd_lock_get_owners "int (*)(rbd_image_t, rbd_lock_mode_t *, char **, size_t *)":
        unsafe extern "C" fn(Image, *mut c_int, *mut *mut c_char, *mut usize) -> c_int;
    rbd rbd_lock_get_owners_cleanup "void (*)(char **, size_t)":
        unsafe extern "C" fn(*mut *mut c_char, usize);
    rbd rbd_lock_break "int (*)(rbd_image_t, rbd_lock_mode_t, const char *)":
        unsafe extern "C" fn(Image, c_int, *const c_char) -> c_int;
}

/// The libraries, opened once per process; the error says what is missing.
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn open(name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: a NUL-terminated library name; the handle is kept for the process's life.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a C string or null, valid until the next dl call.
        let why = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!(
            "{}: {why} (Debian: apt install librbd1)",
            name.to_string_lossy()
        ));
    }
    Ok(handle)
}

fn load() -> Result<Api, String> {
    let rados = open(c"librados.so.2")?;
    let rbd = open(c"librbd.so.1")?;
    resolve(rados, rbd)
}

/// A librados/librbd return code as text (they return `-errno`).
pub fn errno_text(rc: i64) -> String {
    format!("{} ({rc})", std::io::Error::from_raw_os_error((-rc) as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The declarations above, compiled as C against the installed headers: a type that
    /// does not match the header fails the compile. Skipped (with a note) where the headers
    /// are not installed.
    #[test]
    fn declarations_match_the_ceph_headers() {
        if !std::path::Path::new("/usr/include/rbd/librbd.h").exists() {
            eprintln!("librbd-dev not installed: declarations not checked");
            return;
        }
        let mut c = String::from(
            "#include <sys/uio.h>\n#include <rados/librados.h>\n#include <rbd/librbd.h>\n",
        );
        for (name, ty) in SIGNATURES {
            c.push_str(&format!(
                "_Static_assert(__builtin_types_compatible_p(__typeof__(&{name}), {ty}), \"{name}\");\n"
            ));
        }
        c.push_str(&format!(
            "_Static_assert(RBD_LOCK_MODE_EXCLUSIVE == {LOCK_MODE_EXCLUSIVE}, \"lock mode\");\n"
        ));
        let dir = std::env::temp_dir().join(format!("vfblk-rbd-sig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("check.c");
        std::fs::write(&file, &c).unwrap();
        let out = std::process::Command::new("cc")
            .args(["-fsyntax-only", "-std=gnu11"])
            .arg(&file)
            .output()
            .expect("a C compiler (cc)");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "declarations differ from the headers:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn the_libraries_load_where_installed() {
        match api() {
            Ok(_) => {}
            Err(e) => assert!(e.contains("librbd1"), "{e}"),
        }
    }
}
