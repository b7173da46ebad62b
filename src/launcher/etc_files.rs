//! The `/etc/passwd` and `/etc/group` a step that runs as a user sees: written by cimage from
//! the host's user database and mounted read-only over the image's own.
//!
//! runc sets a process's supplementary groups by looking each gid up in the container's
//! `/etc/group`, by name *or* number, and uses the gid of the first line that matches: an image
//! whose `/etc/group` holds a line `27:x:6:` turns the host group 27 the step should have into
//! gid 6 (`disk`). The runtime's answer about the container cannot show this, as it happens when
//! the process starts. With these files in place the image's account of users and groups is
//! never read: each line is a host group, named by its host name when that name cannot be
//! mistaken for a number, as enroot and Apptainer do.

use super::request::Identity;

/// A group's name as written: its host name when that is a plain name, else `g<gid>` (a name
/// that reads as a number, or holds `:` or a line break, would be misread).
fn group_name(gid: u32, host: Option<&str>) -> String {
    match host {
        Some(n) if plain(n) && n.parse::<u64>().is_err() => n.to_owned(),
        _ => format!("g{gid}"),
    }
}

/// A name that fits in a passwd or group field.
fn plain(n: &str) -> bool {
    !n.is_empty() && !n.contains(':') && !n.contains(',') && !n.chars().any(char::is_control)
}

/// The two files for `identity`, given the host's names of its groups (`names`, by gid; a gid
/// without a host name gets `g<gid>`). Returns `(passwd, group)`.
pub fn etc_files(identity: &Identity, names: &[(u32, Option<String>)]) -> (String, String) {
    let user = match plain(&identity.name) {
        true => identity.name.clone(),
        false => format!("u{}", identity.uid),
    };
    let mut passwd = String::from("root:x:0:0:root:/root:/bin/sh\n");
    if identity.uid != 0 {
        passwd.push_str(&format!(
            "{user}:x:{}:{}:{user}:/:/bin/sh\n",
            identity.uid, identity.gid
        ));
    }
    let mut gids: Vec<u32> = std::iter::once(0)
        .chain(std::iter::once(identity.gid))
        .chain(identity.groups.iter().copied())
        .collect();
    gids.sort_unstable();
    gids.dedup();
    let mut group = String::new();
    for gid in gids {
        let host = names
            .iter()
            .find(|(g, _)| *g == gid)
            .and_then(|(_, n)| n.as_deref());
        let name = match gid {
            0 => "root".to_owned(),
            _ => group_name(gid, host),
        };
        // The user is listed as a member of its supplementary groups, as on the host.
        let members = match gid != identity.gid && identity.groups.contains(&gid) {
            true => user.as_str(),
            false => "",
        };
        group.push_str(&format!("{name}:x:{gid}:{members}\n"));
    }
    (passwd, group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_is_a_host_group_and_no_name_reads_as_a_number() {
        let alice = Identity {
            uid: 1000,
            gid: 1000,
            name: "alice".into(),
            groups: vec![27, 44, 100, 1000],
        };
        let names = vec![
            (1000, Some("alice".to_owned())),
            (27, Some("sudo".to_owned())),
            (44, Some("6".to_owned())),
            (100, Some("a:b".to_owned())),
        ];
        let (passwd, group) = etc_files(&alice, &names);
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:alice:/:/bin/sh\n"
        );
        assert_eq!(
            group,
            "root:x:0:\nsudo:x:27:alice\ng44:x:44:alice\ng100:x:100:alice\nalice:x:1000:\n"
        );
        // runc's lookup of each supplementary gid (by name or number) finds only its own line.
        for gid in alice.supplementary() {
            let s = gid.to_string();
            let hit = group
                .lines()
                .find(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    f[0] == s || f[2] == s
                })
                .unwrap();
            assert_eq!(hit.split(':').nth(2), Some(s.as_str()), "{hit}");
        }
    }
}
