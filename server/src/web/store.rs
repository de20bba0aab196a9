//! Files on disk under unguessable ids (128 random bits, 32 hex digits):
//! `images/<id>.png` + `images/<id>.json` (the [`JobResult`], for share links) and
//! `uploads/<id>.png` (Transform inputs, already resized; removed after a day).

use app::types::{is_valid_id, limits, transform_size, JobResult, UploadInfo};
use app::{ErrorKind, StudioError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long uploads are kept.
/// Longest side of an upload we decode.
pub const MAX_UPLOAD_SIDE: u32 = 16384;
/// Most memory a decoded upload may take: bounds the server's peak for any legal upload to about
/// this much plus the small resized copies (a 48-megapixel photo is 144 MB in 8-bit RGB).
pub const MAX_UPLOAD_DECODED_BYTES: u64 = 256 * 1024 * 1024;
pub const UPLOAD_TTL: Duration = Duration::from_secs(24 * 3600);

/// 128 random bits as 32 lowercase hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random number generator failed");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A random 32-bit seed.
pub fn random_seed() -> u64 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the OS random number generator failed");
    u32::from_le_bytes(b) as u64
}

pub struct ImageStore {
    root: PathBuf,
    images: PathBuf,
    uploads: PathBuf,
}

fn internal(what: &str, e: impl std::fmt::Display) -> StudioError {
    StudioError::internal(format!("{what}: {e}"))
}

/// Writes via a temporary file and a rename so readers never see half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", new_id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all().ok();
    }
    std::fs::rename(&tmp, path)
}

impl ImageStore {
    pub fn open(data_dir: &Path) -> std::io::Result<ImageStore> {
        let images = data_dir.join("images");
        let uploads = data_dir.join("uploads");
        std::fs::create_dir_all(&images)?;
        std::fs::create_dir_all(&uploads)?;
        Ok(ImageStore { root: data_dir.to_path_buf(), images, uploads })
    }

