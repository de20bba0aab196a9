//! Finding and reading model files: a diffusers-layout folder, a Hugging Face hub id resolved
//! through the local cache and downloaded into it when missing (`hub`), or the built-in `tiny`
//! model. Every missing file is named, with how to get it.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hub::{CacheRepo, DownloadProgress, HubClient, HubSettings};

/// The published model.
pub const DEFAULT_HUB_ID: &str = "Tongyi-MAI/Z-Image-Turbo";

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// Built-in small model with deterministic random weights (offline, for tests and demos).
    Tiny,
    /// A local folder in the diffusers layout.
    Dir(PathBuf),
    /// A Hugging Face hub repository id.
    Hub(String),
    /// The real architecture with random weights drawn on the device (`random`): for benchmarks
    /// and serving tests where the real files are absent. Its images are noise.
    RandomFullSize,
}

impl ModelSource {
    /// `tiny`, `random`, an existing folder, or otherwise a hub id.
    pub fn parse(s: &str) -> ModelSource {
        if s == "tiny" {
            ModelSource::Tiny
        } else if s == "random" {
            ModelSource::RandomFullSize
        } else if Path::new(s).is_dir() || s.starts_with('.') || s.starts_with('/') {
            ModelSource::Dir(PathBuf::from(s))
        } else {
            ModelSource::Hub(s.to_string())
        }
    }

    /// The model to serve when none is named: on a GPU the real model (downloaded when the cache
    /// lacks it); on the CPU the real model only when the cache holds it complete (it takes many
    /// minutes an image there), otherwise the tiny model.
    pub fn default_source(gpu: bool) -> ModelSource {
        if gpu {
            return ModelSource::Hub(DEFAULT_HUB_ID.to_string());
        }
        match cached_hub_model(DEFAULT_HUB_ID) {
            Ok(Some(_)) => ModelSource::Hub(DEFAULT_HUB_ID.to_string()),
            _ => ModelSource::Tiny,
        }
    }

    pub fn display_name(&self) -> String {
        match self {
            ModelSource::Tiny => "tiny (random weights)".into(),
            ModelSource::Dir(p) => p.display().to_string(),
            ModelSource::Hub(id) => id.clone(),
            ModelSource::RandomFullSize => "random full-size weights (benchmark; images are noise)".into(),
        }
    }
}

/// The files of one component, resolved to paths.
#[derive(Debug, Clone)]
pub struct ComponentFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
}

/// All files of a diffusers-layout Z-Image model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub root: PathBuf,
    pub transformer: ComponentFiles,
    pub text_encoder: ComponentFiles,
    pub vae: ComponentFiles,
    pub tokenizer: PathBuf,
    pub scheduler_config: PathBuf,
}

const TRANSFORMER_STEM: &str = "transformer/diffusion_pytorch_model";
const TEXT_ENCODER_STEM: &str = "text_encoder/model";
const VAE_STEM: &str = "vae/diffusion_pytorch_model";

/// The distinct shard file names of a `*.safetensors.index.json`, sorted.
fn shard_names(index: &serde_json::Value) -> Vec<String> {
    let mut shards: Vec<String> = index["weight_map"]
        .as_object()
        .map(|m| m.values().filter_map(|f| f.as_str().map(String::from)).collect())
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    shards
}

/// Names of the weight files of a component: from `<stem>.safetensors.index.json` when present
/// (sharded), else `<stem>.safetensors`.
fn weight_files(root: &Path, stem: &str, missing: &mut Vec<String>) -> Vec<PathBuf> {
    let index = root.join(format!("{stem}.safetensors.index.json"));
    let single = root.join(format!("{stem}.safetensors"));
    if index.exists() {
        let parsed: std::result::Result<serde_json::Value, String> = std::fs::read_to_string(&index)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()));
        match parsed {
            Ok(v) => {
                let shards = shard_names(&v);
                let dir = index.parent().expect("index has a parent");
                if shards.is_empty() {
                    missing.push(format!("{} has an empty weight_map", index.display()));
                }
                let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
                for p in &paths {
                    if !p.exists() {
                        missing.push(rel(root, p));
                    }
                }
                paths
            }
            Err(e) => {
                missing.push(format!("{} (unreadable: {e})", rel(root, &index)));
                vec![]
            }
        }
    } else if single.exists() {
        vec![single]
    } else {
        missing.push(format!("{stem}.safetensors (or {stem}.safetensors.index.json and its shards)"));
        vec![]
    }
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

