//! Debian packages for the xtasks, through a private apt configuration: its own sources
//! (bullseye to sid, on the host's own mirror), lists, cache and an empty dpkg status, in
//! `$NPD_CACHE`. Nothing is installed into the host; packages are downloaded and unpacked.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::output;

use crate::run;

/// Static busybox, the guest's userland.
const BUSYBOX: (&str, &str) = ("busybox-static", "bookworm");
/// Suites of the private apt configuration, and which archive each is in.
const SUITES: &[(&str, Archive)] = &[
    ("bullseye", Archive::Main),
    ("bullseye-security", Archive::Security),
    ("bookworm", Archive::Main),
    ("bookworm-updates", Archive::Main),
    ("bookworm-security", Archive::Security),
    ("bookworm-backports", Archive::Main),
    ("trixie", Archive::Main),
    ("trixie-security", Archive::Security),
    ("sid", Archive::Main),
];
#[derive(Clone, Copy)]
enum Archive {
    Main,
    Security,
}

pub(crate) struct Apt {
    dir: PathBuf,
}

impl Apt {
    pub(crate) fn new(matrix: &Path) -> anyhow::Result<Apt> {
        let dir = matrix.join("apt");
        for sub in [
            "lists/partial",
            "archives/partial",
            "etc/apt.conf.d",
            "etc/sources.list.d",
            "etc/preferences.d",
        ] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let (main, security) = debian_mirrors()?;
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        if !Path::new(keyring).is_file() {
            bail!("{keyring} is missing (package debian-archive-keyring)");
        }
        let mut sources = String::new();
        for (suite, archive) in SUITES {
            let uri = match archive {
                Archive::Main => &main,
                Archive::Security => &security,
            };
            sources.push_str(&format!("deb [signed-by={keyring}] {uri} {suite} main\n"));
        }
        write_if_changed(&dir.join("etc/sources.list"), &sources)?;
        // Prefer bookworm's builds: QEMU from backports runs with bookworm's libraries.
        let mut pins = String::new();
        for (release, priority) in [
            ("bookworm-backports", 990),
            ("bookworm", 900),
            ("bookworm-security", 900),
            ("bookworm-updates", 900),
        ] {
            pins.push_str(&format!(
                "Package: *\nPin: release n={release}\nPin-Priority: {priority}\n\n"
            ));
        }
        write_if_changed(&dir.join("etc/preferences"), &pins)?;
        // No package is installed here: the status stays empty, so apt resolves everything.
        let status = dir.join("status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        Ok(Apt { dir })
    }

    pub(crate) fn command(&self, program: &str) -> Command {
        let d = |p: &str| self.dir.join(p).to_string_lossy().into_owned();
        let mut cmd = Command::new(program);
        for (key, value) in [
            ("Dir::Etc::SourceList", d("etc/sources.list")),
            ("Dir::Etc::SourceParts", d("etc/sources.list.d")),
            ("Dir::Etc::Preferences", d("etc/preferences")),
            ("Dir::Etc::PreferencesParts", d("etc/preferences.d")),
            // Not the host's apt.conf.d (its extra index targets and hooks).
            ("Dir::Etc::Parts", d("etc/apt.conf.d")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::State::status", d("status")),
            ("Dir::Cache", d("cache")),
            ("Dir::Cache::archives", d("archives")),
            ("Debug::NoLocking", "1".into()),
            ("Acquire::Languages", "none".into()),
            ("APT::Install-Recommends", "0".into()),
            ("APT::Sandbox::User", "root".into()),
        ] {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        cmd
    }

    /// `apt-get update`, once per run at most, and only when something must be downloaded.
    pub(crate) fn update(&self) -> anyhow::Result<()> {
        let stamp = self.dir.join("updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(600));
        if !fresh {
            run(self.command("apt-get").args(["-q", "update"]))?;
            std::fs::write(&stamp, "")?;
        }
        Ok(())
    }

    /// Downloads `pkg=version` (or `pkg/suite`) into `dir` unless a matching .deb is there.
    pub(crate) fn download(&self, spec: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let (name, version) = spec
            .split_once('=')
            .map_or((spec.split('/').next().unwrap_or(spec), None), |(n, v)| {
                (n, Some(v))
            });
        let find = || -> Option<PathBuf> {
            std::fs::read_dir(dir)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    let file = p.file_name().unwrap_or_default().to_string_lossy();
                    let file = file.replace("%3a", ":");
                    file.ends_with(".deb")
                        && file.starts_with(&format!("{name}_"))
                        && version.is_none_or(|v| {
                            // The file name drops an epoch.
                            let v = v.split_once(':').map_or(v, |(_, v)| v);
                            file.starts_with(&format!("{name}_{v}_"))
                                || file.contains(&format!(":{v}_"))
                        })
                })
        };
        if let Some(deb) = find() {
            return Ok(deb);
        }
        self.update()?;
        let mut cmd = self.command("apt-get");
        cmd.args(["-q", "download", spec]).current_dir(dir);
        if let Err(e) = run(&mut cmd) {
            let policy =
                output(self.command("apt-cache").args(["policy", name])).unwrap_or_default();
            bail!(
                "{e:#}\n{spec} is not in the archive (any more?). What apt knows of {name}:\n{policy}\nUpdate the table in xtask/src/matrix.rs and docs/kernel-matrix.md to the nearest version, and say what differs."
            );
        }
        find().with_context(|| format!("apt-get downloaded no .deb for {spec}"))
    }
}

/// The host's Debian mirrors (main archive, security archive) from its apt sources, so that
/// the matrix uses the machine's own mirror; `NPD_DEBIAN_MIRROR` and
/// `NPD_DEBIAN_SECURITY_MIRROR` override them.
fn debian_mirrors() -> anyhow::Result<(String, String)> {
    let mut uris = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.flatten().map(|e| e.path()));
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(str::to_string));
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // `deb [options] URI suite components`
                let rest = match rest.trim_start().strip_prefix('[') {
                    Some(r) => r.split_once(']').map_or("", |(_, r)| r),
                    None => rest,
                };
                uris.extend(rest.split_whitespace().next().map(str::to_string));
            }
        }
    }
    let pick = |var: &str, suffix: &str| -> anyhow::Result<String> {
        if let Ok(uri) = std::env::var(var) {
            return Ok(uri);
        }
        uris.iter()
            .find(|u| u.trim_end_matches('/').ends_with(suffix))
            .cloned()
            .with_context(|| {
                format!("no Debian mirror ending in {suffix} in the host's apt sources: set {var}")
            })
    };
    Ok((
        pick("NPD_DEBIAN_MIRROR", "/debian")?,
        pick("NPD_DEBIAN_SECURITY_MIRROR", "/debian-security")?,
    ))
}

pub(crate) fn write_if_changed(path: &Path, text: &str) -> anyhow::Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Unpacks `debs` into `root` once (a marker lists what was unpacked).
pub(crate) fn unpack(debs: &[PathBuf], root: &Path) -> anyhow::Result<()> {
    let marker = root.join(".npd-unpacked");
    let list: String = debs
        .iter()
        .map(|d| format!("{}\n", d.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(list.as_str()) {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root)?;
    for deb in debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))?;
    }
    std::fs::write(&marker, list)?;
    Ok(())
}

/// Static busybox from bookworm, unpacked under `dir`: its path.
pub(crate) fn ensure_busybox(matrix: &Path, apt: &Apt) -> anyhow::Result<PathBuf> {
    let (name, suite) = BUSYBOX;
    let deb = apt.download(&format!("{name}/{suite}"), &matrix.join("debs"))?;
    let root = matrix.join("busybox");
    unpack(&[deb], &root)?;
    let bin = root.join("bin/busybox");
    if !bin.is_file() {
        bail!("{} has no bin/busybox", root.display());
    }
    Ok(bin)
}
