//! Reading back what the runtime made, for the launcher's checks: a created container's verbose
//! `ContainerStatus` (the generated OCI spec's process identity and mounts, the snapshot its
//! image is read from, its pid), an image's declared volumes (verbose `ImageStatus`), whether
//! the runtime creates them (its verbose `Status` config) and a started container's first
//! process as the host sees it (`/proc/<pid>/status`).

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use serde_json::Value;

use super::runtime::CriTaskRuntime;
use super::{bounded, image_spec};
use crate::runtime::{
    Created, EtcCheck, HostProcess, ProcessIdentity, RuntimeError, RuntimeErrorKind, SpecMount,
};

/// File systems a runtime makes new for a container: what is in them is the kernel's or the
/// runtime's, not a host directory's.
const NEW_FILESYSTEMS: &[&str] = &[
    "tmpfs", "proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

/// The process identity in the verbose info's generated OCI spec (`runtimeSpec.process.user`),
/// as containerd and CRI-O report it.
pub(super) fn identity_from_info(v: &Value) -> Option<ProcessIdentity> {
    let user = v.get("runtimeSpec")?.get("process")?.get("user")?;
    let id = |k: &str| user.get(k).and_then(|x| x.as_u64()).map(|x| x as u32);
    Some(ProcessIdentity {
        uid: id("uid")?,
        gid: id("gid")?,
        additional_gids: user
            .get("additionalGids")
            .and_then(|g| g.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The mounts of the generated OCI spec (`runtimeSpec.mounts`), in order, not yet resolved.
pub(super) fn mounts_from_info(v: &Value) -> Vec<SpecMount> {
    let Some(mounts) = v
        .get("runtimeSpec")
        .and_then(|s| s.get("mounts"))
        .and_then(|m| m.as_array())
    else {
        return Vec::new();
    };
    mounts
        .iter()
        .filter_map(|m| {
            let destination = m.get("destination")?.as_str()?.to_owned();
            let kind = m.get("type").and_then(|t| t.as_str()).unwrap_or("");
            Some(SpecMount {
                destination,
                // Anything not known to be new is taken as a host directory's contents.
                bind: !NEW_FILESYSTEMS.contains(&kind),
                landing: None,
            })
        })
        .collect()
}

/// The volumes of an image's config in its verbose `ImageStatus` info (containerd:
/// `imageSpec.config.Volumes`, a map from path to `{}`), sorted.
pub(super) fn volumes_from_image_info(json: &str) -> Option<Vec<String>> {
    let v: Value = serde_json::from_str(json).ok()?;
    let config = v.get("imageSpec")?.get("config")?;
    let mut volumes: Vec<String> = match config.get("Volumes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => m.keys().cloned().collect(),
        Some(_) => return None,
    };
    volumes.sort();
    Some(volumes)
}

/// Whether the runtime creates image volumes, from its verbose `Status` `config` (containerd:
/// `ignoreImageDefinedVolumes`); `None` when it does not say.
pub(super) fn creates_volumes_from_config(json: &str) -> Option<bool> {
    let v: Value = serde_json::from_str(json).ok()?;
    v.get("ignoreImageDefinedVolumes")?
        .as_bool()
        .map(|ignore| !ignore)
}

/// The ids of a `/proc/<pid>/status` line (`Uid:` or `Gid:`): real, effective, saved, fs.
fn four(line: &str) -> Option<[u32; 4]> {
    let ids: Vec<u32> = line
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    ids.try_into().ok()
}

/// A process's credentials from the text of its `/proc/<pid>/status`.
pub(super) fn host_process(pid: u32, status: &str) -> Option<HostProcess> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
    };
    Some(HostProcess {
        pid,
        uids: four(field("Uid")?)?,
        gids: four(field("Gid")?)?,
        groups: field("Groups")?
            .split_whitespace()
            .map(|g| g.parse().ok())
            .collect::<Option<_>>()?,
    })
}

/// Reads process `pid` on the host if it still belongs to container `cid` (its cgroup names
/// the container: a pid reused by another process is not taken for it). Blocking.
fn read_process(pid: u32, cid: &str) -> Result<Option<HostProcess>, std::io::Error> {
    let dir = std::path::Path::new("/proc").join(pid.to_string());
    let cgroup = match std::fs::read_to_string(dir.join("cgroup")) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let status = std::fs::read_to_string(dir.join("status"));
    // Read the cgroup again after the status: the pid was the container's all along.
    let again = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
    if !cgroup.contains(cid) || again != cgroup {
        return Ok(None);
    }
    match status {
        Ok(s) => Ok(host_process(pid, &s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn other(op: &'static str, message: String) -> RuntimeError {
    RuntimeError {
        op,
        kind: RuntimeErrorKind::Other,
        message,
    }
}

impl CriTaskRuntime {
    /// One verbose `ContainerStatus`: its `info` JSON, parsed (`None` when the runtime gives
    /// none, or not JSON).
    async fn verbose_info(&self, id: &str) -> Result<Option<(Value, String)>, RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: true,
        };
        let r = bounded(
            "ContainerStatus",
            &self.endpoint,
            self.timeout,
            c.container_status(req),
        )
        .await?;
        Ok(r.info
            .get("info")
            .and_then(|json| Some((serde_json::from_str(json).ok()?, json.clone()))))
    }

    /// [`crate::runtime::TaskRuntime::inspect_created`].
    pub(super) async fn created(&self, id: &str, image: bool) -> Result<Created, RuntimeError> {
        let Some((info, json)) = self.verbose_info(id).await? else {
            return Ok(Created {
                identity: None,
                etc: image.then(|| {
                    EtcCheck::Unknown("the runtime gives no verbose container status".into())
                }),
                mounts: Vec::new(),
            });
        };
        let identity = identity_from_info(&info);
        let mut mounts = mounts_from_info(&info);
        if !image {
            return Ok(Created {
                identity,
                etc: None,
                mounts,
            });
        }
        let destinations = mounts.iter().map(|m| m.destination.clone()).collect();
        let view = tokio::time::timeout(
            self.timeout,
            super::snapshot::check(self.channel.clone(), &json, destinations),
        )
        .await
        .unwrap_or_else(|_| {
            Err(RuntimeError {
                op: "Snapshots.Mounts",
                kind: RuntimeErrorKind::DeadlineExceeded,
                message: format!("no answer within {:?}", self.timeout),
            })
        })?;
        if let Some(landings) = view.landings {
            for (m, l) in mounts.iter_mut().zip(landings) {
                m.landing = Some(l);
            }
        }
        Ok(Created {
            identity,
            etc: Some(view.etc),
            mounts,
        })
    }

    /// [`crate::runtime::TaskRuntime::image_volumes`].
    pub(super) async fn volumes_of(
        &self,
        image: &str,
    ) -> Result<Option<Vec<String>>, RuntimeError> {
        // containerd and CRI-O serve the image service on the runtime's socket too.
        let mut c = ImageServiceClient::new(self.channel.clone());
        let req = cri::ImageStatusRequest {
            image: image_spec(image),
            verbose: true,
        };
        let r = bounded(
            "ImageStatus",
            &self.endpoint,
            self.timeout,
            c.image_status(req),
        )
        .await?;
        Ok(r.info.get("info").and_then(|j| volumes_from_image_info(j)))
    }

    /// [`crate::runtime::TaskRuntime::creates_image_volumes`].
    pub(super) async fn creates_volumes(&self) -> Result<Option<bool>, RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::StatusRequest { verbose: true };
        let r = bounded("Status", &self.endpoint, self.timeout, c.status(req)).await?;
        Ok(r.info
            .get("config")
            .and_then(|j| creates_volumes_from_config(j)))
    }

    /// [`crate::runtime::TaskRuntime::container_process`].
    pub(super) async fn process_of(&self, id: &str) -> Result<Option<HostProcess>, RuntimeError> {
        let Some((info, _)) = self.verbose_info(id).await? else {
            return Ok(None);
        };
        let Some(pid) = info
            .get("pid")
            .and_then(|p| p.as_u64())
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0)
        else {
            return Ok(None);
        };
        let cid = id.to_owned();
        tokio::task::spawn_blocking(move || read_process(pid, &cid))
            .await
            .map_err(|e| other("reading the step's process", e.to_string()))?
            .map_err(|e| other("reading the step's process", format!("/proc/{pid}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_process_identity_and_mounts_of_a_generated_spec() {
        let info: Value = serde_json::from_str(
            r#"{"sandboxID":"x","pid":42,"runtimeSpec":{"process":{"user":{"uid":65534,"gid":65534,"additionalGids":[65534,6]}},
            "mounts":[{"destination":"/proc","type":"proc","source":"proc"},
                      {"destination":"/dev/shm","type":"bind","source":"/run/x/shm","options":["rbind"]},
                      {"destination":"/data","type":"bind","source":"/s/0"},
                      {"destination":"/odd","source":"/s/1"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            identity_from_info(&info),
            Some(ProcessIdentity {
                uid: 65534,
                gid: 65534,
                additional_gids: vec![65534, 6]
            })
        );
        let mounts: Vec<(String, bool)> = mounts_from_info(&info)
            .into_iter()
            .map(|m| (m.destination, m.bind))
            .collect();
        assert_eq!(
            mounts,
            [
                ("/proc".into(), false),
                ("/dev/shm".into(), true),
                ("/data".into(), true),
                ("/odd".into(), true)
            ]
        );
        assert_eq!(identity_from_info(&Value::Null), None);
        assert!(mounts_from_info(&Value::Null).is_empty());
    }

    #[test]
    fn reads_image_volumes_and_the_runtimes_volume_setting() {
        let img = r#"{"chainID":"c","imageSpec":{"config":{"Cmd":["sh"],"Volumes":{"/data":{},"/a/b/etc":{}}}}}"#;
        assert_eq!(
            volumes_from_image_info(img),
            Some(vec!["/a/b/etc".into(), "/data".into()])
        );
        let none = r#"{"imageSpec":{"config":{"Cmd":["sh"]}}}"#;
        assert_eq!(volumes_from_image_info(none), Some(vec![]));
        assert_eq!(volumes_from_image_info("{}"), None);
        let cfg = |b: &str| format!(r#"{{"containerd":{{}},"ignoreImageDefinedVolumes":{b}}}"#);
        assert_eq!(creates_volumes_from_config(&cfg("false")), Some(true));
        assert_eq!(creates_volumes_from_config(&cfg("true")), Some(false));
        assert_eq!(creates_volumes_from_config("{}"), None);
    }

    #[test]
    fn reads_a_processs_credentials_from_its_status() {
        let status = "Name:\tsh\nUid:\t999\t999\t999\t999\nGid:\t995\t995\t995\t995\nFDSize:\t64\nGroups:\t0 44 995 \n";
        assert_eq!(
            host_process(7, status),
            Some(HostProcess {
                pid: 7,
                uids: [999; 4],
                gids: [995; 4],
                groups: vec![0, 44, 995]
            })
        );
        let none = "Uid:\t1\t1\t1\t1\nGid:\t1\t1\t1\t1\nGroups:\t\n";
        assert_eq!(host_process(7, none).unwrap().groups, Vec::<u32>::new());
        assert_eq!(host_process(7, "Uid:\t1\n"), None);
    }
}
