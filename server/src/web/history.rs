//! The history of finished images in SQLite (`<data>/history.sqlite3`, WAL): one row per image
//! with its settings, timings and where the request came from, a full-text index over the prompts
//! (FTS5), and a small JPEG thumbnail per image (`<data>/thumbs/<id>.jpg`) made once when the image
//! is stored. Images written by earlier versions (only `images/<id>.png` + `.json`) are imported
//! once at start. One connection behind a mutex: writers from several workers and readers from the
//! web handlers are serialized, and WAL keeps a reader from waiting on the disk.

use app::types::{is_valid_id, HistoryItem, HistoryPage, JobResult};
use app::StudioError;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Items per history page.
pub const PAGE_SIZE: u32 = 24;
/// Longest side of a thumbnail.
const THUMB_SIDE: u32 = 256;

pub struct History {
    db: Mutex<Connection>,
    thumbs: PathBuf,
}

fn internal(what: &str, e: impl std::fmt::Display) -> StudioError {
    StudioError::internal(format!("{what}: {e}"))
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    created INTEGER NOT NULL,
    mode TEXT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    style TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    strength REAL,
    total_ms INTEGER NOT NULL,
    file TEXT NOT NULL,
    source TEXT NOT NULL,
    model TEXT NOT NULL,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_newest ON images(created DESC, id);
CREATE VIRTUAL TABLE IF NOT EXISTS images_fts USING fts5(prompt, negative_prompt, content='images', content_rowid='rowid');
CREATE TRIGGER IF NOT EXISTS images_ai AFTER INSERT ON images BEGIN
    INSERT INTO images_fts(rowid, prompt, negative_prompt) VALUES (new.rowid, new.prompt, new.negative_prompt);
END;
CREATE TRIGGER IF NOT EXISTS images_ad AFTER DELETE ON images BEGIN
    INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt) VALUES ('delete', old.rowid, old.prompt, old.negative_prompt);
END;
";

/// Words of a search as an FTS5 query: each word a quoted prefix term, all required.
fn fts_query(search: &str) -> Option<String> {
    let terms: Vec<String> = search
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(16)
        .map(|w| format!("\"{}\"*", w.replace('"', "")))
        .collect();
    (!terms.is_empty()).then(|| terms.join(" "))
}

impl History {
    /// Opens (or creates) the database in `data_dir` and imports images the folder holds that it
    /// does not list yet.
    pub fn open(data_dir: &Path) -> Result<History, StudioError> {
        let thumbs = data_dir.join("thumbs");
        std::fs::create_dir_all(&thumbs).map_err(|e| internal("creating the thumbnail folder", e))?;
        let db = Connection::open(data_dir.join("history.sqlite3")).map_err(|e| internal("opening the history database", e))?;
        db.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| internal("history database", e))?;
        db.execute_batch(SCHEMA).map_err(|e| internal("creating the history tables", e))?;
        let h = History { db: Mutex::new(db), thumbs };
        h.import_folder(&data_dir.join("images"));
        Ok(h)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the write-ahead log into the database file (on shutdown: the next start, or a copy
    /// of the folder, finds everything in `history.sqlite3`).
    pub fn checkpoint(&self) -> Result<(), StudioError> {
        self.conn()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| internal("flushing the history database", e))
    }

    pub fn thumb_path(&self, id: &str) -> Option<PathBuf> {
        is_valid_id(id).then(|| self.thumbs.join(format!("{id}.jpg")))
    }

