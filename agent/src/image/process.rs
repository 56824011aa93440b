//! The process an image runs by default, from its config: entrypoint and
//! command, environment, working directory and user, Docker's way: a
//! command given at launch replaces the image's command and keeps its
//! entrypoint.

use std::io::Read;
use std::path::Path;

use oci_spec::image::ImageConfiguration;

/// What the image config says of its process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageProcess {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// Empty: `/`.
    pub cwd: String,
    /// As the image names it: `uid`, `uid:gid`, `name` or `name:group`.
    pub user: Option<String>,
}

impl ImageProcess {
    pub fn of(config: &ImageConfiguration) -> Self {
        let Some(c) = config.config() else {
            return ImageProcess::default();
        };
        ImageProcess {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            cwd: c.working_dir().clone().unwrap_or_default(),
            user: c.user().clone().filter(|u| !u.is_empty()),
        }
    }

    /// The argv to run: the entrypoint, then `args` or else the image's
    /// command.
    pub fn command(&self, args: &[String]) -> Vec<String> {
        let rest = if args.is_empty() { &self.cmd } else { args };
        self.entrypoint.iter().chain(rest).cloned().collect()
    }
}

/// The uid and gid of an image's `User`, names looked up in the rootfs's
/// own `/etc/passwd` and `/etc/group` (read beneath it, never through a
/// symlink out of it). A user given by number without a group gets its
/// passwd entry's group, else 0.
pub fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), String> {
    let (who, group) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_beneath(rootfs, "etc/passwd");
    let entry = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        let (uid, gid) = (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
        (f.first() == Some(&who) || f.get(2) == Some(&who)).then_some((uid, gid))
    });
    let uid = match (who.parse::<u32>(), entry) {
        (Ok(uid), _) => uid,
        (Err(_), Some((uid, _))) => uid,
        (Err(_), None) => return Err(format!("user '{who}' is not in the image's /etc/passwd")),
    };
    let gid = match group {
        None => entry.map_or(0, |(_, gid)| gid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_id(&read_beneath(rootfs, "etc/group"), g)
                .ok_or_else(|| format!("group '{g}' is not in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

fn group_id(groups: &str, name: &str) -> Option<u32> {
    groups.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.first() == Some(&name)).then(|| f.get(2)?.parse().ok())?
    })
}

/// A small file of the rootfs as text; empty when it is not there (or is
/// reached only through a symlink).
fn read_beneath(rootfs: &Path, rel: &str) -> String {
    let mut text = String::new();
    let file = crate::transfer::tree::beneath::root(rootfs)
        .and_then(|root| crate::transfer::tree::beneath::file(&root, Path::new(rel)));
    if let Ok(Some(file)) = file {
        let _ = file.take(1 << 20).read_to_string(&mut text);
    }
    text
}