    /// The data folder (images/, uploads/, the history database, thumbs/).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Deletes a finished image's PNG and metadata; `false` when there was none.
    pub fn delete_image(&self, id: &str) -> Result<bool, StudioError> {
        let Some(png) = self.image_path(id) else { return Ok(false) };
        let existed = png.exists();
        for p in [png.with_extension("json"), png] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(internal("deleting the image", e)),
            }
        }
        Ok(existed)
    }

    pub fn image_path(&self, id: &str) -> Option<PathBuf> {
        is_valid_id(id).then(|| self.images.join(format!("{id}.png")))
    }

    pub fn upload_path(&self, id: &str) -> Option<PathBuf> {
        is_valid_id(id).then(|| self.uploads.join(format!("{id}.png")))
    }

    /// Stores a finished image and its metadata under `result.image_id`.
    pub fn save_image(&self, png: &[u8], result: &JobResult) -> Result<(), StudioError> {
        let png_path = self
            .image_path(&result.image_id)
            .ok_or_else(|| StudioError::internal("bad image id"))?;
        let meta = serde_json::to_vec_pretty(result).map_err(|e| internal("metadata", e))?;
        write_atomic(&png_path, png).map_err(|e| internal("saving the image", e))?;
        write_atomic(&png_path.with_extension("json"), &meta).map_err(|e| internal("saving metadata", e))?;
        Ok(())
    }

    pub fn load_meta(&self, id: &str) -> Result<JobResult, StudioError> {
        let missing = || StudioError::not_found("This image does not exist (or was deleted).");
        let path = self.image_path(id).ok_or_else(missing)?.with_extension("json");
        let bytes = std::fs::read(path).map_err(|_| missing())?;
        serde_json::from_slice(&bytes).map_err(|e| internal("reading image metadata", e))
    }

    /// Decodes an upload (PNG, JPEG or WebP; size-limited), flattens alpha onto white, resizes it
    /// to the Transform size and stores it as PNG.
    pub fn save_upload(&self, bytes: &[u8]) -> Result<UploadInfo, StudioError> {
        self.save_upload_at(bytes, None)
    }

    /// `save_upload`, resized to `size` when given instead of the nearest Transform size.
    pub fn save_upload_at(&self, bytes: &[u8], size: Option<(u32, u32)>) -> Result<UploadInfo, StudioError> {
        let unsupported = || {
            StudioError::new(
                ErrorKind::UnsupportedMedia,
                "This file is not a PNG, JPEG or WebP image.",
            )
        };
        if bytes.len() > limits::MAX_UPLOAD_BYTES {
            return Err(StudioError::new(ErrorKind::PayloadTooLarge, "The image is too large."));
        }
        let format = image::guess_format(bytes).map_err(|_| unsupported())?;
        if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) {
            return Err(unsupported());
        }
        let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        let mut lim = image::Limits::default();
        lim.max_image_width = Some(MAX_UPLOAD_SIDE);
        lim.max_image_height = Some(MAX_UPLOAD_SIDE);
        lim.max_alloc = Some(MAX_UPLOAD_DECODED_BYTES);
        reader.limits(lim);
        let img = reader.decode().map_err(|e| match e {
            image::ImageError::Limits(_) => StudioError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "The image is too large to read: at most {MAX_UPLOAD_SIDE} pixels a side and {} MiB once decoded \
                     (about {} megapixels in colour).",
                    MAX_UPLOAD_DECODED_BYTES >> 20,
                    MAX_UPLOAD_DECODED_BYTES / 3 / 1_000_000
                ),
            ),
            e => StudioError::invalid(format!("The image could not be decoded: {e}")),
        })?;
        let (ow, oh) = (img.width(), img.height());
        if ow == 0 || oh == 0 {
            return Err(StudioError::invalid("The image is empty."));
        }
        let (w, h) = size.unwrap_or_else(|| transform_size(ow, oh));
        // More than twice the output size: an area average in the decoded colour type, straight
        // into the output size. Converting a huge grey or 16-bit image to 8-bit RGB at full size,
        // and the filtered resize's float buffers (16 bytes a pixel), took several times the
        // decoded size (1.5 GiB for a legal 16000x16000 grey PNG).
        let img = if u64::from(ow) > 2 * u64::from(w) || u64::from(oh) > 2 * u64::from(h) {
            img.thumbnail_exact(w, h)
        } else {
            img
        };
        let (ow_now, oh_now) = (img.width(), img.height());
        let rgb = flatten_on_white(img);
        let resized = if (w, h) == (ow_now, oh_now) {
            rgb
        } else {
            image::imageops::resize(&rgb, w, h, image::imageops::FilterType::CatmullRom)
        };
        let mut png = Vec::new();
        resized
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| internal("encoding the upload", e))?;
        let id = new_id();
        let path = self.upload_path(&id).expect("fresh id is valid");
        write_atomic(&path, &png).map_err(|e| internal("saving the upload", e))?;
        Ok(UploadInfo {
            url: format!("/uploads/{id}.png"),
            upload_id: id,
            original_width: ow,
            original_height: oh,
            width: w,
            height: h,
        })
    }

    /// Size of a stored upload, or NotFound.
    pub fn upload_size(&self, id: &str) -> Result<(u32, u32), StudioError> {
        let path = self.upload_path(id).ok_or_else(upload_missing)?;
        image::image_dimensions(&path).map_err(|_| upload_missing())
    }

    pub fn load_upload(&self, id: &str) -> Result<image::RgbImage, StudioError> {
        let path = self.upload_path(id).ok_or_else(upload_missing)?;
        let img = image::open(&path).map_err(|_| upload_missing())?;
        Ok(img.to_rgb8())
    }

    /// Deletes uploads older than [`UPLOAD_TTL`] and stray temporary files.
    pub fn prune_uploads(&self) {
        let now = SystemTime::now();
        for dir in [&self.uploads, &self.images] {
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            for e in entries.flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                let age = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or_default();
                let stale_tmp = name.contains(".tmp") && age > Duration::from_secs(3600);
                let stale_upload = dir == &self.uploads && age > UPLOAD_TTL;
                if stale_tmp || stale_upload {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

fn upload_missing() -> StudioError {
    StudioError::not_found("The uploaded image has expired or does not exist; please upload it again.")
}

fn flatten_on_white(img: image::DynamicImage) -> image::RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let mut out = image::RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as u32;
        for c in 0..3 {
            o[c] = ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_store() -> (ImageStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("zimage-store-test-{}", new_id()));
        (ImageStore::open(&dir).unwrap(), dir)
    }

    fn png_bytes(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn ids_are_unguessable_hex() {
        let a = new_id();
        let b = new_id();
        assert!(is_valid_id(&a) && is_valid_id(&b));
        assert_ne!(a, b);
    }

    #[test]
    fn upload_is_resized_and_bad_input_refused() {
        let (store, dir) = tmp_store();
        let info = store.save_upload(&png_bytes(300, 200)).unwrap();
        assert_eq!((info.width, info.height), (768, 512));
        assert_eq!((info.original_width, info.original_height), (300, 200));
        assert_eq!(store.upload_size(&info.upload_id).unwrap(), (768, 512));
        assert_eq!(store.load_upload(&info.upload_id).unwrap().dimensions(), (768, 512));

        let e = store.save_upload(b"hello, this is not an image").unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnsupportedMedia);
        // a PNG signature followed by garbage
        let mut bad = png_bytes(4, 4);
        bad.truncate(20);
        assert_eq!(store.save_upload(&bad).unwrap_err().kind, ErrorKind::InvalidInput);
        assert_eq!(store.upload_size(&new_id()).unwrap_err().kind, ErrorKind::NotFound);
        assert!(store.upload_path("../../etc/passwd").is_none());
        std::fs::remove_dir_all(dir).ok();
    }

    /// A PNG that is only its header and the start of its data: enough for the decoder to size
    /// (and refuse) the image.
    fn png_header_only(w: u32, h: u32, bit_depth: u8, color_type: u8) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in bytes {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 == 1 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
                }
            }
            !c
        }
        let chunk = |kind: &[u8], data: &[u8]| {
            let mut c = (data.len() as u32).to_be_bytes().to_vec();
            let body = [kind, data].concat();
            c.extend_from_slice(&body);
            c.extend_from_slice(&crc32(&body).to_be_bytes());
            c
        };
        let mut ihdr = [w.to_be_bytes(), h.to_be_bytes()].concat();
        ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
        [b"\x89PNG\r\n\x1a\n".to_vec(), chunk(b"IHDR", &ihdr), chunk(b"IDAT", &[0x78, 0x9c]), chunk(b"IEND", &[])].concat()
    }

    #[test]
    fn a_large_upload_is_shrunk_in_its_own_colour_type_and_an_oversized_one_refused() {
        let (store, dir) = tmp_store();
        // 8000x6000 grey (48 MB decoded; 144 MB if it were converted to RGB at full size first):
        // dark left half, bright right half
        let grey = image::GrayImage::from_fn(8000, 6000, |x, _| image::Luma([if x < 4000 { 20 } else { 230 }]));
        let mut png = Vec::new();
        grey.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        drop(grey);
        let info = store.save_upload(&png).unwrap();
        assert_eq!((info.original_width, info.original_height), (8000, 6000));
        let (w, h) = (info.width, info.height);
        assert_eq!((w, h), transform_size(8000, 6000));
        let img = store.load_upload(&info.upload_id).unwrap();
        assert_eq!(img.dimensions(), (w, h));
        assert_eq!(img.get_pixel(w / 8, h / 2).0, [20, 20, 20], "left half dark");
        assert_eq!(img.get_pixel(w - w / 8, h / 2).0, [230, 230, 230], "right half bright");

        // 16-bit RGBA 6000x6000 takes 288 MB decoded: over the bound, refused before decoding
        let e = store.save_upload(&png_header_only(6000, 6000, 16, 6)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PayloadTooLarge, "{e:?}");
        assert!(e.reason.contains("256 MiB once decoded"), "{}", e.reason);
        // over the side limit, even if small once decoded
        let e = store.save_upload(&png_header_only(30000, 2, 8, 0)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PayloadTooLarge, "{e:?}");
        std::fs::remove_dir_all(dir).ok();
    }
}