    /// Writes the thumbnail of a stored image (a JPEG, longest side 256).
    fn make_thumbnail(&self, id: &str, png: &[u8]) -> Result<(), StudioError> {
        let path = self.thumb_path(id).ok_or_else(|| StudioError::internal("bad image id"))?;
        let img = image::load_from_memory_with_format(png, image::ImageFormat::Png).map_err(|e| internal("reading the image for its thumbnail", e))?;
        let thumb = img.thumbnail(THUMB_SIDE, THUMB_SIDE).to_rgb8();
        let mut jpg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 82)
            .encode_image(&thumb)
            .map_err(|e| internal("encoding the thumbnail", e))?;
        let tmp = path.with_extension(format!("tmp{}", super::store::new_id()));
        std::fs::write(&tmp, &jpg).and_then(|_| std::fs::rename(&tmp, &path)).map_err(|e| internal("saving the thumbnail", e))
    }

    /// Records a finished image (its PNG already stored) and makes its thumbnail.
    pub fn add(&self, result: &JobResult, png: &[u8]) -> Result<(), StudioError> {
        self.make_thumbnail(&result.image_id, png)?;
        self.insert(result)
    }

    fn insert(&self, r: &JobResult) -> Result<(), StudioError> {
        let json = serde_json::to_string(r).map_err(|e| internal("history row", e))?;
        let style = serde_json::to_value(r.style).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let mode = if r.strength.is_some() { "transform" } else { "generate" };
        self.conn()
            .execute(
                "INSERT OR IGNORE INTO images (id, created, mode, prompt, negative_prompt, style, width, height, steps, seed, strength, total_ms, file, source, model, result)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    r.image_id,
                    r.created_unix as i64,
                    mode,
                    r.prompt,
                    r.negative_prompt,
                    style,
                    r.width,
                    r.height,
                    r.steps,
                    r.seed as i64,
                    r.strength.map(|s| s as f64),
                    r.timings.total_ms as i64,
                    format!("images/{}.png", r.image_id),
                    r.source.as_str(),
                    r.model,
                    json,
                ],
            )
            .map_err(|e| internal("saving to the history", e))?;
        Ok(())
    }

    /// Imports `<id>.json` + `<id>.png` pairs the database does not list (images from before the
    /// history existed); each gets its thumbnail. Unreadable files are skipped with a warning.
    fn import_folder(&self, images: &Path) {
        let Ok(entries) = std::fs::read_dir(images) else { return };
        let mut imported = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(id) = name.strip_suffix(".json").filter(|id| is_valid_id(id)) else { continue };
            let known: Option<i64> = self.conn().query_row("SELECT 1 FROM images WHERE id = ?1", [id], |r| r.get(0)).optional().unwrap_or(None);
            if known.is_some() {
                continue;
            }
            let read = std::fs::read(e.path()).ok().and_then(|b| serde_json::from_slice::<JobResult>(&b).ok());
            let png = std::fs::read(images.join(format!("{id}.png"))).ok();
            match (read, png) {
                (Some(r), Some(png)) => match self.add(&r, &png) {
                    Ok(()) => imported += 1,
                    Err(err) => eprintln!("warning: history import of {id}: {}", err.reason),
                },
                _ => eprintln!("warning: history import: {name} or its PNG is unreadable; skipped"),
            }
        }
        if imported > 0 {
            eprintln!("history: imported {imported} images stored by an earlier version");
        }
    }

    /// One page (0-based) of the history, newest first, optionally only prompts matching `search`.
    pub fn page(&self, search: &str, page: u32) -> Result<HistoryPage, StudioError> {
        let offset = page as i64 * PAGE_SIZE as i64;
        let conn = self.conn();
        let db = |e: rusqlite::Error| internal("reading the history", e);
        let (total, rows): (i64, Vec<String>) = match fts_query(search) {
            None => {
                let total = conn.query_row("SELECT count(*) FROM images", [], |r| r.get(0)).map_err(db)?;
                let mut st = conn.prepare_cached("SELECT result FROM images ORDER BY created DESC, rowid DESC LIMIT ?1 OFFSET ?2").map_err(db)?;
                let rows = st.query_map(params![PAGE_SIZE, offset], |r| r.get(0)).map_err(db)?.collect::<Result<_, _>>().map_err(db)?;
                (total, rows)
            }
            Some(q) => {
                let total = conn
                    .query_row("SELECT count(*) FROM images_fts WHERE images_fts MATCH ?1", [&q], |r| r.get(0))
                    .map_err(db)?;
                let mut st = conn
                    .prepare_cached(
                        "SELECT i.result FROM images i JOIN images_fts f ON f.rowid = i.rowid
                         WHERE images_fts MATCH ?1 ORDER BY i.created DESC, i.rowid DESC LIMIT ?2 OFFSET ?3",
                    )
                    .map_err(db)?;
                let rows = st.query_map(params![q, PAGE_SIZE, offset], |r| r.get(0)).map_err(db)?.collect::<Result<_, _>>().map_err(db)?;
                (total, rows)
            }
        };
        let items = rows
            .into_iter()
            .filter_map(|json| serde_json::from_str::<JobResult>(&json).ok())
            .map(|result| HistoryItem { thumb_url: format!("/thumbs/{}.jpg", result.image_id), result })
            .collect();
        Ok(HistoryPage { items, total: total as u64, page, page_size: PAGE_SIZE })
    }

    /// Whether the history lists `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.conn().query_row("SELECT 1 FROM images WHERE id = ?1", [id], |r| r.get::<_, i64>(0)).optional().ok().flatten().is_some()
    }

    /// Removes the row and the thumbnail; the caller removes the image files.
    pub fn remove(&self, id: &str) -> Result<bool, StudioError> {
        let n = self.conn().execute("DELETE FROM images WHERE id = ?1", [id]).map_err(|e| internal("deleting from the history", e))?;
        if let Some(p) = self.thumb_path(id) {
            let _ = std::fs::remove_file(p);
        }
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use app::types::JobSource;

    #[test]
    fn search_words_become_quoted_prefix_terms() {
        assert_eq!(fts_query("red fox").as_deref(), Some("\"red\"* \"fox\"*"));
        assert_eq!(fts_query("  \"; DROP TABLE images; --").as_deref(), Some("\"DROP\"* \"TABLE\"* \"images\"*"));
        assert_eq!(fts_query(" ,.; "), None);
    }

    fn result(id: &str, prompt: &str, created: u64, source: JobSource) -> JobResult {
        JobResult {
            image_id: id.into(),
            image_url: format!("/images/{id}.png"),
            share_url: format!("/share/{id}"),
            prompt: prompt.into(),
            negative_prompt: String::new(),
            style: Default::default(),
            seed: 1,
            steps: 8,
            width: 64,
            height: 64,
            strength: None,
            model: "tiny".into(),
            tiny_model: true,
            timings: Default::default(),
            prompt_truncated: false,
            created_unix: created,
            source,
            loras: vec![],
            variation: 0.0,
            variation_seed: None,
            written_prompt: None,
        }
    }

    fn png() -> Vec<u8> {
        let mut b = Vec::new();
        image::RgbImage::new(64, 64).write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png).unwrap();
        b
    }

    #[test]
    fn newest_first_search_delete_and_reopen() {
        let dir = std::env::temp_dir().join(format!("zimage-history-{}", super::super::store::new_id()));
        std::fs::create_dir_all(dir.join("images")).unwrap();
        let ids: Vec<String> = (0..3).map(|_| super::super::store::new_id()).collect();
        {
            let h = History::open(&dir).unwrap();
            h.add(&result(&ids[0], "a red fox in snow", 100, JobSource::Studio), &png()).unwrap();
            h.add(&result(&ids[1], "a blue whale", 200, JobSource::OpenAi), &png()).unwrap();
            h.add(&result(&ids[2], "red lighthouse", 300, JobSource::A1111), &png()).unwrap();
            let all = h.page("", 0).unwrap();
            assert_eq!(all.total, 3);
            assert_eq!(all.items.iter().map(|i| i.result.image_id.clone()).collect::<Vec<_>>(), vec![ids[2].clone(), ids[1].clone(), ids[0].clone()]);
            assert!(h.thumb_path(&ids[0]).unwrap().is_file());
            let red = h.page("red", 0).unwrap();
            assert_eq!(red.total, 2);
            assert_eq!(red.items[0].result.image_id, ids[2]);
            assert_eq!(h.page("lightho", 0).unwrap().total, 1, "prefix search");
            assert_eq!(h.page("whale red", 0).unwrap().total, 0, "all words required");
            assert!(h.remove(&ids[1]).unwrap());
            assert!(!h.thumb_path(&ids[1]).unwrap().exists());
            assert_eq!(h.page("whale", 0).unwrap().total, 0);
        }
        let h = History::open(&dir).unwrap();
        let page = h.page("", 0).unwrap();
        assert_eq!(page.total, 2, "rows survive a reopen");
        assert_eq!(page.items[0].result.source, JobSource::A1111);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn images_of_earlier_versions_are_imported_once() {
        let dir = std::env::temp_dir().join(format!("zimage-history-{}", super::super::store::new_id()));
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        let id = super::super::store::new_id();
        // an older version's metadata: no source, no negative prompt
        let mut v = serde_json::to_value(result(&id, "old image", 50, JobSource::Studio)).unwrap();
        v.as_object_mut().unwrap().remove("source");
        v.as_object_mut().unwrap().remove("negative_prompt");
        std::fs::write(images.join(format!("{id}.json")), v.to_string()).unwrap();
        std::fs::write(images.join(format!("{id}.png")), png()).unwrap();
        let h = History::open(&dir).unwrap();
        assert_eq!(h.page("old", 0).unwrap().total, 1);
        drop(h);
        let h = History::open(&dir).unwrap();
        assert_eq!(h.page("", 0).unwrap().total, 1, "not imported twice");
        std::fs::remove_dir_all(&dir).ok();
    }
}
