//! A folder of LoRA files addressed by name (the file stem), read again on every listing so new
//! files appear without a restart; parsed files are cached until the file changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::LoraFile;
use crate::error::{Error, Result};

/// One file of the folder.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraEntry {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
}

pub struct LoraLibrary {
    dir: PathBuf,
    cache: Mutex<HashMap<PathBuf, (SystemTime, u64, Arc<LoraFile>)>>,
}

/// A name a client may use: a file stem without path separators or control characters.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 200 && name != "." && name != ".." && !name.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}

impl LoraLibrary {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), cache: Mutex::new(HashMap::new()) }
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The `.safetensors` files of the folder, by name (an absent folder is an empty library).
    pub fn list(&self) -> Result<Vec<LoraEntry>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(Error::io(&self.dir, e)),
        };
        let mut out = vec![];
        for entry in rd.flatten() {
            let path = entry.path();
            let (Some(stem), Some(ext)) = (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|s| s.to_str())) else { continue };
            if !ext.eq_ignore_ascii_case("safetensors") || !is_valid_name(stem) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() {
                out.push(LoraEntry { name: stem.to_string(), path: path.clone(), size: meta.len() });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
    /// The file of `name`; an unknown name is an error naming it and the folder.
    pub fn resolve(&self, name: &str) -> Result<LoraEntry> {
        let unknown = || Error::Lora { path: self.dir.clone(), reason: format!("no LoRA named `{name}` in this folder") };
        if !is_valid_name(name) {
            return Err(unknown());
        }
        self.list()?.into_iter().find(|e| e.name == name).ok_or_else(unknown)
    }
    /// The parsed file of `name`, from the cache while the file is unchanged.
    pub fn load(&self, name: &str) -> Result<Arc<LoraFile>> {
        let entry = self.resolve(name)?;
        let meta = std::fs::metadata(&entry.path).map_err(|e| Error::io(&entry.path, e))?;
        let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
        if let Some((m, l, f)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&entry.path) {
            if (*m, *l) == stamp {
                return Ok(f.clone());
            }
        }
        let file = Arc::new(LoraFile::read(&entry.path)?);
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(entry.path, (stamp.0, stamp.1, file.clone()));
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folder_is_read_again_and_files_are_cached_until_they_change() {
        let dir = std::env::temp_dir().join(format!("zimage-lora-lib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lib = LoraLibrary::new(&dir);
        assert!(lib.list().unwrap().is_empty());
        let src = crate::testutil::fixtures_dir().join("lora");
        std::fs::copy(src.join("aitoolkit.safetensors"), dir.join("style.safetensors")).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a LoRA").unwrap();
        let names: Vec<String> = lib.list().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["style"]);
        let a = lib.load("style").unwrap();
        assert!(Arc::ptr_eq(&a, &lib.load("style").unwrap()), "cached");
        std::fs::copy(src.join("kohya.safetensors"), dir.join("style.safetensors")).unwrap();
        let b = lib.load("style").unwrap();
        assert_ne!(a.sha256, b.sha256, "a changed file is read again");
        for bad in ["missing", "../style", "a/b", ""] {
            let e = lib.resolve(bad).unwrap_err().to_string();
            assert!(e.contains("no LoRA named"), "{e}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
