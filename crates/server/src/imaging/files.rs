//! The DICOM files in the data directory, content-addressed: a file is
//! named by the SHA-256 of its bytes, so a file is never overwritten with
//! other content, and storing the same bytes twice writes once.
//!
//! A file is written to a temporary name, synced, renamed into place and
//! its directory synced, before the index row that names it commits: an
//! acknowledged instance has its file on disk. A crash between the two
//! leaves an unreferenced file, never a row without its file.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::Digest;

/// Where instance files and thumbnails live.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Files under `root` (created when missing).
    pub fn open(root: PathBuf) -> anyhow::Result<FileStore> {
        std::fs::create_dir_all(root.join("objects"))?;
        std::fs::create_dir_all(root.join("thumbnails"))?;
        std::fs::create_dir_all(root.join("tmp"))?;
        Ok(FileStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes `bytes` under their SHA-256 (hex) `sha`; the path relative to
    /// the root. Blocking: call from a blocking thread.
    pub fn put_object(&self, sha: &str, bytes: &[u8]) -> std::io::Result<String> {
        let rel = format!("objects/{}/{sha}.dcm", &sha[..2]);
        let path = self.root.join(&rel);
        if path.exists() {
            return Ok(rel);
        }
        let dir = path.parent().expect("an object path has a directory");
        std::fs::create_dir_all(dir)?;
        self.write_atomically(&path, bytes)?;
        Ok(rel)
    }

    /// A series' thumbnail (PNG), replaced atomically. Blocking.
    pub fn put_thumbnail(&self, series_uid: &str, png: &[u8]) -> std::io::Result<()> {
        let path = self.thumbnail_path(series_uid);
        self.write_atomically(&path, png)
    }

    pub fn thumbnail_path(&self, series_uid: &str) -> PathBuf {
        let h = hex::encode(sha2::Sha256::digest(series_uid.as_bytes()));
        self.root
            .join("thumbnails")
            .join(format!("{}.png", &h[..32]))
    }

    pub fn path_of(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}.part", uuid::Uuid::new_v4().simple()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Where the dataset starts in a Part 10 file: after the preamble, `DICM`
/// and the file meta group, whose length its first element, (0002,0000)
/// File Meta Information Group Length, gives. `None` when that element is
/// not where the standard puts it.
pub fn dataset_offset(part10: &[u8]) -> Option<usize> {
    let head = part10.get(132..144)?;
    if &part10.get(128..132)? != b"DICM" || head[..4] != [2, 0, 0, 0] || &head[4..6] != b"UL" {
        return None;
    }
    let len = u32::from_le_bytes(head[8..12].try_into().ok()?) as usize;
    let end = 144usize.checked_add(len)?;
    (end <= part10.len()).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dataset_starts_after_the_meta_group_it_announces() {
        let mut f = vec![0u8; 128];
        f.extend_from_slice(b"DICM");
        f.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0]);
        f.extend_from_slice(&10u32.to_le_bytes());
        f.extend_from_slice(&[0xAA; 10]);
        f.extend_from_slice(b"dataset");
        assert_eq!(dataset_offset(&f), Some(154));
        assert_eq!(&f[154..], b"dataset");
        // A length past the end, a missing magic, a missing group length.
        let mut long = f.clone();
        long[140..144].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(dataset_offset(&long), None);
        let mut magic = f.clone();
        magic[128] = b'X';
        assert_eq!(dataset_offset(&magic), None);
        assert_eq!(dataset_offset(&f[..140]), None);
    }

    #[test]
    fn objects_are_content_addressed_and_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FileStore::open(dir.path().to_path_buf()).unwrap();
        let sha = sha256_hex(b"one");
        let rel = fs.put_object(&sha, b"one").unwrap();
        assert_eq!(std::fs::read(fs.path_of(&rel)).unwrap(), b"one");
        // Same name again: the file is kept, not rewritten.
        let again = fs.put_object(&sha, b"one").unwrap();
        assert_eq!(rel, again);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
