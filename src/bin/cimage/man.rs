//! `cimage man DIR` (hidden): the manual pages of the CLI, made from its clap definition so that
//! they never drift from it: `cimage(1)` with every command, and `cimage-COMMAND(1)` for each
//! command (and `cimage-prewarm-add(1)` for the commands under `prewarm`).

use std::io::Write;
use std::path::Path;

/// Writes the pages of `cmd` (the whole CLI) into `dir`; returns how many.
pub fn write_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.name("cimage");
    cmd.build();
    let mut written = 0;
    write_one(&cmd, "cimage", dir, &mut written)?;
    Ok(written)
}

fn write_one(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut usize,
) -> std::io::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone().name(name.to_owned()))
        .section("1")
        .manual("cimage")
        .render(&mut page)?;
    if name == "cimage" {
        page.extend_from_slice(
            b".SH SEE ALSO\n.BR cimaged (8),\n.BR cimage\\-config (5), and \\fBcimage\\-COMMAND\\fR(1) for each command\n",
        );
    } else {
        page.extend_from_slice(b".SH SEE ALSO\n.BR cimage (1)\n");
    }
    std::fs::File::create(dir.join(format!("{name}.1")))?.write_all(&page)?;
    *written += 1;
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        write_one(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
