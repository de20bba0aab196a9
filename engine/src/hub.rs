//! The Hugging Face hub: finding a model in the local cache and downloading it into that cache,
//! in the layout `huggingface_hub` writes (`models--org--name/{blobs,snapshots,refs}`), so both
//! tools share one copy. Honours the variables the Hugging Face tools read: `HF_ENDPOINT` (mirrors),
//! `HF_TOKEN` (or the token file `huggingface-cli login` writes), `HF_HOME` / `HF_HUB_CACHE`, and
//! `HF_HUB_OFFLINE`.
//!
//! A download lists the repository (sizes included), checks the free disk space first, writes each
//! file to `blobs/<etag>.incomplete` and resumes it with an HTTP range request after a network
//! error (within the run, with backoff) or on the next start; LFS files are checked against their
//! SHA-256. Progress (bytes of total, speed) goes to a callback.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Where and how to reach the hub, from the environment as the Hugging Face tools read it.
#[derive(Clone, Debug)]
pub struct HubSettings {
    /// Base URL, e.g. `https://huggingface.co` or a mirror's (`HF_ENDPOINT`), without a trailing `/`.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer` to the endpoint (not to the CDN it redirects to).
    pub token: Option<String>,
    /// The hub cache folder (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// `HF_HUB_OFFLINE`: nothing is fetched.
    pub offline: bool,
}

impl HubSettings {
    pub fn from_env() -> HubSettings {
        HubSettings::from_vars(|name| std::env::var(name).ok())
    }

    /// The settings from variables read by `var` (the environment, or a test's map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> HubSettings {
        let get = |name: &str| var(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let hf_home = get("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache_home = get("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| home_dir().join(".cache"));
            cache_home.join("huggingface")
        });
        let cache = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = get("HF_TOKEN").or_else(|| get("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let path = get("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let endpoint = get("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
        let offline = get("HF_HUB_OFFLINE").is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"));
        HubSettings { endpoint: endpoint.trim_end_matches('/').to_string(), token, cache, offline }
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
}

/// One repository's folder in the cache.
#[derive(Clone, Debug)]
pub struct CacheRepo {
    root: PathBuf,
}

impl CacheRepo {
    pub fn new(cache: &Path, repo_id: &str) -> CacheRepo {
        CacheRepo { root: cache.join(format!("models--{}", repo_id.replace('/', "--"))) }
    }

    /// The snapshot folder `refs/<revision>` points at, if both exist.
    pub fn snapshot(&self, revision: &str) -> Option<PathBuf> {
        let commit = std::fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        let dir = self.root.join("snapshots").join(commit.trim());
        dir.is_dir().then_some(dir)
    }

    fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    fn incomplete(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.incomplete"))
    }
}

/// A file of the repository as the hub lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteFile {
    pub path: String,
    /// Bytes, when the listing says.
    pub size: Option<u64>,
    /// The SHA-256 of an LFS file (its etag and blob name), or the git blob id of a small file.
    pub etag: String,
    pub lfs_sha256: Option<String>,
}

/// A listing of one revision.
#[derive(Clone, Debug)]
pub struct RepoListing {
    pub commit: String,
    pub files: Vec<RemoteFile>,
}

/// Parses `GET /api/models/{id}/revision/{rev}?blobs=true`.
pub fn parse_listing(json: &serde_json::Value) -> Result<RepoListing> {
    let commit = json["sha"].as_str().ok_or_else(|| Error::Hub("the hub's listing has no commit (`sha`)".into()))?;
    let siblings = json["siblings"]
        .as_array()
        .ok_or_else(|| Error::Hub("the hub's listing has no file list (`siblings`)".into()))?;
    let mut files = Vec::new();
    for s in siblings {
        let Some(path) = s["rfilename"].as_str() else { continue };
        let lfs_sha256 = s["lfs"]["sha256"].as_str().map(String::from);
        let size = s["lfs"]["size"].as_u64().or_else(|| s["size"].as_u64());
        let etag = lfs_sha256.clone().or_else(|| s["blobId"].as_str().map(String::from));
        // without an id the blob cannot be named as huggingface_hub names it: use the commit's
        // path (still unique per commit)
        let etag = etag.unwrap_or_else(|| format!("{commit}-{}", path.replace('/', "--")));
        files.push(RemoteFile { path: path.to_string(), size, etag, lfs_sha256 });
    }
    Ok(RepoListing { commit: commit.to_string(), files })
}

/// Folders of a diffusers model that the engine reads; everything else (README, sample images,
/// other formats) is left on the hub.
const MODEL_FOLDERS: [&str; 5] = ["transformer", "text_encoder", "vae", "tokenizer", "scheduler"];
/// Weight formats other tools use, skipped when safetensors are there.
const OTHER_WEIGHT_FORMATS: [&str; 8] = [".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5"];

/// The files of a listing the engine needs: `model_index.json` and the model folders, every file of
/// the tokenizer folder (its chat template too), safetensors rather than other weight formats.
pub fn model_files(listing: &RepoListing) -> Vec<RemoteFile> {
    listing
        .files
        .iter()
        .filter(|f| {
            if f.path == "model_index.json" {
                return true;
            }
            let Some((folder, _)) = f.path.split_once('/') else { return false };
            MODEL_FOLDERS.contains(&folder) && !OTHER_WEIGHT_FORMATS.iter().any(|ext| f.path.ends_with(ext))
        })
        .cloned()
        .collect()
}

/// What a download has done so far, for progress lines and the studio's status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DownloadProgress {
    /// The file being fetched (empty before the first one).
    pub file: String,
    pub files_done: usize,
    pub files_total: usize,
    /// Bytes present, including files and parts already in the cache before this run.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Over the last few seconds.
    pub bytes_per_sec: f64,
}

