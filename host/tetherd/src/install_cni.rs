//! `tetherd install-cni`: puts the `tether` plugin into the node's CNI bin directory so that
//! no runtime ever sees a half-written binary. The new file is written beside the old one,
//! synced, made executable and renamed over it; a runtime executing the old binary keeps its
//! inode. The chart's init container runs this (its image has no shell and no `cp`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;

use crate::cli::InstallCniArgs;

/// What an install did.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    /// The file was written (new, or replacing a different one).
    Written,
    /// The same bytes were already there, executable: nothing was touched.
    Unchanged,
}

pub fn run(a: &InstallCniArgs) -> ExitCode {
    match install(&a.source, &a.dest_dir, &a.name) {
        Ok(what) => {
            let dest = a.dest_dir.join(&a.name);
            match what {
                Installed::Written => println!("installed {}", dest.display()),
                Installed::Unchanged => println!("{} is up to date", dest.display()),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

/// The prefix of the staging files of plugin `name`.
fn staging_prefix(name: &str) -> String {
    format!(".{name}.tetherd-install-")
}

/// A fresh staging file beside the plugin, created exclusively (another name is tried when
/// one exists).
fn stage(dir: &Path, name: &str) -> std::io::Result<(std::path::PathBuf, fs::File)> {
    let mut last = None;
    for attempt in 0..8u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = dir.join(format!(
            "{}{}-{nanos:09}-{attempt}",
            staging_prefix(name),
            std::process::id()
        ));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no staging name was free")))
}

/// Staging files an installer killed mid-copy left behind, older than [`STALE`]: removed (a
/// younger one may be another installer's, at work).
fn sweep_stale(dir: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = staging_prefix(name);
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE);
        if old && e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// How old a staging file must be to count as left behind.
const STALE: std::time::Duration = std::time::Duration::from_secs(600);

/// Installs `source` as `dir/name`, atomically.
pub fn install(source: &Path, dir: &Path, name: &str) -> anyhow::Result<Installed> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        anyhow::bail!("--name {name:?} is not a plain file name");
    }
    let bytes =
        fs::read(source).map_err(|e| anyhow::anyhow!("reading {}: {e}", source.display()))?;
    if bytes.is_empty() {
        anyhow::bail!("{} is empty", source.display());
    }
    if !dir.is_dir() {
        anyhow::bail!(
            "{} is not a directory (is the host's CNI bin directory mounted?)",
            dir.display()
        );
    }
    let dest = dir.join(name);
    if let (Ok(old), Ok(meta)) = (fs::read(&dest), fs::metadata(&dest))
        && old == bytes
        && meta.permissions().mode() & 0o111 == 0o111
    {
        return Ok(Installed::Unchanged);
    }
    sweep_stale(dir, name);
    // A hidden name in the same directory (same filesystem, so the rename is atomic), created
    // exclusively: two installers (a container's pid is always 1) never write one file, and
    // only the file this one created is ever removed.
    let (staged, mut f) = stage(dir, name)
        .map_err(|e| anyhow::anyhow!("creating a staging file in {}: {e}", dir.display()))?;
    let written = (|| {
        f.write_all(&bytes)?;
        f.set_permissions(fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
        fs::rename(&staged, &dest)?;
        // The rename itself survives a crash once the directory is synced.
        fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&staged);
        anyhow::bail!("installing {}: {e}", dest.display());
    }
    Ok(Installed::Written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn plugin(dir: &Path, body: &[u8]) -> std::path::PathBuf {
        let p = dir.join("src-plugin");
        fs::write(&p, body).expect("write source");
        p
    }

    #[test]
    fn installs_executable_and_leaves_no_staging_file() {
        let src = tempfile::tempdir().expect("tempdir");
        let bin = tempfile::tempdir().expect("tempdir");
        let s = plugin(src.path(), b"\x7fELF new");
        assert_eq!(
            install(&s, bin.path(), "tether").expect("install"),
            Installed::Written
        );
        let dest = bin.path().join("tether");
        assert_eq!(fs::read(&dest).expect("read"), b"\x7fELF new");
        assert_eq!(
            fs::metadata(&dest).expect("meta").permissions().mode() & 0o777,
            0o755
        );
        let names: Vec<_> = fs::read_dir(bin.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("tether")]);
        // Again: nothing to do, the file is not replaced.
        let ino = fs::metadata(&dest).expect("meta").ino();
        assert_eq!(
            install(&s, bin.path(), "tether").expect("install"),
            Installed::Unchanged
        );
        assert_eq!(fs::metadata(&dest).expect("meta").ino(), ino);
    }

    /// The old binary is replaced by a rename, never rewritten in place: whoever has the old
    /// file open (a runtime executing it) still reads the old bytes, and the path shows the
    /// new ones whole.
    #[test]
    fn replaces_by_rename_so_an_open_old_binary_is_untouched() {
        let src = tempfile::tempdir().expect("tempdir");
        let bin = tempfile::tempdir().expect("tempdir");
        let dest = bin.path().join("tether");
        fs::write(&dest, b"old binary").expect("old");
        let mut held = fs::File::open(&dest).expect("open old");
        let old_ino = fs::metadata(&dest).expect("meta").ino();
        let s = plugin(src.path(), b"the new binary");
        assert_eq!(
            install(&s, bin.path(), "tether").expect("install"),
            Installed::Written
        );
        assert_ne!(fs::metadata(&dest).expect("meta").ino(), old_ino);
        let mut old = Vec::new();
        std::io::Read::read_to_end(&mut held, &mut old).expect("read old");
        assert_eq!(old, b"old binary");
        assert_eq!(fs::read(&dest).expect("read"), b"the new binary");
    }

    /// A staging file left by a killed installer is removed once it is old; a young one (an
    /// installer at work) is left alone.
    #[test]
    fn staging_files_left_behind_are_swept_once_old() {
        let src = tempfile::tempdir().expect("tempdir");
        let bin = tempfile::tempdir().expect("tempdir");
        let old = bin.path().join(".tether.tetherd-install-1-000000001-0");
        let young = bin.path().join(".tether.tetherd-install-1-000000002-0");
        let other = bin.path().join(".other.tetherd-install-1-000000003-0");
        for p in [&old, &young, &other] {
            fs::write(p, b"partial").expect("write");
        }
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for p in [&old, &other] {
            fs::File::options()
                .write(true)
                .open(p)
                .expect("open")
                .set_modified(an_hour_ago)
                .expect("set mtime");
        }
        install(&plugin(src.path(), b"bin"), bin.path(), "tether").expect("install");
        assert!(!old.exists(), "an old staging file stays");
        assert!(young.exists(), "another installer's fresh file was removed");
        assert!(other.exists(), "another plugin's file was removed");
    }

    #[test]
    fn refuses_what_it_cannot_install_and_says_why() {
        let src = tempfile::tempdir().expect("tempdir");
        let s = plugin(src.path(), b"x");
        let missing = src.path().join("no-such-dir");
        let e = install(&s, &missing, "tether").expect_err("no dir");
        assert!(e.to_string().contains("is not a directory"), "{e}");
        let e = install(&src.path().join("absent"), src.path(), "tether").expect_err("no src");
        assert!(e.to_string().contains("reading"), "{e}");
        let e = install(&s, src.path(), "../tether").expect_err("bad name");
        assert!(e.to_string().contains("plain file name"), "{e}");
        let empty = plugin(src.path(), b"");
        let e = install(&empty, src.path(), "tether").expect_err("empty");
        assert!(e.to_string().contains("is empty"), "{e}");
    }
}
