//! Work done inside an environment's guest through its agent: the network hostd planned
//! for it (at boot), running a command and moving files. Each is audited (the command line,
//! never its input or output; the file's path and size).

use std::net::IpAddr;
use std::time::Duration;

use proto::agent::{ExecRequest, FileGetRequest, FilePutRequest, NetworkConfig};

use super::{OrchError, Orchestrator};
use tokio::io::AsyncRead;

use crate::agent::{AgentError, ExecOutput, GuestFile};

/// Most output kept per stream of a command run through [`Orchestrator::exec`]; the rest
/// is counted in `dropped`.
pub const EXEC_OUTPUT_LIMIT: usize = 8 << 20;
/// Largest file `genos cp` moves either way.
pub const MAX_COPY_SIZE: u64 = 4 << 30;
/// Longest a command may run ([`Orchestrator::exec`]): the admin request waits for it.
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);

/// The guest's interface as genos-vmm's one virtio-net device appears in it: the kernel's
/// first Ethernet name (virtio-mmio devices have no bus path for udev to name them by).
pub const GUEST_INTERFACE: &str = "eth0";

/// What the guest's agent configures for a `nat`/`allowlist` environment: its end of the
/// point-to-point link to the environment's namespace ([`jailer::net::Addressing`]), the
/// namespace's end as its gateway, and `resolvers`.
pub fn guest_network(a: &jailer::net::Addressing, resolvers: Vec<IpAddr>) -> NetworkConfig {
    NetworkConfig {
        interface: GUEST_INTERFACE.into(),
        address: a.guest.into(),
        prefix: jailer::net::LINK_PREFIX,
        gateway: Some(a.gateway.into()),
        resolvers,
    }
}

impl Orchestrator {
    /// Runs a command in the guest of `name` to its end (at most `timeout`, then the
    /// agent kills its process group), with `stdin` as its input.
    pub async fn exec(
        &self,
        name: &str,
        actor: &str,
        mut exec: ExecRequest,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<ExecOutput, OrchError> {
        let agent = self.agent(name).await?;
        let timeout = timeout.min(MAX_EXEC_TIMEOUT);
        exec.timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        exec.stdin = stdin.is_some();
        self.audit(
            actor,
            "exec",
            name,
            &super::audit_text(&format!("user={:?} argv={:?}", exec.user, exec.argv)),
        )?;
        let agent_error = |source| OrchError::Agent {
            name: name.into(),
            source,
        };
        let process = agent.exec(exec).await.map_err(agent_error)?;
        let input = process.input();
        let feed = async {
            if let Some(data) = stdin {
                input.write(&data).await?;
                input.close().await?;
            }
            Ok::<(), AgentError>(())
        };
        // Output is read while stdin is written: a process that fills its stdout stops
        // reading its stdin.
        let (fed, output) = tokio::join!(feed, process.collect(EXEC_OUTPUT_LIMIT));
        let output = output.map_err(agent_error)?;
        // A process may exit without reading all of its input; that is its business.
        if let Err(e) = fed {
            tracing::debug!(env = name, error = %crate::error_chain(&e), "stdin not all taken");
        }
        Ok(output)
    }

    /// Writes `data` to `put.path` in the guest of `name`.
    pub async fn put_file(
        &self,
        name: &str,
        actor: &str,
        mut put: FilePutRequest,
        data: &[u8],
    ) -> Result<(), OrchError> {
        put.size = data.len() as u64;
        self.put_file_from(name, actor, put, &mut &data[..]).await
    }

    /// Writes `put.size` bytes read from `data` to `put.path` in the guest of `name`; the
    /// agent puts the file in place only once all of them arrived.
    pub async fn put_file_from(
        &self,
        name: &str,
        actor: &str,
        put: FilePutRequest,
        data: &mut (impl AsyncRead + Unpin),
    ) -> Result<(), OrchError> {
        let agent = self.agent(name).await?;
        self.audit(
            actor,
            "file-put",
            name,
            &format!(
                "path={:?} user={:?} mode={:o} size={} as_root={}",
                put.path, put.user, put.mode, put.size, put.as_root
            ),
        )?;
        agent
            .put_file(put, data)
            .await
            .map_err(|source| OrchError::Agent {
                name: name.into(),
                source,
            })
    }

    /// Reads `get.path` from the guest of `name`, refusing a file over `limit` bytes.
    pub async fn get_file(
        &self,
        name: &str,
        actor: &str,
        get: FileGetRequest,
        limit: u64,
    ) -> Result<(Vec<u8>, u32), OrchError> {
        let mut file = self.open_file(name, actor, get, limit).await?;
        let mut data = Vec::with_capacity(file.size.min(limit) as usize);
        while let Some(chunk) = file.next_chunk().await.map_err(|source| OrchError::Agent {
            name: name.into(),
            source,
        })? {
            data.extend_from_slice(&chunk);
        }
        Ok((data, file.mode))
    }

    /// Opens `get.path` in the guest of `name` for reading as it streams, refusing a file
    /// over `limit` bytes.
    pub async fn open_file(
        &self,
        name: &str,
        actor: &str,
        get: FileGetRequest,
        limit: u64,
    ) -> Result<GuestFile, OrchError> {
        let agent = self.agent(name).await?;
        self.audit(
            actor,
            "file-get",
            name,
            &format!(
                "path={:?} user={:?} as_root={}",
                get.path, get.user, get.as_root
            ),
        )?;
        agent
            .open_file(get, limit)
            .await
            .map_err(|source| OrchError::Agent {
                name: name.into(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_gets_its_link_address_with_the_namespace_as_gateway() {
        let a = jailer::net::Addressing::new("e3", 3).unwrap();

        let net = guest_network(&a, vec![]);

        assert_eq!(net.interface, "eth0");
        assert_eq!(net.address, "10.201.0.14".parse::<IpAddr>().unwrap());
        assert_eq!(net.prefix, 30);
        assert_eq!(net.gateway, Some("10.201.0.13".parse().unwrap()));
        assert!(net.resolvers.is_empty());
    }
}
