//! cimaged's manual pages, made from what they describe: `cimaged(8)` from the daemon's command
//! line (clap's definition, so a flag changed is a page changed) and `cimage-config(5)` from the
//! configuration reference the parser is tested against ([`cimage::config::reference`]).

use std::io::Write;
use std::path::Path;

use cimage::config::reference::{Default, KEYS};

/// Text for roff: backslashes and a leading dot or quote escaped, Markdown's `code` in bold.
fn roff(text: &str) -> String {
    let mut out = String::new();
    let mut bold = false;
    for c in text.chars() {
        match c {
            '`' => {
                out.push_str(if bold { "\\fR" } else { "\\fB" });
                bold = !bold;
            }
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            _ => out.push(c),
        }
    }
    if bold {
        out.push_str("\\fR");
    }
    match out.chars().next() {
        Some('.') | Some('\'') => format!("\\&{out}"),
        _ => out,
    }
}

/// `cimage-config(5)`: every key with its default and meaning.
pub fn config_page() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let mut p = format!(
        ".TH CIMAGE-CONFIG 5 \"\" \"cimage {version}\" \"File Formats\"\n\
.SH NAME\ncimage\\-config \\- the configuration keys of cimaged\n\
.SH DESCRIPTION\n\
cimaged reads one YAML file (\\fB\\-\\-config\\fR, default \\fI/etc/crane/config.yaml\\fR, or \
\\fBCIMAGE_CONFIG\\fR). It may be CraneSched's whole configuration file: sections cimage does \
not know are ignored, but an unknown key inside \\fBContainer\\fR or \\fBImageCache\\fR is an \
error, as is a wrong type or a bad duration, and the message names the key with its line and \
column. \\fBcimaged \\-\\-check\\-config\\fR validates a file and prints the resolved settings.\n\
.PP\nDurations are written \\fB500ms\\fR, \\fB90s\\fR, \\fB10m\\fR, \\fB1h30m\\fR, \\fB2d\\fR; \
sizes \\fB500MiB\\fR, \\fB50GiB\\fR. \\fB<host>\\fR stands for a registry host, \\fB[]\\fR for \
each item of a list.\n.SH KEYS\n"
    );
    for k in KEYS {
        let default = match k.default {
            Default::Value(v) => format!("\\fB{}\\fR", roff(v)),
            Default::Text(t) => roff(t),
        };
        p.push_str(&format!(
            ".TP\n.B {}\n(default: {default})\n{}\n",
            roff(k.name),
            roff(k.meaning)
        ));
    }
    p.push_str(
        ".SH FILES\n.TP\n.I /etc/crane/config.yaml\nthe default configuration file\n\
.TP\n.I /usr/share/doc/cimage/examples/config.yaml\nan example to start from\n\
.SH SEE ALSO\n.BR cimaged (8),\n.BR cimage (1)\n",
    );
    p
}

/// Writes `cimaged.8` (from `cmd`, the daemon's command line) and `cimage-config.5` into `dir`.
pub fn write_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut daemon = Vec::new();
    clap_mangen::Man::new(cmd.name("cimaged"))
        .section("8")
        .manual("System Administration")
        .render(&mut daemon)?;
    daemon.extend_from_slice(
        b".SH SIGNALS\nSIGTERM and SIGINT stop cimaged: it stops accepting requests, lets work \
in flight write its state (at most 15 s) and exits; running job steps go on and are followed \
again at the next start.\n\
.SH FILES\n.TP\n.I /etc/crane/config.yaml\nconfiguration (see \\fBcimage\\-config\\fR(5))\n\
.TP\n.I /run/cimage/cimaged.sock\nthe API socket (\\fBImageCache.Socket\\fR)\n\
.TP\n.I /run/cimage/image.sock\nthe CRI image endpoint (\\fBImageCache.ImageService.Socket\\fR)\n\
.TP\n.I /var/crane/cimage/index.redb\nthe index and the daemon's state (\\fBImageCache.StateDir\\fR)\n\
.SH SEE ALSO\n.BR cimage (1),\n.BR cimage\\-config (5)\n",
    );
    std::fs::File::create(dir.join("cimaged.8"))?.write_all(&daemon)?;
    std::fs::File::create(dir.join("cimage-config.5"))?.write_all(config_page().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_page_lists_every_key_in_roff() {
        let p = config_page();
        for k in KEYS {
            assert!(p.contains(&format!(".B {}\n", roff(k.name))), "{}", k.name);
        }
        assert_eq!(roff("`a-b`"), "\\fBa\\-b\\fR");
        assert_eq!(roff(".dot"), "\\&.dot");
    }
}
