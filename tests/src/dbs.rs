//! Real PostgreSQL and Redis servers for tests: each started by the test in a temporary
//! directory on a loopback port of its own (no system service, nothing shared between tests),
//! and stopped when dropped.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root (CI) the server runs as
//! the `postgres` user Debian's package creates (or `nobody`). The binaries are found on PATH
//! or in `/usr/lib/postgresql/<version>/bin`, where Debian puts them.

use std::{
    ffi::CString,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// A free loopback port (bound and released: a small race the tests accept).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.exists() {
                // Follow a symlink to the versioned directory (postgres sits beside it there).
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                return Ok(real.parent().map_or(dir, Path::to_path_buf));
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (apt-get install postgresql)")?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no initdb under /usr/lib/postgresql (apt-get install postgresql)")
}

/// Whether PostgreSQL's server binaries are installed.
pub fn postgres_installed() -> bool {
    postgres_bin_dir().is_ok()
}

/// (uid, gid) to run PostgreSQL as: ourselves unless we are root.
fn server_user() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        let c = CString::new(name)?;
        // SAFETY: a valid C string; the result is read at once, before any other getpw* call.
        let entry = unsafe { libc::getpwnam(c.as_ptr()) };
        if !entry.is_null() {
            // SAFETY: non-null, points at libc's static passwd record.
            let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
            return Ok(Some((uid, gid)));
        }
    }
    bail!("running as root and neither a postgres nor a nobody user exists")
}

fn chown_tree(path: &Path, user: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// A PostgreSQL server of the test's own.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    /// Its loopback port.
    pub port: u16,
    child: Option<Child>,
}

impl Postgres {
    /// Creates a cluster (user `meshd`, trust auth on loopback) and starts it.
    pub fn start() -> anyhow::Result<Self> {
        let bin = postgres_bin_dir()?;
        let user = server_user()?;
        let dir = tempfile::Builder::new().prefix("meshd-pg-").tempdir()?;
        chown_tree(dir.path(), user)?;
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "-U",
                "meshd",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = user {
            use std::os::unix::process::CommandExt;
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut pg = Self {
            dir,
            bin,
            user,
            port: free_port()?,
            child: None,
        };
        pg.spawn()?;
        Ok(pg)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.path().join("server.log"))?;
        chown_tree(&self.dir.path().join("server.log"), self.user)?;
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=200",
            ])
            .stdout(Stdio::null())
            .stderr(log);
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: a kill takes the backends with the postmaster, as a
            // crashed host would.
            cmd.process_group(0);
            if let Some((uid, gid)) = self.user {
                cmd.uid(uid).gid(gid);
            }
        }
        self.child = Some(cmd.spawn().context("starting postgres")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.query("postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres did not come up: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        self.query("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(name))
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://meshd@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs SQL with psql; its unaligned output (`|`-separated, one row per line).
    pub fn query(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new("psql")
            .args([
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "meshd",
                "-p",
                &self.port.to_string(),
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Kills the server and every backend at once (SIGKILL to its process group).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            // SAFETY: signals our own child's process group.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    /// Starts it again on the same data and port (crash recovery after [`Self::kill`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis server of the test's own (no persistence).
pub struct Redis {
    _dir: tempfile::TempDir,
    /// Its loopback port.
    pub port: u16,
    child: Child,
}

impl Redis {
    /// Starts one.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("meshd-redis-").tempdir()?;
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not come up on port {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            _dir: dir,
            port,
            child,
        })
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