impl ModelFiles {
    /// Resolves every file of a local diffusers-layout folder; names all that are missing.
    pub fn from_dir(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::MissingFiles {
                root: root.to_path_buf(),
                missing: vec!["(the folder itself)".into()],
                hint: "pass a folder in the diffusers layout, a hub id, or `tiny`".into(),
            });
        }
        let mut missing = Vec::new();
        let mut need = |p: &str| {
            let path = root.join(p);
            if !path.exists() {
                missing.push(p.to_string());
            }
            path
        };
        let t_cfg = need("transformer/config.json");
        let te_cfg = need("text_encoder/config.json");
        let vae_cfg = need("vae/config.json");
        let tok = need("tokenizer/tokenizer.json");
        let sched = need("scheduler/scheduler_config.json");
        let t_w = weight_files(root, TRANSFORMER_STEM, &mut missing);
        let te_w = weight_files(root, TEXT_ENCODER_STEM, &mut missing);
        let vae_w = weight_files(root, VAE_STEM, &mut missing);
        if !missing.is_empty() {
            return Err(Error::MissingFiles {
                root: root.to_path_buf(),
                missing,
                hint: format!(
                    "download the model with `huggingface-cli download {DEFAULT_HUB_ID} --local-dir <folder>` \
                     (or `zimage generate --model {DEFAULT_HUB_ID}` with network access)"
                ),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            transformer: ComponentFiles { config: t_cfg, weights: t_w },
            text_encoder: ComponentFiles { config: te_cfg, weights: te_w },
            vae: ComponentFiles { config: vae_cfg, weights: vae_w },
            tokenizer: tok,
            scheduler_config: sched,
        })
    }
}

/// Reads a JSON config into its serde struct.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config { path: path.to_path_buf(), reason: e.to_string() })
}

/// Small files every component needs before its weights (named when the cache lacks them offline).
const HUB_META_FILES: [&str; 7] = [
    "model_index.json",
    "transformer/config.json",
    "text_encoder/config.json",
    "vae/config.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
];

/// The snapshot folder of a hub model if the Hugging Face cache holds all of its files.
pub fn cached_hub_model(id: &str) -> Result<Option<PathBuf>> {
    Ok(cached_hub_model_in(&HubSettings::from_env().cache, id))
}

fn cached_hub_model_in(cache: &Path, id: &str) -> Option<PathBuf> {
    let snapshot = CacheRepo::new(cache, id).snapshot("main")?;
    ModelFiles::from_dir(&snapshot).is_ok().then_some(snapshot)
}

/// Resolves a hub id to a complete local snapshot: the cache first, then a download unless
/// HF_HUB_OFFLINE is set (callers that show progress download first with `resolve_hub_model_with`).
pub fn resolve_hub_model(id: &str) -> Result<ModelFiles> {
    resolve_hub_model_with(&HubSettings::from_env(), id, &mut |_| {})
}

/// Whether resolving `id` would download (the cache lacks it and the hub may be asked).
pub fn needs_download(id: &str) -> bool {
    let settings = HubSettings::from_env();
    !settings.offline && cached_hub_model_in(&settings.cache, id).is_none()
}