impl DownloadProgress {
    /// Seconds left at the current speed.
    pub fn eta_secs(&self) -> Option<u64> {
        (self.bytes_per_sec > 1.0).then(|| ((self.bytes_total.saturating_sub(self.bytes_done)) as f64 / self.bytes_per_sec) as u64)
    }
}

/// Bytes for messages: "2.35 GB", "0.4 MB" (the studio formats progress itself).
pub fn fmt_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 { format!("{:.2} GB", n / 1e9) } else { format!("{:.1} MB", n / 1e6) }
}

/// Tries per file without any byte of progress before the download gives up.
const MAX_FAILED_TRIES: u32 = 5;
/// Progress callbacks at most this often (and at every file's start and end).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Kept free beside the model: a full disk breaks more than the download.
const DISK_MARGIN: u64 = 256 * 1024 * 1024;

/// A failure of one request: whether trying again may help.
struct Failure {
    message: String,
    retry: bool,
}

/// Talks to one hub endpoint.
pub struct HubClient {
    settings: HubSettings,
    agent: ureq::Agent,
}

impl HubClient {
    pub fn new(settings: HubSettings) -> Result<HubClient> {
        let tls = native_tls::TlsConnector::new().map_err(|e| Error::Hub(format!("TLS setup: {e}")))?;
        let agent = ureq::AgentBuilder::new()
            .tls_connector(std::sync::Arc::new(tls))
            .try_proxy_from_env(true)
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(60))
            // a mirror may redirect to itself; the CDN the hub redirects to gets no token
            .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
            .user_agent(concat!("zimage-studio/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(HubClient { settings, agent })
    }

    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    fn get(&self, url: &str) -> ureq::Request {
        let req = self.agent.get(url);
        match &self.settings.token {
            Some(t) => req.set("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// Says what an HTTP failure means for `what` (a file or the listing) of `repo_id`.
    fn failure(&self, repo_id: &str, what: &str, url: &str, e: ureq::Error) -> Failure {
        match e {
            ureq::Error::Status(code, _) => {
                let message = match code {
                    401 | 403 => format!(
                        "the hub refused {what} of {repo_id} ({code}): the repository is gated or private. Accept its terms \
                         on its page and set HF_TOKEN (or run `huggingface-cli login`){}",
                        if self.settings.token.is_some() { "; the token sent was not accepted" } else { "; no token was sent" }
                    ),
                    404 => format!("the hub has no {what} for {repo_id} ({url} answered 404): check the model id and HF_ENDPOINT"),
                    416 => format!("the hub refused the range request for {what} (416)"),
                    c => format!("the hub answered {c} for {what} of {repo_id} ({url})"),
                };
                Failure { message, retry: code >= 500 || code == 429 || code == 416 }
            }
            ureq::Error::Transport(t) => Failure {
                message: format!("cannot reach {} for {what} of {repo_id}: {t}", self.settings.endpoint),
                retry: true,
            },
        }
    }

    /// Lists `revision` of `repo_id`, with sizes.
    pub fn list(&self, repo_id: &str, revision: &str) -> Result<RepoListing> {
        let url = format!("{}/api/models/{repo_id}/revision/{}?blobs=true", self.settings.endpoint, encode_path(revision));
        let mut tries = 0;
        loop {
            match self.get(&url).call() {
                Ok(resp) => {
                    let json: serde_json::Value = resp
                        .into_json()
                        .map_err(|e| Error::Hub(format!("the hub's file list for {repo_id} is not JSON: {e}")))?;
                    return parse_listing(&json);
                }
                Err(e) => {
                    let f = self.failure(repo_id, "the file list", &url, e);
                    tries += 1;
                    if !f.retry || tries >= MAX_FAILED_TRIES {
                        return Err(Error::Hub(f.message));
                    }
                    std::thread::sleep(backoff(tries));
                }
            }
        }
    }

    /// Makes `revision` of `repo_id` complete in the cache (only what the engine reads) and returns
    /// its snapshot folder. Files already there are not fetched again; a partial one continues
    /// where it stopped.
    pub fn download_model(
        &self,
        repo_id: &str,
        revision: &str,
        on_progress: &mut dyn FnMut(&DownloadProgress),
    ) -> Result<PathBuf> {
        if self.settings.offline {
            return Err(Error::Hub(format!("HF_HUB_OFFLINE is set, so {repo_id} is not downloaded")));
        }
        let listing = self.list(repo_id, revision)?;
        let files = model_files(&listing);
        if !files.iter().any(|f| f.path == "model_index.json") {
            return Err(Error::Hub(format!(
                "{repo_id} has no model_index.json at {revision}: it is not a model in the diffusers layout"
            )));
        }
        let repo = CacheRepo::new(&self.settings.cache, repo_id);
        let snapshot = repo.root.join("snapshots").join(&listing.commit);
        std::fs::create_dir_all(repo.root.join("blobs")).map_err(|e| Error::io(repo.root.join("blobs"), e))?;
        std::fs::create_dir_all(&snapshot).map_err(|e| Error::io(&snapshot, e))?;

        // What is there already, and the space the rest needs.
        let present = |f: &RemoteFile| -> u64 {
            if repo.blob(&f.etag).is_file() {
                return f.size.unwrap_or(0);
            }
            std::fs::metadata(repo.incomplete(&f.etag)).map(|m| m.len()).unwrap_or(0)
        };
        let bytes_total: u64 = files.iter().map(|f| f.size.unwrap_or(0)).sum();
        let have: u64 = files.iter().map(present).sum();
        let need = bytes_total.saturating_sub(have);
        if let Some(free) = free_space(&repo.root) {
            if need + DISK_MARGIN > free {
                return Err(Error::Hub(format!(
                    "not enough disk space for {repo_id}: {} more to download, {} free at {} (keeping {} spare). \
                     Free some space or point HF_HOME / HF_HUB_CACHE at a larger disk",
                    fmt_bytes(need),
                    fmt_bytes(free),
                    self.settings.cache.display(),
                    fmt_bytes(DISK_MARGIN)
                )));
            }
        }

        let mut progress = ProgressMeter::new(files.len(), bytes_total, have);
        for f in &files {
            let link = snapshot.join(&f.path);
            if !repo.blob(&f.etag).is_file() {
                progress.start_file(&f.path, on_progress);
                self.fetch_blob(repo_id, &listing.commit, f, &repo, &mut progress, on_progress)?;
            }
            link_blob(&repo.blob(&f.etag), &link)?;
            progress.finish_file(f.size, on_progress);
        }
        std::fs::create_dir_all(repo.root.join("refs")).map_err(|e| Error::io(repo.root.join("refs"), e))?;
        let reference = repo.root.join("refs").join(revision);
        std::fs::write(&reference, &listing.commit).map_err(|e| Error::io(&reference, e))?;
        Ok(snapshot)
    }

    /// Downloads one file into `blobs/<etag>`, resuming `blobs/<etag>.incomplete`.
    fn fetch_blob(
        &self,
        repo_id: &str,
        commit: &str,
        f: &RemoteFile,
        repo: &CacheRepo,
        progress: &mut ProgressMeter,
        on_progress: &mut dyn FnMut(&DownloadProgress),
    ) -> Result<()> {
        let part = repo.incomplete(&f.etag);
        let url = format!("{}/{repo_id}/resolve/{commit}/{}", self.settings.endpoint, encode_path(&f.path));
        let mut failed_tries = 0;
        loop {
            let start = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            match self.fetch_range(repo_id, &url, f, &part, start, progress, on_progress) {
                Ok(()) => break,
                Err(failure) => {
                    let now = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                    // a try that brought bytes starts the count again
                    failed_tries = if now > start { 1 } else { failed_tries + 1 };
                    if !failure.retry || failed_tries >= MAX_FAILED_TRIES {
                        let kept = if now > 0 {
                            format!("; the {} already fetched are kept and the next start continues from there", fmt_bytes(now))
                        } else {
                            String::new()
                        };
                        return Err(Error::Hub(format!("{}: {}{kept}", f.path, failure.message)));
                    }
                    std::thread::sleep(backoff(failed_tries));
                }
            }
        }
        let len = std::fs::metadata(&part).map_err(|e| Error::io(&part, e))?.len();
        if let Some(size) = f.size {
            if len != size {
                return Err(Error::Hub(format!("{}: {len} bytes arrived, the hub listed {size}", f.path)));
            }
        }
        if let Some(expected) = &f.lfs_sha256 {
            let actual = sha256_file(&part)?;
            if !actual.eq_ignore_ascii_case(expected) {
                std::fs::remove_file(&part).ok();
                return Err(Error::Hub(format!(
                    "{} arrived corrupted (SHA-256 {actual}, expected {expected}); it was deleted and is fetched \
                     again on the next start",
                    f.path
                )));
            }
        }
        let blob = repo.blob(&f.etag);
        std::fs::rename(&part, &blob).map_err(|e| Error::io(&blob, e))
    }

    /// One request from byte `start` to the end, appended to `part`.
    #[allow(clippy::too_many_arguments)]
    fn fetch_range(
        &self,
        repo_id: &str,
        url: &str,
        f: &RemoteFile,
        part: &Path,
        start: u64,
        progress: &mut ProgressMeter,
        on_progress: &mut dyn FnMut(&DownloadProgress),
    ) -> std::result::Result<(), Failure> {
        if f.size.is_some_and(|s| start >= s) {
            return Ok(()); // complete, not yet renamed (stopped between the two)
        }
        let mut req = self.get(url);
        if start > 0 {
            req = req.set("Range", &format!("bytes={start}-"));
        }
        let resp = req.call().map_err(|e| self.failure(repo_id, &f.path, url, e))?;
        let io_failure = |what: &str, e: std::io::Error| Failure {
            retry: !matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::PermissionDenied),
            message: if e.kind() == std::io::ErrorKind::StorageFull {
                format!("the disk holding {} is full", part.display())
            } else {
                format!("{what}: {e}")
            },
        };
        let resumed = resp.status() == 206;
        if start > 0 && !resumed {
            // the server ignored the range: it sends the whole file, so the part starts again
            progress.rewind(start);
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(resumed)
            .write(true)
            .truncate(!resumed)
            .open(part)
            .map_err(|e| io_failure(&format!("cannot write {}", part.display()), e))?;
        let mut body = resp.into_reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    return Err(Failure {
                        message: format!("the connection broke while fetching {}: {e}", f.path),
                        retry: true,
                    })
                }
            };
            out.write_all(&buf[..n]).map_err(|e| io_failure(&format!("cannot write {}", part.display()), e))?;
            progress.add(n as u64, on_progress);
        }
        out.sync_data().map_err(|e| io_failure(&format!("cannot write {}", part.display()), e))?;
        let len = out.metadata().map(|m| m.len()).unwrap_or(0);
        match f.size {
            Some(size) if len < size => Err(Failure {
                message: format!("the connection closed after {} of {}", fmt_bytes(len), fmt_bytes(size)),
                retry: true,
            }),
            _ => Ok(()),
        }
    }
}

/// Percent-encodes a path for a URL, keeping its `/`s.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn backoff(tries: u32) -> Duration {
    Duration::from_millis(500u64 << tries.min(5))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `snapshots/<commit>/<path>` -> `../../blobs/<etag>` (relative, as huggingface_hub links).
fn link_blob(blob: &Path, link: &Path) -> Result<()> {
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    if link.exists() || link.symlink_metadata().is_ok() {
        std::fs::remove_file(link).map_err(|e| Error::io(link, e))?;
    }
    #[cfg(unix)]
    {
        let target = relative_to(blob, link.parent().expect("a link has a folder"));
        std::os::unix::fs::symlink(&target, link).map_err(|e| Error::io(link, e))
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(blob, link).map(|_| ()).map_err(|e| Error::io(link, e))
    }
}

/// `target` as a path relative to folder `from` (both under the same cache folder).
#[cfg(unix)]
fn relative_to(target: &Path, from: &Path) -> PathBuf {
    let t: Vec<_> = target.components().collect();
    let f: Vec<_> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// Bytes free for an unprivileged writer on the disk holding `path` (or its nearest existing parent).
fn free_space(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let mut p = path;
        while !p.exists() {
            p = p.parent()?;
        }
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid NUL-terminated path and a zeroed struct statvfs fills.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Counts bytes and reports them, with the speed over the last few seconds.
struct ProgressMeter {
    state: DownloadProgress,
    last_report: Option<Instant>,
    /// (when, bytes_done) samples of the last few seconds, for the speed.
    window: std::collections::VecDeque<(Instant, u64)>,
}

impl ProgressMeter {
    fn new(files_total: usize, bytes_total: u64, bytes_done: u64) -> ProgressMeter {
        ProgressMeter {
            state: DownloadProgress { files_total, bytes_total, bytes_done, ..Default::default() },
            last_report: None,
            window: Default::default(),
        }
    }

    fn start_file(&mut self, path: &str, on: &mut dyn FnMut(&DownloadProgress)) {
        self.state.file = path.to_string();
        self.report(true, on);
    }

    fn finish_file(&mut self, _size: Option<u64>, on: &mut dyn FnMut(&DownloadProgress)) {
        self.state.files_done += 1;
        self.report(true, on);
    }

    fn rewind(&mut self, bytes: u64) {
        self.state.bytes_done = self.state.bytes_done.saturating_sub(bytes);
    }

    fn add(&mut self, n: u64, on: &mut dyn FnMut(&DownloadProgress)) {
        self.state.bytes_done += n;
        // a listing without sizes: the total grows with what arrives
        self.state.bytes_total = self.state.bytes_total.max(self.state.bytes_done);
        self.report(false, on);
    }

    fn report(&mut self, always: bool, on: &mut dyn FnMut(&DownloadProgress)) {
        let now = Instant::now();
        if !always && self.last_report.is_some_and(|t| now - t < PROGRESS_EVERY) {
            return;
        }
        self.window.push_back((now, self.state.bytes_done));
        while self.window.len() > 2 && now - self.window[0].0 > Duration::from_secs(5) {
            self.window.pop_front();
        }
        let (t0, b0) = self.window[0];
        let secs = (now - t0).as_secs_f64();
        self.state.bytes_per_sec = if secs > 0.2 { (self.state.bytes_done.saturating_sub(b0)) as f64 / secs } else { 0.0 };
        self.last_report = Some(now);
        on(&self.state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn listing() -> RepoListing {
        parse_listing(&json!({
            "sha": "c0ffee",
            "siblings": [
                {"rfilename": "README.md", "size": 10, "blobId": "aa"},
                {"rfilename": "model_index.json", "size": 400, "blobId": "bb"},
                {"rfilename": "assets/cover.png", "size": 99, "blobId": "cc"},
                {"rfilename": "tokenizer/tokenizer.json", "size": 1000, "blobId": "dd"},
                {"rfilename": "tokenizer/chat_template.jinja", "size": 30, "blobId": "ee"},
                {"rfilename": "transformer/diffusion_pytorch_model.safetensors", "size": 134,
                 "blobId": "ff", "lfs": {"sha256": "abc123", "size": 5000, "pointerSize": 134}},
                {"rfilename": "transformer/diffusion_pytorch_model.bin", "size": 5000, "blobId": "gg"},
                {"rfilename": "vae/config.json", "blobId": "hh"}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn the_listing_names_blobs_as_huggingface_hub_does() {
        let l = listing();
        assert_eq!(l.commit, "c0ffee");
        let st = l.files.iter().find(|f| f.path.ends_with(".safetensors")).unwrap();
        // LFS files: blob named by the SHA-256, size of the file (not of the pointer)
        assert_eq!((st.etag.as_str(), st.size, st.lfs_sha256.as_deref()), ("abc123", Some(5000), Some("abc123")));
        let cfg = l.files.iter().find(|f| f.path == "vae/config.json").unwrap();
        assert_eq!((cfg.etag.as_str(), cfg.size), ("hh", None));
    }

    #[test]
    fn only_the_model_folders_are_fetched_with_every_tokenizer_file() {
        let names: Vec<String> = model_files(&listing()).into_iter().map(|f| f.path).collect();
        assert_eq!(
            names,
            [
                "model_index.json",
                "tokenizer/tokenizer.json",
                "tokenizer/chat_template.jinja",
                "transformer/diffusion_pytorch_model.safetensors",
                "vae/config.json"
            ]
        );
    }

    #[test]
    fn a_listing_without_commit_is_an_error() {
        assert!(parse_listing(&json!({"siblings": []})).is_err());
    }

    #[test]
    fn paths_are_encoded_for_urls() {
        assert_eq!(encode_path("tokenizer/a b+c.json"), "tokenizer/a%20b%2Bc.json");
    }

    #[test]
    fn links_point_back_to_the_blobs_folder() {
        let rel = relative_to(Path::new("/c/models--a--b/blobs/123"), Path::new("/c/models--a--b/snapshots/s/transformer"));
        assert_eq!(rel, PathBuf::from("../../../blobs/123"));
    }

    #[test]
    fn sizes_in_messages_are_gigabytes() {
        assert_eq!(fmt_bytes(32_800_000_000), "32.80 GB");
        assert_eq!(fmt_bytes(1_500_000), "1.5 MB");
    }

    #[test]
    fn settings_follow_the_hugging_face_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let s = HubSettings::from_vars(vars(&[
            ("HF_HOME", "/tmp/hfhome"),
            ("HF_ENDPOINT", "https://hf-mirror.example/"),
            ("HF_TOKEN", "hf_abc"),
            ("HF_HUB_OFFLINE", "True"),
        ]));
        assert_eq!(s.cache, PathBuf::from("/tmp/hfhome/hub"));
        assert_eq!(s.endpoint, "https://hf-mirror.example");
        assert_eq!(s.token.as_deref(), Some("hf_abc"));
        assert!(s.offline);
        let s = HubSettings::from_vars(vars(&[("HF_HOME", "/tmp/hfhome"), ("HF_HUB_CACHE", "/tmp/elsewhere"), ("HF_HUB_OFFLINE", "0")]));
        assert_eq!(s.cache, PathBuf::from("/tmp/elsewhere"));
        assert_eq!(s.endpoint, "https://huggingface.co");
        assert!(!s.offline);
        let s = HubSettings::from_vars(vars(&[("XDG_CACHE_HOME", "/tmp/xdg"), ("HF_TOKEN_PATH", "/nonexistent/token")]));
        assert_eq!((s.cache, s.token), (PathBuf::from("/tmp/xdg/huggingface/hub"), None));
    }
}