/// `resolve_hub_model` with the given settings and progress callback.
pub fn resolve_hub_model_with(
    settings: &HubSettings,
    id: &str,
    on_progress: &mut dyn FnMut(&DownloadProgress),
) -> Result<ModelFiles> {
    if let Some(dir) = cached_hub_model_in(&settings.cache, id) {
        return ModelFiles::from_dir(&dir);
    }
    let how = format!(
        "the Hugging Face cache at {} does not hold {id} complete. With network access run again without \
         HF_HUB_OFFLINE (or `huggingface-cli download {id}`), or pass --model <folder>",
        settings.cache.display()
    );
    if settings.offline {
        let snapshot = CacheRepo::new(&settings.cache, id).snapshot("main");
        let missing: Vec<String> = match &snapshot {
            Some(dir) => match ModelFiles::from_dir(dir) {
                Err(Error::MissingFiles { missing, .. }) => missing,
                _ => vec![],
            },
            None => HUB_META_FILES.iter().map(|f| f.to_string()).collect(),
        };
        return Err(Error::MissingFiles {
            root: snapshot.unwrap_or_else(|| settings.cache.clone()),
            missing: if missing.is_empty() { vec!["weight shards (see the *.index.json files)".into()] } else { missing },
            hint: format!("HF_HUB_OFFLINE is set; {how}"),
        });
    }
    let client = HubClient::new(settings.clone())?;
    let snapshot = client.download_model(id, "main", on_progress)?;
    ModelFiles::from_dir(&snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::tiny_model_dir;

    #[test]
    fn fixture_folder_resolves_with_sharded_transformer() {
        let f = ModelFiles::from_dir(&tiny_model_dir()).unwrap();
        assert!(f.transformer.weights.len() > 1, "the fixture transformer is sharded");
        assert_eq!(f.vae.weights.len(), 1);
    }

    #[test]
    fn missing_files_are_all_named() {
        let tmp = std::env::temp_dir().join(format!("zimage-missing-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("transformer")).unwrap();
        std::fs::write(tmp.join("transformer/config.json"), "{}").unwrap();
        let err = ModelFiles::from_dir(&tmp).unwrap_err().to_string();
        for name in ["text_encoder/config.json", "vae/config.json", "tokenizer/tokenizer.json", "transformer/diffusion_pytorch_model.safetensors"] {
            assert!(err.contains(name), "{name} not named in: {err}");
        }
        assert!(err.contains("huggingface-cli download"));
        std::fs::remove_dir_all(&tmp).ok();
    }

    /// Lays out `dir` as the HF cache does: models--org--name/{refs/main, snapshots/<rev>/...}.
    fn fake_cache_with_fixture(dir: &Path, id: &str) {
        let repo = dir.join(format!("models--{}", id.replace('/', "--")));
        let snap = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
        copy_dir(&tiny_model_dir(), &snap);
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dest = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &dest);
            } else {
                std::fs::copy(e.path(), dest).unwrap();
            }
        }
    }

    #[test]
    fn hub_id_resolves_from_the_cache_offline() {
        let tmp = std::env::temp_dir().join(format!("zimage-hf-{}", std::process::id()));
        let id = "Tongyi-MAI/Z-Image-Turbo";
        fake_cache_with_fixture(&tmp, id);
        let settings = HubSettings { cache: tmp.clone(), offline: true, ..HubSettings::from_vars(|_| None) };
        let files = resolve_hub_model_with(&settings, id, &mut |_| {}).unwrap();
        assert!(files.root.ends_with("snapshots/0123abcd"));
        assert!(files.transformer.weights.len() > 1);
        std::fs::remove_dir_all(&tmp).ok();
    }

    #[test]
    fn offline_without_the_model_names_what_is_missing() {
        let tmp = std::env::temp_dir().join(format!("zimage-hf-empty-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let settings = HubSettings { cache: tmp.clone(), offline: true, ..HubSettings::from_vars(|_| None) };
        let err = resolve_hub_model_with(&settings, "Tongyi-MAI/Z-Image-Turbo", &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("model_index.json") && err.contains("transformer/config.json"), "{err}");
        assert!(err.contains("HF_HUB_OFFLINE") && err.contains("huggingface-cli download"), "{err}");
        std::fs::remove_dir_all(&tmp).ok();
    }

    #[test]
    fn source_parsing() {
        assert_eq!(ModelSource::parse("tiny"), ModelSource::Tiny);
        assert_eq!(ModelSource::parse("Tongyi-MAI/Z-Image-Turbo"), ModelSource::Hub(DEFAULT_HUB_ID.into()));
        assert!(matches!(ModelSource::parse("/tmp"), ModelSource::Dir(_)));
    }
}
